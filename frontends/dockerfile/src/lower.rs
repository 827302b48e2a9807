//! Phase 3, lower: typed instructions → LLB through the builder, plus the
//! result image's config — what BuildKit's dockerfile2llb does.
//!
//! Stages are lowered on demand from the target, so only stages the target
//! needs enter the graph; a stage that reaches itself is an error.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use kiln_frontend::{Host, ImageConfig, Platform};
use kiln_image::Reference;
use kiln_image::{Healthcheck, History};
use kiln_llb::builder::{Exec, FileInput, FileOp, LateAttrs, Mount, MountKind, SourceSpan, VertexMeta};
use kiln_llb::pb;
use kiln_llb::pb::file_action::Action;
use kiln_llb::State;

use crate::ir::{CopyInstr, Heredoc, Instruction, Located, MountKey, MountSpec, Program, RunInstr, Stage};
use crate::parser::{chomp_heredoc_content, Span};
use crate::shell::{Env, Lexer};

/// Stack left before recursion grows the stack ([`stacker`]).
pub(crate) const STACK_RED_ZONE: usize = 128 * 1024;
/// Size of each stack segment recursion adds.
pub(crate) const STACK_SEGMENT: usize = 2 * 1024 * 1024;

/// Default PATH for Linux images without one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A lowering error: (code, message, span).
pub type LowerError = (&'static str, String, Span);

/// What lowering works from: the program and the request it is built for.
pub struct LowerInput<'a> {
    /// The typed program.
    pub program: &'a Program,
    /// Request.
    pub request: &'a kiln_frontend::Request,
    /// Host.
    pub host: &'a dyn Host,
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
    /// The build state's environment (ENV and ARG values), inherited by stages built from this one.
    env: EnvList,
    platform: Platform,
}

