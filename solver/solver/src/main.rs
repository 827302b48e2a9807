//! `kiln-solver [--root DIR]`: one solve request on stdin, events on stdout.
//! See solver/PROTOCOL.md.
//!
//! It uses the system allocator: a warm build is mostly process start and
//! exit, where mimalloc's arena set-up and per-thread heaps cost ~200 page
//! faults and about 1 ms (a ninth of a warm build), and the cold benches
//! (bench/solver.sh: copyheavy, bigctx, parallel, deepchain) ran no faster
//! with it.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kiln_solver::EventSink;
use kiln_solver_protocol::{ErrorKind, Event};
use tokio::signal::unix::SignalKind;

/// Writes each event as one line on stdout, flushed at once.
struct Stdout(Mutex<std::io::Stdout>);

impl EventSink for Stdout {
    fn emit(&self, event: Event) {
        let line = event.to_line();
        if let Ok(mut out) = self.0.lock() {
            // A closed stdout (the CLI went away) must not stop the cleanup.
            let _ = out.write_all(line.as_bytes());
            let _ = out.flush();
        }
    }
}

fn default_root() -> PathBuf {
    kiln_solver_protocol::default_state_root()
}

/// `kiln-solver du|prune|gc`: the state root's maintenance, JSON on stdout.
fn maintenance(cmd: &str, args: &[String]) -> i32 {
    let mut root = default_root();
    let mut policy = kiln_solver::gc::Policy::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |what: &str| it.next().cloned().unwrap_or_else(|| usage(&format!("{a} needs {what}")));
        match a.as_str() {
            "--root" => root = PathBuf::from(value("a directory")),
            "--all" => policy.all = true,
            "--until" => {
                let v = value("a duration");
                policy.unused_for = Some(
                    kiln_solver::gc::parse_duration(&v)
                        .unwrap_or_else(|| usage(&format!("--until {v:?}: expected e.g. 90s, 30m, 24h, 7d"))),
                );
            }
            "--keep-storage" => {
                let v = value("a size");
                policy.keep_bytes = Some(
                    kiln_solver::gc::parse_size(&v).unwrap_or_else(|| usage(&format!("--keep-storage {v:?}: expected e.g. 500M, 10G"))),
                );
            }
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    let print = |v: &dyn erased::Json| println!("{}", v.to_json());
    match cmd {
        "du" => {
            print(&kiln_solver::gc::usage(&root));
            0
        }
        "prune" | "gc" => {
            let wait = cmd == "prune";
            if wait && kiln_solver::StateRoot::lock_exclusive(&root, false).ok().flatten().is_none() {
                eprintln!("kiln-solver: waiting for running builds to finish");
            }
            let lock = match kiln_solver::StateRoot::lock_exclusive(&root, true) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("kiln-solver: {}: {e}", root.display());
                    return kiln_solver::exit::INTERNAL;
                }
            };
            let report = if cmd == "gc" {
                kiln_solver::gc::collect(&root).unwrap_or_default()
            } else {
                kiln_solver::gc::prune(&root, &policy)
            };
            drop(lock);
            print(&report);
            0
        }
        _ => usage("unknown command"),
    }
}

