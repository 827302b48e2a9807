//! Running the frontend for a command: the flags that say what to compile,
//! reading the definition file and `.dockerignore`, rendering diagnostics.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use kiln_frontend::{ImageConfig, OfflineHost, Platform, Request};

use crate::host::CliHost;
use crate::plugins::PluginCache;
use crate::{EXIT_FRONTEND, EXIT_OTHER, EXIT_USAGE};

/// Flags shared by every command that compiles a definition.
#[derive(clap::Args, Debug, Clone)]
pub struct FrontendArgs {
    /// The definition file: a Dockerfile, a recipe, or any format its `# syntax=` names (default: CONTEXT/Dockerfile).
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Build this stage and what it needs.
    #[arg(long)]
    pub target: Option<String>,
    /// Set a build-time variable (KEY=VALUE, or KEY to take it from the environment).
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    pub build_args: Vec<String>,
    /// Target platforms (os/arch[/variant]): several, comma-separated or
    /// repeated, build one image index with a manifest per platform.
    #[arg(long, value_delimiter = ',', value_name = "PLATFORM")]
    pub platform: Vec<String>,
    /// Additional build context (NAME=DIR, NAME=oci-layout:///path[:tag], NAME=docker-image://REF).
    #[arg(long = "build-context", value_name = "NAME=SRC")]
    pub build_contexts: Vec<String>,
    /// Network mode for RUN steps that do not set one (default, none, host).
    #[arg(long)]
    pub network: Option<String>,
    /// An extra /etc/hosts entry for every RUN step: HOST:IP (or HOST=IP); repeatable.
    #[arg(long = "add-host", value_name = "HOST:IP")]
    pub add_hosts: Vec<String>,
    /// kiln's state root; default $KILN_ROOT or ~/.local/share/kiln.
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Ask the registry for the current image of every tag, even when kiln's store has it.
    #[arg(long)]
    pub pull: bool,
    /// The frontend to use, overriding the file's `# syntax=` line
    /// (`dockerfile`, a `.wasm` file, a plugin NAME, an OCI artifact reference,
    /// or NAME for a `kiln-frontend-NAME` program on PATH).
    #[arg(long)]
    pub frontend: Option<String>,
    /// Memory limit of a WASM frontend plugin, in MiB (default $KILN_PLUGIN_MEMORY or 512).
    #[arg(long, value_name = "MIB")]
    pub plugin_memory: Option<u64>,
    /// Time limit of a WASM frontend plugin, in seconds of its own computing
    /// (default $KILN_PLUGIN_TIMEOUT or 10).
    #[arg(long, value_name = "SECONDS")]
    pub plugin_timeout: Option<f64>,
    /// Build context directory.
    #[arg(default_value = ".")]
    pub context: PathBuf,
}

/// What the frontend produced.
pub struct Compiled {
    /// One build per target platform, in the order asked (one, with no
    /// platform, when none was asked).
    pub targets: Vec<Target>,
    /// The definition file's text (for mapping errors to lines).
    pub source: String,
    /// Its name as shown in messages.
    pub filename: String,
    /// How many of the frontend's diagnostics are check findings (BuildKit's rules).
    pub findings: usize,
}

/// The frontend's result for one target platform.
pub struct Target {
    /// The platform asked for (`None`: the build platform, nothing asked).
    pub platform: Option<Platform>,
    /// The marshalled Definition.
    pub definition: Vec<u8>,
    /// The result image's config.
    pub image_config: Option<ImageConfig>,
}

impl Compiled {
    /// The first (with one platform, the only) target.
    pub fn first(&self) -> &Target {
        &self.targets[0]
    }
}

/// The `--platform` values, normalized (`aarch64` is `linux/arm64`), each
/// once, in the order given.
pub fn target_platforms(args: &FrontendArgs) -> Result<Vec<Platform>, String> {
    let mut out: Vec<Platform> = Vec::new();
    for p in args.platform.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
        let parsed = Platform::parse(p)
            .ok_or_else(|| format!("invalid --platform {p:?}: expected os/arch[/variant]"))?
            .normalized();
        if !out.contains(&parsed) {
            out.push(parsed);
        }
    }
    Ok(out)
}

/// The definition file: `-f`, else CONTEXT/Dockerfile.
pub fn definition_path(args: &FrontendArgs) -> PathBuf {
    args.file.clone().unwrap_or_else(|| args.context.join("Dockerfile"))
}

