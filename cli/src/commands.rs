//! The subcommands.

pub mod dump_llb;

use std::io::Write;

/// A kiln subcommand.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Compile a Dockerfile (or read a Definition) and print its LLB.
    DumpLlb(dump_llb::Args),
}

/// Runs a subcommand, writing to the given streams; returns the exit code.
pub fn execute(command: Command, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    match command {
        Command::DumpLlb(args) => dump_llb::run(&args, out, err),
    }
}
