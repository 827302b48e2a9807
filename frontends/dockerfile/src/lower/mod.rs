//! Phase 3, lower: the typed IR → LLB through the builder, plus the
//! result image's config — what BuildKit's dockerfile2llb does.
//!
//! Stages are lowered on demand from the target, so only stages the target
//! needs enter the graph; a stage that reaches itself is an error.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use kiln_frontend::{Host, ImageConfig, Platform};
use kiln_image::Reference;
use kiln_image::{Healthcheck, History};
use kiln_llb::builder::{Exec, FileInput, FileOp, LateAttrs, Mount, MountKind, SourceSpan, VertexMeta};
use kiln_llb::pb;
use kiln_llb::pb::file_action::Action;
use kiln_llb::State;

use crate::ir::{
    parse_size, Chmod, Chown, CopyInstr, FlagType, FlagValue, Heredoc, Instruction, Located, MountKey, MountSpec, NetworkMode, Principal,
    Program, RunInstr, SecurityMode, Stage,
};
use crate::parser::{chomp_heredoc_content, Span};
use crate::shell::{Env, Lexer};

mod copy;
mod paths;
mod run;

use copy::chown_opt;
pub use paths::clean_path;
use paths::{fileop_path, normalize_path};
use run::inline_document;

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
    /// Dockerfile check findings of the stages lowered.
    pub findings: Vec<crate::lint::Finding>,
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
        findings: lowerer.findings.take(),
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
    /// Check findings only lowering can make (UndefinedVar, InvalidBaseImagePlatform).
    findings: std::cell::RefCell<Vec<crate::lint::Finding>>,
    /// The UndefinedVar findings made, to report each once.
    undefined_seen: std::cell::RefCell<HashSet<crate::lint::Finding>>,
    /// For each stage, how many stages name it in FROM and are still to be lowered.
    base_uses: Vec<usize>,
}