/// Reads the Dockerfile and `.dockerignore`, runs the frontend once per
/// target platform, renders its diagnostics on `err` (the first platform's;
/// another's only when it has errors); returns what it compiled or an exit code.
/// `no_resolve` is the command's `--no-resolve` (None: it has no such flag).
pub fn compile(args: &FrontendArgs, no_resolve: Option<bool>, err: &mut dyn Write) -> Result<Compiled, i32> {
    let path = definition_path(args);
    let definition = std::fs::read(&path).map_err(|e| {
        let _ = writeln!(err, "error: cannot read Dockerfile {}: {e}", path.display());
        EXIT_OTHER
    })?;
    let platforms = target_platforms(args).map_err(|msg| {
        let _ = writeln!(err, "error: {msg}");
        EXIT_USAGE
    })?;
    let multi = platforms.len() > 1;
    let wanted: Vec<Option<Platform>> = if platforms.is_empty() {
        vec![None]
    } else {
        platforms.into_iter().map(Some).collect()
    };
    let mut compiled: Option<Compiled> = None;
    for (i, platform) in wanted.into_iter().enumerate() {
        let mut request = build_request(args, &path, definition.clone()).map_err(|msg| {
            let _ = writeln!(err, "error: {msg}");
            EXIT_USAGE
        })?;
        request.platform = platform.clone();
        request.multi_platform = multi;
        let response = run_frontend(args, no_resolve, &path, &request, i == 0, err)?;
        let source = String::from_utf8_lossy(&request.definition).into_owned();
        if i == 0 || response.has_errors() {
            let color = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let _ = err.write_all(crate::diagnostics::render_all(&response.diagnostics, &source, color).as_bytes());
        }
        let findings = response
            .diagnostics
            .iter()
            .filter(|d| d.code.starts_with(kiln_dockerfile::LINT))
            .count();
        let target = match response.definition {
            Some(def) if !response.has_errors() => Target {
                platform,
                definition: kiln_llb::marshal::encode_definition(&def),
                image_config: response.image_config,
            },
            _ => return Err(EXIT_FRONTEND),
        };
        match &mut compiled {
            Some(c) => c.targets.push(target),
            None => {
                compiled = Some(Compiled {
                    targets: vec![target],
                    source,
                    filename: request.filename,
                    findings,
                })
            }
        }
    }
    compiled.ok_or(EXIT_OTHER)
}

/// Picks the frontend for `request` and runs it (the built-in ones in this
/// process, a program or plugin as its own). `warn` prints the
/// `# syntax=` version warning (once per build, not per platform).
fn run_frontend(
    args: &FrontendArgs,
    no_resolve: Option<bool>,
    path: &Path,
    request: &Request,
    warn: bool,
    err: &mut dyn Write,
) -> Result<kiln_frontend::Response, i32> {
    let syntax = args
        .frontend
        .clone()
        .or_else(|| kiln_frontend_stdio::detect_syntax(&request.definition));
    let definition_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let chosen = choose_frontend(syntax.as_deref(), &definition_dir).map_err(|msg| {
        let _ = writeln!(err, "error: {msg}");
        EXIT_USAGE
    })?;
    if let (true, Chosen::Builtin, Some(requested)) = (warn, &chosen, syntax.as_deref()) {
        if let Some(warning) = version_warning(requested) {
            let _ = writeln!(err, "warning: {warning}");
        }
    }
    let cli_host;
    let host: &dyn kiln_frontend::Host = if no_resolve == Some(true) {
        &OfflineHost
    } else {
        let mut h = CliHost::new(&request.named_contexts, crate::host::state_root(args.root.as_deref())).map_err(|msg| {
            let _ = writeln!(err, "error: {msg}");
            EXIT_USAGE
        })?;
        h.skip_store = args.pull;
        h.can_skip_resolve = no_resolve.is_some();
        cli_host = h;
        &cli_host
    };
    let response = match chosen {
        Chosen::Builtin => kiln_dockerfile::compile(request, host),
        Chosen::Recipe => kiln_recipe::compile(request, host),
        Chosen::Native(program) => run_native(&program, request, host, &args.context).map_err(|msg| {
            let _ = writeln!(err, "error: frontend {}: {msg}", program.display());
            EXIT_FRONTEND
        })?,
        Chosen::Wasm(file) => {
            std::fs::File::open(&file).map_err(|e| {
                let _ = writeln!(err, "error: cannot read frontend plugin {}: {e}", file.display());
                EXIT_OTHER
            })?;
            let name = file.display().to_string();
            run_plugin(args, &name, &file, request, host).map_err(|msg| {
                let _ = writeln!(err, "error: {msg}");
                EXIT_FRONTEND
            })?
        }
        Chosen::Artifact(reference) => {
            let cache = PluginCache::new(&crate::host::state_root(args.root.as_deref()));
            let module = cache
                .fetch(&reference, args.pull)
                .and_then(|(digest, wasm)| cache.module_file(&digest, &wasm))
                .map_err(|msg| {
                    let _ = writeln!(err, "error: cannot fetch frontend plugin {reference}: {msg}");
                    EXIT_FRONTEND
                })?;
            run_plugin(args, &reference, &module, request, host).map_err(|msg| {
                let _ = writeln!(err, "error: {msg}");
                EXIT_FRONTEND
            })?
        }
    };
    Ok(response)
}

