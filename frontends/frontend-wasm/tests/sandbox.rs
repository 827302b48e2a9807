//! The sandbox holds: plugins written to misbehave (in WebAssembly text, so
//! no guest toolchain is needed) are stopped with the documented error.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test helper that panics fails its test with the message"
)]

use std::time::{Duration, Instant};

use kiln_frontend::{OfflineHost, Platform, Request};
use kiln_frontend_wasm::{Limits, PluginError, PluginHost};

fn request() -> Request {
    Request {
        definition: b"FROM scratch\n".to_vec(),
        filename: "Dockerfile".into(),
        build_platform: Platform::linux_amd64(),
        multi_platform: false,
        ..Default::default()
    }
}

/// A module importing the WASI calls the probes use, with `body` as `_start`.
fn module(body: &str) -> Vec<u8> {
    let text = format!(
        r#"(module
          (import "wasi_snapshot_preview1" "path_open"
            (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
          (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
          (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1)
          (data (i32.const 16) "/etc/passwd")
          (data (i32.const 64) "no response\n")
          (func (export "_start") {body}))"#
    );
    wat::parse_str(text).expect("valid WAT")
}

fn run(wasm: &[u8], limits: Limits) -> (Result<kiln_frontend::Response, PluginError>, Duration) {
    let host = PluginHost::new(None).expect("engine");
    let plugin = host.load("probe", wasm).expect("compiles");
    let start = Instant::now();
    let r = plugin.run(&request(), &OfflineHost, None, limits, |_| {});
    (r, start.elapsed())
}

#[test]
fn a_plugin_that_loops_forever_is_stopped_at_its_time_limit() {
    let limits = Limits {
        time: Duration::from_millis(300),
        ..Limits::default()
    };
    let (r, took) = run(&module("(loop (br 0))"), limits);
    match r {
        Err(e @ PluginError::Timeout { .. }) => {
            assert!(
                e.to_string()
                    .contains("plugin probe was stopped after running for its time limit of 300ms"),
                "{e}"
            )
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[test]
fn a_plugin_that_allocates_without_bound_is_stopped_at_its_memory_limit() {
    let limits = Limits {
        memory_bytes: 16 << 20,
        ..Limits::default()
    };
    // Grows by one 64 KiB page until growing fails, then keeps asking.
    let (r, took) = run(&module("(loop (drop (memory.grow (i32.const 1))) (br 0))"), limits);
    match r {
        Err(e @ PluginError::Memory { .. }) => {
            let text = e.to_string();
            assert!(text.contains("over its limit of 16777216 bytes"), "{text}");
        }
        other => panic!("expected the memory limit, got {other:?}"),
    }
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[test]
fn a_plugin_cannot_open_a_file_there_is_no_directory_to_open_it_in() {
    // path_open(fd 3, …, "/etc/passwd") — no directory is preopened, so fd 3
    // does not exist and the call returns EBADF (8), which the probe passes
    // to proc_exit so the test can see it.
    let body = "(call $proc_exit (call $path_open (i32.const 3) (i32.const 0) (i32.const 16) (i32.const 11) \
                (i32.const 0) (i64.const 2) (i64.const 2) (i32.const 0) (i32.const 128)))";
    let (r, _) = run(&module(body), Limits::default());
    match r {
        Err(e @ PluginError::Protocol { .. }) => {
            let text = e.to_string();
            assert!(text.contains("exited with status 8"), "{text}");
        }
        other => panic!("expected a protocol error with EBADF, got {other:?}"),
    }
}

#[test]
fn a_crash_is_reported_with_what_the_plugin_wrote_on_stderr() {
    // Writes "no response\n" to stderr (an iovec at 200: base 64, len 12), then traps.
    let body = "(i32.store (i32.const 200) (i32.const 64)) (i32.store (i32.const 204) (i32.const 12)) \
                (drop (call $fd_write (i32.const 2) (i32.const 200) (i32.const 1) (i32.const 220))) unreachable";
    let (r, _) = run(&module(body), Limits::default());
    match r {
        Err(e @ PluginError::Trap { .. }) => {
            let text = e.to_string();
            assert!(text.starts_with("plugin probe crashed"), "{text}");
            assert!(text.contains("no response"), "{text}");
        }
        other => panic!("expected a trap, got {other:?}"),
    }
}

#[test]
fn files_that_are_not_preview1_modules_are_refused() {
    let host = PluginHost::new(None).expect("engine");
    let err = host.load("text", b"#!/bin/sh\necho hi\n").err().expect("refused");
    assert!(
        err.to_string().contains("does not start with the WebAssembly magic number"),
        "{err}"
    );
    let component = [0, b'a', b's', b'm', 0x0d, 0, 1, 0];
    let err = host.load("component", &component).err().expect("refused");
    assert!(err.to_string().contains("it is a component"), "{err}");
    let err = host
        .load("reactor", &wat::parse_str("(module (memory (export \"memory\") 1))").expect("wat"))
        .expect("compiles")
        .run(&request(), &OfflineHost, None, Limits::default(), |_| {})
        .expect_err("refused");
    assert!(err.to_string().contains("no `_start`"), "{err}");
}

#[test]
fn compiled_code_is_cached_by_module_digest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wasm = module("(call $proc_exit (i32.const 0))");
    let first = PluginHost::new(Some(dir.path().to_path_buf()))
        .expect("engine")
        .load("p", &wasm)
        .expect("compiles");
    assert!(!first.from_cache);
    let second = PluginHost::new(Some(dir.path().to_path_buf()))
        .expect("engine")
        .load("p", &wasm)
        .expect("loads");
    assert!(second.from_cache);
    assert_eq!(first.digest, second.digest);
    drop((first, second));
    // A damaged cache file is recompiled, not trusted (replaced, not
    // rewritten in place: the cache is mapped, and kiln only ever renames).
    for entry in std::fs::read_dir(dir.path()).expect("cache dir") {
        let path = entry.expect("entry").path();
        std::fs::remove_file(&path).expect("remove");
        std::fs::write(&path, b"garbage").expect("replace");
    }
    let third = PluginHost::new(Some(dir.path().to_path_buf()))
        .expect("engine")
        .load("p", &wasm)
        .expect("recompiles");
    assert!(!third.from_cache);
}
