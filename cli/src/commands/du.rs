//! `kiln du` and `kiln prune`: the state root's cache records, and removing
//! them least-recently-used first. Both ask `kiln-solver`, which owns the
//! root's layout.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

use kiln_solver_protocol::{PruneReport, Usage};
use serde::de::DeserializeOwned;

use crate::{EXIT_OK, EXIT_OTHER};

/// `kiln du` flags.
#[derive(clap::Args, Debug)]
pub struct DuArgs {
    /// kiln's state root; default $KILN_ROOT or ~/.local/share/kiln.
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Print the solver's JSON.
    #[arg(long)]
    pub json: bool,
}

/// `kiln prune` flags.
#[derive(clap::Args, Debug)]
pub struct PruneArgs {
    /// kiln's state root; default $KILN_ROOT or ~/.local/share/kiln.
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Remove every cache record and cache mount (images in the store stay).
    #[arg(long)]
    pub all: bool,
    /// `until=DURATION`: remove records not used for that long (90s, 30m, 24h, 7d).
    #[arg(long, value_name = "until=DURATION")]
    pub filter: Vec<String>,
    /// Remove least-recently-used records until the root is at most this big (500M, 10G).
    #[arg(long = "keep-storage", value_name = "SIZE")]
    pub keep_storage: Option<String>,
}

/// Runs `kiln-solver ARGS --root ROOT` and reads its JSON answer.
fn solver<T: DeserializeOwned>(args: &[String], root: &Option<PathBuf>, err: &mut dyn Write) -> Result<T, i32> {
    let root = crate::host::state_root(root.as_deref());
    let out = Command::new(crate::solver_client::solver_binary())
        .args(args)
        .arg("--root")
        .arg(&root)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| {
            let _ = writeln!(err, "error: cannot start the solver: {e}");
            EXIT_OTHER
        })?;
    if !out.status.success() {
        let _ = writeln!(err, "error: the solver failed ({:?})", out.status.code());
        return Err(EXIT_OTHER);
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        let _ = writeln!(err, "error: unreadable answer from the solver: {e}");
        EXIT_OTHER
    })
}

/// Runs `kiln du`.
pub fn du(args: &DuArgs, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let usage: Usage = match solver(&["du".to_string()], &args.root, err) {
        Ok(v) => v,
        Err(c) => return c,
    };
    if args.json {
        match serde_json::to_string(&usage) {
            Ok(json) => {
                let _ = writeln!(out, "{json}");
            }
            Err(e) => {
                let _ = writeln!(err, "error: {e}");
                return EXIT_OTHER;
            }
        }
        return EXIT_OK;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    render_usage(&usage, now, out);
    EXIT_OK
}

/// `kiln du`'s table: each record with its size and last use (relative to
/// `now`, seconds since the epoch), then the totals.
pub fn render_usage(usage: &Usage, now: u64, out: &mut dyn Write) {
    let _ = writeln!(out, "{:<20} {:>9} {:>12}  DESCRIPTION", "ID", "SIZE", "LAST USED");
    for r in &usage.records {
        let key = r.key.trim_start_matches("sha256:");
        let ago = now.saturating_sub(r.last_used);
        let ago = match ago {
            0..=59 => format!("{ago}s ago"),
            60..=3599 => format!("{}m ago", ago / 60),
            3600..=86399 => format!("{}h ago", ago / 3600),
            _ => format!("{}d ago", ago / 86400),
        };
        let mut desc: String = r.description.chars().take(70).collect();
        if desc.len() < r.description.len() {
            desc.pop();
            desc.push('…');
        }
        let id: String = key.chars().take(20).collect();
        let _ = writeln!(out, "{id:<20} {:>9} {ago:>12}  {desc}", super::human_size(r.size));
    }
    let _ = writeln!(
        out,
        "layers: {}  blobs: {}  cache mounts: {}  total: {}",
        super::human_size(usage.layers),
        super::human_size(usage.blobs),
        super::human_size(usage.cache_mounts),
        super::human_size(usage.total())
    );
}

/// Runs `kiln prune`.
pub fn prune(args: &PruneArgs, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let mut a = vec!["prune".to_string()];
    if args.all {
        a.push("--all".into());
    }
    for f in &args.filter {
        match f.split_once('=') {
            Some(("until", d)) => {
                a.push("--until".into());
                a.push(d.to_string());
            }
            _ => {
                let _ = writeln!(err, "error: --filter {f:?}: only until=DURATION is supported");
                return crate::EXIT_USAGE;
            }
        }
    }
    if let Some(k) = &args.keep_storage {
        a.push("--keep-storage".into());
        a.push(k.clone());
    }
    let v: PruneReport = match solver(&a, &args.root, err) {
        Ok(v) => v,
        Err(c) => return c,
    };
    let _ = writeln!(
        out,
        "removed {} records, {} layers, {} blobs; freed {}",
        v.records,
        v.layers,
        v.blobs,
        super::human_size(v.freed)
    );
    EXIT_OK
}