/// Which frontend compiles a file.
#[derive(Debug, PartialEq)]
pub enum Chosen {
    /// kiln's built-in Dockerfile frontend.
    Builtin,
    /// kiln's built-in YAML recipe frontend.
    Recipe,
    /// A native frontend program speaking the frontend protocol.
    Native(PathBuf),
    /// A WASM plugin file.
    Wasm(PathBuf),
    /// A WASM plugin in an OCI artifact (`oci-layout://…` or a registry reference).
    Artifact(String),
}

/// Resolves a `# syntax=` value (or `--frontend`), in this order:
/// absent, `dockerfile` or BuildKit's `docker/dockerfile:…` are the built-in
/// Dockerfile frontend; `recipe` the built-in YAML recipe frontend; a value ending in `.wasm` is a plugin file (relative
/// to the definition file's directory); a plain NAME is `NAME.wasm` in a
/// plugin directory, else a `kiln-frontend-NAME` program on PATH; a value
/// with `/`, `:` or `@` (or `oci-layout://`) is an OCI artifact reference.
/// Anything else is an error listing what was tried.
pub fn choose_frontend(syntax: Option<&str>, definition_dir: &Path) -> Result<Chosen, String> {
    let Some(name) = syntax else { return Ok(Chosen::Builtin) };
    let bare = name.trim_start_matches("docker.io/");
    if name == "dockerfile" || is_buildkit_dockerfile(bare) {
        return Ok(Chosen::Builtin);
    }
    if name == "recipe" {
        return Ok(Chosen::Recipe);
    }
    if name.ends_with(".wasm") && !name.contains("://") {
        let file = definition_dir.join(name);
        if file.is_file() {
            return Ok(Chosen::Wasm(file));
        }
        return Err(format!(
            "no frontend for `# syntax={name}`: the plugin file {} does not exist",
            file.display()
        ));
    }
    let simple = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    let mut tried = vec!["the built-in frontends (dockerfile, docker/dockerfile:…, recipe)".to_string()];
    if simple {
        let dirs = crate::plugins::plugin_dirs();
        if let Some(found) = dirs.iter().map(|d| d.join(format!("{name}.wasm"))).find(|p| p.is_file()) {
            return Ok(Chosen::Wasm(found));
        }
        tried.push(format!(
            "{name}.wasm in the plugin directories ({})",
            dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
        ));
        let program = format!("kiln-frontend-{name}");
        if let Some(found) = std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|d| d.join(&program))
            .find(|p| p.is_file())
        {
            return Ok(Chosen::Native(found));
        }
        tried.push(format!("{program} on PATH"));
    } else if name.starts_with("oci-layout://") || kiln_image::Reference::parse(name).is_ok() {
        return Ok(Chosen::Artifact(name.to_string()));
    } else {
        tried.push("an OCI artifact reference (it does not parse as one)".to_string());
    }
    Err(format!("no frontend for `# syntax={name}`: tried {}", tried.join("; ")))
}

/// Whether a `# syntax=` image (without `docker.io/`) is BuildKit's own
/// Dockerfile frontend: `docker/dockerfile` or, as BuildKit's own
/// Dockerfiles name it, `docker/dockerfile-upstream`, with any tag or digest.
fn is_buildkit_dockerfile(bare: &str) -> bool {
    ["docker/dockerfile", "docker/dockerfile-upstream"].iter().any(|image| {
        bare.strip_prefix(image)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(':') || rest.starts_with('@'))
    })
}

/// The newest BuildKit Dockerfile frontend whose features the built-in frontend covers.
pub const COVERED_DOCKERFILE_VERSION: (u32, u32) = (1, 14);

