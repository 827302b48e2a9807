//! `kiln dump-llb`: compile a Dockerfile to LLB, or read someone else's LLB,
//! and print it as JSON lines, Graphviz or raw protobuf.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use kiln_frontend::{OfflineHost, Platform, Request};
use kiln_llb::LoadedDefinition;
use prost::Message;

use crate::host::CliHost;
use crate::{EXIT_FRONTEND, EXIT_OK, EXIT_OTHER, EXIT_USAGE};

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
    /// Name of the Dockerfile (default: CONTEXT/Dockerfile).
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Build this stage and what it needs.
    #[arg(long)]
    pub target: Option<String>,
    /// Set a build-time variable (KEY=VALUE, or KEY to take it from the environment).
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    pub build_args: Vec<String>,
    /// Target platform (os/arch[/variant]).
    #[arg(long)]
    pub platform: Option<String>,
    /// Additional build context (NAME=oci-layout:///path[:tag]).
    #[arg(long = "build-context", value_name = "NAME=SRC")]
    pub build_contexts: Vec<String>,
    /// Network mode for RUN steps that do not set one (default, none, host).
    #[arg(long)]
    pub network: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Json)]
    pub format: Format,
    /// Do not resolve base images: configs taken as empty, references unpinned.
    #[arg(long)]
    pub no_resolve: bool,
    /// Read a marshalled Definition from FILE ('-' for stdin) instead of compiling.
    #[arg(long, value_name = "FILE")]
    pub input: Option<String>,
    /// kiln's state root (image store); default $KILN_ROOT or ~/.local/share/kiln.
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Build context directory.
    #[arg(default_value = ".")]
    pub context: PathBuf,
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
        None => match compile(args, err) {
            Ok(b) => b,
            Err(code) => return code,
        },
    };
    if args.format == Format::Pb {
        return match out.write_all(&bytes) {
            Ok(()) => EXIT_OK,
            Err(e) => {
                let _ = writeln!(err, "error: {e}");
                EXIT_OTHER
            }
        };
    }
    let def = match LoadedDefinition::decode(&bytes) {
        Ok(d) => d,
        Err(e) => {
            let _ = writeln!(err, "error: {e}");
            return EXIT_OTHER;
        }
    };
    let text = match args.format {
        Format::Dot => kiln_llb::dot::to_dot(&def),
        _ => def.to_json_lines(),
    };
    match out.write_all(text.as_bytes()) {
        Ok(()) => EXIT_OK,
        Err(e) => {
            let _ = writeln!(err, "error: {e}");
            EXIT_OTHER
        }
    }
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

/// Reads the Dockerfile and `.dockerignore`, runs the frontend, renders its
/// diagnostics; returns the marshalled Definition or an exit code.
fn compile(args: &Args, err: &mut dyn Write) -> Result<Vec<u8>, i32> {
    let path = args.file.clone().unwrap_or_else(|| args.context.join("Dockerfile"));
    let definition = std::fs::read(&path).map_err(|e| {
        let _ = writeln!(err, "error: cannot read Dockerfile {}: {e}", path.display());
        EXIT_OTHER
    })?;
    let request = build_request(args, &path, definition).map_err(|msg| {
        let _ = writeln!(err, "error: {msg}");
        EXIT_USAGE
    })?;
    let response = if args.no_resolve {
        kiln_dockerfile::compile(&request, &OfflineHost)
    } else {
        let host = CliHost::new(&request.named_contexts, crate::host::state_root(args.root.as_deref())).map_err(|msg| {
            let _ = writeln!(err, "error: {msg}");
            EXIT_USAGE
        })?;
        kiln_dockerfile::compile(&request, &host)
    };
    let source = String::from_utf8_lossy(&request.definition).into_owned();
    let _ = err.write_all(
        crate::diagnostics::render_all(&response.diagnostics, &source, std::io::IsTerminal::is_terminal(&std::io::stderr())).as_bytes(),
    );
    match response.definition {
        Some(def) if !response.has_errors() => Ok(def.encode_to_vec()),
        _ => Err(EXIT_FRONTEND),
    }
}

/// Builds the frontend request from flags and files.
pub fn build_request(args: &Args, dockerfile: &Path, definition: Vec<u8>) -> Result<Request, String> {
    let mut build_args = BTreeMap::new();
    for a in &args.build_args {
        match a.split_once('=') {
            Some((k, v)) => build_args.insert(k.to_string(), v.to_string()),
            None => match std::env::var(a) {
                Ok(v) => build_args.insert(a.clone(), v),
                Err(_) => continue,
            },
        };
    }
    let platform = match &args.platform {
        Some(p) => Some(Platform::parse(p).ok_or_else(|| format!("invalid --platform {p:?}: expected os/arch[/variant]"))?),
        None => None,
    };
    let mut named_contexts = BTreeMap::new();
    for spec in &args.build_contexts {
        let (name, src) = spec
            .split_once('=')
            .ok_or_else(|| format!("--build-context {spec:?}: expected NAME=SRC"))?;
        named_contexts.insert(name.to_string(), src.to_string());
    }
    let ignore_path = args.context.join(".dockerignore");
    let ignore_patterns = match std::fs::read_to_string(&ignore_path) {
        Ok(text) => parse_dockerignore(&text),
        Err(_) => Vec::new(),
    };
    Ok(Request {
        definition,
        filename: dockerfile
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "Dockerfile".into()),
        build_args,
        target: args.target.clone(),
        platform,
        build_platform: Platform::linux_amd64(),
        named_contexts,
        ignore_patterns,
        network: args.network.clone(),
    })
}

/// `.dockerignore` lines → exclude patterns (comments and blanks dropped, paths cleaned).
pub fn parse_dockerignore(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (neg, body) = match l.strip_prefix('!') {
                Some(b) => ("!", b.trim()),
                None => ("", l),
            };
            let cleaned = kiln_dockerfile::lower::clean_path(body);
            let cleaned = cleaned.trim_start_matches('/');
            format!("{neg}{}", if cleaned.is_empty() { "." } else { cleaned })
        })
        .collect()
}
