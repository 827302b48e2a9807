//! Runs WASM frontend plugins: a WASI preview 1 module speaks the frontend
//! protocol (frontends/PROTOCOL.md) on its stdin/stdout, and this crate is
//! its host, sharing the protocol code with native frontends.
//!
//! The sandbox: the module gets stdin, stdout and stderr and nothing else —
//! no preopened directory, no socket, no environment, a wall clock stuck at
//! the Unix epoch. Its linear memory is capped ([`Limits::memory_bytes`]) and
//! its running time too ([`Limits::time`], counted while the plugin computes,
//! not while kiln answers its calls), by epoch interruption. Compiled code is
//! cached by the module's sha256 so a second start only maps a file.

use std::fs::File;
use std::hash::{Hash, Hasher};
use std::io::{BufReader, Read};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_frontend::{Host, HostError, Platform, Request, ResolvedImage, Response};
use sha2::{Digest, Sha256};
use wasmtime::{Config, Engine, Linker, Module, ResourceLimiter, Store, UpdateDeadline};
use wasmtime_wasi::cli::{InputFile, OutputFile};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtxBuilder};

/// How often the time limit is checked.
const TICK: Duration = Duration::from_millis(10);
/// How much of a plugin's stderr is kept for error messages.
const STDERR_CAPACITY: usize = 64 * 1024;

/// What a plugin may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest linear memory, in bytes.
    pub memory_bytes: u64,
    /// Longest time the plugin may compute.
    pub time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 512 << 20,
            time: Duration::from_secs(10),
        }
    }
}

/// Why a plugin did not give a response.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The file is not a module wasmtime can compile for WASI preview 1.
    #[error("plugin {name}: not a usable WASI preview 1 module: {message}")]
    Invalid {
        /// The plugin's name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// It ran longer than its time limit.
    #[error("plugin {name} was stopped after running for its time limit of {limit:?}")]
    Timeout {
        /// The plugin's name.
        name: String,
        /// The limit it hit.
        limit: Duration,
    },
    /// It asked for more memory than its limit.
    #[error("plugin {name} was stopped: it tried to grow its memory to {wanted} bytes, over its limit of {limit} bytes")]
    Memory {
        /// The plugin's name.
        name: String,
        /// The size it asked for.
        wanted: usize,
        /// The limit.
        limit: u64,
    },
    /// It trapped (a panic, an abort, an out-of-bounds access, …).
    #[error("plugin {name} crashed: {message}{}", stderr_tail(stderr))]
    Trap {
        /// The plugin's name.
        name: String,
        /// The trap.
        message: String,
        /// What it wrote on stderr.
        stderr: String,
    },
    /// It broke the protocol or exited without a response.
    #[error("plugin {name}: {message}{}", stderr_tail(stderr))]
    Protocol {
        /// The plugin's name.
        name: String,
        /// What went wrong.
        message: String,
        /// What it wrote on stderr.
        stderr: String,
    },
    /// The host could not set up the sandbox (pipes, threads, cache).
    #[error("plugin {name}: {message}")]
    Host {
        /// The plugin's name.
        name: String,
        /// What failed.
        message: String,
    },
}

fn stderr_tail(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().collect();
    if lines.is_empty() {
        return String::new();
    }
    let tail = &lines[lines.len().saturating_sub(10)..];
    format!("\n  its stderr ended with:\n    {}", tail.join("\n    "))
}

/// Compiles plugins, with a cache of compiled code.
pub struct PluginHost {
    engine: Engine,
    cache_dir: Option<PathBuf>,
}

/// A compiled plugin, ready to run.
pub struct Plugin {
    name: String,
    engine: Engine,
    module: Module,
    /// The module's digest (`sha256:…`).
    pub digest: String,
    /// Whether the compiled code came from the cache.
    pub from_cache: bool,
}

