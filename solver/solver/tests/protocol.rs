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

/// Starts the solver on a private root named after `name`, stdio piped.
fn start(name: &str) -> std::process::Child {
    let root = std::env::temp_dir().join(format!("kiln-solver-{name}-{}", std::process::id()));
    Command::new(env!("CARGO_BIN_EXE_kiln-solver"))
        .arg("--root")
        .arg(&root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("solver starts")
}

/// Waits for the solver: its exit code, events and stderr.
fn finish(child: std::process::Child) -> (i32, Vec<Event>, String) {
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

fn solve(input: &[u8]) -> (i32, Vec<Event>, String) {
    let mut child = start("protocol");
    child.stdin.take().expect("stdin").write_all(input).expect("write");
    finish(child)
}

/// The solver ended with a `request` error mentioning `needle`, exit 2.
fn assert_request_failure((code, events, stderr): &(i32, Vec<Event>, String), needle: &str) {
    assert_eq!(*code, 2, "exit code for bad request; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    match events.last() {
        Some(Event::Error { kind, message, .. }) => {
            assert_eq!(*kind, ErrorKind::Request);
            assert!(message.contains(needle), "{message:?} should mention {needle:?}");
        }
        other => panic!("last event should be an error, got {other:?}"),
    }
}

/// `input` is refused: hello first, then the request error.
fn assert_request_error(input: &[u8], needle: &str) {
    let outcome = solve(input);
    assert_request_failure(&outcome, needle);
    assert!(matches!(outcome.1.first(), Some(Event::Hello { version: 1 })), "{:?}", outcome.1);
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
fn an_endless_request_is_refused_at_the_limit() {
    let mut child = start("endless");
    let mut stdin = child.stdin.take().expect("stdin");
    // Writes until the solver stops reading (a broken pipe), or twice the limit.
    let writer = std::thread::spawn(move || {
        let chunk = vec![b' '; 1 << 20];
        let mut written = 0usize;
        while written < 2 * kiln_solver_protocol::MAX_REQUEST_BYTES && stdin.write_all(&chunk).is_ok() {
            written += chunk.len();
        }
        written
    });
    let outcome = finish(child);
    let written = writer.join().expect("writer");
    assert!(
        written < 2 * kiln_solver_protocol::MAX_REQUEST_BYTES,
        "the solver read on past its limit ({written} bytes)"
    );
    assert_request_failure(&outcome, "over the 256 MiB limit");
    assert!(matches!(outcome.1.first(), Some(Event::Hello { version: 1 })), "{:?}", outcome.1);
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

/// Solves `state` with `runtime` as the OCI runtime; returns the exit code and
/// the failed vertex's stage and message.
fn failure_of(state: &State, runtime: &str) -> (i32, Option<kiln_solver_protocol::FailureStage>, String) {
    let def = prost::Message::encode_to_vec(&state.marshal(Vec::new()));
    let mut req = SolveRequest::new(&def);
    req.oci_runtime = Some(runtime.into());
    let (code, events, stderr) = solve(&serde_json::to_vec(&req).expect("json"));
    assert!(!stderr.contains("panicked"), "{stderr}");
    let failed = events.iter().find_map(|e| match e {
        Event::VertexFailed { stage, error, .. } => Some((*stage, error.clone())),
        _ => None,
    });
    let (stage, message) = failed.unwrap_or_else(|| panic!("no vertex failed: {events:?}"));
    assert!(
        matches!(
            events.last(),
            Some(Event::Error {
                kind: ErrorKind::Vertex,
                ..
            })
        ),
        "{events:?}"
    );
    (code, stage, message)
}

#[test]
fn failures_say_which_cause_and_stage() {
    use kiln_llb::builder::{Exec, FileInput, FileOp};
    use kiln_llb::pb;
    use kiln_solver_protocol::FailureStage;
    if !kiln_test_support::root("failures_say_which_cause_and_stage", "overlayfs mounts") {
        return;
    }
    // A runtime that is not installed: set-up, not the step's own failure.
    let step = State::scratch().run(
        Exec {
            meta: pb::Meta {
                args: vec!["/bin/true".into()],
                cwd: "/".into(),
                ..Default::default()
            },
            ..Default::default()
        },
        Default::default(),
    );
    let (code, stage, message) = failure_of(&step.root, "/nonexistent/runc");
    assert_eq!((code, stage), (1, Some(FailureStage::Setup)), "{message}");
    assert!(message.contains("cannot start the OCI runtime \"/nonexistent/runc\""), "{message}");

    // A copy of a path that is not there: the file stage, naming the path.
    let copy = State::file(
        FileOp::default().then(
            &State::scratch(),
            FileInput::State(State::scratch()),
            pb::file_action::Action::Copy(pb::FileActionCopy {
                src: "/missing".into(),
                dest: "/to".into(),
                mode: -1,
                timestamp: -1,
                ..Default::default()
            }),
        ),
        Default::default(),
    );
    let (code, stage, message) = failure_of(&copy, "runc");
    assert_eq!((code, stage), (1, Some(FailureStage::File)), "{message}");
    assert!(message.contains("/missing"), "{message}");
}
