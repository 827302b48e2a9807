//! `kiln build`: run the frontend, hand its LLB to `kiln-solver`, render
//! the solver's events, and report a failing step against its source line.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use kiln_frontend::{Diagnostic, Severity};
use kiln_llb::LoadedDefinition;
use kiln_solver_protocol::{ErrorKind, Event, Exporter, SolveRequest};

use crate::frontend::{compile, FrontendArgs};
use crate::progress::{Mode, Renderer};
use crate::{EXIT_OK, EXIT_OTHER, EXIT_STEP, EXIT_USAGE};

/// `kiln build` flags (named after `docker buildx build`).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// What to compile.
    #[command(flatten)]
    pub frontend: FrontendArgs,
    /// Name (and tag) for the image in kiln's store, e.g. `app:1`; repeatable.
    #[arg(short = 't', long = "tag", value_name = "NAME")]
    pub tags: Vec<String>,
    /// Output: `type=oci|docker|tar,dest=FILE`, `type=local,dest=DIR`, `type=image`, or a directory.
    #[arg(short = 'o', long = "output", value_name = "SPEC")]
    pub outputs: Vec<String>,
    /// Do not use cached results.
    #[arg(long)]
    pub no_cache: bool,
    /// Run BuildKit's Dockerfile checks and build nothing: exit 1 when any rule finds something.
    #[arg(long)]
    pub check: bool,
    /// Say why each step that ran missed the cache, against the last build
    /// of the same definition file and target in this state root.
    #[arg(long)]
    pub explain: bool,
    /// When a RUN step fails: `shell` opens a shell in its filesystem (on a
    /// terminal); `keep=DIR` leaves that filesystem at DIR with a script to enter it.
    #[arg(long = "on-error", value_name = "shell|keep=DIR")]
    pub on_error: Option<String>,
    /// At most N RUN steps at once (default: no cap).
    #[arg(long, value_name = "N")]
    pub jobs: Option<usize>,
    /// How to show progress.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub progress: Mode,
    /// The OCI runtime for RUN steps (runc, crun, or a path).
    #[arg(long = "oci-runtime", value_name = "BIN")]
    pub oci_runtime: Option<String>,
    /// A secret for `RUN --mount=type=secret`: `id=ID,src=FILE` or `id=ID,env=VAR`.
    #[arg(long = "secret", value_name = "id=ID,src=FILE|env=VAR")]
    pub secrets: Vec<String>,
    /// An SSH agent for `RUN --mount=type=ssh`: `default`, `ID=SOCKET`.
    #[arg(long = "ssh", value_name = "ID[=SOCKET]")]
    pub ssh: Vec<String>,
    /// Export the build's cache: `type=registry,ref=REF` or `type=local,dest=DIR`,
    /// with `mode=min|max`, `ignore-error=true`, `cache-mounts=true` (the cache mounts' contents too); repeatable.
    #[arg(long = "cache-to", value_name = "type=registry,ref=REF")]
    pub cache_to: Vec<String>,
    /// Take results from a cache: `REF`, `type=registry,ref=REF` or `type=local,src=DIR[,tag=T]`; repeatable.
    #[arg(long = "cache-from", value_name = "REF")]
    pub cache_from: Vec<String>,
    /// Write the image digest and config digest here as JSON.
    #[arg(long = "metadata-file", value_name = "FILE")]
    pub metadata_file: Option<PathBuf>,
    /// Write the image id (config digest) here.
    #[arg(long = "iidfile", value_name = "FILE")]
    pub iidfile: Option<PathBuf>,
    /// Push the -t names to their registries (as `--output type=image,push=true`).
    #[arg(long)]
    pub push: bool,
    /// Hand the image to the local Docker engine (`docker load`).
    #[arg(long)]
    pub load: bool,
    /// Allow a privilege by name: `network.host` (RUN --network=host, --network host),
    /// `security.insecure` (RUN --security=insecure); repeatable or comma-separated.
    #[arg(long = "allow", value_name = "ENTITLEMENT", value_delimiter = ',')]
    pub allow: Vec<String>,
}

/// The Docker engine's version, or why there is none.
fn docker_engine() -> Result<String, String> {
    let docker = std::env::var("DOCKER").unwrap_or_else(|_| "docker".into());
    match std::process::Command::new(&docker)
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
    {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr)
            .lines()
            .last()
            .unwrap_or("docker version failed")
            .to_string()),
        Err(e) => Err(format!("cannot run {docker:?}: {e}")),
    }
}