impl PluginHost {
    /// A host whose compiled modules are kept under `cache_dir` (none: compile every time).
    pub fn new(cache_dir: Option<PathBuf>) -> Result<PluginHost, String> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.cranelift_opt_level(wasmtime::OptLevel::Speed);
        let engine = Engine::new(&config).map_err(|e| format!("cannot start wasmtime: {e}"))?;
        Ok(PluginHost { engine, cache_dir })
    }

    /// Compiles `wasm` (or maps its cached compiled code).
    pub fn load(&self, name: &str, wasm: &[u8]) -> Result<Plugin, PluginError> {
        let invalid = |message: String| PluginError::Invalid {
            name: name.to_string(),
            message,
        };
        match wasm.get(..8) {
            Some([0, b'a', b's', b'm', 1, 0, 0, 0]) => {}
            Some([0, b'a', b's', b'm', _, _, 1, 0]) => {
                return Err(invalid(
                    "it is a component; kiln runs WASI preview 1 modules (build for wasm32-wasip1)".into(),
                ))
            }
            _ => return Err(invalid("it does not start with the WebAssembly magic number".into())),
        }
        let digest = hex::encode(Sha256::digest(wasm));
        let cached = self.cache_path(&digest);
        if let Some(path) = &cached {
            if path.is_file() {
                // SAFETY: the file was written by `Module::serialize` of this
                // engine configuration (its name carries the compatibility
                // hash) into kiln's own state root; wasmtime still checks its
                // header and refuses files from another version or config.
                if let Ok(module) = unsafe { Module::deserialize_file(&self.engine, path) } {
                    return Ok(self.plugin(name, module, digest, true));
                }
            }
        }
        let module = Module::from_binary(&self.engine, wasm).map_err(|e| invalid(format!("{e:#}")))?;
        if let Some(path) = &cached {
            // The cache is an optimisation: failing to write it is not an error.
            if let Ok(bytes) = module.serialize() {
                let _ = write_atomically(path, &bytes);
            }
        }
        Ok(self.plugin(name, module, digest, false))
    }

    fn plugin(&self, name: &str, module: Module, digest: String, from_cache: bool) -> Plugin {
        Plugin {
            name: name.to_string(),
            engine: self.engine.clone(),
            module,
            digest: format!("sha256:{digest}"),
            from_cache,
        }
    }

    fn cache_path(&self, digest: &str) -> Option<PathBuf> {
        let dir = self.cache_dir.as_ref()?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        Some(dir.join(format!("{digest}-{:016x}.cwasm", h.finish())))
    }
}

/// Writes a cache file whole or not at all (temp file + rename), so a file
/// another process has mapped is replaced, never changed under it.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// What the store holds: the WASI context and the memory limiter.
struct State {
    wasi: WasiP1Ctx,
    limiter: MemoryLimit,
}

struct MemoryLimit {
    limit: u64,
    refused: Option<usize>,
}

impl ResourceLimiter for MemoryLimit {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired as u64 > self.limit {
            self.refused = Some(desired);
            return Err(wasmtime::format_err!("memory limit reached"));
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// A wall clock stuck at the Unix epoch: plugins get no time but what the request says.
struct Epoch;

impl HostWallClock for Epoch {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

/// A monotonic clock that advances one nanosecond per reading.
#[derive(Default)]
struct Counter(AtomicU64);

impl HostMonotonicClock for Counter {
    fn resolution(&self) -> u64 {
        1
    }
    fn now(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}

/// The deadline callback's error when it stops the plugin.
#[derive(Debug)]
struct Stopped;

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stopped by kiln")
    }
}

impl std::error::Error for Stopped {}

/// Counts the time spent answering the plugin's calls, which is not its own.
struct TimedHost<'a> {
    inner: &'a dyn Host,
    spent_nanos: &'a AtomicU64,
}

impl Host for TimedHost<'_> {
    fn resolve_image(&self, reference: &str, platform: &Platform) -> Result<Option<ResolvedImage>, HostError> {
        let start = Instant::now();
        let r = self.inner.resolve_image(reference, platform);
        self.spent_nanos.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        r
    }
}

