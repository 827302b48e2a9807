//! The native `kiln-frontend-steps` binary answers a request over the
//! frontend protocol (this test also makes `cargo test --workspace` build it
//! for the CLI's end-to-end tests).

use std::io::{BufReader, Write};
use std::process::{Command, Stdio};

use kiln_guest::{OfflineHost, Platform, Request};

#[test]
fn the_binary_compiles_a_stepfile_over_stdio() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln-frontend-steps"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starts");
    let mut to = child.stdin.take().expect("stdin");
    let mut from = BufReader::new(child.stdout.take().expect("stdout"));
    let request = Request {
        definition: b"base scratch\nfile /hello hi\\n\ncmd cat /hello\n".to_vec(),
        filename: "Stepfile".into(),
        build_platform: Platform::linux_amd64(),
        multi_platform: false,
        ..Default::default()
    };
    let response = kiln_frontend_stdio::run(&mut to, &mut from, &request, &OfflineHost, None, |_| {}).expect("response");
    to.flush().expect("flush");
    drop(to);
    assert!(child.wait().expect("exits").success());
    assert!(response.diagnostics.is_empty(), "{:?}", response.diagnostics);
    let config = response.image_config.expect("config");
    assert_eq!(config.config.cmd, Some(vec!["cat".to_string(), "/hello".to_string()]));
    let def = response.definition.expect("definition");
    assert_eq!(def.def.len(), 2, "one mkfile and the terminator");
}
