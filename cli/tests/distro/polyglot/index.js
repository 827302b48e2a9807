const isNumber = require("is-number");

console.log("node ok", isNumber(5));
