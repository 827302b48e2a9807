//! `kiln-frontend-dockerfile` as a program: a request on stdin gives a
//! response on stdout, and a bad first line is an error exit, not a panic.

use std::io::{BufReader, Write};
use std::process::{Command, Stdio};

use kiln_frontend::{OfflineHost, Platform, Request};

#[test]
fn the_binary_answers_a_request() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln-frontend-dockerfile"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starts");
    let request = Request {
        definition: b"FROM scratch\nCOPY a /a\n".to_vec(),
        filename: "Dockerfile".into(),
        build_platform: Platform::linux_amd64(),
        multi_platform: false,
        ..Default::default()
    };
    let mut to = child.stdin.take().expect("stdin");
    let mut from = BufReader::new(child.stdout.take().expect("stdout"));
    let response = kiln_frontend_stdio::run(&mut to, &mut from, &request, &OfflineHost, None, |_| {}).expect("response");
    drop(to);
    assert!(child.wait().expect("exit").success());
    assert_eq!(response.definition, kiln_dockerfile::compile(&request, &OfflineHost).definition);
    assert!(response.definition.is_some());

    let mut bad = Command::new(env!("CARGO_BIN_EXE_kiln-frontend-dockerfile"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts");
    bad.stdin.take().expect("stdin").write_all(b"not json\n").expect("write");
    let out = bad.wait_with_output().expect("exit");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a request"));
}
