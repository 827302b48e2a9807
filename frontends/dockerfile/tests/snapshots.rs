//! Golden outputs: the LLB JSON dump and image config of every `cases/ok`
//! Dockerfile (which must compile without diagnostics), and the diagnostics of
//! every `cases/err` Dockerfile (which must produce at least one error).
//! Snapshots live in the repository's `snapshots/` folder.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test helper that panics fails its test with the message"
)]

use std::path::{Path, PathBuf};

use kiln_frontend::{OfflineHost, Platform, Request, Severity};
use kiln_llb::LoadedDefinition;
use prost::Message;

fn cases(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases").join(kind);
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).expect("cases").flatten().map(|e| e.path()).collect();
    v.sort();
    v
}

fn compile(path: &Path) -> (kiln_frontend::Response, String) {
    let text = std::fs::read_to_string(path).expect("case");
    let request = Request {
        definition: text.clone().into_bytes(),
        filename: path.file_name().and_then(|n| n.to_str()).unwrap_or("Dockerfile").into(),
        build_platform: Platform::linux_amd64(),
        multi_platform: false,
        ..Default::default()
    };
    (kiln_dockerfile::compile(&request, &OfflineHost), text)
}

fn settings() -> insta::Settings {
    let mut s = insta::Settings::clone_current();
    s.set_snapshot_path(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../snapshots/dockerfile"));
    s.set_prepend_module_to_snapshot(false);
    s
}

#[test]
fn ok_cases_compile_to_the_recorded_llb() {
    for path in cases("ok") {
        let (response, _) = compile(&path);
        // BuildKit's checks may warn about a case; nothing else may.
        let other: Vec<_> = response
            .diagnostics
            .iter()
            .filter(|d| !d.code.starts_with(kiln_dockerfile::LINT))
            .collect();
        assert!(other.is_empty(), "{}: {other:?}", path.display());
        let def = response.definition.expect("definition");
        let loaded = LoadedDefinition::decode(&def.encode_to_vec()).expect("valid LLB");
        let config = serde_json::to_string_pretty(&response.image_config).expect("config json");
        let name = path.file_stem().and_then(|n| n.to_str()).unwrap_or("case").to_string();
        settings().bind(|| {
            insta::assert_snapshot!(format!("llb-{name}"), loaded.to_json_lines());
            insta::assert_snapshot!(format!("config-{name}"), config);
        });
    }
}

#[test]
fn err_cases_report_the_recorded_diagnostics() {
    for path in cases("err") {
        let (response, text) = compile(&path);
        assert!(
            response.diagnostics.iter().any(|d| d.severity == Severity::Error),
            "{}: no error",
            path.display()
        );
        let rendered: String = response
            .diagnostics
            .iter()
            .map(|d| {
                let (line, col) = d.line_column(&text);
                format!(
                    "{}:{line}:{col}: {} [{}] span {}+{}\n",
                    d.file, d.message, d.code, d.offset, d.length
                )
            })
            .collect();
        let name = path.file_stem().and_then(|n| n.to_str()).unwrap_or("case").to_string();
        settings().bind(|| insta::assert_snapshot!(format!("diag-{name}"), rendered));
    }
}