/// A warning when `# syntax=docker/dockerfile:…` asks for more than the
/// built-in frontend covers: a newer version, a `labs` channel, or a pinned
/// digest kiln cannot check. None for `1`, `1.N` up to the covered version,
/// `latest` and `dockerfile`.
pub fn version_warning(syntax: &str) -> Option<String> {
    let bare = syntax.trim_start_matches("docker.io/");
    if !is_buildkit_dockerfile(bare) {
        return None;
    }
    let rest = bare
        .strip_prefix("docker/dockerfile-upstream")
        .or_else(|| bare.strip_prefix("docker/dockerfile"))?;
    let (major, minor) = COVERED_DOCKERFILE_VERSION;
    let covered = format!("kiln's built-in Dockerfile frontend covers the docker/dockerfile:{major}.{minor} feature set");
    if rest.contains('@') {
        return Some(format!(
            "{covered}; `{syntax}` pins an image kiln does not run, so its exact version is not checked"
        ));
    }
    let tag = rest.strip_prefix(':').unwrap_or("latest");
    let (version, channel) = tag.split_once('-').unwrap_or((tag, ""));
    if channel == "labs" || version == "labs" {
        return Some(format!(
            "{covered}; `{syntax}` asks for the labs channel, whose experimental features beyond that are not supported"
        ));
    }
    let parts: Vec<u32> = version.split('.').map_while(|p| p.parse().ok()).collect();
    match parts.as_slice() {
        // `docker/dockerfile-upstream:master` and other branch builds.
        [] if version != "latest" && bare.starts_with("docker/dockerfile-upstream") => Some(format!(
            "{covered}; `{syntax}` is a development build of BuildKit's frontend, whose newer features will be reported as errors"
        )),
        [] => None,
        [m, ..] if *m > major => Some(format!("{covered}; `{syntax}` asks for a newer major version")),
        [m, n, ..] if *m == major && *n > minor => Some(format!(
            "{covered}; `{syntax}` may use features added after it, which will be reported as errors"
        )),
        _ => None,
    }
}

/// Runs the WASM plugin in file `module` under its limits, with compiled
/// code cached in the state root, in a `kiln-plugin-host` process (the CLI
/// links no WASM runtime) speaking the frontend protocol.
fn run_plugin(
    args: &FrontendArgs,
    name: &str,
    module: &Path,
    request: &Request,
    host: &dyn kiln_frontend::Host,
) -> Result<kiln_frontend::Response, String> {
    use std::io::Read;
    let env_number = |var: &str| std::env::var(var).ok().and_then(|v| v.parse::<f64>().ok());
    let cache = PluginCache::new(&crate::host::state_root(args.root.as_deref()));
    let program = crate::solver_client::companion_binary("kiln-plugin-host", "KILN_PLUGIN_HOST");
    let mut command = std::process::Command::new(&program);
    command
        .arg("--name")
        .arg(name)
        .arg("--module")
        .arg(module)
        .arg("--cache")
        .arg(cache.compiled_dir());
    if let Some(mib) = args.plugin_memory.map(|m| m as f64).or_else(|| env_number("KILN_PLUGIN_MEMORY")) {
        command.arg("--memory-bytes").arg(((mib * 1024.0 * 1024.0) as u64).to_string());
    }
    if let Some(secs) = args.plugin_timeout.or_else(|| env_number("KILN_PLUGIN_TIMEOUT")) {
        std::time::Duration::try_from_secs_f64(secs).map_err(|e| format!("plugin time limit {secs}: {e}"))?;
        command.arg("--time-secs").arg(secs.to_string());
    }
    let mut child = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!(
                "plugin {name}: cannot start {}: {e}; kiln-plugin-host is built with kiln and belongs beside the kiln binary (or set KILN_PLUGIN_HOST)",
                program.display()
            )
        })?;
    let mut to = child.stdin.take().ok_or("no stdin")?;
    let from = child.stdout.take().ok_or("no stdout")?;
    let mut stderr = child.stderr.take().ok_or("no stderr")?;
    // Read on the side: a host blocked writing its stderr must not stall the protocol.
    let why = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = (&mut stderr).take(64 * 1024).read_to_end(&mut text);
        let _ = std::io::copy(&mut stderr, &mut std::io::sink());
        String::from_utf8_lossy(&text).trim_end().to_string()
    });
    let mut reader = std::io::BufReader::new(from);
    let result = kiln_frontend_stdio::run(&mut to, &mut reader, request, host, Some(&args.context), |m| eprintln!("{m}"));
    drop(to);
    let status = child.wait().map_err(|e| e.to_string())?;
    let why = why.join().unwrap_or_default();
    match result {
        Ok(response) if status.success() => Ok(response),
        // The host says why the plugin gave no response (its limits, a trap, …).
        _ if !why.is_empty() => Err(why),
        Ok(_) => Err(format!("plugin {name}: {} exited with {status}", program.display())),
        Err(e) => Err(format!("plugin {name}: {e} ({} exited with {status})", program.display())),
    }
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
    let platform = target_platforms(args)?.into_iter().next();
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
        build_platform: Platform::host(),
        multi_platform: false,
        named_contexts,
        ignore_patterns,
        network: args.network.clone(),
        extra_hosts: args.add_hosts.iter().map(|h| parse_add_host(h)).collect::<Result<_, _>>()?,
    })
}

