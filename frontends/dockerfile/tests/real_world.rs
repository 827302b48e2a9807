//! The 254 published Dockerfiles of the real-world corpus: every one compiles
//! offline, and the graphs are compared with BuildKit's LLB for them.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use kiln_frontend::{OfflineHost, Platform, Request};
use kiln_llb::LoadedDefinition;
use prost::Message;

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, out);
        } else if !matches!(p.file_name().and_then(|n| n.to_str()), Some("README.md" | "SOURCE")) {
            out.push(p);
        }
    }
}

/// Compiles one Dockerfile offline, as `kiln dump-llb --no-resolve` does.
fn compile(path: &Path) -> Result<LoadedDefinition, String> {
    let definition = std::fs::read(path).map_err(|e| e.to_string())?;
    let request = Request {
        definition,
        filename: "Dockerfile".into(),
        build_platform: Platform::linux_amd64(),
        ..Default::default()
    };
    let response = kiln_dockerfile::compile(&request, &OfflineHost);
    if response.has_errors() {
        return Err(response
            .diagnostics
            .iter()
            .map(|d| format!("{} {}", d.code, d.message))
            .collect::<Vec<_>>()
            .join("; "));
    }
    let def = response.definition.ok_or("no definition")?;
    LoadedDefinition::decode(&def.encode_to_vec()).map_err(|e| e.to_string())
}

/// Digests of ops that do not depend on a local source (whose `local.unique` is random in BuildKit's dumps).
fn stable_digests(lines: &[(String, serde_json::Value)]) -> BTreeSet<String> {
    let mut local: BTreeSet<String> = BTreeSet::new();
    let mut out = BTreeSet::new();
    for (digest, op) in lines {
        let is_local = op
            .pointer("/Op/source/identifier")
            .and_then(|v| v.as_str())
            .is_some_and(|i| i.starts_with("local://"));
        let inputs: Vec<String> = op
            .get("inputs")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|i| i.get("digest")?.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        if is_local || inputs.iter().any(|i| local.contains(i)) {
            local.insert(digest.clone());
        } else if op.get("Op").is_some_and(|o| o.as_object().is_some_and(|m| !m.is_empty())) {
            out.insert(digest.clone());
        }
    }
    out
}

#[test]
fn every_real_world_dockerfile_compiles() {
    let Some(dir) = common::corpus("conformance/real-world") else {
        return;
    };
    let llb_dir = common::shared().join("conformance/real-world-llb");
    let mut all = Vec::new();
    files(&dir, &mut all);
    all.sort();
    let mut failures = Vec::new();
    let (mut same_count, mut compared, mut kiln_stable, mut bk_stable, mut shared_stable) = (0, 0, 0, 0, 0);
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for path in &all {
        let def = match compile(path) {
            Ok(d) => d,
            Err(e) => {
                failures.push(format!("{}: {e}", path.display()));
                continue;
            }
        };
        let rel = path.strip_prefix(&dir).unwrap_or(path);
        let Ok(text) = std::fs::read_to_string(llb_dir.join(format!("{}.jsonl", rel.display()))) else {
            continue;
        };
        compared += 1;
        let bk: Vec<(String, serde_json::Value)> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| (v["Digest"].as_str().unwrap_or("").to_string(), v["Op"].clone()))
            .collect();
        if bk.len() == def.ops.len() {
            same_count += 1;
            *kinds.entry("same op count").or_default() += 1;
        }
        let ours: Vec<(String, serde_json::Value)> = def
            .ops
            .iter()
            .map(|o| (o.digest.to_string(), serde_json::to_value(&o.op).unwrap_or_default()))
            .collect();
        let (a, b) = (stable_digests(&ours), stable_digests(&bk));
        kiln_stable += a.len();
        bk_stable += b.len();
        shared_stable += a.intersection(&b).count();
    }
    eprintln!(
        "{}/{} real-world Dockerfiles compile; {same_count}/{compared} have BuildKit's op count; \
         ops not downstream of the context: {shared_stable} of BuildKit's {bk_stable} have the same digest in kiln ({kiln_stable} in kiln)",
        all.len() - failures.len(),
        all.len()
    );
    assert!(failures.is_empty(), "{} failed:\n{}", failures.len(), failures.join("\n"));
    assert_eq!(all.len(), 254);
}
