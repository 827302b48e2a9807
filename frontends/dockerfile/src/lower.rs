//! Phase 3, lower: typed instructions → LLB through the builder, plus the
//! result image's config — what BuildKit's dockerfile2llb does.
//!
//! Stages are lowered on demand from the target, so only stages the target
//! needs enter the graph; a stage that reaches itself is an error.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use kiln_frontend::config::{Healthcheck, History};
use kiln_frontend::reference::Reference;
use kiln_frontend::{Host, ImageConfig, Platform};
use kiln_llb::builder::{Exec, FileInput, FileOp, LateAttrs, Mount, MountKind, SourceSpan, VertexMeta};
use kiln_llb::pb;
use kiln_llb::pb::file_action::Action;
use kiln_llb::State;

use crate::instructions::{CopyInstr, Instruction};
use crate::parser::{chomp_heredoc_content, Node, Span};
use crate::shell::{Env, Lexer};

/// Default PATH for Linux images without one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// An ARG declaration: name and optional default (unexpanded).
pub type ArgDecl = (String, Option<String>);

/// A lowering error: (code, message, span).
pub type LowerError = (&'static str, String, Span);

/// One stage's instructions.
pub struct StageDef<'a> {
    /// `FROM` image (unexpanded).
    pub image: String,
    /// `AS` name.
    pub name: Option<String>,
    /// `--platform` (unexpanded).
    pub platform: Option<String>,
    /// The FROM node.
    pub from: &'a Node,
    /// The rest, in order.
    pub instructions: Vec<(&'a Node, Instruction)>,
}

/// Inputs of lowering besides the stages.
pub struct LowerInput<'a> {
    /// Global ARGs (before the first FROM).
    pub meta_args: Vec<(&'a Node, Vec<ArgDecl>)>,
    /// Stages.
    pub stages: Vec<StageDef<'a>>,
    /// Request.
    pub request: &'a kiln_frontend::Request,
    /// Host.
    pub host: &'a dyn Host,
    /// The escape character.
    pub escape: char,
}

/// The lowering result.
pub struct Lowered {
    /// The result state.
    pub state: State,
    /// The result image config.
    pub config: ImageConfig,
}

#[derive(Clone)]
struct Built {
    state: State,
    config: ImageConfig,
    /// Declared ARGs (name, value) visible to stages built from this one.
    args: Vec<(String, String)>,
    platform: Platform,
}

/// Lowers the stages to LLB.
pub fn lower(input: &LowerInput<'_>) -> Result<Lowered, Vec<LowerError>> {
    let mut lowerer = Lowerer::new(input);
    let target = lowerer.target_stage()?;
    let result = lowerer.stage(target);
    let mut errors = std::mem::take(&mut lowerer.errors);
    let built = match result {
        Ok(b) => b,
        Err(e) => {
            errors.push(e);
            Built {
                state: State::scratch(),
                config: ImageConfig::default(),
                args: Vec::new(),
                platform: Platform::default(),
            }
        }
    };
    if !errors.is_empty() {
        errors.sort_by_key(|e| e.2.start);
        errors.dedup();
        return Err(errors);
    }
    // Now that every use of the context is known, fix what the context source asks for.
    let mut late = BTreeMap::new();
    let includes: Vec<String> = lowerer
        .context_paths
        .iter()
        .map(|p| p.trim_start_matches('/').to_string())
        .collect();
    if !includes.is_empty() && !includes.iter().any(String::is_empty) {
        let json = serde_json::to_string(&includes).unwrap_or_default();
        late.insert("local.includepattern".to_string(), json.clone());
        late.insert("local.followpaths".to_string(), json);
    }
    let _ = lowerer.context_late.set(late);
    Ok(Lowered {
        state: built.state,
        config: built.config,
    })
}

struct Lowerer<'a, 'b> {
    input: &'b LowerInput<'a>,
    built: HashMap<usize, Built>,
    in_progress: BTreeSet<usize>,
    context: Option<State>,
    context_late: LateAttrs,
    context_paths: BTreeSet<String>,
    meta_env: Vec<(String, String)>,
    images: HashMap<String, (String, ImageConfig)>,
    /// Errors of instructions that were skipped so the rest could be checked.
    errors: Vec<LowerError>,
}

fn platform_args(prefix: &str, p: &Platform) -> Vec<(String, String)> {
    vec![
        (format!("{prefix}PLATFORM"), p.to_string_form()),
        (format!("{prefix}OS"), p.os.clone()),
        (format!("{prefix}ARCH"), p.architecture.clone()),
        (format!("{prefix}VARIANT"), p.variant.clone()),
    ]
}

fn span_of(node: &Node) -> SourceSpan {
    SourceSpan {
        source_index: 0,
        start_line: node.start_line as i32,
        end_line: node.end_line as i32,
    }
}

fn pb_platform(p: &Platform) -> pb::Platform {
    pb::Platform {
        architecture: p.architecture.clone(),
        os: p.os.clone(),
        variant: p.variant.clone(),
        ..Default::default()
    }
}

/// Go's `path.Clean` for absolute or relative slash paths.
pub fn clean_path(p: &str) -> String {
    let rooted = p.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|l| *l != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            s => parts.push(s),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".into(),
        (false, false) => joined,
    }
}

fn join_path(base: &str, p: &str) -> String {
    if p.starts_with('/') {
        clean_path(p)
    } else {
        clean_path(&format!("{}/{}", if base.is_empty() { "/" } else { base }, p))
    }
}

impl<'a, 'b> Lowerer<'a, 'b> {
    fn new(input: &'b LowerInput<'a>) -> Self {
        let req = input.request;
        let target = req.platform.clone().unwrap_or_else(|| req.build_platform.clone());
        let mut meta_env = platform_args("TARGET", &target);
        meta_env.extend(platform_args("BUILD", &req.build_platform));
        Lowerer {
            input,
            built: HashMap::new(),
            in_progress: BTreeSet::new(),
            context: None,
            context_late: LateAttrs::default(),
            context_paths: BTreeSet::new(),
            meta_env,
            images: HashMap::new(),
            errors: Vec::new(),
        }
    }

