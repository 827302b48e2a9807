//! BuildKit's own LLB (JSON dumps from `buildctl debug dump-llb`) read back by
//! kiln: every op re-marshalled by kiln must have BuildKit's digest, and every
//! line re-rendered by kiln must equal BuildKit's text.

use std::path::{Path, PathBuf};

use kiln_llb::json::{dump_line, parse_line};
use kiln_llb::{digest_of, marshal_op};

fn shared() -> PathBuf {
    kiln_test_support::shared_dir()
}

fn jsonl_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            jsonl_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "jsonl") {
            out.push(p);
        }
    }
}

#[test]
fn buildkit_ops_remarshal_to_the_same_digest_and_text() {
    let mut files = Vec::new();
    jsonl_files(&shared().join("reference/buildkit-llb"), &mut files);
    jsonl_files(&shared().join("conformance/real-world-llb"), &mut files);
    if files.is_empty() {
        kiln_test_support::skip("buildkit_dumps", "the BuildKit LLB corpus (../shared) is missing");
        return;
    }
    let (mut ops, mut same_digest, mut same_text) = (0, 0, 0);
    let mut failures = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("readable");
        for line in text.lines() {
            let parsed = parse_line(line).unwrap_or_else(|e| panic!("{}: {e}: {line}", file.display()));
            ops += 1;
            let digest = digest_of(&marshal_op(&parsed.op));
            if digest.as_str() == parsed.digest {
                same_digest += 1;
            } else if failures.len() < 5 {
                failures.push(format!("{}: digest {} != {}", file.display(), digest, parsed.digest));
            }
            let again = dump_line(
                &parsed.op,
                &kiln_llb::Digest::from_string(parsed.digest.clone()),
                parsed.metadata.as_ref(),
            );
            if again == line {
                same_text += 1;
            } else if failures.len() < 5 {
                failures.push(format!("{}:\n kiln:     {again}\n buildkit: {line}", file.display()));
            }
        }
    }
    eprintln!(
        "{} files, {ops} ops: {same_digest} same digest, {same_text} same JSON text",
        files.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(same_digest, ops);
}
