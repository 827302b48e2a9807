//! The `kiln` binary: a thin wrapper over the CLI library.

fn main() {
    std::process::exit(kiln::run(std::env::args_os()));
}
