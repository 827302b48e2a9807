//! Keeping the state root in check: what the cache holds (`kiln du`), and
//! removing least-recently-used records with what only they used (`kiln
//! prune`, and automatically after a build when the root is over its limit).
//!
//! A record's last use is its file's mtime (touched on every cache hit).
//! Each layer is counted once, for the oldest record that has it (an image
//! source's record owns the image's layers, a step's record the layer it
//! added). Pruning takes the root's exclusive lock, so it never runs while a
//! build holds the shared one: nothing a running build uses is removed.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::cache::Record;
use crate::root::remove_all;

pub use kiln_solver_protocol::{PruneReport, RecordUsage, Usage};

/// What to remove.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Every record and cache mount (images in the store stay).
    pub all: bool,
    /// Records not used for this long.
    pub unused_for: Option<Duration>,
    /// Remove least-recently-used records until the root is at most this big.
    pub keep_bytes: Option<u64>,
}

/// Disk bytes of a tree (allocated blocks).
pub fn tree_size(path: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(m) = fs::symlink_metadata(&p) else { continue };
        total += m.blocks() * 512;
        if m.is_dir() {
            if let Ok(rd) = fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        }
    }
    total
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A layer's size, remembered in `snapshots/ID/size` (layers never change).
fn layer_size(root: &Path, id: &str) -> u64 {
    let dir = root.join("snapshots").join(id);
    if let Some(n) = fs::read_to_string(dir.join("size")).ok().and_then(|s| s.trim().parse().ok()) {
        return n;
    }
    if !dir.join("fs").is_dir() {
        return 0; // a layer adopted from a cache, not unpacked yet: only its blob
    }
    let n = tree_size(&dir.join("fs"));
    let _ = fs::write(dir.join("size"), n.to_string());
    n
}

fn read_records(root: &Path) -> Vec<(String, Record, u64)> {
    let mut out = Vec::new();
    for e in fs::read_dir(root.join("cache")).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(key) = name.strip_suffix(".json") else { continue };
        let Ok(bytes) = fs::read(e.path()) else { continue };
        let Ok(record) = serde_json::from_slice::<Record>(&bytes) else {
            continue;
        };
        let used = e.metadata().ok().and_then(|m| m.modified().ok()).map(secs).unwrap_or(0);
        out.push((key.to_string(), record, used));
    }
    out
}