/// Serialising the maintenance results without naming their types twice.
mod erased {
    /// Anything printable as one JSON line.
    pub(crate) trait Json {
        /// The JSON text.
        fn to_json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> String {
            serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
        }
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let maintaining = argv.first().is_some_and(|c| ["du", "prune", "gc"].contains(&c.as_str()));
    let informing = argv.iter().any(|a| ["--version", "-h", "--help"].contains(&a.as_str()));
    // A user other than root builds in a user namespace of its own.
    let rootless_failed = |e: kiln_solver::rootless::RootlessError| -> ! {
        if maintaining {
            eprintln!("kiln-solver: {e}");
        } else {
            let out = Stdout(Mutex::new(std::io::stdout()));
            out.emit(Event::Hello {
                version: kiln_solver_protocol::VERSION,
            });
            out.emit(Event::Error {
                message: e.to_string(),
                digest: None,
                kind: ErrorKind::Internal,
            });
        }
        std::process::exit(kiln_solver::exit::INTERNAL);
    };
    if let Err(e) = kiln_solver::rootless::enter_if_inner() {
        rootless_failed(e);
    }
    if kiln_solver::rootless::needed() && !informing {
        let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM));
        match kiln_solver::rootless::run_inside() {
            Ok(code) => std::process::exit(code),
            Err(e) => rootless_failed(e),
        }
    }
    if let Some(cmd) = argv.first().filter(|_| maintaining) {
        std::process::exit(maintenance(cmd, &argv[1..]));
    }
    let mut root = default_root();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--root" => match args.next() {
                Some(p) => root = PathBuf::from(p),
                None => usage("--root needs a directory"),
            },
            "--version" => {
                println!(
                    "kiln-solver {} (protocol {})",
                    env!("CARGO_PKG_VERSION"),
                    kiln_solver_protocol::VERSION
                );
                return;
            }
            "-h" | "--help" => {
                println!(
                    "usage: kiln-solver [--root DIR] < request.json\n       kiln-solver du|gc [--root DIR]\n       kiln-solver prune [--root DIR] [--all] [--until DURATION] [--keep-storage SIZE]\nReads one solve request on stdin and writes JSON-lines events on stdout (solver/PROTOCOL.md)."
                );
                return;
            }
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    // A client that dies without stopping the solve (SIGKILL) still stops it.
    let parent = rustix::process::getppid();
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM));
    if rustix::process::getppid() != parent {
        std::process::exit(kiln_solver::exit::INTERNAL);
    }
    // The runtime starts while the request is still being written.
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kiln-solver: cannot start the async runtime: {e}");
            std::process::exit(kiln_solver::exit::INTERNAL);
        }
    };
    let sink: Arc<dyn EventSink> = Arc::new(Stdout(Mutex::new(std::io::stdout())));
    // The first line, before the request is read: a request refused while
    // being read is reported after it too.
    sink.emit(Event::Hello {
        version: kiln_solver_protocol::VERSION,
    });
    let mut request = Vec::new();
    let limit = kiln_solver_protocol::MAX_REQUEST_BYTES;
    let read = std::io::stdin().take(limit as u64 + 1).read_to_end(&mut request);
    let problem = match read {
        Err(e) => Some(format!("reading the request from stdin: {e}")),
        Ok(n) if n > limit => Some(format!("the request on stdin is over the {} MiB limit", limit >> 20)),
        Ok(_) => None,
    };
    if let Some(message) = problem {
        sink.emit(Event::Error {
            message,
            digest: None,
            kind: ErrorKind::Request,
        });
        std::process::exit(kiln_solver::exit::REQUEST);
    }
    let root_for_gc = root.clone();
    let code = rt.block_on(async {
        let solve = kiln_solver::run(&request, root, sink.clone());
        let watch = |kind: SignalKind| tokio::signal::unix::signal(kind);
        let (mut int, mut term, mut hup) = match (
            watch(SignalKind::interrupt()),
            watch(SignalKind::terminate()),
            watch(SignalKind::hangup()),
        ) {
            (Ok(i), Ok(t), Ok(h)) => (i, t, h),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                eprintln!("kiln-solver: cannot watch SIGINT/SIGTERM/SIGHUP: {e}");
                return kiln_solver::exit::INTERNAL;
            }
        };
        tokio::select! {
            code = solve => code,
            _ = int.recv() => interrupted(&sink, "SIGINT", 2),
            _ = term.recv() => interrupted(&sink, "SIGTERM", 15),
            _ = hup.recv() => interrupted(&sink, "SIGHUP", 1),
        }
    });
    if code == kiln_solver::exit::OK {
        // Nothing is left running after a success.
        rt.shutdown_background();
    } else {
        // Dropping the runtime ends any step still running; their guards
        // remove containers and mounts.
        rt.shutdown_timeout(std::time::Duration::from_secs(10));
        kiln_solver::wait_for_background_work(std::time::Duration::from_secs(10));
    }
    if code == kiln_solver::exit::OK {
        kiln_solver::gc::maybe_start_collector(&root_for_gc);
    }
    std::process::exit(code);
}

/// A signal ends the solve: the caller drops every running step (their
/// guards delete containers and unmount) and exits with 128 + `number`.
fn interrupted(sink: &Arc<dyn EventSink>, name: &str, number: i32) -> i32 {
    sink.emit(Event::Error {
        message: format!("interrupted by {name}"),
        digest: None,
        kind: ErrorKind::Interrupted,
    });
    128 + number
}

fn usage(msg: &str) -> ! {
    eprintln!("kiln-solver: {msg}\nusage: kiln-solver [--root DIR] < request.json");
    std::process::exit(2);
}
