//! The `kiln` binary: a thin wrapper over the CLI library.

/// Compiling a large Dockerfile makes many small allocations; mimalloc handles
/// them markedly faster than the system allocator.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(kiln_cli::run(std::env::args_os()));
}