pub(crate) fn platform_args(prefix: &str, p: &Platform) -> Vec<(String, String)> {
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
            findings: std::cell::RefCell::new(Vec::new()),
            undefined_seen: std::cell::RefCell::new(HashSet::new()),
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
        let processed = self
            .lexer()
            .process_word(word, env)
            .map_err(|e| ("expansion", e.0, node.span_of(word)))?;
        if env.checks_undefined() {
            self.report_undefined(&processed.unmatched, env, node);
        }
        Ok(processed.result)
    }

    /// UndefinedVar, as BuildKit: a variable a word used that is neither set
    /// nor declared by an ARG (BuildKit's SBOM scan arguments excepted).
    fn report_undefined(&self, unmatched: &[String], env: &dyn Env, node: &Located) {
        const NOT_ENV: [&str; 2] = ["BUILDKIT_SBOM_SCAN_CONTEXT", "BUILDKIT_SBOM_SCAN_STAGE"];
        for var in unmatched {
            if env.declared(var) || NOT_ENV.contains(&var.as_str()) {
                continue;
            }
            let names = env.names();
            let hint = crate::lint::suggest(var, &names)
                .map(|s| format!(" (did you mean ${s}?)"))
                .unwrap_or_default();
            let finding = crate::lint::Finding {
                rule: "UndefinedVar",
                message: format!("Usage of undefined variable '${var}'{hint}"),
                span: node.span.clone(),
            };
            if self.undefined_seen.borrow_mut().insert(finding.clone()) {
                self.findings.borrow_mut().push(finding);
            }
        }
    }

    /// A typed flag's value: as typed when the IR was built, else its word
    /// expanded with `env` and typed now (an error at the word).
    fn flag<T: FlagType>(&self, value: &FlagValue<T>, env: &dyn Env, node: &Located, code: &'static str) -> Result<T, LowerError> {
        if let Some(typed) = &value.typed {
            return Ok(typed.clone());
        }
        let expanded = self.expand(&value.written, env, node)?;
        T::read(&expanded).map_err(|message| (code, message, node.span_of(&value.written)))
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
            Some(p) => self.flag(p, &self.meta_env, &def.from, "invalid_platform")?,
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
            platform: self.input.request.multi_platform.then(|| platform.clone()),
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
            .describe("llb.customname", cx.prefix(&format!("FROM {pinned}"), &EnvList::default()))
            .at(span_of(&def.from));
        let (state, config) = self.image_state(image, platform, &def.from, meta)?;
        // InvalidBaseImagePlatform: the image the host resolved is for another platform.
        if !config.os.is_empty() && (config.os != platform.os || config.architecture != platform.architecture) {
            let actual = Platform {
                os: config.os.clone(),
                architecture: config.architecture.clone(),
                variant: config.variant.clone(),
            };
            self.findings.borrow_mut().push(crate::lint::Finding {
                rule: "InvalidBaseImagePlatform",
                message: format!(
                    "Base image {image} was pulled with platform {:?}, expected {:?} for current build",
                    actual.to_string_form(),
                    platform.to_string_form()
                ),
                span: def.from.span.clone(),
            });
        }
        let unknown_base = config.os.is_empty();
        Ok(Built {
            state,
            config,
            env: EnvList {
                unknown_base,
                ..EnvList::default()
            },
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
                    b.env.declare(k);
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
                    let owner = match Chown::read(&b.config.config.user) {
                        Ok(user) if !b.config.config.user.is_empty() => Some(chown_opt(&user, 0)),
                        _ => None,
                    };
                    let mkdir = Action::Mkdir(pb::FileActionMkDir {
                        path: fileop_path("/", &wd, false),
                        mode: 0o755,
                        make_parents: true,
                        owner,
                        timestamp: -1,
                    });
                    let fop = FileOp::default().then(&b.state, FileInput::Empty, mkdir);
                    b.state = State::file(fop, Self::meta(node, cx.prefix(&name, &b.env), false).cap("file.base"));
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
                    let p = self.expand(p, &b.env.vars(), node)?;
                    for key in exposed_ports(&p).map_err(|m| ("invalid_port", m, node.span_of(&p)))? {
                        b.config.config.exposed_ports.insert(key, serde_json::json!({}));
                    }
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
}

/// The build state's environment as BuildKit keeps it: ENV and ARG values in
/// the order they were last set (setting a key again moves it to the end).
/// RUN sees it, and instructions expand their words with it.
#[derive(Clone, Default, Debug)]
struct EnvList {
    /// `KEY`, value pairs.
    vars: Vec<(String, String)>,
    /// The ARG names declared (with or without a value).
    declared: BTreeSet<String>,
    /// The base image's environment is unknown (not resolved, as under
    /// `--check` offline), so no variable can be called undefined.
    unknown_base: bool,
}

impl EnvList {
    /// The variables alone, to expand a word without the UndefinedVar check
    /// (EXPOSE, as BuildKit).
    fn vars(&self) -> &[(String, String)] {
        &self.vars
    }

    fn declare(&mut self, key: &str) {
        self.declared.insert(key.to_string());
    }

    fn set(&mut self, key: &str, value: &str) {
        self.vars.retain(|(k, _)| k != key);
        self.vars.push((key.to_string(), value.to_string()));
    }

    /// `KEY=value` entries, for an ExecOp.
    fn to_array(&self) -> Vec<String> {
        // Concatenated, not format!ed: a long Dockerfile makes tens of thousands.
        self.vars
            .iter()
            .map(|(k, v)| {
                let mut entry = String::with_capacity(k.len() + 1 + v.len());
                entry.push_str(k);
                entry.push('=');
                entry.push_str(v);
                entry
            })
            .collect()
    }
}

impl Env for EnvList {
    fn get(&self, name: &str) -> Option<&str> {
        Env::get(self.vars.as_slice(), name)
    }

    fn checks_undefined(&self) -> bool {
        !self.unknown_base
    }

    fn declared(&self, name: &str) -> bool {
        self.declared.contains(name)
    }

    fn names(&self) -> Vec<&str> {
        self.vars.iter().map(|(k, _)| k.as_str()).collect()
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
    /// The stage's platform, when the build has several target platforms
    /// (names then start with it, as BuildKit's).
    platform: Option<Platform>,
}

impl StageCx {
    /// BuildKit's progress name: `[stage i/N] text`, `i` padded to the width
    /// of `N`; in a multi-platform build `[linux/arm64 stage i/N]`, with
    /// `->arch` when the stage's `TARGET*` args name another platform.
    fn prefix(&mut self, text: &str, env: &dyn Env) -> String {
        if self.total == 0 {
            return text.to_string();
        }
        self.index += 1;
        let width = self.total.to_string().len();
        let onbuild = if self.onbuild { "ONBUILD " } else { "" };
        let platform = match &self.platform {
            Some(p) => format!("{}{} ", p.to_string_form(), cross_target(p, env)),
            None => String::new(),
        };
        let name = if self.name.is_empty() {
            String::new()
        } else {
            format!("{} ", self.name)
        };
        format!("[{platform}{name}{:>width$}/{}] {onbuild}{text}", self.index, self.total)
    }
}

/// BuildKit's `->target` for a step whose `TARGETPLATFORM` (or
/// `TARGETOS`/`TARGETARCH`/`TARGETVARIANT`) names another platform than
/// the one it runs on: a cross-compiling stage.
fn cross_target(base: &Platform, env: &dyn Env) -> String {
    let target = match env.get("TARGETPLATFORM").and_then(Platform::parse) {
        Some(p) => p,
        None => {
            let os = env.get("TARGETOS");
            let arch = env.get("TARGETARCH");
            let variant = env.get("TARGETVARIANT");
            if os.is_none() && arch.is_none() && variant.is_none() {
                return String::new();
            }
            Platform {
                os: os.filter(|o| !o.is_empty()).unwrap_or(&base.os).to_string(),
                architecture: arch.filter(|a| !a.is_empty()).unwrap_or(&base.architecture).to_string(),
                variant: variant.unwrap_or("").to_string(),
            }
        }
    };
    let target = target.normalized();
    if target.os == base.os && target.architecture != base.architecture {
        if target.variant.is_empty() {
            format!("->{}", target.architecture)
        } else {
            format!("->{}/{}", target.architecture, target.variant)
        }
    } else if target.os != base.os {
        format!("->{}", target.to_string_form())
    } else {
        String::new()
    }
}

/// How many instructions of a stage make a vertex with a progress name.
fn vertex_commands<'n>(instructions: impl IntoIterator<Item = &'n Instruction>) -> usize {
    instructions
        .into_iter()
        .filter(|i| matches!(i, Instruction::Run(_) | Instruction::Copy(_) | Instruction::Workdir(_)))
        .count()
}

/// Upper-cases the first word, as BuildKit shows instructions.
fn uppercase_cmd(text: &str) -> String {
    match text.split_once(' ') {
        Some((kw, rest)) => format!("{} {rest}", kw.to_uppercase()),
        None => text.to_uppercase(),
    }
}

/// The config keys of one `EXPOSE` argument, as Docker reads a port spec:
/// `[ip:[hostPort]:]port[-end][/proto]`, a range giving each port, the
/// protocol lower-cased (tcp when none).
fn exposed_ports(spec: &str) -> Result<Vec<String>, String> {
    let (ports, proto) = match spec.rsplit_once('/') {
        Some((p, proto)) => (p, proto.to_ascii_lowercase()),
        None => (spec, "tcp".to_string()),
    };
    let container = ports.rsplit(':').next().unwrap_or(ports);
    let number = |s: &str| s.parse::<u16>().map_err(|_| format!("invalid containerPort: {container}"));
    let (start, end) = match container.split_once('-') {
        Some((a, b)) => (number(a)?, number(b)?),
        None => (number(container)?, number(container)?),
    };
    if end < start {
        return Err(format!("invalid containerPort: {container}"));
    }
    Ok((start..=end).map(|p| format!("{p}/{proto}")).collect())
}

#[cfg(test)]
mod tests {
    use super::exposed_ports;

    #[test]
    fn expose_ranges_list_each_port() {
        assert_eq!(exposed_ports("8000-8002/TCP").expect("range"), ["8000/tcp", "8001/tcp", "8002/tcp"]);
        assert_eq!(exposed_ports("53/udp").expect("udp"), ["53/udp"]);
        assert_eq!(exposed_ports("80").expect("plain"), ["80/tcp"]);
        assert_eq!(exposed_ports("127.0.0.1:8080:80").expect("with host"), ["80/tcp"]);
        assert!(exposed_ports("http").is_err());
        assert!(exposed_ports("90-80").is_err());
    }
}