/// Reads one `--secret` value: `(id, value)`.
pub fn parse_secret(spec: &str) -> Result<(String, Vec<u8>), String> {
    let mut fields = BTreeMap::new();
    for part in spec.split(',') {
        match part.split_once('=') {
            Some((k, v)) => fields.insert(k.trim().to_string(), v.trim().to_string()),
            None => fields.insert("id".to_string(), part.trim().to_string()),
        };
    }
    let id = fields
        .get("id")
        .cloned()
        .filter(|i| !i.is_empty())
        .ok_or_else(|| format!("--secret {spec:?}: needs id=ID"))?;
    let kind = fields.get("type").map(String::as_str);
    let src = fields.get("src").or_else(|| fields.get("source"));
    let env = fields.get("env");
    match (kind, src, env) {
        (Some("env"), Some(var), _) | (_, None, Some(var)) => std::env::var_os(var)
            .map(|v| (id.clone(), v.into_encoded_bytes()))
            .ok_or_else(|| format!("--secret {spec:?}: ${var} is not set")),
        (_, Some(path), _) => std::fs::read(path)
            .map(|v| (id.clone(), v))
            .map_err(|e| format!("--secret {spec:?}: {path}: {e}")),
        // Neither: an environment variable named like the id, else a file.
        (_, None, None) => match std::env::var_os(&id) {
            Some(v) => Ok((id, v.into_encoded_bytes())),
            None => std::fs::read(&id)
                .map(|v| (id.clone(), v))
                .map_err(|_| format!("--secret {spec:?}: give src=FILE or env=VAR")),
        },
    }
}

/// Reads one `--ssh` value: `(id, socket)`; `default` alone is `$SSH_AUTH_SOCK`.
pub fn parse_ssh(spec: &str) -> Result<(String, String), String> {
    let (id, path) = match spec.split_once('=') {
        Some((id, path)) => (id.to_string(), path.to_string()),
        None => (
            spec.to_string(),
            std::env::var("SSH_AUTH_SOCK").map_err(|_| format!("--ssh {spec}: SSH_AUTH_SOCK is not set; give {spec}=SOCKET"))?,
        ),
    };
    let first = path.split(',').next().unwrap_or("").to_string();
    let meta = std::fs::metadata(&first).map_err(|e| format!("--ssh {spec}: {first}: {e}"))?;
    if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
        return Err(format!(
            "--ssh {spec}: {first} is not an agent socket (to use key files, load them into ssh-agent with ssh-add and pass its socket)"
        ));
    }
    Ok((id, absolute(Path::new(&first)).to_string_lossy().into_owned()))
}

/// `key=value,…` of a `--cache-to`/`--cache-from` and its `type`
/// (default `registry`); a bare value with no `=` is a registry reference,
/// as buildx reads it.
fn cache_spec(spec: &str) -> Result<(String, BTreeMap<String, String>), String> {
    if !spec.contains('=') {
        return Ok(("registry".into(), BTreeMap::from([("ref".to_string(), spec.to_string())])));
    }
    let mut fields = BTreeMap::new();
    for part in spec.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').ok_or_else(|| format!("{part:?} is not key=value"))?;
        fields.insert(k.trim().to_string(), v.to_string());
    }
    let kind = fields.remove("type").unwrap_or_else(|| "registry".into());
    match kind.as_str() {
        "local" | "registry" | "inline" => Ok((kind, fields)),
        other => Err(format!(
            "type={other} is not supported: kiln exports and imports caches as type=local (an OCI layout directory) \
             and type=registry, in BuildKit's format"
        )),
    }
}

/// An absolute path from a cache spec's directory.
fn cache_dir(dir: &str) -> String {
    absolute(Path::new(dir)).to_string_lossy().into_owned()
}

/// Refuses options left over after a cache spec was read.
fn no_more(f: &BTreeMap<String, String>) -> Result<(), String> {
    match f.keys().next() {
        Some(k) => Err(format!("unknown option {k:?}")),
        None => Ok(()),
    }
}