impl Plugin {
    /// The plugin's name as shown in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs the plugin on `request`: answers its calls with `host` (files
    /// from `context`, or by `host` too without one), enforces `limits`,
    /// returns its response.
    pub fn run(
        &self,
        request: &Request,
        host: &dyn Host,
        context: Option<&Path>,
        limits: Limits,
        progress: impl FnMut(&str),
    ) -> Result<Response, PluginError> {
        let name = self.name.clone();
        let host_err = |message: String| PluginError::Host {
            name: name.clone(),
            message,
        };
        let (guest_in, mut to_guest) = std::io::pipe().map_err(|e| host_err(format!("cannot make a pipe: {e}")))?;
        let (from_guest, guest_out) = std::io::pipe().map_err(|e| host_err(format!("cannot make a pipe: {e}")))?;
        let stderr = MemoryOutputPipe::new(STDERR_CAPACITY);
        let wasi = WasiCtxBuilder::new()
            .stdin(InputFile::new(File::from(OwnedFd::from(guest_in))))
            .stdout(OutputFile::new(File::from(OwnedFd::from(guest_out))))
            .stderr(stderr.clone())
            .arg(&self.name)
            .wall_clock(Epoch)
            .monotonic_clock(Counter::default())
            .build_p1();
        let mut store = Store::new(
            &self.engine,
            State {
                wasi,
                limiter: MemoryLimit {
                    limit: limits.memory_bytes,
                    refused: None,
                },
            },
        );
        store.limiter(|s| &mut s.limiter);

        let started = Instant::now();
        let host_nanos = Arc::new(AtomicU64::new(0));
        let cancelled = Arc::new(AtomicBool::new(false));
        let timed_out = Arc::new(AtomicBool::new(false));
        {
            let host_nanos = host_nanos.clone();
            let cancelled = cancelled.clone();
            let timed_out = timed_out.clone();
            store.set_epoch_deadline(1);
            store.epoch_deadline_callback(move |_| {
                let own = started
                    .elapsed()
                    .saturating_sub(Duration::from_nanos(host_nanos.load(Ordering::Relaxed)));
                if own > limits.time {
                    timed_out.store(true, Ordering::Relaxed);
                    return Err(wasmtime::Error::new(Stopped));
                }
                if cancelled.load(Ordering::Relaxed) {
                    return Err(wasmtime::Error::new(Stopped));
                }
                Ok(UpdateDeadline::Continue(1))
            });
        }
        let mut linker: Linker<State> = Linker::new(&self.engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s| &mut s.wasi).map_err(|e| host_err(format!("{e:#}")))?;
        let instance = linker.instantiate(&mut store, &self.module).map_err(|e| PluginError::Invalid {
            name: name.clone(),
            message: format!("{e:#}"),
        })?;
        let start = instance
            .get_typed_func::<(), ()>(&mut store, "_start")
            .map_err(|_| PluginError::Invalid {
                name: name.clone(),
                message: "it has no `_start` function (build it as a command, not a reactor)".into(),
            })?;

        // Dropping `stop` ends the ticker at once (a sleep would hold up every run by up to a tick).
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let engine = &self.engine;
        let (answer, outcome) = std::thread::scope(|scope| {
            // Ticks the epoch so the deadline callback runs while the plugin computes.
            scope.spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(TICK) {
                    engine.increment_epoch();
                }
            });
            let guest = scope.spawn(move || {
                let r = start.call(&mut store, ());
                let refused = store.data().limiter.refused;
                // Dropping the store closes the plugin's stdout: the host sees EOF.
                drop(store);
                (r, refused)
            });
            let timed = TimedHost {
                inner: host,
                spent_nanos: &host_nanos,
            };
            let mut reader = BufReader::new(from_guest);
            let answer = kiln_frontend_stdio::run(&mut to_guest, &mut reader, request, &timed, context, progress);
            // Whatever happened, the plugin gets EOF on stdin and may not run on.
            drop(to_guest);
            cancelled.store(true, Ordering::Relaxed);
            // Drain its stdout so a plugin blocked writing it can finish.
            let _ = std::io::copy(&mut reader.take(1 << 20), &mut std::io::sink());
            let outcome = guest.join();
            drop(stop);
            (answer, outcome)
        });
        let stderr_text = String::from_utf8_lossy(&stderr.contents()).into_owned();
        let (result, refused) = outcome.map_err(|_| host_err("the thread running it panicked".into()))?;
        if let Some(wanted) = refused {
            return Err(PluginError::Memory {
                name,
                wanted,
                limit: limits.memory_bytes,
            });
        }
        if timed_out.load(Ordering::Relaxed) {
            return Err(PluginError::Timeout { name, limit: limits.time });
        }
        if let (Err(e), Err(message)) = (&result, &answer) {
            // The plugin failed and gave no answer: say how it failed.
            let failure = match e.downcast_ref::<wasmtime_wasi::I32Exit>() {
                Some(exit) => PluginError::Protocol {
                    name,
                    message: format!("{message} (it exited with status {})", exit.0),
                    stderr: stderr_text,
                },
                None if e.downcast_ref::<Stopped>().is_some() => PluginError::Protocol {
                    name,
                    message: message.clone(),
                    stderr: stderr_text,
                },
                None => PluginError::Trap {
                    name,
                    message: format!("{e:#}"),
                    stderr: stderr_text,
                },
            };
            return Err(failure);
        }
        answer.map_err(|message| PluginError::Protocol {
            name,
            message,
            stderr: stderr_text,
        })
    }
}

/// Reads a plugin file and loads it.
pub fn load_file(host: &PluginHost, path: &Path) -> Result<Plugin, PluginError> {
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    let wasm = std::fs::read(path).map_err(|e| PluginError::Host {
        name: name.clone(),
        message: format!("cannot read {}: {e}", path.display()),
    })?;
    host.load(&name, &wasm)
}
