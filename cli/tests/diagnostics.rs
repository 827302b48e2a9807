//! Rendered diagnostics, as a user sees them on stderr: file, line, column,
//! the caret under the span, the stable code. One snapshot per `err` case of
//! the Dockerfile frontend.

use std::path::Path;

use kiln_frontend::{OfflineHost, Platform, Request};

#[test]
fn err_cases_render_as_recorded() {
    let cases = Path::new(env!("CARGO_MANIFEST_DIR")).join("../frontends/dockerfile/tests/cases/err");
    let mut paths: Vec<_> = std::fs::read_dir(&cases).expect("cases").flatten().map(|e| e.path()).collect();
    paths.sort();
    assert!(!paths.is_empty());
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(Path::new(env!("CARGO_MANIFEST_DIR")).join("../snapshots/diagnostics"));
    settings.set_prepend_module_to_snapshot(false);
    for path in paths {
        let text = std::fs::read_to_string(&path).expect("case");
        let file = path.file_name().and_then(|n| n.to_str()).unwrap_or("Dockerfile").to_string();
        let request = Request {
            definition: text.clone().into_bytes(),
            filename: file.clone(),
            build_platform: Platform::linux_amd64(),
            multi_platform: false,
            ..Default::default()
        };
        let response = kiln_dockerfile::compile(&request, &OfflineHost);
        assert!(response.has_errors(), "{file}: no error");
        let rendered = kiln_cli::diagnostics::render_all(&response.diagnostics, &text, false);
        let name = path.file_stem().and_then(|n| n.to_str()).unwrap_or("case").to_string();
        settings.bind(|| insta::assert_snapshot!(name, rendered));
    }
}