/// Lowers the stages to LLB.
pub fn lower(input: &LowerInput<'_>) -> Result<Lowered, Vec<LowerError>> {
    let mut lowerer = Lowerer::new(input);
    let target = lowerer.target_stage()?;
    let result = lowerer.stage_ref(target).and_then(|()| {
        lowerer
            .built
            .remove(&target)
            .ok_or(("internal", "the target stage was not lowered".to_string(), 0..0))
    });
    let mut errors = std::mem::take(&mut lowerer.errors);
    let built = match result {
        Ok(b) => b,
        Err(e) => {
            errors.push(e);
            Built {
                state: State::scratch(),
                config: ImageConfig::default(),
                env: EnvList::default(),
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
    /// For each stage, how many stages name it in FROM and are still to be lowered.
    base_uses: Vec<usize>,
}

fn platform_args(prefix: &str, p: &Platform) -> Vec<(String, String)> {
    vec![
        (format!("{prefix}PLATFORM"), p.to_string_form()),
        (format!("{prefix}OS"), p.os.clone()),
        (format!("{prefix}ARCH"), p.architecture.clone()),
        (format!("{prefix}VARIANT"), p.variant.clone()),
    ]
}

fn span_of(node: &Located) -> SourceSpan {
    SourceSpan {
        source_index: 0,
        start_line: node.start_line as i32,
        end_line: node.end_line as i32,
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
            base_uses: base_uses(&input.program.stages),
        }
    }

    fn target_stage(&mut self) -> Result<usize, Vec<LowerError>> {
        let mut errors = Vec::new();
        // Global ARGs: build args override defaults.
        for (node, args) in &self.input.program.meta_args {
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
        let stages = &self.input.program.stages;
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
        Lexer::new(self.input.program.escape)
    }

    /// Expands both sides of ENV/LABEL pairs, all with the same variables.
    fn expand_pairs(&self, pairs: &[(String, String)], env: &dyn Env, node: &Located) -> Result<Vec<(String, String)>, LowerError> {
        pairs
            .iter()
            .map(|(k, v)| Ok((self.expand(k, env, node)?, self.expand(v, env, node)?)))
            .collect()
    }

    fn expand(&self, word: &str, env: &dyn Env, node: &Located) -> Result<String, LowerError> {
        self.lexer()
            .process_word(word, env)
            .map(|p| p.result)
            .map_err(|e| ("expansion", e.0, node.span_of(word)))
    }

    fn find_stage(&self, name: &str, before: usize) -> Option<usize> {
        let lower = name.to_ascii_lowercase();
        if let Some(i) = self.input.program.stages[..before]
            .iter()
            .position(|s| s.name.as_deref() == Some(lower.as_str()))
        {
            return Some(i);
        }
        name.parse::<usize>().ok().filter(|i| *i < before)
    }

    fn resolve_image(&mut self, reference: &str, platform: &Platform, node: &Located) -> Result<(String, ImageConfig), LowerError> {
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
        node: &Located,
        meta: VertexMeta,
    ) -> Result<(State, ImageConfig), LowerError> {
        let (pinned, config) = self.resolve_image(reference, platform, node)?;
        // A host may pin an image to another source kind (e.g. `oci-layout://…`).
        let identifier = if pinned.contains("://") {
            pinned
        } else {
            format!("docker-image://{pinned}")
        };
        let state = State::source(identifier, BTreeMap::new(), Some(platform.to_pb()), meta.cap("source.image"));
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

    /// A stage's result for a stage built FROM it. The last such stage takes the
    /// image config instead of copying it (a long chain of stages would otherwise
    /// copy ever longer histories); later users only need the filesystem.
    fn stage_as_base(&mut self, index: usize) -> Result<Built, LowerError> {
        self.stage_ref(index)?;
        // Counted uses only: a base named through an ARG is not counted and always copied.
        let last_use = match self.base_uses.get_mut(index) {
            Some(n) if *n > 0 => {
                *n -= 1;
                *n == 0
            }
            _ => false,
        };
        let Some(built) = self.built.get_mut(&index) else {
            return Err(("internal", format!("stage {index} was not lowered"), 0..0));
        };
        if last_use {
            let taken = Built {
                state: built.state.clone(),
                config: std::mem::take(&mut built.config),
                env: std::mem::take(&mut built.env),
                platform: built.platform.clone(),
            };
            return Ok(taken);
        }
        Ok(built.clone())
    }

    /// Lowers a stage once (memoized) without copying its result.
    fn stage_ref(&mut self, index: usize) -> Result<(), LowerError> {
        if self.built.contains_key(&index) {
            return Ok(());
        }
        let def = &self.input.program.stages[index];
        if !self.in_progress.insert(index) {
            return Err((
                "stage_cycle",
                format!("stage {} depends on itself", def.name.clone().unwrap_or(index.to_string())),
                def.from.span.clone(),
            ));
        }
        // Stages are lowered recursively along FROM / --from chains; grow the stack
        // on the heap as needed so a chain of any length cannot overflow it.
        let result = stacker::maybe_grow(STACK_RED_ZONE, STACK_SEGMENT, || self.lower_stage(index));
        self.in_progress.remove(&index);
        self.built.insert(index, result?);
        Ok(())
    }

    fn lower_stage(&mut self, index: usize) -> Result<Built, LowerError> {
        let def = &self.input.program.stages[index];
        // BuildKit leaves the name out of progress names when there is only one stage.
        let stage_name = match &def.name {
            _ if self.input.program.stages.len() == 1 => String::new(),
            Some(n) => n.clone(),
            None => format!("stage-{index}"),
        };
        let image = self.expand(&def.image, &self.meta_env, &def.from)?;
        if image.is_empty() {
            return Err((
                "empty_base",
                format!("base name ({}) should not be blank: an ARG it uses has no value", def.image),
                def.from.span_of(&def.image),
            ));
        }
        let platform = match &def.platform {
            Some(p) => {
                let expanded = self.expand(p, &self.meta_env, &def.from)?;
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
        let base_stage = self.input.program.stages[..index]
            .iter()
            .position(|s| s.name.as_deref() == Some(image_lower.as_str()));
        let named = if base_stage.is_none() { self.named_context(&image) } else { None };
        let image = match &named {
            Some(NamedContext::Image(replacement)) => replacement.clone(),
            _ => image,
        };
        let from_local = matches!(named, Some(NamedContext::Local(_)));
        let from_image = base_stage.is_none() && image_lower != "scratch" && !from_local;
        let mut cx = StageCx {
            name: stage_name,
            total: vertex_commands(def.instructions.iter().map(|(_, i)| i)) + usize::from(from_image),
            index: 0,
            onbuild: false,
            cmd_set: false,
        };
        let mut b = if let Some(base) = base_stage {
            let mut b = self.stage_as_base(base)?;
            b.platform = platform.clone();
            b
        } else if let Some(NamedContext::Local(name)) = &named {
            Built {
                state: self.named_local(name),
                config: ImageConfig::default(),
                env: EnvList::default(),
                platform: platform.clone(),
            }
        } else if image_lower == "scratch" {
            Built {
                state: State::scratch(),
                config: ImageConfig::default(),
                env: EnvList::default(),
                platform: platform.clone(),
            }
        } else {
            self.base_image(&image, &platform, def, &mut cx, &from_text)?
        };
        b.config.architecture = platform.architecture.clone();
        b.config.os = platform.os.clone();
        b.config.variant = platform.variant.clone();
        // Like BuildKit: PATH is always set (last, if the image lacks it), and the
        // image's environment is applied over the build state's, also when the base
        // is another stage (which moves those keys after the stage's ARGs).
        if b.config.env("PATH").is_none() && platform.os != "windows" {
            b.config.config.env.push(format!("PATH={DEFAULT_PATH}"));
        }
        for e in &b.config.config.env {
            let (k, v) = e.split_once('=').unwrap_or((e.as_str(), ""));
            b.env.set(k, v);
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
                let typed = crate::instructions::type_node(&node)
                    .map_err(|(c, m, _)| (c, format!("ONBUILD trigger {t:?}: {m}"), def.from.span.clone()))?;
                let crate::instructions::Typed::Other(inst) = typed else {
                    return Err((
                        "onbuild_trigger",
                        format!("FROM isn't allowed as an ONBUILD trigger ({t:?} in base image)"),
                        def.from.span.clone(),
                    ));
                };
                // Reported at the FROM that inherits them.
                trigger_nodes.push((Located::from_node(&node).relocated(&def.from), inst));
            }
        }
        cx.total += vertex_commands(trigger_nodes.iter().map(|(_, i)| i));
        cx.onbuild = true;
        for (located, inst) in &trigger_nodes {
            self.dispatch(index, &mut b, &mut cx, located, inst)?;
        }
        cx.onbuild = false;
        for (node, inst) in &def.instructions {
            // Report the error and go on, so one run shows every broken instruction.
            if let Err(e) = self.dispatch(index, &mut b, &mut cx, node, inst) {
                self.errors.push(e);
            }
        }
        Ok(b)
    }

    fn base_image(
        &mut self,
        image: &str,
        platform: &Platform,
        def: &Stage,
        cx: &mut StageCx,
        from_text: &str,
    ) -> Result<Built, LowerError> {
        let (pinned, _) = self.resolve_image(image, platform, &def.from)?;
        let meta = VertexMeta::default()
            .describe("com.docker.dockerfile.v1.command", from_text)
            .describe("llb.customname", cx.prefix(&format!("FROM {pinned}")))
            .at(span_of(&def.from));
        let (state, config) = self.image_state(image, platform, &def.from, meta)?;
        Ok(Built {
            state,
            config,
            env: EnvList::default(),
            platform: platform.clone(),
        })
    }

    /// Metadata of an instruction's vertex: its progress name and source location,
    /// and the instruction text when BuildKit records it (FROM, RUN).
    fn meta(node: &Located, customname: String, with_command: bool) -> VertexMeta {
        let mut m = VertexMeta::default().describe("llb.customname", customname).at(span_of(node));
        if with_command {
            m = m.describe("com.docker.dockerfile.v1.command", node.original.trim());
        }
        m
    }

    /// The instruction as BuildKit shows it: variables from ENV expanded
    /// (`raw`: quotes kept and unset variables left as written, as for RUN),
    /// keyword upper-cased.
    fn display_text(&self, node: &Located, b: &Built, raw: bool) -> String {
        let mut lex = self.lexer();
        lex.raw_quotes = raw;
        lex.skip_unset_env = raw;
        let text = lex
            .process_word(node.original.trim(), &b.env)
            .map(|p| p.result)
            .unwrap_or_else(|_| node.original.trim().to_string());
        uppercase_cmd(&text)
    }

    fn dispatch(&mut self, index: usize, b: &mut Built, cx: &mut StageCx, node: &Located, inst: &Instruction) -> Result<(), LowerError> {
        let history = |b: &mut Built, created_by: String, empty: bool| {
            b.config.history.push(History {
                created_by,
                comment: "buildkit.dockerfile.v0".into(),
                empty_layer: empty,
            });
        };
        match inst {
            Instruction::Arg(args) => {
                // Every value is expanded with the variables as they were before this instruction.
                let env: &dyn Env = &b.env;
                let mut values = Vec::with_capacity(args.len());
                for (k, v) in args {
                    let value = if let Some(v) = self.input.request.build_args.get(k) {
                        Some(v.clone())
                    } else if let Some(v) = v {
                        Some(self.expand(v, env, node)?)
                    } else {
                        Env::get(&self.meta_env, k).map(str::to_string)
                    };
                    values.push((k, value));
                }
                for (k, value) in values {
                    if let Some(v) = value {
                        b.env.set(k, &v);
                    }
                }
                history(b, format!("ARG {}", node.arguments_text()), true);
            }
            Instruction::Env(pairs) => {
                // As in BuildKit, `ENV a=1 b=$a` gives b the value a had before this instruction.
                let expanded = self.expand_pairs(pairs, &b.env, node)?;
                for (key, value) in expanded {
                    b.config.set_env(&key, &value);
                    b.env.set(&key, &value);
                }
                history(b, format!("ENV {}", node.arguments_text()), true);
            }
            Instruction::Label(pairs) => {
                let expanded = self.expand_pairs(pairs, &b.env, node)?;
                b.config.config.labels.extend(expanded);
                history(b, format!("LABEL {}", node.arguments_text()), true);
            }
            Instruction::Maintainer(m) => {
                history(b, format!("MAINTAINER {m}"), true);
            }
            Instruction::Workdir(dir) => {
                let dir = self.expand(dir, &b.env, node)?;
                let wd = normalize_path(&b.config.config.working_dir, &dir, false);
                b.config.config.working_dir = wd.clone();
                if wd == "/" {
                    history(b, format!("WORKDIR {wd}"), true);
                } else {
                    let name = self.display_text(node, b, false);
                    let owner = (!b.config.config.user.is_empty()).then(|| parse_chown(&b.config.config.user, 0));
                    let mkdir = Action::Mkdir(pb::FileActionMkDir {
                        path: fileop_path("/", &wd, false),
                        mode: 0o755,
                        make_parents: true,
                        owner,
                        timestamp: -1,
                    });
                    let fop = FileOp::default().then(&b.state, FileInput::Empty, mkdir);
                    b.state = State::file(fop, Self::meta(node, cx.prefix(&name), false).cap("file.base"));
                    history(b, format!("WORKDIR {wd}"), false);
                }
            }
            Instruction::User(u) => {
                b.config.config.user = self.expand(u, &b.env, node)?;
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
                    let p = self.expand(p, &b.env, node)?;
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
                    let v = self.expand(v, &b.env, node)?;
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
                b.config.config.stop_signal = self.expand(s, &b.env, node)?;
                history(b, format!("STOPSIGNAL {}", b.config.config.stop_signal), true);
            }
            Instruction::Healthcheck(h) => {
                let typ = h.args.first().map(|a| a.to_ascii_uppercase()).unwrap_or_default();
                let hc = if typ == "NONE" {
                    Healthcheck {
                        test: vec!["NONE".into()],
                        ..Default::default()
                    }
                } else {
                    let rest = h.args.get(1..).unwrap_or(&[]);
                    let test = if h.json {
                        std::iter::once("CMD".to_string()).chain(rest.iter().cloned()).collect()
                    } else {
                        vec!["CMD-SHELL".to_string(), rest.join(" ")]
                    };
                    Healthcheck {
                        test,
                        interval: h.interval,
                        timeout: h.timeout,
                        start_period: h.start_period,
                        start_interval: h.start_interval,
                        retries: h.retries,
                    }
                };
                b.config.config.healthcheck = Some(hc);
                history(b, format!("HEALTHCHECK {}", h.args.join(" ")), true);
            }
            Instruction::Onbuild(trigger) => {
                b.config.config.on_build.push(trigger.clone());
                history(b, format!("ONBUILD {trigger}"), true);
            }
            Instruction::Run(run) => self.run(index, b, cx, node, run)?,
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
    /// A `--build-context` that replaces the image or stage `name`.
    fn named_context(&self, name: &str) -> Option<NamedContext> {
        let contexts = &self.input.request.named_contexts;
        let normalized = Reference::parse(name).ok().map(|r| r.normalized());
        let (key, value) = contexts.iter().find(|(k, _)| {
            k.as_str() == name || (normalized.is_some() && Reference::parse(k).ok().map(|r| r.normalized()) == normalized)
        })?;
        Some(if let Some(image) = value.strip_prefix("docker-image://") {
            NamedContext::Image(image.to_string())
        } else if value.starts_with("oci-layout://") {
            NamedContext::Layout
        } else {
            NamedContext::Local(key.clone())
        })
    }

    /// A local directory given as a named build context.
    fn named_local(&self, name: &str) -> State {
        let mut attrs = BTreeMap::new();
        attrs.insert("local.sharedkeyhint".to_string(), name.to_string());
        let meta = VertexMeta::default()
            .describe("llb.customname", format!("[context {name}] load from client"))
            .cap("source.local")
            .cap("source.local.sharedkeyhint");
        State::source(format!("local://{name}"), attrs, None, meta)
    }

    fn source_of(&mut self, index: usize, from: &str, node: &Located, platform: &Platform) -> Result<State, LowerError> {
        if let Some(s) = self.find_stage(from, index) {
            self.stage_ref(s)?;
            return Ok(self.built[&s].state.clone());
        }
        let self_name = self.input.program.stages[index].name.as_deref();
        if self_name == Some(from.to_ascii_lowercase().as_str())
            || from
                .parse::<usize>()
                .is_ok_and(|i| i >= index && i < self.input.program.stages.len())
        {
            return Err((
                "stage_cycle",
                format!("stage {from:?} cannot be used here: a stage cannot depend on itself or a later stage"),
                node.span_of(from),
            ));
        }
        if self
            .input
            .program
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
        match self.named_context(from) {
            Some(NamedContext::Image(image)) => {
                let meta = VertexMeta::default().describe("llb.customname", format!("[internal] load {image}"));
                return self.image_state(&image, platform, node, meta).map(|(state, _)| state);
            }
            Some(NamedContext::Local(name)) => return Ok(self.named_local(&name)),
            Some(NamedContext::Layout) | None => {}
        }
        // A plain name one typo away from a stage is almost certainly that stage, not an image.
        let plain = !from.contains(['/', ':', '.', '@']);
        if let Some(near) = self
            .input
            .program
            .stages
            .iter()
            .filter_map(|s| s.name.as_deref())
            .find(|n| plain && kiln_frontend::diagnostic::edit_distance(n, &from.to_ascii_lowercase()) <= 2)
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
    fn run(&mut self, index: usize, b: &mut Built, cx: &mut StageCx, node: &Located, run: &RunInstr) -> Result<(), LowerError> {
        let (args, json, heredocs) = (&run.args, run.json, &run.heredocs);
        let (network, security) = (run.network.as_deref(), run.security.as_deref());
        // A RUN whose whole command is one heredoc runs the heredoc's body (BuildKit's "fake" heredoc).
        let cmd = args.join(" ");
        let whole_heredoc = !json && heredocs.len() == 1 && crate::parser::parse_heredoc(&cmd).ok().flatten().is_some();
        let mut name = self.display_text(node, b, true);
        if whole_heredoc {
            name = format!("{name} ({})", summarize_heredoc(&heredocs[0].content));
        }
        let customname = cx.prefix(&name);
        let env: &dyn Env = &b.env;
        let cwd = if b.config.config.working_dir.is_empty() {
            "/".to_string()
        } else {
            b.config.config.working_dir.clone()
        };
        let mut exec = Exec::default();
        let mut extra_mounts = Vec::new();
        let mut argv = if json { args.to_vec() } else { self.shell(b) };
        if !json {
            if whole_heredoc {
                // Like BuildKit, the body is not expanded here: the shell does that.
                let doc = &heredocs[0];
                let data = if doc.chomp {
                    chomp_heredoc_content(&doc.content)
                } else {
                    doc.content.clone()
                };
                if b.platform.os != "windows" && data.starts_with("#!") {
                    // A script with its own interpreter: write it out and run it.
                    let script = inline_document(&doc.name, 0o755, data);
                    let mut m = Mount::bind("/dev/pipes/", script);
                    m.selector = "/".into();
                    m.readonly = true;
                    m.no_output = true;
                    extra_mounts.push(m);
                    argv.push(format!("/dev/pipes/{}", doc.name));
                } else {
                    argv.push(data);
                }
            } else {
                // Other heredocs go to the shell as written, bodies and delimiters included.
                let mut script = cmd;
                for doc in heredocs {
                    script.push('\n');
                    script.push_str(&doc.content);
                    script.push_str(&doc.name);
                }
                argv.push(script);
            }
        }
        let run_env = b.env.to_array();
        exec.meta = pb::Meta {
            args: argv,
            env: run_env,
            cwd: cwd.clone(),
            user: b.config.config.user.clone(),
            remove_mount_stubs_recursive: true,
            proxy_env: proxy_env(&self.input.request.build_args),
            ..Default::default()
        };
        exec.network = match network.or(self.input.request.network.as_deref()) {
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
        exec.platform = Some(b.platform.to_pb());
        let mut meta = Self::meta(node, customname, true)
            .cap("exec.meta.base")
            .cap("exec.mount.bind")
            .cap("exec.meta.setsdefaultpath");
        if exec.network != pb::NetMode::Unset {
            meta = meta.cap("exec.meta.network");
        }
        let mut ssh_count = 0;
        for spec in &run.mounts {
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
        node: &Located,
        env: &dyn Env,
        spec: &MountSpec,
        cwd: &str,
        ssh_count: &mut usize,
        secret_env: &mut Vec<pb::SecretEnv>,
    ) -> Result<Option<Mount>, LowerError> {
        let bad = |msg: String| ("malformed_mount", msg, node.span_of(&spec.raw));
        // Each value expanded with the step's variables, then read (as BuildKit does).
        let mut kv: Vec<(MountKey, Option<String>)> = Vec::with_capacity(spec.options.len());
        for (k, v) in &spec.options {
            let v = match v {
                Some(v) => Some(self.expand(v, env, node)?),
                None => None,
            };
            kv.push((*k, v));
        }
        let get = |key: MountKey| kv.iter().rev().find(|(k, _)| *k == key).map(|(_, v)| v.clone().unwrap_or_default());
        let flag = |key: MountKey| -> Result<Option<bool>, LowerError> {
            match kv.iter().rev().find(|(k, _)| *k == key) {
                None => Ok(None),
                Some((_, None)) => Ok(Some(true)),
                Some((k, Some(v))) => match v.to_ascii_lowercase().as_str() {
                    "true" | "1" => Ok(Some(true)),
                    "false" | "0" => Ok(Some(false)),
                    _ => Err(bad(format!("invalid value for {}: {v:?}", k.name()))),
                },
            }
        };
        let typ = get(MountKey::Type).unwrap_or_else(|| "bind".into()).to_ascii_lowercase();
        let target = get(MountKey::Target);
        let parse_u32 = |key: MountKey, radix: u32| -> Result<Option<u32>, LowerError> {
            match get(key) {
                None => Ok(None),
                Some(v) => u32::from_str_radix(&v, radix)
                    .map(Some)
                    .map_err(|_| bad(format!("invalid {} {v:?}", key.name()))),
            }
        };
        // Absolute targets are kept as written, relative ones joined to the working directory.
        let resolve_target = |t: &str| {
            if t.starts_with('/') {
                t.to_string()
            } else {
                clean_path(&format!("/{cwd}/{t}"))
            }
        };
        let readonly_flag = flag(MountKey::ReadOnly)?;
        let rw_flag = flag(MountKey::ReadWrite)?;
        let from = get(MountKey::From);
        let source = get(MountKey::Source);
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
                let raw_target = target.ok_or_else(|| bad("cache mount needs target=".into()))?;
                let target = resolve_target(&raw_target);
                let id = get(MountKey::Id).unwrap_or_else(|| clean_path(&raw_target));
                let sharing = match get(MountKey::Sharing).as_deref() {
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
                let (mode, uid, gid) = (
                    parse_u32(MountKey::Mode, 8)?,
                    parse_u32(MountKey::Uid, 10)?,
                    parse_u32(MountKey::Gid, 10)?,
                );
                if m.selector.is_empty() && (mode.is_some() || uid.is_some() || gid.is_some()) {
                    // An empty cache is created owned and with the mode asked for, as BuildKit does.
                    let user = |id: Option<u32>| {
                        Some(pb::UserOpt {
                            user: Some(pb::user_opt::User::ById(id.unwrap_or(0))),
                        })
                    };
                    let mkdir = Action::Mkdir(pb::FileActionMkDir {
                        path: "/cache".into(),
                        mode: mode.unwrap_or(0o755) as i32,
                        make_parents: false,
                        owner: Some(pb::ChownOpt {
                            user: user(uid),
                            group: user(gid),
                        }),
                        timestamp: -1,
                    });
                    let meta = VertexMeta::default()
                        .describe("llb.customname", "[internal] setting cache mount permissions")
                        .cap("file.base");
                    m.source = State::file(FileOp::default().then(&m.source, FileInput::Empty, mkdir), meta);
                    m.selector = "/cache".into();
                }
                m
            }
            "tmpfs" => {
                let target = target.ok_or_else(|| bad("tmpfs mount needs target=".into()))?;
                let size = match get(MountKey::Size) {
                    None => 0,
                    Some(s) => parse_size(&s).ok_or_else(|| bad(format!("invalid size {s:?}")))?,
                };
                Mount::of_kind(resolve_target(&target), MountKind::Tmpfs { size })
            }
            "secret" => {
                let id = get(MountKey::Id)
                    .or_else(|| target.as_deref().and_then(|t| t.rsplit('/').next()).map(str::to_string))
                    .ok_or_else(|| bad("secret mount needs id= or target=".into()))?;
                let optional = flag(MountKey::Required)? != Some(true);
                if let Some(var) = get(MountKey::Env) {
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
                    uid: parse_u32(MountKey::Uid, 10)?.unwrap_or(0),
                    gid: parse_u32(MountKey::Gid, 10)?.unwrap_or(0),
                    mode: parse_u32(MountKey::Mode, 8)?.unwrap_or(0o400),
                    optional,
                };
                Mount::of_kind(dest, MountKind::Secret(opt))
            }
            "ssh" => {
                let id = get(MountKey::Id).unwrap_or_else(|| "default".into());
                let optional = flag(MountKey::Required)? != Some(true);
                let dest = target
                    .map(|t| resolve_target(&t))
                    .unwrap_or_else(|| format!("/run/buildkit/ssh_agent.{ssh_count}"));
                *ssh_count += 1;
                let opt = pb::SshOpt {
                    id,
                    uid: parse_u32(MountKey::Uid, 10)?.unwrap_or(0),
                    gid: parse_u32(MountKey::Gid, 10)?.unwrap_or(0),
                    mode: parse_u32(MountKey::Mode, 8)?.unwrap_or(0o600),
                    optional,
                };
                Mount::of_kind(dest, MountKind::Ssh(opt))
            }
            other => return Err(bad(format!("unsupported mount type {other:?} (bind, cache, tmpfs, secret or ssh)"))),
        };
        Ok(Some(m))
    }

    fn heredoc_content(&self, doc: &Heredoc, env: &dyn Env, node: &Located) -> Result<String, LowerError> {
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

    /// COPY and ADD, as BuildKit lowers them: one FileOp with a copy action per
    /// source (context, another stage or image, git, HTTP, heredoc), onto the
    /// stage's filesystem, or with `--link` onto scratch and merged.
    fn copy(&mut self, index: usize, b: &mut Built, cx: &mut StageCx, node: &Located, c: &CopyInstr) -> Result<(), LowerError> {
        let cmd = if c.is_add { "ADD" } else { "COPY" };
        let name = self.display_text(node, b, false);
        let link = c.link && c.chmod.is_none();
        let pg_name = cx.prefix(&name);
        let env: &dyn Env = &b.env;
        let dest_raw = self.expand(&c.dest, env, node)?;
        let dest_raw = if dest_raw.is_empty() || dest_raw == "." {
            "./".to_string()
        } else {
            dest_raw
        };
        let dest = fileop_path("/", &normalize_path(&b.config.config.working_dir, &dest_raw, true), true);
        // Named owners are looked up in the filesystem copied onto (none for --link).
        let base = if link { -1 } else { 0 };
        let owner = match &c.chown {
            Some(ch) => Some(parse_chown(&self.expand(ch, env, node)?, base)),
            None => None,
        };
        let (mode, mode_str) = match &c.chmod {
            None => (-1, String::new()),
            Some(m) => {
                let m = self.expand(m, env, node)?;
                match u32::from_str_radix(&m, 8) {
                    Ok(v) if v <= 0o7777 => (v as i32, String::new()),
                    _ if is_symbolic_mode(&m) => (-1, m),
                    _ => {
                        return Err((
                            "malformed_flag",
                            format!("invalid --chmod value {m:?}: octal between 0 and 07777, or symbolic such as u=rwX,go=rX"),
                            node.span_of(&m),
                        ))
                    }
                }
            }
        };
        let excludes: Vec<String> = c.excludes.iter().map(|e| self.expand(e, env, node)).collect::<Result<_, _>>()?;
        let checksum = match &c.checksum {
            Some(sum) => Some(self.expand(sum, env, node)?),
            None => None,
        };
        let mut sources = Vec::with_capacity(c.sources.len());
        for src in &c.sources {
            sources.push(self.expand(src, env, node)?);
        }
        let mut heredocs = Vec::with_capacity(c.heredocs.len());
        for doc in &c.heredocs {
            heredocs.push((doc.name.clone(), self.heredoc_content(doc, env, node)?));
        }
        let from_source = match &c.from {
            Some(f) => {
                let f = self.expand(f, env, node)?;
                Some(self.source_of(index, &f, node, &b.platform)?)
            }
            None => None,
        };
        // Only mode, ownership and destination creation apply to git, HTTP and heredoc sources.
        let plain_copy = |src: String, unpack: bool| pb::FileActionCopy {
            src,
            dest: dest.clone(),
            owner: owner.clone(),
            mode,
            mode_str: mode_str.clone(),
            attempt_unpack_docker_compatibility: unpack,
            create_dest_path: true,
            timestamp: -1,
            exclude_patterns: excludes.clone(),
            ..Default::default()
        };
        let target = if link { State::scratch() } else { b.state.clone() };
        let mut fop = FileOp::default();
        for src in sources {
            let is_heredoc_marker = src.starts_with("<<")
                && c.heredocs
                    .iter()
                    .any(|d| src.trim_start_matches(['<', '-']).trim_matches(['"', '\'']) == d.name);
            if is_heredoc_marker {
                continue;
            }
            if let Some(git) = GitRef::parse(&src).filter(|_| c.is_add) {
                let mut attrs = BTreeMap::new();
                attrs.insert("git.authheadersecret".to_string(), "GIT_AUTH_HEADER".to_string());
                attrs.insert("git.authtokensecret".to_string(), "GIT_AUTH_TOKEN".to_string());
                attrs.insert("git.fullurl".to_string(), git.remote.clone());
                let mut meta = VertexMeta::default()
                    .describe("llb.customname", pg_name.clone())
                    .cap("source.git")
                    .cap("source.git.fullurl");
                if c.keep_git_dir {
                    attrs.insert("git.keepgitdir".to_string(), "true".to_string());
                    meta = meta.cap("source.git.keepgitdir");
                }
                if let Some(sum) = &checksum {
                    attrs.insert("git.checksum".to_string(), sum.clone());
                }
                let st = State::source(git.identifier(), attrs, None, meta);
                fop = fop.then(&target, FileInput::State(st), Action::Copy(plain_copy("/".into(), false)));
                continue;
            }
            if c.is_add && (src.starts_with("http://") || src.starts_with("https://")) {
                let filename = http_filename(&src);
                let mut attrs = BTreeMap::new();
                attrs.insert("http.filename".to_string(), filename.clone());
                if let Some(sum) = &checksum {
                    attrs.insert("http.checksum".to_string(), sum.clone());
                }
                let meta = VertexMeta::default().describe("llb.customname", pg_name.clone()).cap("source.http");
                let st = State::source(src.clone(), attrs, None, meta);
                let copy = plain_copy(format!("/{filename}"), c.unpack.unwrap_or(false));
                fop = fop.then(&target, FileInput::State(st), Action::Copy(copy));
                continue;
            }
            if !c.is_add
                && (GitRef::parse(&src).is_some() && src.contains("://") || src.starts_with("http://") || src.starts_with("https://"))
            {
                return Err((
                    "copy_remote",
                    format!("{cmd} cannot copy from a URL or git repository ({src}); use ADD"),
                    node.span_of(&src),
                ));
            }
            let (src_path, include_patterns, required_paths) = if c.parents {
                // `--parents`: keep the path below an optional `/./` pivot.
                let (parent, pattern) = match src.split_once("/./") {
                    Some((p, pat)) => (p.to_string(), pat.to_string()),
                    None => ("/".to_string(), src.clone()),
                };
                let pattern = normalize_path("/", &pattern, false);
                let required = if has_wildcards(&parent) || has_wildcards(&pattern) {
                    Vec::new()
                } else {
                    vec![normalize_path("/", &clean_path(&format!("{parent}/{pattern}")), false)]
                };
                (
                    fileop_path("/", &normalize_path("/", &parent, false), false),
                    vec![pattern.trim_start_matches('/').to_string()],
                    required,
                )
            } else {
                (fileop_path("/", &normalize_path("/", &src, false), false), Vec::new(), Vec::new())
            };
            let source_state = match &from_source {
                Some(s) => s.clone(),
                None => {
                    self.context_paths
                        .insert(if c.parents { "/".to_string() } else { src_path.clone() });
                    self.context()
                }
            };
            let copy = pb::FileActionCopy {
                follow_symlink: true,
                dir_copy_contents: true,
                allow_wildcard: true,
                allow_empty_wildcard: true,
                include_patterns,
                required_paths,
                ..plain_copy(src_path, c.unpack.unwrap_or(c.is_add))
            };
            fop = fop.then(&target, FileInput::State(source_state), Action::Copy(copy));
        }
        for (doc_name, content) in heredocs {
            let doc_state = inline_document(&doc_name, 0o644, content);
            let src = fileop_path("/", &doc_name, false);
            fop = fop.then(&target, FileInput::State(doc_state), Action::Copy(plain_copy(src, false)));
        }
        let meta = Self::meta(node, pg_name.clone(), false).cap("file.base");
        b.state = if link {
            // Shown as one step: the copy and the merge share a progress group.
            let group = format!("{}-{}", cx.name, cx.index);
            let copied = State::file(fop, meta.progress_group(group.clone(), pg_name.clone(), true));
            cx.index -= 1;
            let merge_name = cx.prefix(&format!("LINK {name}"));
            let merge_meta = Self::meta(node, merge_name, false)
                .cap("mergeop")
                .progress_group(group, pg_name, false);
            State::merge(&[b.state.clone(), copied], merge_meta)
        } else {
            State::file(fop, meta)
        };
        let mut created_by = String::from(cmd);
        if c.parents {
            created_by.push_str(" --parents");
        }
        if let Some(ch) = &c.chown {
            created_by.push_str(&format!(" --chown={ch}"));
        }
        if let Some(m) = &c.chmod {
            created_by.push_str(&format!(" --chmod={m}"));
        }
        for src in &c.sources {
            created_by.push(' ');
            created_by.push_str(src);
        }
        created_by.push_str(&format!(" {} # buildkit", c.dest));
        b.config.history.push(History {
            created_by,
            comment: "buildkit.dockerfile.v0".into(),
            empty_layer: false,
        });
        Ok(())
    }
}

/// The build state's environment as BuildKit keeps it: ENV and ARG values in
/// the order they were last set (setting a key again moves it to the end).
/// RUN sees it, and instructions expand their words with it.
#[derive(Clone, Default, Debug)]
struct EnvList(Vec<(String, String)>);

impl EnvList {
    fn set(&mut self, key: &str, value: &str) {
        self.0.retain(|(k, _)| k != key);
        self.0.push((key.to_string(), value.to_string()));
    }

    /// `KEY=value` entries, for an ExecOp.
    fn to_array(&self) -> Vec<String> {
        self.0.iter().map(|(k, v)| format!("{k}={v}")).collect()
    }
}

impl Env for EnvList {
    fn get(&self, name: &str) -> Option<&str> {
        Env::get(self.0.as_slice(), name)
    }
}

/// How many stages name each stage in FROM (only earlier stages count, as in lowering).
fn base_uses(stages: &[Stage]) -> Vec<usize> {
    let mut uses = vec![0; stages.len()];
    for (i, stage) in stages.iter().enumerate() {
        let image = stage.image.to_ascii_lowercase();
        if let Some(base) = stages[..i].iter().position(|s| s.name.as_deref() == Some(image.as_str())) {
            uses[base] += 1;
        }
    }
    uses
}

/// What a named build context stands for.
enum NamedContext {
    /// Another image (`docker-image://REF`).
    Image(String),
    /// A local directory, sent as `local://NAME`.
    Local(String),
    /// An OCI layout, which the host resolves under the context's name.
    Layout,
}

/// Per-stage dispatch state.
struct StageCx {
    name: String,
    /// Commands that make a vertex (FROM an image, RUN, COPY, ADD, WORKDIR), as BuildKit counts them.
    total: usize,
    /// How many of them have been named so far.
    index: usize,
    /// Dispatching an ONBUILD trigger of the base image.
    onbuild: bool,
    cmd_set: bool,
}

impl StageCx {
    /// BuildKit's progress name: `[stage i/N] text`, `i` padded to the width of `N`.
    fn prefix(&mut self, text: &str) -> String {
        if self.total == 0 {
            return text.to_string();
        }
        self.index += 1;
        let width = self.total.to_string().len();
        let onbuild = if self.onbuild { "ONBUILD " } else { "" };
        let name = if self.name.is_empty() {
            String::new()
        } else {
            format!("{} ", self.name)
        };
        format!("[{name}{:>width$}/{}] {onbuild}{text}", self.index, self.total)
    }
}

/// How many instructions of a stage make a vertex with a progress name.
fn vertex_commands<'n>(instructions: impl IntoIterator<Item = &'n Instruction>) -> usize {
    instructions
        .into_iter()
        .filter(|i| matches!(i, Instruction::Run(_) | Instruction::Copy(_) | Instruction::Workdir(_)))
        .count()
}

/// The instruction's text after its keyword.

/// Upper-cases the first word, as BuildKit shows instructions.
fn uppercase_cmd(text: &str) -> String {
    match text.split_once(' ') {
        Some((kw, rest)) => format!("{} {rest}", kw.to_uppercase()),
        None => text.to_uppercase(),
    }
}

/// BuildKit's one-line summary of a heredoc body.
fn summarize_heredoc(doc: &str) -> String {
    let doc = doc.trim().replace("\r\n", "\n");
    let mut lines = doc.split('\n');
    let first = lines.next().unwrap_or("").to_string();
    if lines.next().is_some() {
        format!("{first}...")
    } else {
        first
    }
}

/// Proxy settings given as build args (any case): passed to every RUN without
/// entering its environment or cache key, as BuildKit does.
fn proxy_env(build_args: &BTreeMap<String, String>) -> Option<pb::ProxyEnv> {
    let mut proxy = pb::ProxyEnv::default();
    for (k, v) in build_args {
        let slot = match k.to_ascii_lowercase().as_str() {
            "http_proxy" => &mut proxy.http_proxy,
            "https_proxy" => &mut proxy.https_proxy,
            "ftp_proxy" => &mut proxy.ftp_proxy,
            "no_proxy" => &mut proxy.no_proxy,
            "all_proxy" => &mut proxy.all_proxy,
            _ => continue,
        };
        *slot = v.clone();
    }
    (proxy != pb::ProxyEnv::default()).then_some(proxy)
}

/// A scratch filesystem holding one inline document (a heredoc body) at `/name`.
fn inline_document(name: &str, mode: i32, data: String) -> State {
    let mk = Action::Mkfile(pb::FileActionMkFile {
        path: fileop_path("/", name, false),
        mode,
        data: data.into_bytes(),
        timestamp: -1,
        ..Default::default()
    });
    let meta = VertexMeta::default()
        .describe("llb.customname", "[internal] preparing inline document")
        .cap("file.base");
    State::file(FileOp::default().then(&State::scratch(), FileInput::Empty, mk), meta)
}

/// `user[:group]` as BuildKit's `WithUser`: numbers (and `root`) are ids, other
/// names are looked up in the filesystem of input `base`.
fn parse_chown(s: &str, base: i64) -> pb::ChownOpt {
    let user_opt = |v: &str| pb::UserOpt {
        user: Some(match if v == "root" { Ok(0) } else { v.parse::<i32>().map(|n| n as u32) } {
            Ok(id) => pb::user_opt::User::ById(id),
            Err(_) => pb::user_opt::User::ByName(pb::NamedUserOpt {
                name: v.to_string(),
                input: base,
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

/// A git source of ADD: remote URL, ref and sub-directory (`URL#ref:subdir`).
struct GitRef {
    remote: String,
    reference: String,
    subdir: String,
}

impl GitRef {
    /// Recognises git sources: `git://`, `ssh://`, `git@host:path`, and HTTP(S) URLs of `.git` repositories.
    fn parse(s: &str) -> Option<GitRef> {
        let (remote, fragment) = match s.split_once('#') {
            Some((r, f)) => (r, f),
            None => (s, ""),
        };
        let is_git = remote.starts_with("git://")
            || remote.starts_with("ssh://")
            || (remote.starts_with("git@") && remote.contains(':'))
            || ((remote.starts_with("https://") || remote.starts_with("http://")) && remote.trim_end_matches('/').ends_with(".git"));
        if !is_git {
            return None;
        }
        let (reference, subdir) = match fragment.split_once(':') {
            Some((r, d)) => (r.to_string(), d.to_string()),
            None => (fragment.to_string(), String::new()),
        };
        Some(GitRef {
            remote: remote.to_string(),
            reference,
            subdir,
        })
    }

    /// The source identifier: `git://host/path[#ref[:subdir]]`.
    fn identifier(&self) -> String {
        let bare = match self.remote.split_once("://") {
            Some((_, rest)) => rest.to_string(),
            None => self.remote.trim_start_matches("git@").replacen(':', "/", 1),
        };
        let bare = bare
            .split_once('@')
            .filter(|(user, _)| !user.contains('/'))
            .map(|(_, host)| host.to_string())
            .unwrap_or(bare);
        let mut id = format!("git://{bare}");
        if !self.reference.is_empty() || !self.subdir.is_empty() {
            id.push('#');
            id.push_str(&self.reference);
            if !self.subdir.is_empty() {
                id.push(':');
                id.push_str(&self.subdir);
            }
        }
        id
    }
}

/// The file name an ADD of a URL saves as: the last path segment, or `__unnamed__`.
fn http_filename(url: &str) -> String {
    let after_scheme = url.split_once("://").map_or(url, |(_, r)| r);
    let path = after_scheme.find('/').map_or("", |i| &after_scheme[i..]);
    let path = path.split(['?', '#']).next().unwrap_or("");
    match path.trim_end_matches('/').rsplit('/').next() {
        Some(base) if !base.is_empty() && base != "." => base.to_string(),
        _ => "__unnamed__".to_string(),
    }
}

/// Whether a path holds glob characters.
fn has_wildcards(p: &str) -> bool {
    p.contains(['*', '?', '['])
}

/// BuildKit's `system.NormalizePath` for Linux: relative paths are joined to
/// `parent` and cleaned, absolute ones kept as written; `keep_slash` keeps a
/// trailing `/` or `/.`.
fn normalize_path(parent: &str, p: &str, keep_slash: bool) -> String {
    let parent = if parent.is_empty() { "/" } else { parent };
    let parent = if parent.starts_with('/') {
        parent.to_string()
    } else {
        clean_path(&format!("/{parent}"))
    };
    let mut out = if p.is_empty() { parent.clone() } else { p.to_string() };
    if !out.starts_with('/') {
        out = clean_path(&format!("{parent}/{out}"));
    }
    if keep_slash {
        keep_trailing(p, &mut out);
    }
    out
}

/// The path normalization of BuildKit's LLB client for file actions: cleaned,
/// made absolute under `parent`, optionally keeping a trailing `/` or `/.`.
fn fileop_path(parent: &str, p: &str, keep_slash: bool) -> String {
    let mut out = clean_path(p);
    if !out.starts_with('/') {
        out = clean_path(&format!("/{parent}/{out}"));
    }
    if keep_slash {
        keep_trailing(p, &mut out);
    }
    out
}

fn keep_trailing(original: &str, p: &mut String) {
    if original.ends_with('/') && !p.ends_with('/') {
        p.push('/');
    } else if original.ends_with("/.") {
        if p != "/" {
            p.push('/');
        }
        p.push('.');
    }
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
        assert_eq!(normalize_path("/src", "app", false), "/src/app");
        assert_eq!(normalize_path("/src", "/abs/../x/", false), "/abs/../x/");
        assert_eq!(normalize_path("/src", "sub/", true), "/src/sub/");
        assert_eq!(normalize_path("", "./", true), "/");
        assert_eq!(fileop_path("/", "/abs/../x/", true), "/x/");
        assert_eq!(fileop_path("/", "/app/.", true), "/app/.");
        assert_eq!(http_filename("https://example.com/a/b.tar.gz?x=1"), "b.tar.gz");
        assert_eq!(http_filename("https://example.com"), "__unnamed__");
        let git = GitRef::parse("https://github.com/opencontainers/runc.git#v1.4.3").expect("git");
        assert_eq!(git.identifier(), "git://github.com/opencontainers/runc.git#v1.4.3");
        assert_eq!(git.remote, "https://github.com/opencontainers/runc.git");
        assert_eq!(
            GitRef::parse("git@github.com:moby/buildkit.git#main:docs")
                .expect("git")
                .identifier(),
            "git://github.com/moby/buildkit.git#main:docs"
        );
        assert!(GitRef::parse("https://example.com/file.tar").is_none());
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(crate::instructions::parse_duration("1m30s"), Some(90_000_000_000));
        assert_eq!(crate::instructions::parse_duration("5x"), None);
        assert_eq!(parse_size("64m"), Some(64 << 20));
    }
}
