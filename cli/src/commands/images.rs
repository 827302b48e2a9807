//! `kiln images`: the images in kiln's store (`ROOT/store/index.json`).

use std::io::Write;
use std::path::PathBuf;

use serde_json::Value;

use crate::{EXIT_OK, EXIT_OTHER};

/// `kiln images` flags.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// kiln's state root; default $KILN_ROOT or ~/.local/share/kiln.
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Print full digests.
    #[arg(long)]
    pub no_trunc: bool,
}

/// Runs the command.
pub fn run(args: &Args, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let store = crate::host::state_root(args.root.as_deref()).join("store");
    let index: Value = match std::fs::read(store.join("index.json")) {
        Ok(b) => match serde_json::from_slice(&b) {
            Ok(v) => v,
            Err(e) => {
                let _ = writeln!(err, "error: {}: {e}", store.join("index.json").display());
                return EXIT_OTHER;
            }
        },
        Err(_) => Value::Null,
    };
    let _ = writeln!(out, "{:<50} {:<19} {:<22} {:>9}  PLATFORMS", "NAME", "DIGEST", "CREATED", "SIZE");
    let read = |digest: &str| -> Option<Value> {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        std::fs::read(store.join("blobs/sha256").join(hex))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
    };
    for m in index["manifests"].as_array().into_iter().flatten() {
        let name = m["annotations"]["org.opencontainers.image.ref.name"].as_str().unwrap_or("<none>");
        let digest = m["digest"].as_str().unwrap_or("");
        let created = m["annotations"]["org.opencontainers.image.created"].as_str().unwrap_or("");
        let doc = read(digest).unwrap_or(Value::Null);
        // An index: each platform's manifest; a manifest: itself.
        let manifests: Vec<(Value, Value)> = match doc["manifests"].as_array() {
            Some(entries) => entries
                .iter()
                .map(|e| (e["platform"].clone(), e["digest"].as_str().and_then(read).unwrap_or(Value::Null)))
                .collect(),
            None => vec![(m["platform"].clone(), doc)],
        };
        let mut layers = std::collections::BTreeMap::new();
        let mut platforms = Vec::new();
        for (platform, manifest) in &manifests {
            for l in manifest["layers"].as_array().into_iter().flatten() {
                if let (Some(d), Some(size)) = (l["digest"].as_str(), l["size"].as_u64()) {
                    layers.insert(d.to_string(), size);
                }
            }
            let (os, arch) = (
                platform["os"].as_str().unwrap_or(""),
                platform["architecture"].as_str().unwrap_or(""),
            );
            if !os.is_empty() && !arch.is_empty() {
                let variant = platform["variant"].as_str().filter(|v| !v.is_empty());
                platforms.push(match variant {
                    Some(v) => format!("{os}/{arch}/{v}"),
                    None => format!("{os}/{arch}"),
                });
            }
        }
        // Layers shared by platforms count once.
        let size: u64 = layers.values().sum();
        let shown = if args.no_trunc {
            digest.to_string()
        } else {
            digest.chars().take(19).collect()
        };
        let _ = writeln!(
            out,
            "{name:<50} {shown:<19} {created:<22} {:>9}  {}",
            super::human_size(size),
            platforms.join(",")
        );
    }
    EXIT_OK
}
