//! The library a kiln frontend plugin links (see frontends/AUTHORING.md).
//!
//! Two parts: [`main`] runs the frontend protocol on stdin/stdout (the same
//! messages for a WASM plugin and a native `kiln-frontend-NAME` program), and
//! [`Build`]/[`Stage`] describe an image the way a Dockerfile does — a base
//! image, commands, copies, environment — over kiln's LLB builder, so a
//! plugin writes `build.image("alpine")?.run("make")`, not protobuf.
//!
//! ```no_run
//! kiln_guest::main(|request, host| {
//!     let build = kiln_guest::Build::new(request, host);
//!     let stage = match build.image("alpine") {
//!         Ok(s) => s.run("echo hello > /hello"),
//!         Err(d) => return kiln_guest::Response { diagnostics: vec![*d], ..Default::default() },
//!     };
//!     build.finish(&stage)
//! });
//! ```

use std::collections::BTreeMap;
use std::ops::Range;

pub use kiln_frontend::diagnostic::closest;
pub use kiln_frontend::{Diagnostic, Host, ImageConfig, OfflineHost, Platform, Request, Response, Severity};
pub use kiln_llb as llb;
use kiln_llb::builder::{Exec, FileInput, FileOp, SourceSpan, VertexMeta};
use kiln_llb::pb;
use kiln_llb::pb::file_action::Action;
use kiln_llb::State;

/// PATH for images that do not set one (as the Dockerfile frontend).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Serves one request on stdin/stdout with `compile`, then exits the process
/// (status 0, or 2 with a message on stderr when the protocol failed).
pub fn main(compile: impl Fn(&Request, &dyn Host) -> Response) -> ! {
    let name = std::env::args().next().unwrap_or_else(|| "frontend".into());
    kiln_frontend_stdio::serve_stdio(&name, compile)
}

/// One build: the request, the host to resolve images with, and the build context.
pub struct Build<'a> {
    request: &'a Request,
    host: &'a dyn Host,
    platform: Platform,
    context: State,
}

impl<'a> Build<'a> {
    /// Starts a build for `request`.
    pub fn new(request: &'a Request, host: &'a dyn Host) -> Build<'a> {
        let mut attrs = BTreeMap::new();
        attrs.insert("local.sharedkeyhint".to_string(), "context".to_string());
        if !request.ignore_patterns.is_empty() {
            attrs.insert(
                "local.excludepatterns".to_string(),
                serde_json::to_string(&request.ignore_patterns).unwrap_or_default(),
            );
        }
        let meta = VertexMeta::default()
            .describe("llb.customname", "[internal] load build context")
            .cap("source.local")
            .cap("source.local.sharedkeyhint");
        let context = State::source("local://context", attrs, None, meta);
        Build {
            request,
            host,
            platform: request.platform.clone().unwrap_or_else(|| request.build_platform.clone()),
            context,
        }
    }

    /// A diagnostic pointing at `span` of the definition file.
    pub fn error(&self, code: &str, message: impl Into<String>, span: Range<usize>) -> Diagnostic {
        Diagnostic::error(code, message, &self.request.filename, span)
    }

    /// An empty stage.
    pub fn scratch(&self) -> Stage {
        Stage::new(State::scratch(), ImageConfig::default(), &self.platform)
    }

    /// A stage from an image, resolved by the host (pinned to its digest,
    /// with its environment, user and working directory). The error's span
    /// is empty: the caller knows where the reference is and sets it.
    pub fn image(&self, reference: &str) -> Result<Stage, Box<Diagnostic>> {
        let parsed = kiln_image::Reference::parse(reference)
            .map_err(|e| Box::new(self.error("kiln::guest::invalid_reference", format!("{reference}: {e}"), 0..0)))?;
        let normalized = parsed.normalized();
        let resolved = self.host.resolve_image(&normalized, &self.platform).map_err(|e| {
            Box::new(self.error(
                "kiln::guest::unresolved_image",
                format!("cannot resolve image {normalized}: {e}"),
                0..0,
            ))
        })?;
        let (pinned, config) = match resolved {
            Some(r) => (r.reference, r.config),
            None => (normalized.clone(), ImageConfig::default()),
        };
        let identifier = if pinned.contains("://") {
            pinned
        } else {
            format!("docker-image://{pinned}")
        };
        let meta = VertexMeta::default()
            .describe("llb.customname", format!("[internal] load {normalized}"))
            .cap("source.image");
        let state = State::source(identifier, BTreeMap::new(), Some(self.platform.to_pb()), meta);
        Ok(Stage::new(state, config, &self.platform))
    }

    /// The build context (`local://context`, `.dockerignore` applied).
    pub fn context(&self) -> &State {
        &self.context
    }

    /// The response for a build whose result is `stage`.
    pub fn finish(&self, stage: &Stage) -> Response {
        let info = pb::SourceInfo {
            filename: self.request.filename.clone(),
            data: self.request.definition.clone(),
            language: String::new(),
            definition: None,
        };
        let mut config = stage.config.clone();
        config.os = self.platform.os.clone();
        config.architecture = self.platform.architecture.clone();
        config.variant = self.platform.variant.clone();
        Response {
            definition: Some(stage.state.marshal(vec![info])),
            image_config: Some(config),
            diagnostics: Vec::new(),
        }
    }
}

