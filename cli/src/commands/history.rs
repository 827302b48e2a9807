//! `kiln history` and `kiln history show ID`: the builds of a state root
//! (`ROOT/history/`, written by the solver), and one build's critical path,
//! waits for a job slot and cache-miss reasons.

use std::io::Write;
use std::path::{Path, PathBuf};

use kiln_solver_protocol::history::{BuildRecord, StepStatus, DIR};

use crate::{EXIT_OK, EXIT_OTHER, EXIT_USAGE};

/// A history file larger than this is not read.
const MAX_RECORD: u64 = 64 << 20;

/// `kiln history` flags.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// kiln's state root; default $KILN_ROOT or ~/.local/share/kiln.
    #[arg(long, global = true)]
    pub root: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// `show ID`, or nothing to list the builds.
    #[command(subcommand)]
    pub show: Option<Show>,
}

/// `kiln history show`.
#[derive(clap::Subcommand, Debug)]
pub enum Show {
    /// One build: its steps, critical path, longest waits and cache-miss reasons.
    Show {
        /// The build's id (a unique prefix will do), or `last`.
        id: String,
    },
}

fn when(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| secs.to_string())
}

fn seconds(ms: u64) -> String {
    format!("{:.2}s", ms as f64 / 1000.0)
}

/// Every build of the history, oldest first; unreadable files are skipped.
fn read_all(dir: &Path) -> Vec<BuildRecord> {
    let mut builds: Vec<BuildRecord> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .filter(|e| e.metadata().is_ok_and(|m| m.len() <= MAX_RECORD))
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
        .collect();
    builds.sort_by(|a: &BuildRecord, b| (a.started, &a.id).cmp(&(b.started, &b.id)));
    builds
}

/// Runs the command.
pub fn run(args: &Args, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let dir = crate::host::state_root(args.root.as_deref()).join(DIR);
    let builds = read_all(&dir);
    match &args.show {
        None => {
            if args.json {
                let _ = writeln!(out, "{}", serde_json::to_string_pretty(&builds).unwrap_or_default());
                return EXIT_OK;
            }
            let _ = writeln!(
                out,
                "{:<20} {:<19} {:>8} {:>4} {:>6}  {:<19} DEFINITION",
                "ID", "STARTED", "DURATION", "RAN", "CACHED", "RESULT"
            );
            for b in &builds {
                let result = match (&b.result, &b.error) {
                    (_, Some(_)) => "failed".to_string(),
                    (Some(d), None) => d.chars().take(19).collect(),
                    (None, None) => "-".to_string(),
                };
                let target = b.target.as_deref().map(|t| format!(" (target {t})")).unwrap_or_default();
                let _ = writeln!(
                    out,
                    "{:<20} {:<19} {:>8} {:>4} {:>6}  {:<19} {}{target}",
                    b.id,
                    when(b.started),
                    seconds(b.duration_ms),
                    b.ran,
                    b.cached,
                    result,
                    b.definition
                );
            }
            EXIT_OK
        }
        Some(Show::Show { id }) => {
            let found: Vec<&BuildRecord> = if id == "last" {
                builds.last().into_iter().collect()
            } else {
                builds.iter().filter(|b| b.id.starts_with(id.as_str())).collect()
            };
            let build = match found.as_slice() {
                [one] => *one,
                [] => {
                    let _ = writeln!(err, "error: no build {id:?} in {} (`kiln history` lists them)", dir.display());
                    return EXIT_OTHER;
                }
                many => {
                    let _ = writeln!(err, "error: {id:?} names {} builds; give more of the id", many.len());
                    return EXIT_USAGE;
                }
            };
            if args.json {
                let _ = writeln!(out, "{}", serde_json::to_string_pretty(build).unwrap_or_default());
                return EXIT_OK;
            }
            show(build, out);
            EXIT_OK
        }
    }
}

/// One build, for people.
fn show(b: &BuildRecord, out: &mut dyn Write) {
    let _ = writeln!(out, "build {}", b.id);
    let _ = writeln!(out, "  started:    {}", when(b.started));
    let _ = writeln!(
        out,
        "  definition: {}{}",
        b.definition,
        b.target.as_deref().map(|t| format!(" (target {t})")).unwrap_or_default()
    );
    if !b.platforms.is_empty() {
        let _ = writeln!(out, "  platforms:  {}", b.platforms.join(", "));
    }
    let _ = writeln!(out, "  duration:   {}", seconds(b.duration_ms));
    let _ = writeln!(out, "  steps:      {} ran, {} cached", b.ran, b.cached);
    match (&b.result, &b.error) {
        (_, Some(e)) => {
            let _ = writeln!(out, "  failed:     {}", e.lines().next().unwrap_or(""));
        }
        (Some(d), None) => {
            let _ = writeln!(out, "  result:     {d}");
        }
        (None, None) => {}
    }
    let path = b.critical_path();
    let total: u64 = path.iter().map(|s| s.duration_ms).sum();
    let _ = writeln!(out, "\ncritical path ({} steps, {} of running):", path.len(), seconds(total));
    for s in &path {
        let queued = b.steps.iter().find(|r| r.digest == s.digest).map(|r| r.queued_ms).unwrap_or(0);
        let waited = if queued > 0 {
            format!(" (after {} waiting for a job slot)", seconds(queued))
        } else {
            String::new()
        };
        let _ = writeln!(out, "  {:>8}  {}{waited}", seconds(s.duration_ms), s.name);
    }
    let waits = b.longest_waits(5);
    if !waits.is_empty() {
        let _ = writeln!(out, "\nlongest waits for a job slot:");
        for s in waits {
            let _ = writeln!(out, "  {:>8}  {}", seconds(s.queued_ms), s.name);
        }
    }
    let number = |digest: &str| b.steps.iter().position(|s| s.digest == digest).map(|i| i + 1);
    let ran: Vec<(usize, &kiln_solver_protocol::history::StepRecord)> = b
        .steps
        .iter()
        .enumerate()
        .filter(|(_, s)| matches!(s.status, StepStatus::Ran | StepStatus::Failed))
        .map(|(i, s)| (i + 1, s))
        .collect();
    if !ran.is_empty() {
        let _ = writeln!(out, "\nsteps that ran, and why:");
        for (n, s) in ran {
            let why = match &s.explain {
                Some(e) => match e.because_of.as_deref().and_then(number) {
                    Some(up) => match e.besides_upstream() {
                        Some(rest) => format!("because of step #{up}; {rest}"),
                        None => format!("because of step #{up}"),
                    },
                    None => e.reason.clone(),
                },
                None => "(no reason recorded)".into(),
            };
            let failed = if s.status == StepStatus::Failed { " FAILED" } else { "" };
            let _ = writeln!(out, "  #{n} {} ({}{failed})", s.name, seconds(s.duration_ms));
            let _ = writeln!(out, "      {why}");
        }
    }
}
