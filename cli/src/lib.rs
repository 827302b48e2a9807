//! kiln's command-line interface, as a library: one module per command, a
//! thin `main`. The only crate that prints.

pub mod cancel;
pub mod commands;
pub mod diagnostics;
pub mod frontend;
pub mod host;
pub mod plugins;
pub mod progress;
pub mod solver_client;

use clap::Parser;

/// Exit code: success.
pub const EXIT_OK: i32 = 0;
/// Exit code: the definition file has errors.
pub const EXIT_FRONTEND: i32 = 1;
/// Exit code: bad command-line usage.
pub const EXIT_USAGE: i32 = 2;
/// Exit code: anything else (IO, malformed input LLB, solver or export failure).
pub const EXIT_OTHER: i32 = 3;
/// Exit code: a build step failed.
pub const EXIT_STEP: i32 = 4;

/// kiln: container image builds, BuildKit-compatible.
#[derive(Parser, Debug)]
#[command(name = "kiln", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: commands::Command,
}

/// Runs the CLI with the given arguments and returns the exit code.
pub fn run<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
            let _ = e.print();
            return code;
        }
    };
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr().lock();
    commands::execute(cli.command, &mut stdout, &mut stderr)
}
