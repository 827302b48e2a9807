//! The subcommands.

pub mod build;
pub mod du;
pub mod dump_llb;
pub mod history;
pub mod images;
pub mod push;

use std::io::Write;

/// A kiln subcommand.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Build an image from a Dockerfile and a context.
    Build(Box<build::Args>),
    /// Compile a Dockerfile (or read a Definition) and print its LLB.
    DumpLlb(Box<dump_llb::Args>),
    /// List the images in kiln's store.
    Images(images::Args),
    /// Push an image from kiln's store to its registry.
    Push(push::Args),
    /// Show what kiln's cache holds.
    Du(du::DuArgs),
    /// Remove cache records, least recently used first.
    Prune(du::PruneArgs),
    /// List the builds of this state root, or show one (`history show ID`).
    History(history::Args),
}

/// Bytes as `docker images` shows sizes (1000-based: `1.2MB`).
pub fn human_size(bytes: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1000.0 && i + 1 < units.len() {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes}B")
    } else {
        format!("{v:.1}{}", units[i])
    }
}

/// Runs a subcommand, writing to the given streams; returns the exit code.
pub fn execute(command: Command, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    match command {
        Command::Build(args) => build::run(&args, out, err),
        Command::DumpLlb(args) => dump_llb::run(&args, out, err),
        Command::Images(args) => images::run(&args, out, err),
        Command::Push(args) => push::run(&args, out, err),
        Command::Du(args) => du::du(&args, out, err),
        Command::Prune(args) => du::prune(&args, out, err),
        Command::History(args) => history::run(&args, out, err),
    }
}
