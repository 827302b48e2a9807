//! `kiln-plugin-host` as the CLI runs it: the frontend protocol on
//! stdin/stdout, and when a plugin gives no response, only the reason on
//! stderr and exit status 3. (Also what makes `cargo test --workspace` build
//! the program the CLI's plugin tests start.)
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test helper that panics fails its test with the message"
)]

use std::io::Write;
use std::process::{Command, Output, Stdio};

use kiln_frontend::{Platform, Request};

/// Runs the host on `module` with the protocol's request for a tiny file.
fn host(module: &[u8], extra: &[&str]) -> Output {
    let dir = std::env::temp_dir().join(format!("kiln-plugin-host-test-{}-{}", std::process::id(), module.len()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("plugin.wasm");
    std::fs::write(&path, module).expect("module");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln-plugin-host"))
        .args(["--name", "test.wasm", "--module"])
        .arg(&path)
        .arg("--cache")
        .arg(dir.join("compiled"))
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the host starts");
    let request = Request {
        definition: b"base scratch\n".to_vec(),
        filename: "Stepfile".into(),
        build_platform: Platform::linux_amd64(),
        ..Default::default()
    };
    let line = serde_json::to_string(&kiln_frontend_stdio::request_message(&request)).expect("json");
    // The host may already have exited (a module it refuses): a closed pipe is fine.
    let _ = child.stdin.take().expect("stdin").write_all(format!("{line}\n").as_bytes());
    child.wait_with_output().expect("wait")
}

#[test]
fn a_module_that_is_not_wasm_is_refused_with_the_reason_alone() {
    let out = host(b"not wasm", &[]);
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim_end(),
        "plugin test.wasm: not a usable WASI preview 1 module: it does not start with the WebAssembly magic number"
    );
    assert!(
        out.stdout.is_empty(),
        "no protocol output: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn a_plugin_over_its_time_limit_is_stopped_and_the_limit_named() {
    let looping = wat::parse_str("(module (memory (export \"memory\") 1) (func (export \"_start\") (loop (br 0))))").expect("wat");
    let started = std::time::Instant::now();
    let out = host(&looping, &["--time-secs", "0.3"]);
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("plugin test.wasm was stopped after running for its time limit of 300ms"),
        "{stderr}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}