    fn target_stage(&mut self) -> Result<usize, Vec<LowerError>> {
        let mut errors = Vec::new();
        // Global ARGs: build args override defaults.
        for (node, args) in &self.input.meta_args {
            for (k, v) in args {
                let value = match self.input.request.build_args.get(k) {
                    Some(v) => Some(v.clone()),
                    None => match v {
                        Some(v) => match self.lexer().process_word(v, &self.meta_env) {
                            Ok(p) => Some(p.result),
                            Err(e) => {
                                errors.push(("expansion", e.0, node.span.clone()));
                                None
                            }
                        },
                        None => None,
                    },
                };
                if let Some(v) = value {
                    self.meta_env.push((k.clone(), v));
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let stages = &self.input.stages;
        match &self.input.request.target {
            Some(t) => stages
                .iter()
                .position(|s| s.name.as_deref() == Some(t.to_ascii_lowercase().as_str()))
                .ok_or_else(|| {
                    let names: Vec<&str> = stages.iter().filter_map(|s| s.name.as_deref()).collect();
                    vec![(
                        "unknown_target",
                        format!("target stage {t:?} could not be found (stages: {})", names.join(", ")),
                        0..0,
                    )]
                }),
            None => Ok(stages.len() - 1),
        }
    }

    fn lexer(&self) -> Lexer {
        Lexer::new(self.input.escape)
    }

    fn expand(&self, word: &str, env: &dyn Env, node: &Node) -> Result<String, LowerError> {
        self.lexer()
            .process_word(word, env)
            .map(|p| p.result)
            .map_err(|e| ("expansion", e.0, node.span_of(word)))
    }

    fn find_stage(&self, name: &str, before: usize) -> Option<usize> {
        let lower = name.to_ascii_lowercase();
        if let Some(i) = self.input.stages[..before]
            .iter()
            .position(|s| s.name.as_deref() == Some(lower.as_str()))
        {
            return Some(i);
        }
        name.parse::<usize>().ok().filter(|i| *i < before)
    }

    fn resolve_image(&mut self, reference: &str, platform: &Platform, node: &Node) -> Result<(String, ImageConfig), LowerError> {
        let key = format!("{reference} {}", platform.to_string_form());
        if let Some(hit) = self.images.get(&key) {
            return Ok(hit.clone());
        }
        let parsed = Reference::parse(reference).map_err(|e| ("invalid_reference", e.to_string(), node.span_of(reference)))?;
        let normalized = parsed.normalized();
        let resolved = self.input.host.resolve_image(&normalized, platform).map_err(|e| {
            (
                "unresolved_image",
                format!("cannot resolve image {normalized} for {}: {e}", platform.to_string_form()),
                node.span.clone(),
            )
        })?;
        let result = match resolved {
            Some(r) => (r.reference, r.config),
            None => (normalized, ImageConfig::default()),
        };
        self.images.insert(key, result.clone());
        Ok(result)
    }

    fn image_state(
        &mut self,
        reference: &str,
        platform: &Platform,
        node: &Node,
        meta: VertexMeta,
    ) -> Result<(State, ImageConfig), LowerError> {
        let (pinned, config) = self.resolve_image(reference, platform, node)?;
        // A host may pin an image to another source kind (e.g. `oci-layout://…`).
        let identifier = if pinned.contains("://") {
            pinned
        } else {
            format!("docker-image://{pinned}")
        };
        let state = State::source(identifier, BTreeMap::new(), Some(pb_platform(platform)), meta.cap("source.image"));
        Ok((state, config))
    }

    fn context(&mut self) -> State {
        if let Some(c) = &self.context {
            return c.clone();
        }
        let mut attrs = BTreeMap::new();
        attrs.insert("local.sharedkeyhint".to_string(), "context".to_string());
        let ignore = &self.input.request.ignore_patterns;
        if !ignore.is_empty() {
            attrs.insert(
                "local.excludepatterns".to_string(),
                serde_json::to_string(ignore).unwrap_or_default(),
            );
        }
        let meta = VertexMeta::default()
            .describe("llb.customname", "[internal] load build context")
            .cap("source.local")
            .cap("source.local.sharedkeyhint");
        let state = State::source_with_late_attrs("local://context", attrs, self.context_late.clone(), meta);
        self.context = Some(state.clone());
        state
    }

    fn stage(&mut self, index: usize) -> Result<Built, LowerError> {
        self.stage_ref(index)?;
        Ok(self.built[&index].clone())
    }

    /// Lowers a stage once (memoized) without copying its result.
    fn stage_ref(&mut self, index: usize) -> Result<(), LowerError> {
        if self.built.contains_key(&index) {
            return Ok(());
        }
        let def = &self.input.stages[index];
        if !self.in_progress.insert(index) {
            return Err((
                "stage_cycle",
                format!("stage {} depends on itself", def.name.clone().unwrap_or(index.to_string())),
                def.from.span.clone(),
            ));
        }
        let result = self.lower_stage(index);
        self.in_progress.remove(&index);
        self.built.insert(index, result?);
        Ok(())
    }

    fn lower_stage(&mut self, index: usize) -> Result<Built, LowerError> {
        let def = &self.input.stages[index];
        let stage_name = def.name.clone().unwrap_or_else(|| format!("stage-{index}"));
        let total = def.instructions.len() + 1;
        let image = self.expand(&def.image, &self.meta_env, def.from)?;
        if image.is_empty() {
            return Err((
                "empty_base",
                format!("base name ({}) should not be blank: an ARG it uses has no value", def.image),
                def.from.span_of(&def.image),
            ));
        }
        let platform = match &def.platform {
            Some(p) => {
                let expanded = self.expand(p, &self.meta_env, def.from)?;
                Platform::parse(&expanded).ok_or(("invalid_platform", format!("invalid platform {expanded:?}"), def.from.span_of(p)))?
            }
            None => self
                .input
                .request
                .platform
                .clone()
                .unwrap_or_else(|| self.input.request.build_platform.clone()),
        };
        let from_text = def.from.original.trim().to_string();
        let image_lower = image.to_ascii_lowercase();
        let base_stage = self.input.stages[..index]
            .iter()
            .position(|s| s.name.as_deref() == Some(image_lower.as_str()));
        let mut b = if let Some(base) = base_stage {
            let mut b = self.stage(base)?;
            b.platform = platform.clone();
            b
        } else if image_lower == "scratch" {
            Built {
                state: State::scratch(),
                config: ImageConfig::default(),
                args: Vec::new(),
                platform: platform.clone(),
            }
        } else {
            self.base_image(&image, &platform, def, &stage_name, total, &from_text)?
        };
        b.config.architecture = platform.architecture.clone();
        b.config.os = platform.os.clone();
        b.config.variant = platform.variant.clone();
        if b.config.env("PATH").is_none() && platform.os == "linux" {
            b.config.config.env.insert(0, format!("PATH={DEFAULT_PATH}"));
        }
        // ONBUILD triggers of the base image run first.
        let triggers = std::mem::take(&mut b.config.config.on_build);
        let mut trigger_nodes = Vec::new();
        for t in &triggers {
            let (ast, errors) = crate::parser::parse(t);
            if let Some(e) = errors.first() {
                return Err((
                    "onbuild_trigger",
                    format!("invalid ONBUILD trigger {t:?} in base image: {}", e.message),
                    def.from.span.clone(),
                ));
            }
            for node in ast.nodes {
                let inst = crate::instructions::type_node(&node)
                    .map_err(|(c, m, _)| (c, format!("ONBUILD trigger {t:?}: {m}"), def.from.span.clone()))?;
                trigger_nodes.push((node, inst));
            }
        }
        let mut cx = StageCx {
            name: stage_name,
            total,
            step: 1,
            args: b.args.clone(),
            cmd_set: false,
        };
        for (node, inst) in &trigger_nodes {
            let mut located = node.clone();
            located.span = def.from.span.clone();
            located.start_line = def.from.start_line;
            located.end_line = def.from.end_line;
            self.dispatch(index, &mut b, &mut cx, &located, inst)?;
        }
        for (node, inst) in &def.instructions {
            cx.step += 1;
            // Report the error and go on, so one run shows every broken instruction.
            if let Err(e) = self.dispatch(index, &mut b, &mut cx, node, inst) {
                self.errors.push(e);
            }
        }
        b.args = cx.args;
        Ok(b)
    }

    fn base_image(
        &mut self,
        image: &str,
        platform: &Platform,
        def: &StageDef<'_>,
        stage_name: &str,
        total: usize,
        from_text: &str,
    ) -> Result<Built, LowerError> {
        let (pinned, _) = self.resolve_image(image, platform, def.from)?;
        let meta = VertexMeta::default()
            .describe("com.docker.dockerfile.v1.command", from_text)
            .describe("llb.customname", format!("[{stage_name} 1/{total}] FROM {pinned}"))
            .at(span_of(def.from));
        let (state, config) = self.image_state(image, platform, def.from, meta)?;
        Ok(Built {
            state,
            config,
            args: Vec::new(),
            platform: platform.clone(),
        })
    }

    fn meta(&self, cx: &StageCx, node: &Node, with_command: bool) -> VertexMeta {
        let text = node.original.trim();
        let mut m = VertexMeta::default()
            .describe(
                "llb.customname",
                format!("[{} {}/{}] {}", cx.name, cx.step, cx.total, display_command(node)),
            )
            .at(span_of(node));
        if with_command {
            m = m.describe("com.docker.dockerfile.v1.command", text);
        }
        m
    }

    fn dispatch(&mut self, index: usize, b: &mut Built, cx: &mut StageCx, node: &Node, inst: &Instruction) -> Result<(), LowerError> {
        let history = |b: &mut Built, created_by: String, empty: bool| {
            b.config.history.push(History {
                created_by,
                comment: "buildkit.dockerfile.v0".into(),
                empty_layer: empty,
            });
        };
        match inst {
            Instruction::From { .. } => {}
            Instruction::Arg(args) => {
                // Every value is expanded with the variables as they were before this instruction.
                let env = StageVars::of(b, cx);
                let mut values = Vec::with_capacity(args.len());
                for (k, v) in args {
                    let value = if let Some(v) = self.input.request.build_args.get(k) {
                        Some(v.clone())
                    } else if let Some(v) = v {
                        Some(self.expand(v, &env, node)?)
                    } else {
                        Env::get(&self.meta_env, k).map(str::to_string)
                    };
                    values.push((k, value));
                }
                for (k, value) in values {
                    cx.args.retain(|(ak, _)| ak != k);
                    if let Some(v) = value {
                        cx.args.push((k.clone(), v));
                    }
                }
                history(b, format!("ARG {}", node.original.trim().get(3..).unwrap_or("").trim()), true);
            }
            Instruction::Env(pairs) => {
                // As in BuildKit, `ENV a=1 b=$a` gives b the value a had before this instruction.
                let env = StageVars::of(b, cx);
                let expanded = pairs
                    .iter()
                    .map(|(k, v)| Ok((self.expand(k, &env, node)?, self.expand(v, &env, node)?)))
                    .collect::<Result<Vec<_>, LowerError>>()?;
                for (key, value) in expanded {
                    b.config.set_env(&key, &value);
                }
                history(b, format!("ENV {}", node.original.trim().get(3..).unwrap_or("").trim()), true);
            }
            Instruction::Label(pairs) => {
                let env = StageVars::of(b, cx);
                let expanded = pairs
                    .iter()
                    .map(|(k, v)| Ok((self.expand(k, &env, node)?, self.expand(v, &env, node)?)))
                    .collect::<Result<Vec<_>, LowerError>>()?;
                b.config.config.labels.extend(expanded);
                history(b, format!("LABEL {}", node.original.trim().get(5..).unwrap_or("").trim()), true);
            }
            Instruction::Maintainer(m) => {
                history(b, format!("MAINTAINER {m}"), true);
            }
            Instruction::Workdir(dir) => {
                let dir = self.expand(dir, &StageVars::of(b, cx), node)?;
                let path = join_path(&b.config.config.working_dir, &dir);
                b.config.config.working_dir = path.clone();
                let mkdir = Action::Mkdir(pb::FileActionMkDir {
                    path,
                    mode: 0o755,
                    make_parents: true,
                    timestamp: -1,
                    ..Default::default()
                });
                let fop = FileOp::default().then(&b.state, FileInput::Empty, mkdir);
                b.state = State::file(fop, self.meta(cx, node, false).cap("file.base"));
                history(b, format!("WORKDIR {dir}"), false);
            }
            Instruction::User(u) => {
                b.config.config.user = self.expand(u, &StageVars::of(b, cx), node)?;
                history(b, format!("USER {}", b.config.config.user), true);
            }
            Instruction::Shell(s) => {
                b.config.config.shell = s.clone();
                history(b, format!("SHELL {s:?}"), true);
            }
            Instruction::Cmd(args, json) => {
                b.config.config.cmd = Some(self.command_args(b, args, *json));
                cx.cmd_set = true;
                history(
                    b,
                    format!("CMD {}", serde_json::to_string(&b.config.config.cmd).unwrap_or_default()),
                    true,
                );
            }
            Instruction::Entrypoint(args, json) => {
                b.config.config.entrypoint = Some(self.command_args(b, args, *json));
                if !cx.cmd_set {
                    b.config.config.cmd = None;
                }
                history(
                    b,
                    format!(
                        "ENTRYPOINT {}",
                        serde_json::to_string(&b.config.config.entrypoint).unwrap_or_default()
                    ),
                    true,
                );
            }
            Instruction::Expose(ports) => {
                for p in ports {
                    let p = self.expand(p, &StageVars::of(b, cx), node)?;
                    let key = if p.contains('/') {
                        p.to_ascii_lowercase()
                    } else {
                        format!("{p}/tcp")
                    };
                    b.config.config.exposed_ports.insert(key, serde_json::json!({}));
                }
                history(b, format!("EXPOSE {}", ports.join(" ")), true);
            }
            Instruction::Volume(vols) => {
                for v in vols {
                    let v = self.expand(v, &StageVars::of(b, cx), node)?;
                    if v.trim().is_empty() {
                        return Err((
                            "empty_volume",
                            "VOLUME specified can not be an empty string".into(),
                            node.span.clone(),
                        ));
                    }
                    b.config.config.volumes.insert(v, serde_json::json!({}));
                }
                history(b, format!("VOLUME {vols:?}"), true);
            }
            Instruction::StopSignal(s) => {
                b.config.config.stop_signal = self.expand(s, &StageVars::of(b, cx), node)?;
                history(b, format!("STOPSIGNAL {}", b.config.config.stop_signal), true);
            }
            Instruction::Healthcheck { args, json, flags } => {
                let typ = args[0].to_ascii_uppercase();
                let hc = if typ == "NONE" {
                    Healthcheck {
                        test: vec!["NONE".into()],
                        ..Default::default()
                    }
                } else {
                    let rest = &args[1..];
                    let test = if *json {
                        std::iter::once("CMD".to_string()).chain(rest.iter().cloned()).collect()
                    } else {
                        vec!["CMD-SHELL".to_string(), rest.join(" ")]
                    };
                    let dur = |n: &str| -> Result<i64, LowerError> {
                        match flags.get(n) {
                            None => Ok(0),
                            Some(v) => {
                                parse_duration(v).ok_or(("malformed_flag", format!("invalid duration for --{n}: {v:?}"), node.span_of(v)))
                            }
                        }
                    };
                    let retries = match flags.get("retries") {
                        None => 0,
                        Some(r) => r
                            .parse::<i64>()
                            .map_err(|_| ("malformed_flag", format!("invalid --retries value {r:?}"), node.span_of(r)))?,
                    };
                    Healthcheck {
                        test,
                        interval: dur("interval")?,
                        timeout: dur("timeout")?,
                        start_period: dur("start-period")?,
                        start_interval: dur("start-interval")?,
                        retries,
                    }
                };
                b.config.config.healthcheck = Some(hc);
                history(b, format!("HEALTHCHECK {}", args.join(" ")), true);
            }
            Instruction::Onbuild(trigger) => {
                b.config.config.on_build.push(trigger.clone());
                history(b, format!("ONBUILD {trigger}"), true);
            }
            Instruction::Run {
                args,
                json,
                mounts,
                network,
                security,
                heredocs,
            } => {
                self.run(
                    index,
                    b,
                    cx,
                    node,
                    args,
                    *json,
                    mounts,
                    network.as_deref(),
                    security.as_deref(),
                    heredocs,
                )?;
            }
            Instruction::Copy(copy) => self.copy(index, b, cx, node, copy)?,
        }
        Ok(())
    }

    fn command_args(&self, b: &Built, args: &[String], json: bool) -> Vec<String> {
        if json {
            args.to_vec()
        } else {
            let mut v = self.shell(b);
            v.push(args.join(" "));
            v
        }
    }

    fn shell(&self, b: &Built) -> Vec<String> {
        if !b.config.config.shell.is_empty() {
            b.config.config.shell.clone()
        } else if b.platform.os == "windows" {
            vec!["cmd".into(), "/S".into(), "/C".into()]
        } else {
            vec!["/bin/sh".into(), "-c".into()]
        }
    }

    /// Resolves `from=` of a mount or `--from` of COPY: a stage, or an image.
    fn source_of(&mut self, index: usize, from: &str, node: &Node, platform: &Platform) -> Result<State, LowerError> {
        if let Some(s) = self.find_stage(from, index) {
            self.stage_ref(s)?;
            return Ok(self.built[&s].state.clone());
        }
        let self_name = self.input.stages[index].name.as_deref();
        if self_name == Some(from.to_ascii_lowercase().as_str())
            || from.parse::<usize>().is_ok_and(|i| i >= index && i < self.input.stages.len())
        {
            return Err((
                "stage_cycle",
                format!("stage {from:?} cannot be used here: a stage cannot depend on itself or a later stage"),
                node.span_of(from),
            ));
        }
        if self
            .input
            .stages
            .iter()
            .any(|s| s.name.as_deref() == Some(from.to_ascii_lowercase().as_str()))
        {
            return Err((
                "stage_order",
                format!("stage {from:?} is defined after this one"),
                node.span_of(from),
            ));
        }
        // A plain name one typo away from a stage is almost certainly that stage, not an image.
        let plain = !from.contains(['/', ':', '.', '@']);
        if let Some(near) = self
            .input
            .stages
            .iter()
            .filter_map(|s| s.name.as_deref())
            .find(|n| plain && crate::instructions::edit_distance(n, &from.to_ascii_lowercase()) <= 2)
        {
            return Err((
                "unknown_stage",
                format!("no stage named {from:?} (did you mean {near:?}?); name an existing stage or a full image reference"),
                node.span_of(from),
            ));
        }
        if Reference::parse(from).is_err() {
            return Err((
                "unknown_stage",
                format!("{from:?} is neither a stage of this Dockerfile nor a valid image reference"),
                node.span_of(from),
            ));
        }
        let meta = VertexMeta::default().describe("llb.customname", format!("[internal] load {from}"));
        self.image_state(from, platform, node, meta).map(|(state, _)| state)
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        index: usize,
        b: &mut Built,
        cx: &StageCx,
        node: &Node,
        args: &[String],
        json: bool,
        mount_specs: &[String],
        network: Option<&str>,
        security: Option<&str>,
        heredocs: &[crate::parser::Heredoc],
    ) -> Result<(), LowerError> {
        let env: &dyn Env = &StageVars::of(b, cx);
        let cwd = if b.config.config.working_dir.is_empty() {
            "/".to_string()
        } else {
            b.config.config.working_dir.clone()
        };
        let mut exec = Exec::default();
        let mut extra_mounts = Vec::new();
        let mut argv = if json { args.to_vec() } else { self.shell(b) };
        if !json {
            let cmd = args.join(" ");
            let only_heredoc = heredocs.len() == 1 && crate::parser::parse_heredoc(cmd.trim()).ok().flatten().is_some();
            if only_heredoc {
                let doc = &heredocs[0];
                let content = self.heredoc_content(doc, env, node)?;
                argv.push(content);
            } else if !heredocs.is_empty() {
                let mut cmd = cmd;
                for doc in heredocs {
                    let (file, st) = self.heredoc_file(doc, env, node)?;
                    let dest = format!("/dev/pipes/{}", doc.name);
                    let mut m = Mount::bind(dest.clone(), st);
                    m.selector = file;
                    m.readonly = true;
                    extra_mounts.push(m);
                    if let Some(pos) = find_heredoc_marker(&cmd, &doc.name) {
                        cmd.replace_range(pos.clone(), &format!("<{dest}"));
                    }
                }
                argv.push(cmd);
            } else {
                argv.push(cmd);
            }
        }
        let mut run_env: Vec<String> = b.config.config.env.clone();
        let env_keys: BTreeSet<&str> = b
            .config
            .config
            .env
            .iter()
            .map(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k))
            .collect();
        for (k, v) in &cx.args {
            if !env_keys.contains(k.as_str()) && !is_proxy_arg(k) {
                run_env.push(format!("{k}={v}"));
            }
        }
        exec.meta = pb::Meta {
            args: argv,
            env: run_env,
            cwd: cwd.clone(),
            user: b.config.config.user.clone(),
            remove_mount_stubs_recursive: true,
            ..Default::default()
        };
        exec.network = match network {
            None | Some("default") => pb::NetMode::Unset,
            Some("none") => pb::NetMode::None,
            Some("host") => pb::NetMode::Host,
            Some(other) => {
                return Err((
                    "malformed_flag",
                    format!("unsupported network mode {other:?} (default, none or host)"),
                    node.span_of(other),
                ))
            }
        };
        exec.security = match security {
            None | Some("sandbox") => pb::SecurityMode::Sandbox,
            Some("insecure") => pb::SecurityMode::Insecure,
            Some(other) => {
                return Err((
                    "malformed_flag",
                    format!("unsupported security mode {other:?} (sandbox or insecure)"),
                    node.span_of(other),
                ))
            }
        };
        exec.platform = Some(pb_platform(&b.platform));
        let mut meta = self
            .meta(cx, node, true)
            .cap("exec.meta.base")
            .cap("exec.mount.bind")
            .cap("exec.meta.setsdefaultpath");
        if exec.network != pb::NetMode::Unset {
            meta = meta.cap("exec.meta.network");
        }
        let mut ssh_count = 0;
        for spec in mount_specs {
            let m = self.mount(index, b, node, env, spec, &cwd, &mut ssh_count, &mut exec.secret_env)?;
            if let Some(m) = m {
                meta = meta.cap(match m.kind {
                    MountKind::Cache { .. } => "exec.mount.cache",
                    MountKind::Tmpfs { .. } => "exec.mount.tmpfs",
                    MountKind::Secret(_) => "exec.mount.secret",
                    MountKind::Ssh(_) => "exec.mount.ssh",
                    MountKind::Bind => "exec.mount.bind",
                });
                extra_mounts.push(m);
            }
        }
        exec.mounts = extra_mounts;
        let result = b.state.run(exec, meta);
        b.state = result.root;
        let shown = if json {
            serde_json::to_string(args).unwrap_or_default()
        } else {
            format!("/bin/sh -c {}", args.join(" "))
        };
        b.config.history.push(History {
            created_by: format!("RUN {shown} # buildkit"),
            comment: "buildkit.dockerfile.v0".into(),
            empty_layer: false,
        });
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn mount(
        &mut self,
        index: usize,
        b: &Built,
        node: &Node,
        env: &dyn Env,
        spec: &str,
        cwd: &str,
        ssh_count: &mut usize,
        secret_env: &mut Vec<pb::SecretEnv>,
    ) -> Result<Option<Mount>, LowerError> {
        let bad = |msg: String| ("malformed_mount", msg, node.span_of(spec));
        let spec = self.expand(spec, env, node)?;
        let mut kv: Vec<(String, Option<String>)> = Vec::new();
        for field in split_csv(&spec) {
            let (k, v) = match field.split_once('=') {
                Some((k, v)) => (k.trim().to_ascii_lowercase(), Some(v.to_string())),
                None => (field.trim().to_ascii_lowercase(), None),
            };
            kv.push((k, v));
        }
        let get = |names: &[&str]| {
            kv.iter()
                .rev()
                .find(|(k, _)| names.contains(&k.as_str()))
                .map(|(_, v)| v.clone().unwrap_or_default())
        };
        let flag = |names: &[&str]| -> Result<Option<bool>, LowerError> {
            match kv.iter().rev().find(|(k, _)| names.contains(&k.as_str())) {
                None => Ok(None),
                Some((_, None)) => Ok(Some(true)),
                Some((k, Some(v))) => match v.to_ascii_lowercase().as_str() {
                    "true" | "1" => Ok(Some(true)),
                    "false" | "0" => Ok(Some(false)),
                    _ => Err(bad(format!("invalid value for {k}: {v:?}"))),
                },
            }
        };
        const KNOWN: &[&str] = &[
            "type",
            "target",
            "dst",
            "destination",
            "source",
            "src",
            "from",
            "ro",
            "readonly",
            "rw",
            "readwrite",
            "id",
            "sharing",
            "mode",
            "uid",
            "gid",
            "size",
            "required",
            "env",
        ];
        if let Some((k, _)) = kv.iter().find(|(k, _)| !KNOWN.contains(&k.as_str())) {
            return Err(bad(format!("unknown mount option {k:?}")));
        }
        let typ = get(&["type"]).unwrap_or_else(|| "bind".into()).to_ascii_lowercase();
        let target = get(&["target", "dst", "destination"]);
        let parse_u32 = |name: &str, radix: u32| -> Result<Option<u32>, LowerError> {
            match get(&[name]) {
                None => Ok(None),
                Some(v) => u32::from_str_radix(&v, radix)
                    .map(Some)
                    .map_err(|_| bad(format!("invalid {name} {v:?}"))),
            }
        };
        let resolve_target = |t: &str| join_path(cwd, t);
        let readonly_flag = flag(&["ro", "readonly"])?;
        let rw_flag = flag(&["rw", "readwrite"])?;
        let from = get(&["from"]);
        let source = get(&["source", "src"]);
        let source_state = |this: &mut Self| -> Result<State, LowerError> {
            match &from {
                Some(f) => this.source_of(index, f, node, &b.platform),
                None => {
                    this.context_paths
                        .insert(clean_path(&format!("/{}", source.clone().unwrap_or_default())));
                    Ok(this.context())
                }
            }
        };
        let m = match typ.as_str() {
            "bind" => {
                // BuildKit mounts at the working directory when no target is given.
                let target = target.unwrap_or_else(|| ".".into());
                let mut m = Mount::bind(resolve_target(&target), source_state(self)?);
                m.selector = source
                    .as_deref()
                    .map(|s| clean_path(&format!("/{s}")))
                    .filter(|s| s != "/")
                    .unwrap_or_default();
                m.readonly = !(rw_flag == Some(true) || readonly_flag == Some(false));
                m.no_output = true;
                m
            }
            "cache" => {
                let target = target.ok_or_else(|| bad("cache mount needs target=".into()))?;
                let target = resolve_target(&target);
                let id = get(&["id"]).unwrap_or_else(|| target.clone());
                let sharing = match get(&["sharing"]).as_deref() {
                    None | Some("shared") => pb::CacheSharingOpt::Shared,
                    Some("private") => pb::CacheSharingOpt::Private,
                    Some("locked") => pb::CacheSharingOpt::Locked,
                    Some(o) => return Err(bad(format!("unsupported sharing value {o:?} (shared, private or locked)"))),
                };
                let mut m = Mount::of_kind(
                    target,
                    MountKind::Cache {
                        id: format!("/{id}"),
                        sharing,
                    },
                );
                if from.is_some() {
                    m.source = source_state(self)?;
                    m.selector = source
                        .as_deref()
                        .map(|s| clean_path(&format!("/{s}")))
                        .filter(|s| s != "/")
                        .unwrap_or_default();
                }
                m.readonly = readonly_flag == Some(true);
                let _ = (parse_u32("mode", 8)?, parse_u32("uid", 10)?, parse_u32("gid", 10)?);
                m
            }
            "tmpfs" => {
                let target = target.ok_or_else(|| bad("tmpfs mount needs target=".into()))?;
                let size = match get(&["size"]) {
                    None => 0,
                    Some(s) => parse_size(&s).ok_or_else(|| bad(format!("invalid size {s:?}")))?,
                };
                Mount::of_kind(resolve_target(&target), MountKind::Tmpfs { size })
            }
            "secret" => {
                let id = get(&["id"])
                    .or_else(|| target.as_deref().and_then(|t| t.rsplit('/').next()).map(str::to_string))
                    .ok_or_else(|| bad("secret mount needs id= or target=".into()))?;
                let optional = flag(&["required"])? != Some(true);
                if let Some(var) = get(&["env"]) {
                    secret_env.push(pb::SecretEnv {
                        id: id.clone(),
                        name: var,
                        optional,
                    });
                    if target.is_none() {
                        return Ok(None);
                    }
                }
                let dest = target.map(|t| resolve_target(&t)).unwrap_or_else(|| format!("/run/secrets/{id}"));
                let opt = pb::SecretOpt {
                    id,
                    uid: parse_u32("uid", 10)?.unwrap_or(0),
                    gid: parse_u32("gid", 10)?.unwrap_or(0),
                    mode: parse_u32("mode", 8)?.unwrap_or(0o400),
                    optional,
                };
                Mount::of_kind(dest, MountKind::Secret(opt))
            }
            "ssh" => {
                let id = get(&["id"]).unwrap_or_else(|| "default".into());
                let optional = flag(&["required"])? != Some(true);
                let dest = target
                    .map(|t| resolve_target(&t))
                    .unwrap_or_else(|| format!("/run/buildkit/ssh_agent.{ssh_count}"));
                *ssh_count += 1;
                let opt = pb::SshOpt {
                    id,
                    uid: parse_u32("uid", 10)?.unwrap_or(0),
                    gid: parse_u32("gid", 10)?.unwrap_or(0),
                    mode: parse_u32("mode", 8)?.unwrap_or(0o600),
                    optional,
                };
                Mount::of_kind(dest, MountKind::Ssh(opt))
            }
            other => return Err(bad(format!("unsupported mount type {other:?} (bind, cache, tmpfs, secret or ssh)"))),
        };
        Ok(Some(m))
    }

    /// A scratch filesystem holding one heredoc body as `/<name>` (mode 0644); returns the path and the state.
    fn heredoc_file(&self, doc: &crate::parser::Heredoc, env: &dyn Env, node: &Node) -> Result<(String, State), LowerError> {
        let content = self.heredoc_content(doc, env, node)?;
        let path = format!("/{}", doc.name);
        let mk = Action::Mkfile(pb::FileActionMkFile {
            path: path.clone(),
            mode: 0o644,
            data: content.into_bytes(),
            timestamp: -1,
            ..Default::default()
        });
        let state = State::file(
            FileOp::default().then(&State::scratch(), FileInput::Empty, mk),
            VertexMeta::default().cap("file.base"),
        );
        Ok((path, state))
    }

    fn heredoc_content(&self, doc: &crate::parser::Heredoc, env: &dyn Env, node: &Node) -> Result<String, LowerError> {
        let content = if doc.chomp {
            chomp_heredoc_content(&doc.content)
        } else {
            doc.content.clone()
        };
        if !doc.expand {
            return Ok(content);
        }
        let mut lex = self.lexer();
        lex.raw_quotes = true;
        lex.skip_process_quotes = true;
        lex.process_word(&content, env)
            .map(|p| p.result)
            .map_err(|e| ("expansion", e.0, node.span.clone()))
    }

    fn copy(&mut self, index: usize, b: &mut Built, cx: &StageCx, node: &Node, c: &CopyInstr) -> Result<(), LowerError> {
        let env: &dyn Env = &StageVars::of(b, cx);
        let cmd = if c.is_add { "ADD" } else { "COPY" };
        let dest_raw = self.expand(&c.dest, env, node)?;
        let mut dest = join_path(&b.config.config.working_dir, &dest_raw);
        if (dest_raw.ends_with('/') || dest_raw == "." || dest_raw.ends_with("/.")) && !dest.ends_with('/') {
            dest.push('/');
        }
        let owner = match &c.chown {
            Some(ch) => Some(parse_chown(&self.expand(ch, env, node)?)),
            None => None,
        };
        let (mode, mode_str) = match &c.chmod {
            None => (-1, String::new()),
            Some(m) => {
                let m = self.expand(m, env, node)?;
                match i32::from_str_radix(&m, 8) {
                    Ok(v) if m.chars().all(|c| c.is_ascii_digit()) && v <= 0o7777 => (v, String::new()),
                    _ if is_symbolic_mode(&m) => (-1, m),
                    _ => {
                        return Err((
                            "malformed_flag",
                            format!("invalid --chmod value {m:?}: octal or symbolic (u=rwX,go=rX) expected"),
                            node.span_of(&m),
                        ))
                    }
                }
            }
        };
        let excludes: Vec<String> = c.excludes.iter().map(|e| self.expand(e, env, node)).collect::<Result<_, _>>()?;
        let from_source = match &c.from {
            Some(f) => {
                let f = self.expand(f, env, node)?;
                Some(self.source_of(index, &f, node, &b.platform)?)
            }
            None => None,
        };
        let target = if c.link { State::scratch() } else { b.state.clone() };
        let mut fop = FileOp::default();
        let copy_action = |src: String, dest: String, unpack: bool, includes: Vec<String>| {
            Action::Copy(pb::FileActionCopy {
                src,
                dest,
                owner: owner.clone(),
                mode,
                mode_str: mode_str.clone(),
                follow_symlink: true,
                dir_copy_contents: true,
                attempt_unpack_docker_compatibility: unpack,
                create_dest_path: true,
                allow_wildcard: true,
                allow_empty_wildcard: true,
                timestamp: -1,
                include_patterns: includes,
                exclude_patterns: excludes.clone(),
                ..Default::default()
            })
        };
        for doc in &c.heredocs {
            let (name, src) = self.heredoc_file(doc, env, node)?;
            let heredoc_dest = if dest.ends_with('/') {
                format!("{dest}{}", doc.name)
            } else {
                dest.clone()
            };
            fop = fop.then(&target, FileInput::State(src), copy_action(name, heredoc_dest, false, Vec::new()));
        }
        for src in &c.sources {
            let src = self.expand(src, env, node)?;
            if c.heredocs
                .iter()
                .any(|d| src.starts_with("<<") && src.trim_start_matches(['<', '-']).trim_matches(['"', '\'']) == d.name)
            {
                continue;
            }
            if c.is_add && (src.starts_with("http://") || src.starts_with("https://")) && !is_git_url(&src) {
                let filename = src
                    .trim_end_matches('/')
                    .rsplit('/')
                    .next()
                    .filter(|f| !f.is_empty() && !f.contains('?'))
                    .unwrap_or("index.html")
                    .to_string();
                let mut attrs = BTreeMap::new();
                attrs.insert("http.filename".to_string(), filename.clone());
                if let Some(sum) = &c.checksum {
                    attrs.insert("http.checksum".to_string(), self.expand(sum, env, node)?);
                }
                let st = State::source(
                    src.clone(),
                    attrs,
                    None,
                    VertexMeta::default()
                        .describe("llb.customname", format!("[internal] load remote {src}"))
                        .cap("source.http"),
                );
                fop = fop.then(
                    &target,
                    FileInput::State(st),
                    copy_action(format!("/{filename}"), dest.clone(), false, Vec::new()),
                );
                continue;
            }
            if c.is_add && is_git_url(&src) {
                let (identifier, full) = git_identifier(&src);
                let mut attrs = BTreeMap::new();
                attrs.insert("git.fullurl".to_string(), full);
                if c.keep_git_dir {
                    attrs.insert("git.keepgitdir".to_string(), "true".to_string());
                }
                if let Some(sum) = &c.checksum {
                    attrs.insert("git.checksum".to_string(), self.expand(sum, env, node)?);
                }
                let st = State::source(
                    identifier,
                    attrs,
                    None,
                    VertexMeta::default()
                        .describe("llb.customname", format!("[internal] load git source {src}"))
                        .cap("source.git"),
                );
                fop = fop.then(
                    &target,
                    FileInput::State(st),
                    copy_action("/".into(), dest.clone(), false, Vec::new()),
                );
                continue;
            }
            let source_state = match &from_source {
                Some(s) => s.clone(),
                None => {
                    let p = clean_path(&format!("/{src}"));
                    self.context_paths.insert(if c.parents { "/".to_string() } else { p });
                    self.context()
                }
            };
            let unpack = c.is_add && c.unpack != Some(false);
            let (src_path, includes) = if c.parents {
                ("/".to_string(), vec![clean_path(&src).trim_start_matches("./").to_string()])
            } else {
                (clean_path(&format!("/{src}")), Vec::new())
            };
            fop = fop.then(
                &target,
                FileInput::State(source_state),
                copy_action(src_path, dest.clone(), unpack, includes),
            );
        }
        let meta = self.meta(cx, node, false).cap("file.base");
        let copied = State::file(fop, meta);
        b.state = if c.link {
            State::merge(&[b.state.clone(), copied], self.meta(cx, node, false).cap("mergeop"))
        } else {
            copied
        };
        b.config.history.push(History {
            created_by: format!("{cmd} {} {} # buildkit", c.sources.join(" "), c.dest),
            comment: "buildkit.dockerfile.v0".into(),
            empty_layer: false,
        });
        Ok(())
    }
}

/// The variables an instruction expands with: the image's ENV, then the
/// stage's declared ARGs (ENV wins), read in place without copying.
struct StageVars<'x> {
    env: &'x [String],
    args: &'x [(String, String)],
}

impl<'x> StageVars<'x> {
    fn of(b: &'x Built, cx: &'x StageCx) -> StageVars<'x> {
        StageVars {
            env: &b.config.config.env,
            args: &cx.args,
        }
    }
}

impl Env for StageVars<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        // Check the byte after the name first: it rules out almost every entry without comparing names.
        let n = name.len();
        let from_env = self
            .env
            .iter()
            .rev()
            .find(|e| e.as_bytes().get(n) == Some(&b'=') && e.starts_with(name))
            .map(|e| &e[n + 1..]);
        from_env.or_else(|| Env::get(self.args, name))
    }
}

