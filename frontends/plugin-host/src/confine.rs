//! The plugin host's own sandbox, under wasmtime's: before it starts any
//! thread or reads anything, the process gives up (Landlock) all filesystem
//! access but reading its module and using its compile cache, TCP bind and
//! connect, abstract unix sockets and signals to processes outside it. A
//! plugin that broke out of wasmtime could still only speak the frontend
//! protocol on the stdin and stdout it already holds.
//!
//! Best effort: a kernel without Landlock (before 5.13), or with an older
//! ABI, enforces what it knows; the WASM sandbox stays the first wall.

use std::path::Path;

use landlock::{
    path_beneath_rules, Access, AccessFs, AccessNet, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetError, RulesetStatus, Scope, ABI,
};

/// The newest Landlock ABI whose rights this code asks for.
const ABI_HANDLED: ABI = ABI::V6;

/// Restricts the calling thread and every thread and process it starts
/// later. `cache` must exist (a rule names only existing paths).
pub(crate) fn confine(module: &Path, cache: Option<&Path>) -> Result<RulesetStatus, RulesetError> {
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(ABI_HANDLED))?
        .handle_access(AccessNet::BindTcp | AccessNet::ConnectTcp)?
        .scope(Scope::AbstractUnixSocket | Scope::Signal)?
        .create()?
        .add_rules(path_beneath_rules([module], AccessFs::from_read(ABI_HANDLED)))?
        .add_rules(path_beneath_rules(cache, AccessFs::from_all(ABI_HANDLED)))?
        .restrict_self()?;
    Ok(status.ruleset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;

    #[test]
    fn a_confined_host_reads_its_module_writes_its_cache_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("kiln-plugin-host-confine-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("cache")).expect("cache");
        std::fs::write(dir.join("plugin.wasm"), b"\0asm").expect("module");
        std::fs::write(dir.join("context-file"), b"secret").expect("file");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let port = listener.local_addr().expect("addr").port();
        // Landlock binds the thread that asks and its descendants: a thread
        // of its own leaves the rest of the test process free.
        let d = dir.clone();
        let seen = std::thread::spawn(move || {
            let status = confine(&d.join("plugin.wasm"), Some(&d.join("cache"))).expect("confine");
            let kind = |r: std::io::Result<()>| r.err().map(|e| e.kind());
            (
                status,
                kind(std::fs::read(d.join("plugin.wasm")).map(drop)),
                kind(std::fs::write(d.join("cache/compiled.cwasm"), b"code")),
                kind(std::fs::read(d.join("context-file")).map(drop)),
                kind(std::fs::write(d.join("elsewhere"), b"x")),
                kind(std::fs::read("/etc/passwd").map(drop)),
                kind(std::net::TcpStream::connect(("127.0.0.1", port)).map(drop)),
            )
        })
        .join()
        .expect("thread");
        let (status, module, cache, context, elsewhere, etc, connect) = seen;
        if status != RulesetStatus::FullyEnforced {
            kiln_test_support::skip(
                "a_confined_host_reads_its_module_writes_its_cache_and_nothing_else",
                &format!("this kernel enforces Landlock only {status:?} (Linux 6.12 or later, with landlock in the kernel's lsm= list)"),
            );
            return;
        }
        assert_eq!((module, cache), (None, None), "its own files");
        let denied = Some(ErrorKind::PermissionDenied);
        assert_eq!((context, elsewhere, etc), (denied, denied, denied), "nothing else");
        assert_eq!(connect, denied, "no TCP connections");
        // The test process itself is not confined.
        assert!(std::fs::read(dir.join("context-file")).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