/// A filesystem and the image config that goes with it. Every method returns
/// a new stage; the old one stays usable (stages are cheap to clone).
#[derive(Clone, Debug)]
pub struct Stage {
    /// The filesystem.
    pub state: State,
    /// The image config (env, user, working directory, cmd, …).
    pub config: ImageConfig,
    platform: Platform,
    lines: Option<(i32, i32)>,
}

impl Stage {
    fn new(state: State, mut config: ImageConfig, platform: &Platform) -> Stage {
        if config.env("PATH").is_none() && platform.os != "windows" {
            config.set_env("PATH", DEFAULT_PATH);
        }
        Stage {
            state,
            config,
            platform: platform.clone(),
            lines: None,
        }
    }

    /// Attributes the next steps to lines `start..=end` of the definition
    /// file (1-based), so failures are shown there.
    pub fn at_lines(mut self, start: usize, end: usize) -> Stage {
        self.lines = Some((start as i32, end as i32));
        self
    }

    fn meta(&self, name: String) -> VertexMeta {
        let meta = VertexMeta::default().describe("llb.customname", name);
        match self.lines {
            Some((start_line, end_line)) => meta.at(SourceSpan {
                source_index: 0,
                start_line,
                end_line,
            }),
            None => meta,
        }
    }

    fn cwd(&self) -> String {
        match self.config.config.working_dir.as_str() {
            "" => "/".to_string(),
            dir => dir.to_string(),
        }
    }

    /// `path` taken from the working directory unless it is absolute.
    fn absolute(&self, path: &str) -> String {
        if path.starts_with('/') {
            path.to_string()
        } else {
            format!("{}/{path}", self.cwd().trim_end_matches('/'))
        }
    }

    /// Runs a shell command (`/bin/sh -c COMMAND`).
    pub fn run(&self, command: &str) -> Stage {
        self.run_args(&["/bin/sh", "-c", command])
    }

    /// Runs a program with these arguments.
    pub fn run_args(&self, argv: &[&str]) -> Stage {
        let exec = Exec {
            meta: pb::Meta {
                args: argv.iter().map(|a| a.to_string()).collect(),
                env: self.config.config.env.clone(),
                cwd: self.cwd(),
                user: self.config.config.user.clone(),
                remove_mount_stubs_recursive: true,
                ..Default::default()
            },
            platform: Some(self.platform.to_pb()),
            ..Default::default()
        };
        let meta = self
            .meta(format!("RUN {}", argv.join(" ")))
            .cap("exec.meta.base")
            .cap("exec.mount.bind")
            .cap("exec.meta.setsdefaultpath");
        let mut next = self.clone();
        next.state = self.state.run(exec, meta).root;
        next
    }

    /// Sets an environment variable for later steps and the image.
    pub fn env(&self, key: &str, value: &str) -> Stage {
        let mut next = self.clone();
        next.config.set_env(key, value);
        next
    }

    /// Sets the user later steps and the image run as.
    pub fn user(&self, user: &str) -> Stage {
        let mut next = self.clone();
        next.config.config.user = user.to_string();
        next
    }

    /// Sets (and creates) the working directory; relative paths are taken from the current one.
    pub fn workdir(&self, dir: &str) -> Stage {
        let path = self.absolute(dir);
        let mkdir = Action::Mkdir(pb::FileActionMkDir {
            path: path.clone(),
            mode: 0o755,
            make_parents: true,
            owner: None,
            timestamp: -1,
        });
        let mut next = self.clone();
        next.state = State::file(
            FileOp::default().then(&self.state, FileInput::Empty, mkdir),
            self.meta(format!("WORKDIR {path}")).cap("file.base"),
        );
        next.config.config.working_dir = path;
        next
    }

