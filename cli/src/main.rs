//! The `kiln` binary: a thin wrapper over the CLI library.

/// Compiling a large Dockerfile makes many small allocations; mimalloc handles
/// them markedly faster than the system allocator.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // A cancelled build stops its solver before kiln exits.
    if let Err(e) = kiln_cli::cancel::install() {
        eprintln!("kiln: cannot catch SIGINT/SIGTERM ({e}); cancelling a build may leave its steps running");
    }
    std::process::exit(kiln_cli::run(std::env::args_os()));
}
