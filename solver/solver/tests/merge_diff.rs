//! MergeOp and DiffOp through the real solver: merge(A, diff(A, B)) has B's
//! files, and deletions travel as whiteouts.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test helper that panics fails its test with the message"
)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use kiln_llb::builder::{FileInput, FileOp, State};
use kiln_llb::pb;
use kiln_llb::pb::file_action::Action;
use kiln_solver_protocol::{Event, Exporter, SolveRequest};

fn mkfile(path: &str, data: &str) -> Action {
    Action::Mkfile(pb::FileActionMkFile {
        path: path.into(),
        mode: 0o644,
        data: data.as_bytes().to_vec(),
        timestamp: -1,
        ..Default::default()
    })
}

fn rm(path: &str) -> Action {
    Action::Rm(pb::FileActionRm {
        path: path.into(),
        ..Default::default()
    })
}

fn files(state: &State, actions: Vec<Action>) -> State {
    let mut op = FileOp::default();
    for a in actions {
        op = op.then(state, FileInput::Empty, a);
    }
    State::file(op, Default::default())
}

/// Solves `state` and exports its filesystem to a directory; returns the relative paths.
fn export(name: &str, state: &State) -> Vec<String> {
    let dir = std::env::temp_dir().join(format!("kiln-merge-diff-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let def = prost::Message::encode_to_vec(&state.marshal(Vec::new()));
    let mut req = SolveRequest::new(&def);
    req.exporters.push(Exporter::Local {
        dest: dir.join("out").to_string_lossy().into_owned(),
    });
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln-solver"))
        .arg("--root")
        .arg(dir.join("root"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("solver");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&serde_json::to_vec(&req).expect("json"))
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        matches!(text.lines().last().map(Event::from_line), Some(Ok(Event::Result(_)))),
        "{text}"
    );
    let mut paths = Vec::new();
    walk(&dir.join("out"), &dir.join("out"), &mut paths);
    paths.sort();
    let _ = std::fs::remove_dir_all(&dir);
    paths
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        let rel = p.strip_prefix(root).expect("prefix").to_string_lossy().into_owned();
        if p.is_dir() {
            out.push(format!("{rel}/"));
            walk(root, &p, out);
        } else {
            let content = std::fs::read_to_string(&p).unwrap_or_default();
            out.push(format!("{rel}={content}"));
        }
    }
}

fn is_root() -> bool {
    kiln_test_support::root("merge_diff", "overlayfs mounts")
}

#[test]
fn merge_of_a_diff_replays_the_changes() {
    if !is_root() {
        return;
    }
    let base = files(
        &State::scratch(),
        vec![
            mkfile("/a", "A"),
            Action::Mkdir(pb::FileActionMkDir {
                path: "/d".into(),
                mode: 0o755,
                timestamp: -1,
                ..Default::default()
            }),
            mkfile("/d/keep", "K"),
        ],
    );
    let changed = files(&base, vec![mkfile("/c", "C"), rm("/a"), mkfile("/d/new", "N")]);
    assert_eq!(export("changed", &changed), ["c=C", "d/", "d/keep=K", "d/new=N"]);

    // The diff alone: only what changed (the deletion is a whiteout, invisible here).
    let delta = State::diff(&base, &changed, Default::default());
    assert_eq!(export("delta", &delta), ["c=C", "d/", "d/new=N"]);

    // merge(other, base, diff(base, changed)) = other's files + changed.
    let other = files(&State::scratch(), vec![mkfile("/o", "O")]);
    let merged = State::merge(&[other.clone(), base.clone(), delta], Default::default());
    assert_eq!(export("merged", &merged), ["c=C", "d/", "d/keep=K", "d/new=N", "o=O"]);

    // A diff whose lower is not below its upper is computed by comparing the trees.
    let cross = State::diff(&other, &changed, Default::default());
    let replay = State::merge(&[other, cross], Default::default());
    assert_eq!(export("replay", &replay), ["c=C", "d/", "d/keep=K", "d/new=N"]);
}
