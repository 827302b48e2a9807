//! `kiln-plugin-host`: runs one WASM frontend plugin (kiln-frontend-wasm's
//! sandbox and limits) in a process of its own, so that the `kiln` CLI links
//! no WASM runtime: every build that does not use a plugin starts faster, and
//! a fault in the runtime ends this process, not the CLI.
//!
//! Invocation contract with the CLI: `--module` names the plugin's file;
//! stdin/stdout carry the frontend protocol (frontends/PROTOCOL.md) as a
//! native frontend speaks it. The plugin's host calls, files of the build
//! context included, are answered by the CLI over that protocol: this
//! process reads nothing of the context itself. When the plugin gives no
//! response, the reason is the only thing written on stderr and the exit
//! status is 3. The process confines itself first (`confine.rs`).

mod confine;

use std::io::{BufReader, Read};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use kiln_frontend_wasm::{Limits, PluginHost};

/// The largest module accepted.
const MAX_MODULE: u64 = 256 << 20;
/// The exit status when the plugin could not be run or gave no response.
const EXIT_PLUGIN: i32 = 3;

/// Runs a WASM frontend plugin on the frontend request read on stdin.
#[derive(Parser)]
#[command(name = "kiln-plugin-host", version)]
struct Args {
    /// The plugin's name in messages.
    #[arg(long)]
    name: String,
    /// The plugin: a WASI preview 1 module.
    #[arg(long)]
    module: PathBuf,
    /// Where compiled code is cached (by the module's sha256).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Largest linear memory, in bytes.
    #[arg(long)]
    memory_bytes: Option<u64>,
    /// Longest time the plugin may compute, in seconds.
    #[arg(long)]
    time_secs: Option<f64>,
}

/// Says why on stderr and exits with [`EXIT_PLUGIN`].
fn fail(message: &str) -> ! {
    eprintln!("{message}");
    std::process::exit(EXIT_PLUGIN)
}

/// Reads the module at `path`, at most [`MAX_MODULE`] bytes.
fn read_module(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
    let mut module = Vec::new();
    file.take(MAX_MODULE + 1)
        .read_to_end(&mut module)
        .map_err(|e| format!("cannot read it: {e}"))?;
    if module.len() as u64 > MAX_MODULE {
        return Err(format!("it is over the {MAX_MODULE} byte limit"));
    }
    Ok(module)
}

fn main() {
    let args = Args::parse();
    // Nothing to answer for once the CLI is gone.
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    // Before any thread starts: they inherit the confinement.
    if let Some(cache) = &args.cache {
        let _ = std::fs::create_dir_all(cache);
    }
    if let Err(e) = confine::confine(&args.module, args.cache.as_deref()) {
        fail(&format!("plugin {}: cannot confine the plugin host: {e}", args.name));
    }
    let mut limits = Limits::default();
    if let Some(bytes) = args.memory_bytes {
        limits.memory_bytes = bytes;
    }
    if let Some(secs) = args.time_secs {
        limits.time = Duration::try_from_secs_f64(secs).unwrap_or_else(|e| fail(&format!("plugin time limit {secs}: {e}")));
    }
    let module = read_module(&args.module).unwrap_or_else(|e| fail(&format!("plugin {}: {e}", args.name)));
    let plugins = PluginHost::new(args.cache).unwrap_or_else(|e| fail(&e));
    let plugin = plugins.load(&args.name, &module).unwrap_or_else(|e| fail(&e.to_string()));
    let mut input = BufReader::new(std::io::stdin().lock());
    let mut output = std::io::stdout().lock();
    let served = kiln_frontend_stdio::serve(&mut input, &mut output, |request, host| {
        plugin
            .run(request, host, None, limits, |m| host.progress(m))
            .unwrap_or_else(|e| fail(&e.to_string()))
    });
    if let Err(e) = served {
        fail(&format!("plugin {}: {e}", args.name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_are_read_whole_and_bounded() {
        let dir = std::env::temp_dir().join(format!("kiln-plugin-host-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let small = dir.join("small.wasm");
        std::fs::write(&small, b"\0asm").expect("write");
        assert_eq!(read_module(&small).expect("module"), b"\0asm");
        let huge = dir.join("huge.wasm");
        std::fs::File::create(&huge)
            .and_then(|f| f.set_len(MAX_MODULE + 1))
            .expect("sparse file");
        assert!(read_module(&huge).expect_err("huge").contains("limit"));
        assert!(read_module(&dir.join("missing.wasm"))
            .expect_err("missing")
            .contains("cannot read it"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
