//! Running the frontend for a command: the flags that say what to compile,
//! reading the definition file and `.dockerignore`, rendering diagnostics.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use kiln_frontend::{ImageConfig, OfflineHost, Platform, Request};
use prost::Message;

use crate::host::CliHost;
use crate::{EXIT_FRONTEND, EXIT_OTHER, EXIT_USAGE};

/// Flags shared by every command that compiles a definition.
#[derive(clap::Args, Debug, Clone)]
pub struct FrontendArgs {
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
    /// Additional build context (NAME=DIR, NAME=oci-layout:///path[:tag], NAME=docker-image://REF).
    #[arg(long = "build-context", value_name = "NAME=SRC")]
    pub build_contexts: Vec<String>,
    /// Network mode for RUN steps that do not set one (default, none, host).
    #[arg(long)]
    pub network: Option<String>,
    /// kiln's state root; default $KILN_ROOT or ~/.local/share/kiln.
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Ask the registry for the current image of every tag, even when kiln's store has it.
    #[arg(long)]
    pub pull: bool,
    /// The frontend to use, overriding the file's `# syntax=` line
    /// (`dockerfile`, or NAME for a `kiln-frontend-NAME` program on PATH).
    #[arg(long)]
    pub frontend: Option<String>,
    /// Build context directory.
    #[arg(default_value = ".")]
    pub context: PathBuf,
}

/// What the frontend produced.
pub struct Compiled {
    /// The marshalled Definition.
    pub definition: Vec<u8>,
    /// The result image's config.
    pub image_config: Option<ImageConfig>,
    /// The definition file's text (for mapping errors to lines).
    pub source: String,
    /// Its name as shown in messages.
    pub filename: String,
}

/// Reads the Dockerfile and `.dockerignore`, runs the frontend, renders its
/// diagnostics on `err`; returns what it compiled or an exit code.
pub fn compile(args: &FrontendArgs, no_resolve: bool, err: &mut dyn Write) -> Result<Compiled, i32> {
    let path = args.file.clone().unwrap_or_else(|| args.context.join("Dockerfile"));
    let definition = std::fs::read(&path).map_err(|e| {
        let _ = writeln!(err, "error: cannot read Dockerfile {}: {e}", path.display());
        EXIT_OTHER
    })?;
    let request = build_request(args, &path, definition).map_err(|msg| {
        let _ = writeln!(err, "error: {msg}");
        EXIT_USAGE
    })?;
    let syntax = args
        .frontend
        .clone()
        .or_else(|| kiln_frontend_stdio::detect_syntax(&request.definition));
    let chosen = choose_frontend(syntax.as_deref()).map_err(|msg| {
        let _ = writeln!(err, "error: {msg}");
        EXIT_USAGE
    })?;
    let cli_host;
    let host: &dyn kiln_frontend::Host = if no_resolve {
        &OfflineHost
    } else {
        let mut h = CliHost::new(&request.named_contexts, crate::host::state_root(args.root.as_deref())).map_err(|msg| {
            let _ = writeln!(err, "error: {msg}");
            EXIT_USAGE
        })?;
        h.skip_store = args.pull;
        cli_host = h;
        &cli_host
    };
    let response = match chosen {
        Chosen::Builtin => kiln_dockerfile::compile(&request, host),
        Chosen::Native(program) => run_native(&program, &request, host, &args.context).map_err(|msg| {
            let _ = writeln!(err, "error: frontend {}: {msg}", program.display());
            EXIT_FRONTEND
        })?,
    };
    let source = String::from_utf8_lossy(&request.definition).into_owned();
    let _ = err.write_all(
        crate::diagnostics::render_all(&response.diagnostics, &source, std::io::IsTerminal::is_terminal(&std::io::stderr())).as_bytes(),
    );
    match response.definition {
        Some(def) if !response.has_errors() => Ok(Compiled {
            definition: def.encode_to_vec(),
            image_config: response.image_config,
            source,
            filename: request.filename,
        }),
        _ => Err(EXIT_FRONTEND),
    }
}

/// Which frontend compiles a file.
#[derive(Debug, PartialEq)]
pub enum Chosen {
    /// kiln's built-in Dockerfile frontend.
    Builtin,
    /// A native frontend program speaking the frontend protocol.
    Native(PathBuf),
}

/// Resolves a `# syntax=` value (or `--frontend`): absent, `dockerfile` or
/// BuildKit's `docker/dockerfile:…` are the built-in Dockerfile frontend;
/// NAME is a `kiln-frontend-NAME` program on PATH. Anything else is an error
/// listing what was tried.
pub fn choose_frontend(syntax: Option<&str>) -> Result<Chosen, String> {
    let Some(name) = syntax else { return Ok(Chosen::Builtin) };
    let bare = name.trim_start_matches("docker.io/");
    if name == "dockerfile"
        || bare.starts_with("docker/dockerfile:")
        || bare.starts_with("docker/dockerfile@")
        || bare == "docker/dockerfile"
    {
        return Ok(Chosen::Builtin);
    }
    let simple = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    let program = format!("kiln-frontend-{name}");
    if simple {
        if let Some(found) = std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|d| d.join(&program))
            .find(|p| p.is_file())
        {
            return Ok(Chosen::Native(found));
        }
    }
    Err(format!(
        "no frontend for `# syntax={name}`: tried the built-in Dockerfile frontend (dockerfile, docker/dockerfile:…){}; \
         WASM plugins (.wasm files, the plugin directory, OCI artifacts) are not supported yet",
        if simple { format!(" and {program} on PATH") } else { String::new() }
    ))
}

/// Runs a native frontend program over the frontend protocol.
fn run_native(
    program: &Path,
    request: &Request,
    host: &dyn kiln_frontend::Host,
    context: &Path,
) -> Result<kiln_frontend::Response, String> {
    let mut child = std::process::Command::new(program)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start it: {e}"))?;
    let mut to = child.stdin.take().ok_or("no stdin")?;
    let from = child.stdout.take().ok_or("no stdout")?;
    let mut reader = std::io::BufReader::new(from);
    let result = kiln_frontend_stdio::run(&mut to, &mut reader, request, host, Some(context), |m| eprintln!("{m}"));
    drop(to);
    let status = child.wait().map_err(|e| e.to_string())?;
    match result {
        Ok(r) => Ok(r),
        Err(e) => Err(format!("{e} (exit status {status})")),
    }
}

/// Builds the frontend request from flags and files.
pub fn build_request(args: &FrontendArgs, dockerfile: &Path, definition: Vec<u8>) -> Result<Request, String> {
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
