//! The solver's stdin/stdout contract on bad input: an error event and a
//! non-zero exit, never a panic.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test helper that panics fails its test with the message"
)]

use std::io::Write;
use std::process::{Command, Stdio};

use kiln_llb::builder::State;
use kiln_solver_protocol::{ErrorKind, Event, SolveRequest};

fn solve(input: &[u8]) -> (i32, Vec<Event>, String) {
    let root = std::env::temp_dir().join(format!("kiln-solver-protocol-{}", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln-solver"))
        .arg("--root")
        .arg(&root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("solver starts");
    child.stdin.take().expect("stdin").write_all(input).expect("write");
    let out = child.wait_with_output().expect("wait");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let events = stdout
        .lines()
        .map(|l| Event::from_line(l).unwrap_or_else(|e| panic!("not an event line {l:?}: {e}")))
        .collect();
    (
        out.status.code().unwrap_or(-1),
        events,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_request_error(input: &[u8], needle: &str) {
    let (code, events, stderr) = solve(input);
    assert_eq!(code, 2, "exit code for bad request; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(matches!(events.first(), Some(Event::Hello { version: 1 })), "{events:?}");
    match events.last() {
        Some(Event::Error { kind, message, .. }) => {
            assert_eq!(*kind, ErrorKind::Request);
            assert!(message.contains(needle), "{message:?} should mention {needle:?}");
        }
        other => panic!("last event should be an error, got {other:?}"),
    }
}

#[test]
fn malformed_requests_are_errors_not_panics() {
    assert_request_error(b"", "not valid");
    assert_request_error(b"{\"version\":1,\"definition\":\"AAA", "not valid");
    assert_request_error(b"not json at all", "not valid");
    assert_request_error(br#"{"version":1,"definition":"!!!"}"#, "base64");
    assert_request_error(br#"{"version":99,"definition":""}"#, "version 99");
    // Valid base64, not a Definition.
    assert_request_error(br#"{"version":1,"definition":"/////w=="}"#, "definition");
}

#[test]
fn truncated_and_dangling_definitions_are_rejected() {
    let st = State::source("local://context", Default::default(), None, Default::default());
    let bytes = prost::Message::encode_to_vec(&st.marshal(Vec::new()));
    for cut in [1, bytes.len() / 2, bytes.len() - 1] {
        let req = serde_json::to_vec(&SolveRequest::new(&bytes[..cut])).expect("json");
        assert_request_error(&req, "definition");
    }
    // Only the terminator: its input dangles.
    let mut def = st.marshal(Vec::new());
    def.def.remove(0);
    let req = serde_json::to_vec(&SolveRequest::new(&prost::Message::encode_to_vec(&def))).expect("json");
    assert_request_error(&req, "definition");
}