/// What the root holds.
pub fn usage(root: &Path) -> Usage {
    let mut records = read_records(root);
    // A record kept under a definition key (an alias) never owns a layer.
    records.sort_by_key(|(_, r, _)| (r.key.is_some(), r.created));
    let mut owner: HashMap<String, usize> = HashMap::new();
    for (i, (_, r, _)) in records.iter().enumerate() {
        for id in r.outputs.iter().flatten() {
            owner.entry(id.clone()).or_insert(i);
        }
    }
    let mut sizes = vec![0u64; records.len()];
    for (id, i) in &owner {
        sizes[*i] += layer_size(root, id);
    }
    let mut list: Vec<RecordUsage> = records
        .iter()
        .zip(sizes)
        .filter(|((_, r, _), _)| r.key.is_none())
        .map(|((key, r, used), size)| RecordUsage {
            key: format!("sha256:{key}"),
            description: r.description.clone(),
            size,
            last_used: *used,
            created: r.created,
        })
        .collect();
    list.sort_by_key(|r| std::cmp::Reverse(r.last_used));
    let layers = fs::read_dir(root.join("snapshots"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| layer_size(root, &e.file_name().to_string_lossy()))
        .sum();
    Usage {
        records: list,
        layers,
        blobs: tree_size(&root.join("store/blobs")),
        cache_mounts: tree_size(&root.join("cache-mounts")),
    }
}

/// Blobs kiln's image store refers to (indexes, manifests, configs, layers).
fn store_blobs(root: &Path) -> HashSet<String> {
    let blob = |d: &str| fs::read(root.join("store/blobs/sha256").join(d.trim_start_matches("sha256:"))).ok();
    let mut keep = HashSet::new();
    let index: serde_json::Value = fs::read(root.join("store/index.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mut todo: Vec<String> = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["digest"].as_str().map(str::to_string))
        .collect();
    while let Some(d) = todo.pop() {
        if !keep.insert(d.clone()) {
            continue;
        }
        let Some(doc) = blob(&d).and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok()) else {
            continue;
        };
        for m in doc["manifests"].as_array().into_iter().flatten() {
            if let Some(c) = m["digest"].as_str() {
                todo.push(c.to_string());
            }
        }
        if let Some(c) = doc["config"]["digest"].as_str() {
            keep.insert(c.to_string());
        }
        for l in doc["layers"].as_array().into_iter().flatten() {
            if let Some(c) = l["digest"].as_str() {
                keep.insert(c.to_string());
            }
        }
    }
    keep
}

/// Removes what the policy selects, then every layer and blob nothing refers to.
/// The caller holds the root's exclusive lock.
pub fn prune(root: &Path, policy: &Policy) -> PruneReport {
    let mut report = PruneReport::default();
    let before = usage(root);
    let now = secs(SystemTime::now());
    let mut records = read_records(root);
    // Least recently used first.
    records.sort_by_key(|(_, _, used)| *used);
    let own: HashMap<String, u64> = before
        .records
        .iter()
        .map(|r| (r.key.trim_start_matches("sha256:").to_string(), r.size))
        .collect();
    let mut remaining = before.total();
    let mut removed: HashSet<String> = HashSet::new();
    for (key, _, used) in &records {
        let old = policy.unused_for.is_some_and(|d| now.saturating_sub(*used) >= d.as_secs());
        let over = policy.keep_bytes.is_some_and(|k| remaining > k);
        if (policy.all || old || over) && fs::remove_file(root.join("cache").join(format!("{key}.json"))).is_ok() {
            report.records += 1;
            removed.insert(key.clone());
            remaining = remaining.saturating_sub(own.get(key).copied().unwrap_or(0));
        }
    }
    // Layers no remaining record uses.
    let kept: HashSet<String> = records
        .iter()
        .filter(|(k, _, _)| !removed.contains(k))
        .flat_map(|(_, r, _)| r.outputs.iter().flatten().cloned())
        .collect();
    let mut blobs_in_use = store_blobs(root);
    for e in fs::read_dir(root.join("snapshots")).into_iter().flatten().flatten() {
        let id = e.file_name().to_string_lossy().into_owned();
        if id.starts_with('.') {
            continue;
        }
        if kept.contains(&id) {
            // Its exported blobs stay with it.
            for f in fs::read_dir(e.path()).into_iter().flatten().flatten() {
                let n = f.file_name().to_string_lossy().into_owned();
                if n.starts_with("layer") && n.ends_with(".json") {
                    if let Some(d) = fs::read(f.path())
                        .ok()
                        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                        .and_then(|v| v["digest"].as_str().map(str::to_string))
                    {
                        blobs_in_use.insert(d);
                    }
                }
            }
            continue;
        }
        let size = layer_size(root, &id);
        if remove_all(&e.path()).is_ok() {
            report.layers += 1;
            report.freed += size;
        }
    }
    // Blobs neither the store nor a kept layer refers to.
    for e in fs::read_dir(root.join("store/blobs/sha256")).into_iter().flatten().flatten() {
        let d = format!("sha256:{}", e.file_name().to_string_lossy());
        if blobs_in_use.contains(&d) {
            continue;
        }
        let len = e.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
        if fs::remove_file(e.path()).is_ok() {
            report.blobs += 1;
            report.freed += len;
        }
    }
    if policy.all {
        for e in fs::read_dir(root.join("cache-mounts")).into_iter().flatten().flatten() {
            let lock = e.path().join("lock");
            let Ok(f) = fs::OpenOptions::new().write(true).create(true).truncate(false).open(&lock) else {
                continue;
            };
            if rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok() {
                let size = tree_size(&e.path());
                if remove_all(&e.path()).is_ok() {
                    report.freed += size;
                }
            }
        }
    }
    report
}

/// How often the automatic GC measures the root, at most.
const GC_INTERVAL: Duration = Duration::from_secs(300);

/// After a build: when the last check is older than [`GC_INTERVAL`], starts
/// a detached `kiln-solver gc` (which waits for running builds, measures
/// the root and prunes down to [`default_limit`] if it is over).
pub fn maybe_start_collector(root: &Path) {
    let stamp = root.join("gc.last");
    let recent = fs::metadata(&stamp)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < GC_INTERVAL);
    if recent || std::env::var_os("KILN_GC").is_some_and(|v| v == "off") {
        return;
    }
    let _ = fs::write(&stamp, b"");
    if let Ok(exe) = std::env::current_exe() {
        let _ = std::process::Command::new(exe)
            .arg("gc")
            .arg("--root")
            .arg(root)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
}

/// The automatic GC: prunes least-recently-used records when the root is
/// over its limit. The caller holds the root's exclusive lock.
pub fn collect(root: &Path) -> Option<PruneReport> {
    let limit = default_limit(root);
    if usage(root).total() <= limit {
        return None;
    }
    Some(prune(
        root,
        &Policy {
            keep_bytes: Some(limit),
            ..Default::default()
        },
    ))
}

/// The automatic GC limit: `KILN_GC_KEEP` (bytes, or with k/M/G/T), else 10%
/// of the filesystem the root is on, at most 20 GiB.
pub fn default_limit(root: &Path) -> u64 {
    if let Some(v) = std::env::var("KILN_GC_KEEP").ok().and_then(|v| parse_size(&v)) {
        return v;
    }
    let fs_size = rustix::fs::statvfs(root).map(|s| s.f_blocks * s.f_frsize).unwrap_or(200 << 30);
    (fs_size / 10).min(20 << 30)
}

/// `512`, `10k`, `1.5G`, `2GiB`… → bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().trim_end_matches("ib").trim_end_matches('b') {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return None,
    };
    Some((n * mult as f64) as u64)
}

/// `90s`, `30m`, `24h`, `7d` → a duration.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return None,
    };
    Some(Duration::from_secs(n * mult))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("10k"), Some(10 << 10));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size("1.5G"), Some(3 << 29));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_duration("24h"), Some(Duration::from_secs(86400)));
        assert_eq!(parse_duration("30m"), Some(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1w"), None);
    }
}
