//! `kiln-solver [--root DIR]`: one solve request on stdin, events on stdout.
//! See solver/PROTOCOL.md.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kiln_solver::scheduler::EventSink;
use kiln_solver_protocol::{ErrorKind, Event};

/// Hashing a big context and walking layers allocate a lot; mimalloc is faster at it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    if let Some(p) = std::env::var_os("KILN_ROOT") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(p).join("kiln");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".local/share/kiln")
}

fn main() {
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
                println!("usage: kiln-solver [--root DIR] < request.json\nReads one solve request on stdin and writes JSON-lines events on stdout (solver/PROTOCOL.md).");
                return;
            }
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    let sink: Arc<dyn EventSink> = Arc::new(Stdout(Mutex::new(std::io::stdout())));
    let mut request = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut request) {
        sink.emit(Event::Error {
            message: format!("reading the request from stdin: {e}"),
            digest: None,
            kind: ErrorKind::Request,
        });
        std::process::exit(kiln_solver::exit::REQUEST);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kiln-solver: cannot start the async runtime: {e}");
            std::process::exit(kiln_solver::exit::INTERNAL);
        }
    };
    let code = rt.block_on(async {
        let solve = kiln_solver::run(&request, root, sink.clone());
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("kiln-solver: cannot watch SIGTERM: {e}");
                return kiln_solver::exit::INTERNAL;
            }
        };
        tokio::select! {
            code = solve => code,
            _ = tokio::signal::ctrl_c() => interrupted(&sink),
            _ = term.recv() => interrupted(&sink),
        }
    });
    // Dropping the runtime ends any step still running; their guards remove
    // containers and mounts.
    rt.shutdown_timeout(std::time::Duration::from_secs(10));
    std::process::exit(code);
}

fn interrupted(sink: &Arc<dyn EventSink>) -> i32 {
    sink.emit(Event::Error {
        message: "interrupted".into(),
        digest: None,
        kind: ErrorKind::Internal,
    });
    kiln_solver::exit::INTERNAL
}

fn usage(msg: &str) -> ! {
    eprintln!("kiln-solver: {msg}\nusage: kiln-solver [--root DIR] < request.json");
    std::process::exit(2);
}
