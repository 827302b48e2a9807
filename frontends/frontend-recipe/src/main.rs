//! kiln's recipe frontend as a standalone program speaking the frontend
//! protocol on stdin/stdout.

fn main() {
    kiln_frontend_stdio::serve_stdio("kiln-frontend-recipe", kiln_recipe::compile)
}
