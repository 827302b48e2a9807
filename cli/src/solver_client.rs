//! Starting `kiln-solver`, sending it a request and reading its events.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use kiln_solver_protocol::{Event, SolveRequest};

/// The solver binary: `$KILN_SOLVER`, else `kiln-solver` beside this
/// executable, else on PATH.
pub fn solver_binary() -> PathBuf {
    companion_binary("kiln-solver", "KILN_SOLVER")
}

/// A program installed with kiln: `$ENV` if set, else `name` beside this
/// executable (or one level up, where test binaries find it), else on PATH.
pub fn companion_binary(name: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            let beside = dir.join(name);
            if beside.is_file() {
                return beside;
            }
            // Test binaries live in target/*/deps, the programs one level up.
            if let Some(up) = dir.parent() {
                let p = up.join(name);
                if p.is_file() {
                    return p;
                }
            }
        }
    }
    PathBuf::from(name)
}

/// How a solve ended.
pub struct Outcome {
    /// The solver's exit code.
    pub exit_code: i32,
    /// Lines that were not events (a broken solver), for the error message.
    pub garbage: Vec<String>,
}

/// A solver started ahead of its request, so that it sets itself up while
/// the frontend runs. Dropped unused, it is stopped.
pub struct Started {
    child: Option<Child>,
}

impl Started {
    /// Starts `kiln-solver` on the state root `root`.
    pub fn new(root: &std::path::Path) -> Result<Started, String> {
        let bin = solver_binary();
        let child = Command::new(&bin)
            .arg("--root")
            .arg(root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start the solver {}: {e}", bin.display()))?;
        crate::cancel::solver_started(child.id());
        Ok(Started { child: Some(child) })
    }

    /// Sends the request and reads the events until the solver ends;
    /// `on_event` sees each event as it arrives (`raw` is the line).
    pub fn solve(mut self, request: &SolveRequest, on_event: impl FnMut(&Event, &str)) -> Result<Outcome, String> {
        let mut child = self.child.take().ok_or("the solver is gone")?;
        let outcome = talk(&mut child, request, on_event);
        if outcome.is_err() {
            // It may hold containers and mounts: let it clean up.
            if let Some(pid) = i32::try_from(child.id()).ok().and_then(rustix::process::Pid::from_raw) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
        let status = child.wait().map_err(|e| e.to_string());
        crate::cancel::solver_ended();
        let mut outcome = outcome?;
        outcome.exit_code = status?.code().unwrap_or(-1);
        Ok(outcome)
    }
}

/// Sends the request to `child` and reads its events until it closes its
/// output; the exit code is filled in by the caller.
fn talk(child: &mut Child, request: &SolveRequest, mut on_event: impl FnMut(&Event, &str)) -> Result<Outcome, String> {
    let body = serde_json::to_vec(request).map_err(|e| e.to_string())?;
    if !crate::cancel::solver_busy() {
        return Err("interrupted before the build started".into());
    }
    // A solver that stops before reading (it cannot start: a rootless
    // machine not set up, say) says why in its events: read them first.
    let sent = {
        let mut stdin = child.stdin.take().ok_or("solver has no stdin")?;
        stdin.write_all(&body)
    };
    let stdout = child.stdout.take().ok_or("solver has no stdout")?;
    let mut garbage = Vec::new();
    let mut events = 0usize;
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| format!("reading the solver's output: {e}"))?;
        if line.is_empty() {
            continue;
        }
        match Event::from_line(&line) {
            Ok(ev) => {
                events += 1;
                on_event(&ev, &line);
            }
            Err(_) => garbage.push(line),
        }
    }
    if let Err(e) = sent {
        if events == 0 {
            return Err(format!("sending the request to the solver: {e}"));
        }
    }
    Ok(Outcome { exit_code: -1, garbage })
}

impl Drop for Started {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Nothing was sent: it holds no build state yet.
            let _ = child.kill();
            let _ = child.wait();
            crate::cancel::solver_ended();
        }
    }
}