/// `--cache-to type=local,dest=DIR|type=registry,ref=REF [,mode=min|max][,tag=T][,ignore-error=true][,cache-mounts=true]`.
pub fn parse_cache_to(spec: &str) -> Result<kiln_solver_protocol::CacheExport, String> {
    let (kind, mut f) = cache_spec(spec)?;
    let mode = match f.remove("mode").as_deref() {
        None | Some("min") => kiln_solver_protocol::CacheMode::Min,
        Some("max") => kiln_solver_protocol::CacheMode::Max,
        Some(other) => return Err(format!("mode={other}: expected min or max")),
    };
    let ignore_error = match f.remove("ignore-error").as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => return Err(format!("ignore-error={other}: expected true or false")),
    };
    let cache_mounts = match f.remove("cache-mounts").as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => return Err(format!("cache-mounts={other}: expected true or false")),
    };
    // Options buildx accepts that change nothing here (kiln writes gzip
    // layers and BuildKit's image-manifest form).
    for ignored in [
        "compression",
        "compression-level",
        "force-compression",
        "oci-mediatypes",
        "image-manifest",
    ] {
        f.remove(ignored);
    }
    if kind == "inline" {
        no_more(&f)?;
        return Ok(kiln_solver_protocol::CacheExport::Inline {});
    }
    if kind == "registry" {
        let reference = f.remove("ref").ok_or("type=registry needs ref=REF")?;
        no_more(&f)?;
        return Ok(kiln_solver_protocol::CacheExport::Registry {
            reference,
            mode,
            ignore_error,
            cache_mounts,
        });
    }
    let dest = f.remove("dest").ok_or("type=local needs dest=DIR")?;
    let tag = f.remove("tag");
    no_more(&f)?;
    Ok(kiln_solver_protocol::CacheExport::Local {
        dest: cache_dir(&dest),
        mode,
        tag,
        ignore_error,
        cache_mounts,
    })
}

/// `--cache-from type=local,src=DIR[,tag=T]`, `type=registry,ref=REF` or `REF`.
pub fn parse_cache_from(spec: &str) -> Result<kiln_solver_protocol::CacheImport, String> {
    let (kind, mut f) = cache_spec(spec)?;
    if kind == "inline" {
        return Err("type=inline is a --cache-to: to import an image's inline cache, give its reference (--cache-from REF)".into());
    }
    if kind == "registry" {
        let reference = f.remove("ref").ok_or("type=registry needs ref=REF")?;
        no_more(&f)?;
        return Ok(kiln_solver_protocol::CacheImport::Registry { reference });
    }
    let src = f.remove("src").ok_or("type=local needs src=DIR")?;
    let tag = f.remove("tag");
    f.remove("digest");
    no_more(&f)?;
    Ok(kiln_solver_protocol::CacheImport::Local { src: cache_dir(&src), tag })
}

/// Parses one `--output` value into an exporter.
pub fn parse_output(spec: &str, tags: &[String]) -> Result<Exporter, String> {
    if !spec.contains('=') {
        // buildx: a bare path means a local directory, `-` a tar on stdout (not supported here).
        if spec == "-" {
            return Err("--output -: writing to stdout is not supported; use type=tar,dest=FILE".into());
        }
        return Ok(Exporter::Local { dest: spec.to_string() });
    }
    let mut fields = BTreeMap::new();
    for part in spec.split(',') {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("--output {spec:?}: {part:?} is not KEY=VALUE"))?;
        fields.insert(k.trim().to_string(), v.trim().to_string());
    }
    let kind = fields.get("type").cloned().unwrap_or_else(|| "local".into());
    let dest = fields.get("dest").cloned();
    let mut names: Vec<String> = tags.to_vec();
    if let Some(n) = fields.get("name") {
        names.extend(n.split(';').map(str::to_string));
    }
    let need_dest = |d: Option<String>| {
        d.filter(|d| !d.is_empty())
            .ok_or_else(|| format!("--output {spec:?}: type={kind} needs dest=PATH"))
    };
    Ok(match kind.as_str() {
        "oci" => Exporter::Oci {
            dest: need_dest(dest)?,
            names,
        },
        "docker" => Exporter::Docker {
            dest: need_dest(dest)?,
            names,
        },
        "local" => Exporter::Local { dest: need_dest(dest)? },
        "tar" => Exporter::Tar { dest: need_dest(dest)? },
        "image" => Exporter::Image {
            names,
            push: matches!(fields.get("push").map(String::as_str), Some("true") | Some("1")),
        },
        other => {
            return Err(format!(
                "--output {spec:?}: unknown type {other:?} (oci, docker, local, tar, image)"
            ))
        }
    })
}

fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| std::env::current_dir().map(|d| d.join(p)).unwrap_or_else(|_| p.to_path_buf()))
}

/// `--allow` names only known entitlements, and `--network host` needs
/// `network.host` among them (as buildx), before anything is compiled.
fn check_entitlements(args: &Args) -> Result<(), String> {
    use kiln_solver_protocol::{ENTITLEMENTS, NETWORK_HOST};
    if let Some(unknown) = args.allow.iter().find(|a| !ENTITLEMENTS.contains(&a.as_str())) {
        return Err(format!(
            "--allow {unknown}: unknown entitlement (known: {})",
            ENTITLEMENTS.join(", ")
        ));
    }
    if args.frontend.network.as_deref() == Some("host") && !args.allow.iter().any(|a| a == NETWORK_HOST) {
        return Err(format!(
            "--network host gives every RUN step the host's network: to allow it, add --allow {NETWORK_HOST}"
        ));
    }
    Ok(())
}

/// Runs the command.
pub fn run(args: &Args, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    if args.check {
        return check(args, err);
    }
    if let Err(msg) = check_entitlements(args) {
        let _ = writeln!(err, "error: {msg}");
        return EXIT_USAGE;
    }
    let on_error = match args.on_error.as_deref().map(parse_on_error).transpose() {
        Ok(o) => o,
        Err(msg) => {
            let _ = writeln!(err, "error: --on-error: {msg}");
            return EXIT_USAGE;
        }
    };
    let mut exporters = Vec::new();
    for o in &args.outputs {
        match parse_output(o, &args.tags) {
            Ok(mut e) => {
                // Relative destinations are relative to where kiln runs, not the solver.
                match &mut e {
                    Exporter::Oci { dest, .. } | Exporter::Docker { dest, .. } | Exporter::Local { dest } | Exporter::Tar { dest } => {
                        let p = Path::new(dest.as_str());
                        if p.is_relative() {
                            *dest = std::env::current_dir()
                                .map(|d| d.join(p))
                                .unwrap_or_else(|_| p.to_path_buf())
                                .to_string_lossy()
                                .into_owned();
                        }
                    }
                    Exporter::Image { .. } => {}
                }
                exporters.push(e);
            }
            Err(msg) => {
                let _ = writeln!(err, "error: {msg}");
                return EXIT_USAGE;
            }
        }
    }
    if !args.tags.is_empty() && !exporters.iter().any(|e| matches!(e, Exporter::Image { .. })) {
        exporters.push(Exporter::Image {
            names: args.tags.clone(),
            push: args.push,
        });
    }
    let platforms = match crate::frontend::target_platforms(&args.frontend) {
        Ok(p) => p,
        Err(msg) => {
            let _ = writeln!(err, "error: {msg}");
            return EXIT_USAGE;
        }
    };
    if platforms.len() > 1 && (args.load || exporters.iter().any(|e| matches!(e, Exporter::Docker { .. }))) {
        let what = if args.load { "--load" } else { "--output type=docker" };
        let _ = writeln!(
            err,
            "error: {what} holds one platform and {} were asked for: use --output type=oci,dest=FILE (an OCI layout with the image index), \
             -t NAME (kiln's store) with --push, or one --platform",
            platforms.len()
        );
        return EXIT_USAGE;
    }
    let load_tar = if args.load {
        if let Err(why) = docker_engine() {
            let _ = writeln!(err, "error: --load needs a running Docker engine, and none answers: {why}");
            let _ = writeln!(err, "       (without --load, -t NAME keeps the image in kiln's store; -o type=docker,dest=FILE writes a tarball for docker load)");
            return EXIT_OTHER;
        }
        let path = std::env::temp_dir().join(format!("kiln-load-{}.tar", std::process::id()));
        exporters.push(Exporter::Docker {
            dest: path.to_string_lossy().into_owned(),
            names: args.tags.clone(),
        });
        Some(path)
    } else {
        None
    };
    if exporters.is_empty() {
        let _ = writeln!(err, "note: no -t or --output given; the result stays in kiln's cache only");
    }
    if !args.frontend.context.is_dir() {
        let _ = writeln!(err, "error: build context {} is not a directory", args.frontend.context.display());
        return EXIT_USAGE;
    }
    let root = crate::host::state_root(args.frontend.root.as_deref());
    // The solver starts while the frontend runs.
    let solver = crate::solver_client::Started::new(&root);
    let compiled = match compile(&args.frontend, None, err) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let config_json = |c: &Option<kiln_frontend::ImageConfig>| c.as_ref().and_then(|c| serde_json::to_value(c).ok());
    let mut request = if compiled.targets.len() == 1 {
        let target = compiled.first();
        let mut request = SolveRequest::new(&target.definition);
        request.image_config = config_json(&target.image_config);
        request
    } else {
        let mut request = SolveRequest::new(&[]);
        request.definition.clear();
        request.platforms = compiled
            .targets
            .iter()
            .map(|t| {
                let platform = t.platform.as_ref().map(|p| p.to_string_form()).unwrap_or_default();
                kiln_solver_protocol::PlatformBuild::new(&platform, &t.definition, config_json(&t.image_config))
            })
            .collect();
        request
    };
    request
        .locals
        .insert("context".into(), absolute(&args.frontend.context).to_string_lossy().into_owned());
    for spec in &args.frontend.build_contexts {
        if let Some((name, src)) = spec.split_once('=') {
            if !src.contains("://") && Path::new(src).is_dir() {
                request
                    .locals
                    .insert(name.to_string(), absolute(Path::new(src)).to_string_lossy().into_owned());
            }
        }
    }
    request.exporters = exporters;
    for spec in &args.secrets {
        match parse_secret(spec) {
            Ok((id, value)) => request.secrets.insert(&id, &value),
            Err(msg) => {
                let _ = writeln!(err, "error: {msg}");
                return EXIT_USAGE;
            }
        }
    }
    for spec in &args.ssh {
        match parse_ssh(spec) {
            Ok((id, socket)) => {
                request.ssh.insert(id, socket);
            }
            Err(msg) => {
                let _ = writeln!(err, "error: {msg}");
                return EXIT_USAGE;
            }
        }
    }
    request.source_date_epoch = match source_date_epoch(&args.frontend.build_args) {
        Ok(e) => e,
        Err(msg) => {
            let _ = writeln!(err, "error: {msg}");
            return EXIT_USAGE;
        }
    };
    request.no_cache = args.no_cache;
    // KILN_HISTORY=off: no history kept (and nothing to compare --explain with).
    let remember = args.explain || std::env::var("KILN_HISTORY").map_or(true, |v| v != "off");
    request.build = remember.then(|| kiln_solver_protocol::BuildInfo {
        definition: absolute(&crate::frontend::definition_path(&args.frontend))
            .to_string_lossy()
            .into_owned(),
        target: args.frontend.target.clone(),
        build_args: args
            .frontend
            .build_args
            .iter()
            .map(|a| a.split_once('=').map(|(k, _)| k).unwrap_or(a).to_string())
            .collect(),
        explain: args.explain,
    });
    request.jobs = args.jobs;
    request.keep_failed = on_error.as_ref().map(|o| o.dir().to_string_lossy().into_owned());
    request.oci_runtime = args.oci_runtime.clone();
    request.entitlements = args.allow.clone();
    for spec in &args.cache_to {
        match parse_cache_to(spec) {
            Ok(e) => request.cache_to.push(e),
            Err(msg) => {
                let _ = writeln!(err, "error: --cache-to {spec}: {msg}");
                return EXIT_USAGE;
            }
        }
    }
    for spec in &args.cache_from {
        match parse_cache_from(spec) {
            Ok(i) => request.cache_from.push(i),
            Err(msg) => {
                let _ = writeln!(err, "error: --cache-from {spec}: {msg}");
                return EXIT_USAGE;
            }
        }
    }

    let mut renderer = Renderer::new(args.progress);
    let (tx, rx) = mpsc::channel::<(Event, String)>();
    let worker = std::thread::spawn(move || {
        solver?.solve(&request, |ev, raw| {
            let _ = tx.send((ev.clone(), raw.to_string()));
        })
    });
    let mut result = None;
    let mut failure: Option<(String, Option<String>, ErrorKind)> = None;
    let mut failed_exit: Option<i32> = None;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok((ev, raw)) => {
                renderer.event(&ev, &raw, err);
                match ev {
                    Event::Result(r) => result = Some(r),
                    Event::Error { message, digest, kind } => failure = Some((message, digest, kind)),
                    Event::VertexFailed { exit_code, .. } => failed_exit = exit_code,
                    _ => {}
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => renderer.tick(err),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    renderer.finish(err);
    let joined = worker.join();
    if let Some(sig) = crate::cancel::caught() {
        let _ = writeln!(
            err,
            "interrupted by {}: the build stopped; no step that was running was cached",
            crate::cancel::name(sig)
        );
        return 128 + sig;
    }
    let outcome = match joined {
        Ok(Ok(o)) => o,
        Ok(Err(msg)) => {
            let _ = writeln!(err, "error: {msg}");
            return EXIT_OTHER;
        }
        Err(_) => {
            let _ = writeln!(err, "error: the solver thread panicked");
            return EXIT_OTHER;
        }
    };
    if let Some((message, _, ErrorKind::Interrupted)) = &failure {
        // Someone signalled the solver itself.
        let _ = writeln!(err, "{message}: the build stopped; no step that was running was cached");
        return if outcome.exit_code > 128 { outcome.exit_code } else { EXIT_OTHER };
    }
    if let Some((message, digest, kind)) = failure {
        let tail = digest.as_deref().map(|d| renderer.tail_of(d)).unwrap_or_default();
        let name = digest.as_deref().and_then(|d| renderer.name_of(d));
        let label = match (kind, failed_exit) {
            (ErrorKind::Request, _) => "this step was refused".to_string(),
            (_, Some(c)) => format!("this step failed (exit code {c})"),
            (_, None) => "this step failed".to_string(),
        };
        report_failure(&compiled, &message, digest.as_deref(), name, &tail, &label, err);
        if let Some(o) = &on_error {
            o.after_failure(args.oci_runtime.as_deref().unwrap_or("runc"), err);
        }
        return if kind == ErrorKind::Vertex { EXIT_STEP } else { EXIT_OTHER };
    }
    match result {
        Some(r) if outcome.exit_code == 0 => {
            if let Some(d) = &r.image_digest {
                let _ = writeln!(out, "{d}");
            }
            if let Err(msg) = write_result_files(args, &r) {
                let _ = writeln!(err, "error: {msg}");
                return EXIT_OTHER;
            }
            if let Some(tar) = &load_tar {
                let docker = std::env::var("DOCKER").unwrap_or_else(|_| "docker".into());
                let loaded = std::process::Command::new(&docker).arg("load").arg("-i").arg(tar).output();
                let _ = std::fs::remove_file(tar);
                match loaded {
                    Ok(o) if o.status.success() => {
                        let _ = err.write_all(&o.stdout);
                    }
                    Ok(o) => {
                        let _ = writeln!(err, "error: docker load: {}", String::from_utf8_lossy(&o.stderr).trim());
                        return EXIT_OTHER;
                    }
                    Err(e) => {
                        let _ = writeln!(err, "error: docker load: {e}");
                        return EXIT_OTHER;
                    }
                }
            }
            // The tarball --load goes through is gone: name what the user has.
            let mut wrote: Vec<String> = r
                .exported
                .iter()
                .filter(|e| load_tar.as_ref().is_none_or(|t| Path::new(e.as_str()) != t.as_path()))
                .cloned()
                .collect();
            if load_tar.is_some() {
                wrote.push("the image into Docker (docker load)".into());
            }
            if renderer.mode() == Mode::Tty {
                if let Some(line) = critical_line(&r.critical_path) {
                    let _ = writeln!(err, "{line}");
                }
            }
            let _ = writeln!(
                err,
                "done: {} steps ran, {} cached{}",
                r.executed,
                r.cached,
                if wrote.is_empty() {
                    String::new()
                } else {
                    format!("; wrote {}", wrote.join(", "))
                }
            );
            EXIT_OK
        }
        _ => {
            let _ = writeln!(
                err,
                "error: the solver exited with code {} without a result{}",
                outcome.exit_code,
                if outcome.garbage.is_empty() {
                    String::new()
                } else {
                    format!(": {}", outcome.garbage.join("\n"))
                }
            );
            EXIT_OTHER
        }
    }
}

/// What `--on-error` asks for.
#[derive(Debug)]
pub enum OnError {
    /// A shell in the failed step, from a directory removed afterwards.
    Shell(PathBuf),
    /// The failed step's filesystem left at this directory.
    Keep(PathBuf),
}

/// Parses `--on-error=shell|keep=DIR`, checking up front what each needs.
pub fn parse_on_error(spec: &str) -> Result<OnError, String> {
    if spec == "shell" {
        if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
            return Err("shell needs a terminal on stdin; without one (CI), use --on-error=keep=DIR".into());
        }
        if !rustix::process::geteuid().is_root() {
            return Err("shell runs the step's runtime, which needs root; use --on-error=keep=DIR to keep its files".into());
        }
        return Ok(OnError::Shell(
            std::env::temp_dir().join(format!("kiln-shell-{}", std::process::id())),
        ));
    }
    let Some(dir) = spec.strip_prefix("keep=").filter(|d| !d.is_empty()) else {
        return Err(format!("{spec:?}: expected shell or keep=DIR"));
    };
    let dir = absolute(Path::new(dir));
    if std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(format!("{} is not empty; name a new directory", dir.display()));
    }
    Ok(OnError::Keep(dir))
}