struct StageCx {
    name: String,
    total: usize,
    step: usize,
    args: Vec<(String, String)>,
    cmd_set: bool,
}

fn display_command(node: &Node) -> String {
    let text = node.original.trim();
    let first_line = text.lines().next().unwrap_or("");
    if node.heredocs.is_empty() {
        return text.to_string();
    }
    let first = node.heredocs[0].content.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
    format!("{first_line} ({first}...)")
}

fn is_proxy_arg(k: &str) -> bool {
    matches!(
        k.to_ascii_uppercase().as_str(),
        "HTTP_PROXY" | "HTTPS_PROXY" | "FTP_PROXY" | "NO_PROXY" | "ALL_PROXY"
    )
}

fn find_heredoc_marker(cmd: &str, name: &str) -> Option<std::ops::Range<usize>> {
    for variant in [
        format!("<<-\"{name}\""),
        format!("<<-'{name}'"),
        format!("<<-{name}"),
        format!("<<\"{name}\""),
        format!("<<'{name}'"),
        format!("<<{name}"),
    ] {
        if let Some(at) = cmd.find(&variant) {
            return Some(at..at + variant.len());
        }
    }
    None
}

/// Splits a `--mount` value on commas, honouring double quotes.
fn split_csv(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for ch in s.chars() {
        match ch {
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out.into_iter().filter(|f| !f.trim().is_empty()).collect()
}

fn parse_chown(s: &str) -> pb::ChownOpt {
    let user_opt = |v: &str| pb::UserOpt {
        user: Some(match v.parse::<u32>() {
            Ok(id) => pb::user_opt::User::ById(id),
            Err(_) => pb::user_opt::User::ByName(pb::NamedUserOpt {
                name: v.to_string(),
                input: 0,
            }),
        }),
    };
    let (u, g) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    pb::ChownOpt {
        user: Some(user_opt(u)),
        group: g.map(user_opt),
    }
}

fn is_symbolic_mode(m: &str) -> bool {
    !m.is_empty()
        && m.split(',').all(|clause| {
            let who_end = clause.find(|c: char| !"ugoa".contains(c)).unwrap_or(clause.len());
            let rest = &clause[who_end..];
            !rest.is_empty() && rest.starts_with(['+', '-', '=']) && rest[1..].chars().all(|c| "rwxXst".contains(c))
        })
}

fn is_git_url(s: &str) -> bool {
    s.starts_with("git://") || s.starts_with("git@") || (s.starts_with("https://") && (s.contains(".git#") || s.ends_with(".git")))
}

fn git_identifier(s: &str) -> (String, String) {
    let (url, fragment) = match s.split_once('#') {
        Some((u, f)) => (u, Some(f)),
        None => (s, None),
    };
    let bare = url
        .trim_start_matches("https://")
        .trim_start_matches("git://")
        .replacen("git@", "", 1)
        .replacen(':', "/", 1);
    let bare = bare.trim_end_matches(".git");
    let id = match fragment {
        Some(f) => format!("git://{bare}#{f}"),
        None => format!("git://{bare}"),
    };
    (id, url.to_string())
}

/// Go-style durations: `30s`, `1m30s`, `500ms`, `1h`.
fn parse_duration(s: &str) -> Option<i64> {
    if s == "0" {
        return Some(0);
    }
    let mut total: f64 = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !c.is_ascii_digit() && c != '.')?;
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        total += n * scale;
        rest = &rest[unit_end..];
    }
    Some(total as i64)
}

/// Sizes such as `64m`, `1g`, `1024`.
fn parse_size(s: &str) -> Option<i64> {
    let lower = s.to_ascii_lowercase();
    let t = lower.trim_end_matches('b').trim_end_matches('i');
    let (num, mult) = match t.chars().last()? {
        'k' => (&t[..t.len() - 1], 1 << 10),
        'm' => (&t[..t.len() - 1], 1 << 20),
        'g' => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    num.parse::<i64>().ok().map(|n| n * mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_clean_like_go() {
        assert_eq!(clean_path("/a/../b/./c/"), "/b/c");
        assert_eq!(clean_path("/.."), "/");
        assert_eq!(join_path("/src", "app"), "/src/app");
        assert_eq!(join_path("/src", "/abs"), "/abs");
        assert_eq!(join_path("", "."), "/");
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("1m30s"), Some(90_000_000_000));
        assert_eq!(parse_duration("5x"), None);
        assert_eq!(parse_size("64m"), Some(64 << 20));
    }
}
