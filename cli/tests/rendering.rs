//! Golden renderings (insta snapshots under `snapshots/rendering/`): the
//! plain and tty progress of a build with a cached step, a step with output,
//! a pull and a failing step, on a fixed clock; `dump-llb --format dot`; and
//! `kiln du`'s table at a fixed time.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test helper that panics fails its test with the message"
)]

mod common;

use std::cell::Cell;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use kiln_cli::progress::{Clock, Mode, Renderer};
use kiln_solver_protocol::{Event, Explanation, FailureStage, RecordUsage, SolveResult, Usage};

/// A clock that moves 70 ms each time it is read.
struct Steps(Rc<Cell<u64>>);

impl Clock for Steps {
    fn now(&self) -> Duration {
        let t = self.0.get() + 70;
        self.0.set(t);
        Duration::from_millis(t)
    }
}

fn events() -> Vec<Event> {
    let d = |n: u8| format!("sha256:{}", n.to_string().repeat(64));
    vec![
        Event::VertexCached {
            digest: d(1),
            name: "[internal] load build context".into(),
            at_ms: 0,
        },
        Event::VertexStarted {
            digest: d(2),
            name: "[build 1/3] FROM docker.io/library/busybox:latest".into(),
            at_ms: 1,
            explain: None,
        },
        Event::Progress {
            digest: Some(d(2)),
            id: "sha256:aaaa".into(),
            current: 100,
            total: 100,
            done: true,
        },
        Event::VertexCompleted {
            digest: d(2),
            at_ms: 90,
            duration_ms: 89,
        },
        Event::VertexStarted {
            digest: d(3),
            name: "[build 2/3] RUN make".into(),
            at_ms: 91,
            explain: Some(Explanation {
                reason: "context files changed: Makefile, src/main.c".into(),
                because_of: None,
            }),
        },
        Event::Log {
            digest: d(3),
            stream: 1,
            data: "cc -O2 -c main.c\ncc -o app main".into(),
        },
        Event::Log {
            digest: d(3),
            stream: 1,
            data: ".o\n".into(),
        },
        Event::VertexCompleted {
            digest: d(3),
            at_ms: 1391,
            duration_ms: 1300,
        },
        Event::VertexStarted {
            digest: d(4),
            name: "[build 3/3] RUN make test".into(),
            at_ms: 1392,
            explain: Some(Explanation {
                reason: Explanation::UPSTREAM.into(),
                because_of: Some(d(3)),
            }),
        },
        Event::Log {
            digest: d(4),
            stream: 2,
            data: "FAIL: test_parse\n".into(),
        },
        Event::VertexFailed {
            digest: d(4),
            at_ms: 1500,
            duration_ms: 108,
            error: "process \"/bin/sh -c make test\" did not complete successfully: exit code: 2".into(),
            exit_code: Some(2),
            stage: Some(FailureStage::Run),
        },
        Event::Result(SolveResult::default()),
    ]
}

fn render(mode: Mode) -> String {
    let mut r = Renderer::with_clock(mode, Box::new(Steps(Rc::new(Cell::new(0)))), Some(80));
    let mut out = Vec::new();
    for ev in events() {
        r.event(&ev, &ev.to_line(), &mut out);
    }
    r.finish(&mut out);
    String::from_utf8(out).expect("utf8").replace('\x1b', "<ESC>")
}

fn settings() -> insta::Settings {
    let mut s = insta::Settings::clone_current();
    s.set_snapshot_path(Path::new(env!("CARGO_MANIFEST_DIR")).join("../snapshots/rendering"));
    s.set_prepend_module_to_snapshot(false);
    s
}

#[test]
fn plain_progress() {
    settings().bind(|| insta::assert_snapshot!("progress-plain", render(Mode::Plain)));
}

#[test]
fn tty_progress() {
    settings().bind(|| insta::assert_snapshot!("progress-tty", render(Mode::Tty)));
}

#[test]
fn dump_llb_as_dot() {
    let dir = common::scratch_dir("dot");
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM alpine AS build\nRUN --mount=type=cache,target=/root/.cache make\nCOPY src/ /src/\nFROM scratch\nCOPY --from=build /out /\n",
    )
    .expect("write");
    let out = common::kiln(&["dump-llb", "--no-resolve", "--format", "dot", "."], &dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    settings().bind(|| insta::assert_snapshot!("dump-llb-dot", String::from_utf8(out.stdout).expect("utf8")));
}

#[test]
fn du_table() {
    let now = 1_800_000_000;
    let record = |key: &str, description: &str, size: u64, ago: u64| RecordUsage {
        key: key.into(),
        description: description.into(),
        size,
        last_used: now - ago,
        created: now - ago - 60,
    };
    let usage = Usage {
        records: vec![
            record(
                "sha256:3f1c9a0d5e7b2c4f6a8d0e1b3c5d7f9a2b4c6d8e0f1a3b5c7d9e1f2a4b6c8d0e",
                "[build 2/3] RUN make",
                48_213_504,
                12,
            ),
            record("sha256:77", "docker-image://127.0.0.1:5000/busybox:latest", 2_203_648, 5 * 60),
            record(
                "sha256:a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0",
                &format!("[stage-1 4/4] RUN {}", "apt-get install -y --no-install-recommends ".repeat(3)),
                512,
                3 * 3600,
            ),
            record("sha256:0b", "local://context", 0, 9 * 86400),
        ],
        layers: 50_417_664,
        blobs: 19_005_440,
        cache_mounts: 1_250_000_000,
    };
    let mut out = Vec::new();
    kiln_cli::commands::du::render_usage(&usage, now, &mut out);
    settings().bind(|| insta::assert_snapshot!("du", String::from_utf8(out).expect("utf8")));
}
