//! `kiln dump-llb`: compile a Dockerfile to LLB, or read someone else's LLB,
//! and print it as JSON lines, Graphviz or raw protobuf.

use std::io::{Read, Write};

use kiln_llb::LoadedDefinition;

use crate::frontend::{compile, FrontendArgs};
use crate::{EXIT_OK, EXIT_OTHER};

/// Output formats.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per op, as `buildctl debug dump-llb`.
    Json,
    /// A Graphviz digraph.
    Dot,
    /// The raw `pb.Definition` bytes.
    Pb,
}

/// `kiln dump-llb` flags.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// What to compile.
    #[command(flatten)]
    pub frontend: FrontendArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Json)]
    pub format: Format,
    /// Do not resolve base images: configs taken as empty, references unpinned.
    #[arg(long)]
    pub no_resolve: bool,
    /// Read a marshalled Definition from FILE ('-' for stdin) instead of compiling.
    #[arg(long, value_name = "FILE")]
    pub input: Option<String>,
}

/// Runs the command.
pub fn run(args: &Args, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let bytes = match &args.input {
        Some(input) => match read_input(input) {
            Ok(b) => b,
            Err(e) => {
                let _ = writeln!(err, "error: cannot read {input}: {e}");
                return EXIT_OTHER;
            }
        },
        None => match compile(&args.frontend, Some(args.no_resolve), err) {
            Ok(c) if c.targets.len() > 1 => return dump_platforms(args, &c, out, err),
            Ok(c) => c.targets.into_iter().next().map(|t| t.definition).unwrap_or_default(),
            Err(code) => return code,
        },
    };
    if args.format == Format::Pb {
        return write_out(&bytes, out, err);
    }
    match render(args.format, &bytes) {
        Ok(text) => write_out(text.as_bytes(), out, err),
        Err(e) => {
            let _ = writeln!(err, "error: {e}");
            EXIT_OTHER
        }
    }
}

/// A marshalled Definition as `format` (json lines or dot).
fn render(format: Format, bytes: &[u8]) -> Result<String, kiln_llb::DefinitionError> {
    let def = LoadedDefinition::decode(bytes)?;
    Ok(match format {
        Format::Dot => kiln_llb::dot::to_dot(&def),
        _ => def.to_json_lines(),
    })
}

/// Writes the command's output; a failed write is an error and exit 3.
fn write_out(bytes: &[u8], out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    match out.write_all(bytes) {
        Ok(()) => EXIT_OK,
        Err(e) => {
            let _ = writeln!(err, "error: {e}");
            EXIT_OTHER
        }
    }
}

/// Several platforms: each platform's definition in the order asked, each
/// introduced by a `# platform: os/arch` line in the json and dot formats;
/// `pb` is refused (a Definition holds one platform's graph).
fn dump_platforms(args: &Args, compiled: &crate::frontend::Compiled, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    if args.format == Format::Pb {
        let _ = writeln!(err, "error: --format pb writes one Definition: give one --platform");
        return crate::EXIT_USAGE;
    }
    let mut text = String::new();
    for t in &compiled.targets {
        let platform = t.platform.as_ref().map(|p| p.to_string_form()).unwrap_or_default();
        text.push_str(&format!("# platform: {platform}\n"));
        match render(args.format, &t.definition) {
            Ok(one) => text.push_str(&one),
            Err(e) => {
                let _ = writeln!(err, "error: {e}");
                return EXIT_OTHER;
            }
        }
    }
    write_out(text.as_bytes(), out, err)
}

fn read_input(input: &str) -> std::io::Result<Vec<u8>> {
    if input == "-" {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf)?;
        Ok(buf)
    } else {
        std::fs::read(input)
    }
}