/// `--add-host HOST:IP` or `HOST=IP` (buildx's two spellings; the first
/// `=`, else the first `:`, so `host:::1` is an IPv6 address), the name
/// lower-cased and the address in its canonical form, as BuildKit stores them.
pub fn parse_add_host(spec: &str) -> Result<(String, String), String> {
    let (host, ip) = spec
        .split_once('=')
        .or_else(|| spec.split_once(':'))
        .ok_or_else(|| format!("--add-host {spec:?}: expected HOST:IP"))?;
    let addr: std::net::IpAddr = ip
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| format!("--add-host {spec:?}: {ip:?} is not an IP address"))?;
    let addr = match addr {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(addr),
        v4 => v4,
    };
    if host.is_empty() {
        return Err(format!("--add-host {spec:?}: the host name is empty"));
    }
    Ok((host.to_lowercase(), addr.to_string()))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_host_takes_both_spellings_and_canonical_addresses() {
        let ok = |s: &str| parse_add_host(s).expect(s);
        assert_eq!(ok("DB.local:10.0.0.5"), ("db.local".into(), "10.0.0.5".into()));
        assert_eq!(ok("db=10.0.0.5"), ("db".into(), "10.0.0.5".into()));
        assert_eq!(ok("v6:::1"), ("v6".into(), "::1".into()));
        assert_eq!(ok("v6=2001:DB8:0:0:0:0:0:1"), ("v6".into(), "2001:db8::1".into()));
        assert_eq!(ok("mapped=::ffff:1.2.3.4"), ("mapped".into(), "1.2.3.4".into()));
        for bad in ["nohost", "db:not-an-ip", ":1.2.3.4"] {
            assert!(parse_add_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn buildkit_dockerfile_images_are_the_builtin_frontend() {
        let here = Path::new(".");
        for builtin in [
            "dockerfile",
            "docker/dockerfile",
            "docker/dockerfile:1",
            "docker.io/docker/dockerfile:1.7-labs",
            "docker/dockerfile@sha256:abc",
            "docker/dockerfile-upstream:master",
            "docker.io/docker/dockerfile-upstream:1.20",
        ] {
            assert!(matches!(choose_frontend(Some(builtin), here), Ok(Chosen::Builtin)), "{builtin}");
        }
        // Other images under docker/ are not BuildKit's frontend.
        assert!(matches!(
            choose_frontend(Some("docker/dockerfile-extra:1"), here),
            Ok(Chosen::Artifact(_))
        ));
    }

    #[test]
    fn buildkit_versions_beyond_the_covered_set_get_a_warning() {
        for quiet in [
            "docker/dockerfile:1",
            "docker/dockerfile:1.7",
            "docker.io/docker/dockerfile:1.14.1",
            "docker/dockerfile",
            "dockerfile",
            "docker/dockerfile-upstream:1.7",
        ] {
            assert_eq!(version_warning(quiet), None, "{quiet}");
        }
        for loud in [
            "docker/dockerfile:1.15",
            "docker/dockerfile:2",
            "docker/dockerfile:1.7-labs",
            "docker/dockerfile:labs",
            "docker/dockerfile@sha256:abc",
            "docker/dockerfile-upstream:master",
            "docker/dockerfile-upstream:1.20",
        ] {
            let w = version_warning(loud).unwrap_or_else(|| panic!("{loud}: no warning"));
            assert!(w.contains("covers the docker/dockerfile:1.14 feature set"), "{w}");
        }
    }
}