    /// Copies `src` (wildcards allowed; a directory's contents) from `from`
    /// to `dest` (relative to the working directory).
    pub fn copy(&self, from: &State, src: &str, dest: &str) -> Stage {
        let dest = self.absolute(dest);
        let copy = pb::FileActionCopy {
            src: format!("/{}", src.trim_start_matches('/')),
            dest: dest.clone(),
            follow_symlink: true,
            dir_copy_contents: true,
            allow_wildcard: true,
            allow_empty_wildcard: true,
            create_dest_path: true,
            timestamp: -1,
            mode: -1,
            ..Default::default()
        };
        let mut next = self.clone();
        next.state = State::file(
            FileOp::default().then(&self.state, FileInput::State(from.clone()), Action::Copy(copy)),
            self.meta(format!("COPY {src} {dest}")).cap("file.base"),
        );
        next
    }

    /// Writes a file with these contents and permission bits.
    pub fn write(&self, path: &str, contents: &[u8], mode: u32) -> Stage {
        let path = self.absolute(path);
        let mk = Action::Mkfile(pb::FileActionMkFile {
            path: path.clone(),
            mode: mode as i32,
            data: contents.to_vec(),
            timestamp: -1,
            ..Default::default()
        });
        let mut next = self.clone();
        next.state = State::file(
            FileOp::default().then(&self.state, FileInput::Empty, mk),
            self.meta(format!("WRITE {path}")).cap("file.base"),
        );
        next
    }

    /// Sets the image's default command (exec form).
    pub fn cmd(&self, argv: &[&str]) -> Stage {
        let mut next = self.clone();
        next.config.config.cmd = Some(argv.iter().map(|a| a.to_string()).collect());
        next
    }

    /// Sets the image's entrypoint (exec form).
    pub fn entrypoint(&self, argv: &[&str]) -> Stage {
        let mut next = self.clone();
        next.config.config.entrypoint = Some(argv.iter().map(|a| a.to_string()).collect());
        next
    }

    /// Sets an image label.
    pub fn label(&self, key: &str, value: &str) -> Stage {
        let mut next = self.clone();
        next.config.config.labels.insert(key.to_string(), value.to_string());
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_frontend::{HostError, ResolvedImage};

    struct Pinning;
    impl Host for Pinning {
        fn resolve_image(&self, reference: &str, _: &Platform) -> Result<Option<ResolvedImage>, HostError> {
            let mut config = ImageConfig::default();
            config.set_env("PATH", "/bin");
            Ok(Some(ResolvedImage {
                reference: format!("{reference}@sha256:{}", "a".repeat(64)),
                config,
            }))
        }
    }

    fn request() -> Request {
        Request {
            definition: b"x".to_vec(),
            filename: "Buildfile".into(),
            build_platform: Platform::linux_amd64(),
            multi_platform: false,
            ..Default::default()
        }
    }

    #[test]
    fn a_stage_lowers_to_a_pinned_source_a_workdir_and_a_run_that_sees_both() {
        let req = request();
        let build = Build::new(&req, &Pinning);
        let stage = build
            .image("alpine")
            .expect("resolves")
            .env("A", "1")
            .workdir("/src")
            .copy(build.context(), "app", ".")
            .run("make");
        let response = build.finish(&stage);
        let def = kiln_llb::LoadedDefinition::from_definition(response.definition.expect("definition")).expect("loads");
        let json = def.to_json_lines();
        assert!(json.contains(&format!("docker-image://docker.io/library/alpine:latest@sha256:{}", "a".repeat(64))));
        assert!(json.contains("local://context"));
        let exec = def
            .ops
            .iter()
            .find_map(|o| match &o.op.op {
                Some(pb::op::Op::Exec(e)) => e.meta.clone(),
                _ => None,
            })
            .expect("an exec");
        assert_eq!(exec.args, ["/bin/sh", "-c", "make"]);
        assert_eq!(exec.cwd, "/src");
        assert_eq!(exec.env, ["PATH=/bin", "A=1"]);
        let config = response.image_config.expect("config");
        assert_eq!(config.config.working_dir, "/src");
        assert_eq!(config.architecture, "amd64");
    }

    #[test]
    fn an_unparsable_reference_is_a_diagnostic() {
        let req = request();
        let build = Build::new(&req, &Pinning);
        let err = build.image("Not A Ref").expect_err("invalid");
        assert_eq!(err.code, "kiln::guest::invalid_reference");
    }
}