impl OnError {
    /// The directory the solver keeps the failed step in.
    pub fn dir(&self) -> &Path {
        match self {
            OnError::Shell(d) | OnError::Keep(d) => d,
        }
    }

    /// After a failed build: say how to enter the kept step, or enter it.
    fn after_failure(&self, runtime: &str, err: &mut dyn Write) {
        let dir = self.dir();
        if !dir.join("config.json").is_file() {
            let _ = writeln!(err, "note: --on-error: no RUN step failed, so there is no step to enter");
            return;
        }
        match self {
            OnError::Keep(_) => {
                let _ = writeln!(
                    err,
                    "the failed step is kept at {}: enter it with {}/enter.sh (as root); nothing of it is in the cache",
                    dir.display(),
                    dir.display()
                );
            }
            OnError::Shell(_) => {
                let _ = writeln!(
                    err,
                    "opening a shell in the failed step (its files, mounts, environment, user and working directory); exit to end"
                );
                let status = std::process::Command::new(runtime)
                    .arg("run")
                    .arg("--bundle")
                    .arg(dir)
                    .arg(format!("kiln-shell-{}", std::process::id()))
                    .status();
                if let Err(e) = status {
                    let _ = writeln!(err, "error: {runtime}: {e}");
                }
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

/// One line on the critical path: its length and its slowest step.
pub fn critical_line(path: &[kiln_solver_protocol::PathStep]) -> Option<String> {
    let slowest = path.iter().max_by_key(|s| s.duration_ms)?;
    if slowest.duration_ms == 0 {
        return None;
    }
    let total: u64 = path.iter().map(|s| s.duration_ms).sum();
    Some(format!(
        "critical path: {} steps, {:.1}s; slowest: {} ({:.1}s)",
        path.len(),
        total as f64 / 1000.0,
        slowest.name,
        slowest.duration_ms as f64 / 1000.0
    ))
}

/// `SOURCE_DATE_EPOCH` from `--build-arg` or the environment.
fn source_date_epoch(build_args: &[String]) -> Result<Option<i64>, String> {
    let from_arg = build_args
        .iter()
        .find_map(|a| a.strip_prefix("SOURCE_DATE_EPOCH=").map(str::to_string));
    let value = match from_arg {
        Some(v) => Some(v),
        None => std::env::var("SOURCE_DATE_EPOCH").ok(),
    };
    match value.filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => v
            .parse::<i64>()
            .map(Some)
            .map_err(|_| format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds")),
    }
}

/// `--iidfile` and `--metadata-file`, as buildx writes them.
fn write_result_files(args: &Args, r: &kiln_solver_protocol::SolveResult) -> Result<(), String> {
    if let Some(path) = &args.iidfile {
        // A multi-platform image's id is its index's digest, as buildx writes it.
        let id = r
            .config_digest
            .clone()
            .or_else(|| r.image_digest.clone())
            .ok_or("--iidfile: the build made no image (give -t or an image --output)")?;
        std::fs::write(path, id).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let Some(path) = &args.metadata_file {
        let mut meta = serde_json::Map::new();
        if let Some(d) = &r.image_digest {
            meta.insert("containerimage.digest".into(), d.clone().into());
        }
        if let Some(c) = &r.config_digest {
            meta.insert("containerimage.config.digest".into(), c.clone().into());
        }
        if !args.tags.is_empty() {
            meta.insert("image.name".into(), args.tags.join(",").into());
        }
        let text = serde_json::to_string_pretty(&serde_json::Value::Object(meta)).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// Prints a failed step as a diagnostic on its Dockerfile line, with the
/// step's last output lines.
fn report_failure(
    compiled: &crate::frontend::Compiled,
    message: &str,
    digest: Option<&str>,
    name: Option<String>,
    tail: &[String],
    label: &str,
    err: &mut dyn Write,
) {
    let location = digest.and_then(|d| compiled.targets.iter().find_map(|t| source_range(&t.definition, d)));
    let step = name.unwrap_or_default();
    let help = if tail.is_empty() {
        None
    } else {
        Some(format!(
            "last output of the step:\n{}",
            tail.iter().map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n")
        ))
    };
    match location {
        Some((start_line, end_line)) => {
            let (offset, length) = line_span(&compiled.source, start_line, end_line);
            let diag = Diagnostic {
                severity: Severity::Error,
                code: "kiln::build::step_failed".into(),
                message: if step.is_empty() {
                    message.to_string()
                } else {
                    format!("{step}: {message}")
                },
                label: label.to_string(),
                help,
                file: compiled.filename.clone(),
                offset,
                length,
            };
            let color = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let _ = err.write_all(crate::diagnostics::render(&diag, &compiled.source, color).as_bytes());
        }
        None => {
            let _ = writeln!(
                err,
                "error: {}{message}",
                if step.is_empty() { String::new() } else { format!("{step}: ") }
            );
            if let Some(h) = help {
                let _ = writeln!(err, "{h}");
            }
        }
    }
}

/// `--check`: the frontend alone, offline (no base image is resolved);
/// its findings are printed with the other diagnostics.
fn check(args: &Args, err: &mut dyn Write) -> i32 {
    match compile(&args.frontend, Some(true), err) {
        Ok(c) if c.findings == 0 => {
            let _ = writeln!(err, "check complete, no warnings found.");
            EXIT_OK
        }
        Ok(c) => {
            let _ = writeln!(
                err,
                "check complete, {} warning{} found.",
                c.findings,
                if c.findings == 1 { "" } else { "s" }
            );
            crate::EXIT_FRONTEND
        }
        Err(code) => code,
    }
}

/// The 1-based line range of an op in the Definition's source map.
fn source_range(definition: &[u8], digest: &str) -> Option<(usize, usize)> {
    let def = LoadedDefinition::decode(definition).ok()?;
    let source = def.source.as_ref()?;
    let locs = source.locations.get(digest)?;
    let loc = locs.locations.first()?;
    let r = loc.ranges.first()?;
    let start = r.start.as_ref()?.line.max(1) as usize;
    let end = r.end.as_ref().map(|e| e.line.max(1) as usize).unwrap_or(start);
    Some((start, end.max(start)))
}

/// Byte offset and length of lines `start..=end` (1-based) of `text`.
fn line_span(text: &str, start: usize, end: usize) -> (usize, usize) {
    let mut offset = 0;
    let mut begin = None;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let n = i + 1;
        if n == start {
            begin = Some(offset);
        }
        offset += line.len();
        if n == end {
            let b = begin.unwrap_or(0);
            let trimmed = text[b..offset].trim_end_matches(['\n', '\r']).len();
            return (b, trimmed);
        }
    }
    (begin.unwrap_or(0), 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_critical_path_line_names_the_slowest_step() {
        let step = |name: &str, ms: u64| kiln_solver_protocol::PathStep {
            digest: format!("sha256:{name}"),
            name: name.into(),
            duration_ms: ms,
        };
        let path = [
            step("FROM busybox", 40),
            step("[s3 2/2] RUN sleep 1", 1070),
            step("COPY --from=s3", 5),
        ];
        assert_eq!(
            critical_line(&path).as_deref(),
            Some("critical path: 3 steps, 1.1s; slowest: [s3 2/2] RUN sleep 1 (1.1s)")
        );
        assert_eq!(critical_line(&[step("all cached", 0)]), None, "nothing ran: no line");
        assert_eq!(critical_line(&[]), None);
    }

    #[test]
    fn outputs_parse_like_buildx() {
        let tags = vec!["app:1".to_string()];
        assert_eq!(
            parse_output("type=oci,dest=o.tar", &tags).expect("oci"),
            Exporter::Oci {
                dest: "o.tar".into(),
                names: tags.clone()
            }
        );
        assert_eq!(
            parse_output("outdir", &tags).expect("dir"),
            Exporter::Local { dest: "outdir".into() }
        );
        assert!(parse_output("type=oci", &tags).is_err());
        assert!(parse_output("type=zip,dest=x", &tags).is_err());
        assert_eq!(line_span("a\nbb\nccc\n", 2, 3), (2, 6));
    }
}
