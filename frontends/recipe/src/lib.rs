//! The YAML recipe frontend (`# syntax=recipe`; format in
//! frontends/recipe/README.md, schema in `recipe.schema.json`).
//!
//! A recipe is read into typed data whose values know their YAML positions
//! ([`model`], through [`yaml`]), checked (one kind per step, known stages,
//! no cycles, known target) with errors at YAML lines and columns, then
//! turned into the Dockerfile frontend's typed IR ([`kiln_dockerfile::ir`])
//! and lowered by the same lowering as a Dockerfile. No Dockerfile text is
//! written: a value is a value wherever it came from (a newline in a path is
//! part of the path), and the source map and every diagnostic point at the
//! YAML where the step was written.

pub mod model;
pub mod yaml;

use kiln_dockerfile::ir::{self, FlagType as _, Heredoc, Instruction, Located, MountKey, MountSpec as IrMount, Program, RunInstr};
use kiln_frontend::diagnostic::closest;
use kiln_frontend::{Diagnostic, Host, Request, Response};
use kiln_llb::pb;

use model::{Command, MountSpec, Ordered, Recipe, Scalar, Step};
use yaml::Spanned;

/// Diagnostic code prefix.
const CODE: &str = "kiln::recipe::";

/// Compiles a recipe request to LLB.
pub fn compile(request: &Request, host: &dyn Host) -> Response {
    let source = String::from_utf8_lossy(&request.definition).into_owned();
    let file = request.filename.clone();
    let mut response = Response::default();
    let (recipe, doc): (Recipe, _) = match yaml::parse_document(&source) {
        Ok(r) => r,
        Err(e) => {
            response.diagnostics.push(yaml_error(e, &file));
            return response;
        }
    };
    let mut out = Translation::new(&file, &source, &doc);
    let program = out.recipe(&recipe, request.target.as_deref());
    if !out.errors.is_empty() {
        response.diagnostics = out.errors;
        response.diagnostics.sort_by_key(|d| d.offset);
        return response;
    }
    let lowered_request = Request {
        target: request.target.clone().or(recipe.target.as_ref().map(|t| t.to_string())),
        ..request.clone()
    };
    let info = pb::SourceInfo {
        filename: file,
        data: request.definition.clone(),
        language: "YAML".into(),
        definition: None,
    };
    kiln_dockerfile::lower_program(&program, &lowered_request, host, info)
}

/// A YAML error as a diagnostic at its place, with a did-you-mean for unknown keys.
fn yaml_error(e: yaml::YamlError, file: &str) -> Diagnostic {
    let code = if e.unknown.is_some() { "unknown_key" } else { "invalid" };
    let mut d = Diagnostic::error(&format!("{CODE}{code}"), e.message, file, e.span);
    if let Some((key, expected)) = e.unknown {
        d.help = Some(match closest(&key, expected.iter().map(String::as_str)) {
            Some(m) => format!("did you mean `{m}`?"),
            None => format!("keys here: {}", expected.join(", ")),
        });
    }
    d
}

/// How a Dockerfile would write a value: bare when it reads back as itself,
/// else double-quoted (used only for the text progress and history show).
fn shown(s: &str) -> String {
    if !s.is_empty() && !s.contains(|c: char| c.is_whitespace() || "\"'\\$".contains(c)) {
        s.to_string()
    } else {
        serde_json::to_string(s).unwrap_or_default()
    }
}

/// A value as a word the lowering expands: double-quoted, so `$VAR` is
/// expanded (as the recipe format says) but quotes, backslashes and spaces
/// are the value's own.
fn dq(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// An argument's default as a word, or None when the YAML gives none
/// (`NAME:` alone, `~`, `null`, or an empty string: the parser does not tell
/// an empty value from a missing one).
fn arg_default(v: &Option<Scalar>) -> Option<String> {
    v.as_ref()
        .filter(|Scalar(s)| !matches!(s.as_str(), "" | "~" | "null" | "Null" | "NULL"))
        .map(|Scalar(s)| dq(s))
}

fn json(list: &[String]) -> String {
    serde_json::to_string(list).unwrap_or_default()
}

/// Builds the IR of a recipe, collecting every error.
struct Translation<'a> {
    file: &'a str,
    source: &'a str,
    doc: &'a yaml::Document,
    errors: Vec<Diagnostic>,
}

impl<'a> Translation<'a> {
    fn new(file: &'a str, source: &'a str, doc: &'a yaml::Document) -> Translation<'a> {
        Translation {
            file,
            source,
            doc,
            errors: Vec::new(),
        }
    }

    /// An instruction written at the key `path` (a stage name, an argument).
    fn at_key(&self, keyword: &str, text: String, path: &[&str]) -> Located {
        let (span, line) = self.doc.key_place(path).unwrap_or((0..0, 1));
        Located::synthetic(keyword, text, span, line)
    }

    fn span<T>(&self, v: &Spanned<T>) -> std::ops::Range<usize> {
        yaml::span_of(v, self.source)
    }

    /// A typed flag value from a YAML string; a bad one is an error at it.
    fn typed<T: ir::FlagType>(&mut self, value: &Spanned<String>, code: &str) -> Option<ir::FlagValue<T>> {
        let at = self.span(value);
        self.typed_text(value.as_str(), at, code)
    }

    /// A typed flag value from `text` written at `at`.
    fn typed_text<T: ir::FlagType>(&mut self, text: &str, at: std::ops::Range<usize>, code: &str) -> Option<ir::FlagValue<T>> {
        match ir::FlagValue::new(text) {
            Ok(v) => Some(v),
            Err(message) => {
                self.error(code, message, at, None);
                None
            }
        }
    }

    fn error(&mut self, code: &str, message: String, at: std::ops::Range<usize>, help: Option<String>) {
        let mut d = Diagnostic::error(&format!("{CODE}{code}"), message, self.file, at);
        d.help = help;
        self.errors.push(d);
    }

    /// An instruction written at `at`, shown as `text` (what a Dockerfile would say).
    fn at<T>(&self, keyword: &str, text: String, at: &Spanned<T>) -> Located {
        Located::synthetic(keyword, text, self.span(at), yaml::line_of(at))
    }

    fn recipe(&mut self, recipe: &Recipe, target: Option<&str>) -> Program {
        let mut program = Program {
            escape: '\\',
            ..Program::default()
        };
        let names: Vec<&str> = recipe.stages.0.iter().map(|(n, _)| n.as_str()).collect();
        if names.is_empty() {
            self.error("no_stages", "the recipe has no stages".into(), 0..0, None);
            return program;
        }
        for (k, v) in &recipe.args.0 {
            let value = arg_default(v);
            let text = match &value {
                Some(v) => format!("ARG {k}={v}"),
                None => format!("ARG {k}"),
            };
            program
                .meta_args
                .push((self.at_key("ARG", text, &["args", k]), vec![(k.to_string(), value)]));
        }
        for (name, stage) in &recipe.stages.0 {
            program.stages.push(self.stage(name, stage, &names));
        }
        if let Some(t) = target.or(recipe.target.as_ref().map(|t| t.as_str())) {
            if !names.contains(&t) {
                let at = match (&recipe.target, target) {
                    (Some(spanned), None) => self.span(spanned),
                    _ => 0..0,
                };
                let help = closest(t, names.iter().copied()).map(|m| format!("did you mean `{m}`?"));
                self.error(
                    "unknown_target",
                    format!("no stage named `{t}` (stages: {})", names.join(", ")),
                    at,
                    help,
                );
            }
        }
        self.cycles(recipe);
        program
    }

    fn stage(&mut self, name: &str, stage: &model::Stage, names: &[&str]) -> ir::Stage {
        let valid = name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-".contains(c));
        if !valid {
            self.error(
                "invalid_stage_name",
                format!("stage name `{name}`: use lowercase letters, digits, `_`, `.` and `-`"),
                self.doc.key_place(&["stages", name]).map_or(0..0, |(span, _)| span),
                None,
            );
        }
        if stage.from.as_str() == name {
            self.error(
                "cycle",
                format!("stage `{name}` is built from itself"),
                self.span(&stage.from),
                None,
            );
        }
        let platform = stage
            .platform
            .as_ref()
            .map(|p| format!("--platform={} ", p.as_str()))
            .unwrap_or_default();
        let from = self.at("FROM", format!("FROM {platform}{} AS {name}", stage.from.as_str()), &stage.from);
        let mut instructions = Vec::new();
        for (i, step) in stage.steps.iter().enumerate() {
            let place = self.doc.item_span(&["stages", name, "steps"], i);
            self.step(step, place, names, &mut instructions);
        }
        if let Some(image) = &stage.image {
            self.image(image, &mut instructions);
        }
        ir::Stage {
            image: stage.from.to_string(),
            name: Some(name.to_string()),
            platform: stage.platform.as_ref().and_then(|p| self.typed(p, "invalid_platform")),
            from,
            instructions,
        }
    }

    /// The image config section: the instructions a Dockerfile ends a stage with.
    fn image(&mut self, image: &Spanned<model::ImageSpec>, out: &mut Vec<(Located, Instruction)>) {
        if let Some(env) = &image.env {
            let at = self.at("ENV", String::new(), image);
            self.env(env, at, out);
        }
        if let Some(u) = &image.user {
            out.push((self.at("USER", format!("USER {}", shown(u)), image), Instruction::User(u.clone())));
        }
        if let Some(w) = &image.workdir {
            out.push((
                self.at("WORKDIR", format!("WORKDIR {}", shown(w)), image),
                Instruction::Workdir(w.clone()),
            ));
        }
        if let Some(labels) = &image.labels {
            let pairs: Vec<(String, String)> = labels.0.iter().map(|(k, Scalar(v))| (dq(k), dq(v))).collect();
            if !pairs.is_empty() {
                let text: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
                out.push((
                    self.at("LABEL", format!("LABEL {}", text.join(" ")), image),
                    Instruction::Label(pairs),
                ));
            }
        }
        if let Some(ports) = &image.ports {
            let ports: Vec<String> = ports.iter().map(|Scalar(p)| p.clone()).collect();
            if !ports.is_empty() {
                out.push((
                    self.at("EXPOSE", format!("EXPOSE {}", ports.join(" ")), image),
                    Instruction::Expose(ports),
                ));
            }
        }
        if let Some(volumes) = &image.volumes {
            out.push((
                self.at("VOLUME", format!("VOLUME {}", json(volumes)), image),
                Instruction::Volume(volumes.clone()),
            ));
        }
        if let Some(ep) = &image.entrypoint {
            let (args, is_json) = command(ep);
            out.push((
                self.at("ENTRYPOINT", format!("ENTRYPOINT {}", command_text(ep)), image),
                Instruction::Entrypoint(args, is_json),
            ));
        }
        if let Some(cmd) = &image.cmd {
            let (args, is_json) = command(cmd);
            out.push((
                self.at("CMD", format!("CMD {}", command_text(cmd)), image),
                Instruction::Cmd(args, is_json),
            ));
        }
    }

    fn env(&mut self, env: &Ordered<Scalar>, at: Located, out: &mut Vec<(Located, Instruction)>) {
        let pairs: Vec<(String, String)> = env.0.iter().map(|(k, Scalar(v))| (k.to_string(), dq(v))).collect();
        if !pairs.is_empty() {
            let text: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push((at.with_text(format!("ENV {}", text.join(" "))), Instruction::Env(pairs)));
        }
    }

    fn check_stage_ref(&mut self, what: &str, name: &Spanned<String>, names: &[&str]) {
        if !names.contains(&name.as_str()) {
            let help = closest(name, names.iter().copied())
                .map(|m| format!("did you mean `{m}`?"))
                .or_else(|| Some(format!("stages: {}", names.join(", "))));
            self.error(
                "unknown_stage",
                format!("{what} names no stage `{}`", name.as_str()),
                self.span(name),
                help,
            );
        }
    }

    fn step(
        &mut self,
        spanned: &Spanned<Step>,
        place: Option<(std::ops::Range<usize>, usize)>,
        names: &[&str],
        out: &mut Vec<(Located, Instruction)>,
    ) {
        let step: &Step = spanned;
        // Where the step is written: its first key (the parser's own span of a
        // mapping starts at the first colon).
        let (here, line) = place.unwrap_or_else(|| (self.span(spanned), yaml::line_of(spanned)));
        let at = |keyword: &str, text: String| Located::synthetic(keyword, text, here.clone(), line);
        let kinds: Vec<&str> = [
            ("run", step.run.is_some()),
            ("copy", step.copy.is_some()),
            ("env", step.env.is_some()),
            ("workdir", step.workdir.is_some()),
            ("user", step.user.is_some()),
            ("args", step.args.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
        .collect();
        let [kind] = kinds.as_slice() else {
            self.error(
                "step_kind",
                format!(
                    "a step has exactly one of run, copy, env, workdir, user, args; this one has {}",
                    if kinds.is_empty() { "none".to_string() } else { kinds.join(", ") }
                ),
                here,
                None,
            );
            return;
        };
        let misplaced: Vec<&str> = [
            ("mounts", step.mounts.is_some(), "run"),
            ("network", step.network.is_some(), "run"),
            ("to", step.to.is_some(), "copy"),
            ("from", step.from.is_some(), "copy"),
            ("chown", step.chown.is_some(), "copy"),
            ("chmod", step.chmod.is_some(), "copy"),
        ]
        .into_iter()
        .filter_map(|(k, set, owner)| (set && owner != *kind).then_some(k))
        .collect();
        if !misplaced.is_empty() {
            self.error(
                "misplaced_option",
                format!("a `{kind}` step takes no {}", misplaced.join(", ")),
                here,
                None,
            );
            return;
        }
        match *kind {
            "run" => {
                if let Some(run) = self.run(spanned, at("RUN", String::new()), names) {
                    out.push(run);
                }
            }
            "copy" => {
                let Some(to) = &step.to else {
                    self.error("missing_key", "a `copy` step needs `to:` (the destination)".into(), here, None);
                    return;
                };
                let sources = step.copy.as_ref().map(model::OneOrMany::to_vec).unwrap_or_default();
                let mut flags = String::new();
                if let Some(from) = &step.from {
                    self.check_stage_ref("`from`", from, names);
                    flags.push_str(&format!("--from={} ", from.as_str()));
                }
                if let Some(c) = &step.chown {
                    flags.push_str(&format!("--chown={} ", c.as_str()));
                }
                if let Some(m) = &step.chmod {
                    flags.push_str(&format!("--chmod={} ", m.0));
                }
                let mut shown_args = sources.clone();
                shown_args.push(to.clone());
                let mut at = at("COPY", format!("COPY {flags}{}", json(&shown_args)));
                if let Some(from) = &step.from {
                    at = at.with_word(from, self.span(from));
                }
                let copy = ir::CopyInstr {
                    sources,
                    dest: to.clone(),
                    from: step.from.as_ref().map(|f| f.to_string()),
                    chown: step.chown.as_ref().and_then(|c| self.typed(c, "invalid_value")),
                    chmod: step.chmod.as_ref().and_then(|m| {
                        let text = m.0.clone();
                        self.typed_text(&text, self.span(m), "invalid_value")
                    }),
                    ..ir::CopyInstr::default()
                };
                out.push((at, Instruction::Copy(Box::new(copy))));
            }
            "env" => {
                if let Some(env) = &step.env {
                    self.env(env, at("ENV", String::new()), out);
                }
            }
            "workdir" => {
                if let Some(dir) = &step.workdir {
                    let at = at("WORKDIR", format!("WORKDIR {}", shown(dir))).with_word(dir, self.span(dir));
                    out.push((at, Instruction::Workdir(dir.to_string())));
                }
            }
            "user" => {
                if let Some(user) = &step.user {
                    let at = at("USER", format!("USER {}", shown(user))).with_word(user, self.span(user));
                    out.push((at, Instruction::User(user.to_string())));
                }
            }
            _ => {
                for (k, v) in step.args.iter().flat_map(|a| a.0.iter()) {
                    let value = arg_default(v);
                    let text = match &value {
                        Some(v) => format!("ARG {k}={v}"),
                        None => format!("ARG {k}"),
                    };
                    out.push((at("ARG", text), Instruction::Arg(vec![(k.to_string(), value)])));
                }
            }
        }
    }

    /// A `run` step, reported at `at`.
    fn run(&mut self, spanned: &Spanned<Step>, at: Located, names: &[&str]) -> Option<(Located, Instruction)> {
        let step: &Step = spanned;
        let mut mounts = Vec::new();
        let mut flags = String::new();
        for m in step.mounts.iter().flatten() {
            let mount = self.mount(m, &at.span, names)?;
            flags.push_str(&format!("--mount={} ", mount.raw));
            mounts.push(mount);
        }
        if let Some(n) = &step.network {
            flags.push_str(&format!("--network={} ", n.as_str()));
        }
        let network = match &step.network {
            Some(n) => match ir::NetworkMode::read(n) {
                Ok(mode) => Some(mode),
                Err(message) => {
                    self.error("invalid_value", message, self.span(n), None);
                    return None;
                }
            },
            None => None,
        };
        let mut run = RunInstr {
            mounts,
            network,
            ..RunInstr::default()
        };
        let text = match &step.run {
            Some(Command::Shell(script)) if script.trim_end().contains('\n') => {
                // A script of several lines runs as a Dockerfile heredoc does:
                // its body is handed to the shell as one argument.
                let body = script.trim_end();
                run.args = vec!["<<EOF".into()];
                run.heredocs = vec![Heredoc {
                    name: "EOF".into(),
                    fd: 0,
                    expand: true,
                    chomp: false,
                    content: format!("{body}\n"),
                }];
                format!("RUN {flags}<<EOF")
            }
            Some(Command::Shell(script)) => {
                run.args = vec![script.clone()];
                format!("RUN {flags}{script}")
            }
            Some(Command::Exec(argv)) => {
                run.args = argv.clone();
                run.json = true;
                format!("RUN {flags}{}", json(argv))
            }
            None => return None,
        };
        let mut at = at.with_text(text);
        if let Some(n) = &step.network {
            at = at.with_word(n, self.span(n));
        }
        Some((at, Instruction::Run(Box::new(run))))
    }

    /// A mount of a `run` step as the IR's typed options, or None after reporting an error.
    fn mount(&mut self, m: &MountSpec, step: &std::ops::Range<usize>, names: &[&str]) -> Option<IrMount> {
        let kinds: Vec<(&str, &String)> = [
            ("cache", &m.cache),
            ("secret", &m.secret),
            ("ssh", &m.ssh),
            ("bind", &m.bind),
            ("tmpfs", &m.tmpfs),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
        .collect();
        let [(kind, value)] = kinds.as_slice() else {
            self.error(
                "mount_kind",
                "a mount has exactly one of cache, secret, ssh, bind, tmpfs".into(),
                step.clone(),
                None,
            );
            return None;
        };
        let mut options = vec![(MountKey::Type, Some(kind.to_string()))];
        match *kind {
            "secret" | "ssh" => options.push((MountKey::Id, Some(value.to_string()))),
            _ => options.push((MountKey::Target, Some(value.to_string()))),
        }
        if let Some(from) = &m.from {
            self.check_stage_ref("the mount's `from`", from, names);
        }
        let opts: [(MountKey, Option<String>); 11] = [
            (MountKey::Id, m.id.clone()),
            (MountKey::Sharing, m.sharing.clone()),
            (MountKey::From, m.from.as_ref().map(|f| f.to_string())),
            (MountKey::Source, m.source.clone()),
            (MountKey::Target, m.target.clone()),
            (MountKey::Env, m.env.clone()),
            (MountKey::Required, m.required.map(|b| b.to_string())),
            (MountKey::Mode, m.mode.as_ref().map(|s| s.0.clone())),
            (MountKey::Uid, m.uid.map(|u| u.to_string())),
            (MountKey::Gid, m.gid.map(|g| g.to_string())),
            (MountKey::Size, m.size.as_ref().map(|s| s.0.clone())),
        ];
        options.extend(opts.into_iter().filter(|(_, v)| v.is_some()));
        if m.readwrite == Some(true) {
            options.push((MountKey::ReadWrite, Some("true".into())));
        }
        // How the flag would read in a Dockerfile: for progress names, and what errors point at.
        let raw = options
            .iter()
            .map(|(k, v)| format!("{}={}", k.name(), v.as_deref().unwrap_or_default()))
            .collect::<Vec<_>>()
            .join(",");
        Some(IrMount { raw, options })
    }

    /// Reports the first cycle among stages (through `from`, copies and mounts).
    fn cycles(&mut self, recipe: &Recipe) {
        let names: Vec<&str> = recipe.stages.0.iter().map(|(n, _)| n.as_str()).collect();
        let deps: Vec<Vec<usize>> = recipe
            .stages
            .0
            .iter()
            .map(|(_, s)| {
                let mut refs = vec![s.from.as_str()];
                for step in &s.steps {
                    refs.extend(step.from.as_ref().map(|f| f.as_str()));
                    refs.extend(step.mounts.iter().flatten().filter_map(|m| m.from.as_ref().map(|f| f.as_str())));
                }
                refs.iter().filter_map(|r| names.iter().position(|n| n == r)).collect()
            })
            .collect();
        // 0 = unvisited, 1 = on the path, 2 = done.
        fn visit(i: usize, deps: &[Vec<usize>], state: &mut [u8], path: &mut Vec<usize>) -> Option<Vec<usize>> {
            state[i] = 1;
            path.push(i);
            for &d in &deps[i] {
                if d == i {
                    continue; // reported as "built from itself"
                }
                if state[d] == 1 {
                    let start = path.iter().position(|&p| p == d).unwrap_or(0);
                    let mut cycle = path[start..].to_vec();
                    cycle.push(d);
                    return Some(cycle);
                }
                if state[d] == 0 {
                    if let Some(c) = visit(d, deps, state, path) {
                        return Some(c);
                    }
                }
            }
            path.pop();
            state[i] = 2;
            None
        }
        let mut state = vec![0u8; names.len()];
        for i in 0..names.len() {
            if state[i] == 0 {
                if let Some(cycle) = visit(i, &deps, &mut state, &mut Vec::new()) {
                    let first = &recipe.stages.0[cycle[0]].1;
                    let text: Vec<&str> = cycle.iter().map(|&c| names[c]).collect();
                    self.error(
                        "cycle",
                        format!("stages depend on each other in a cycle: {}", text.join(" → ")),
                        self.span(&first.from),
                        None,
                    );
                    return;
                }
            }
        }
    }
}

/// A command's arguments and whether they are the exec form.
fn command(c: &Command) -> (Vec<String>, bool) {
    match c {
        Command::Shell(s) => (vec![s.clone()], false),
        Command::Exec(v) => (v.clone(), true),
    }
}

/// A command as a Dockerfile writes it: shell form as written, exec form as JSON.
fn command_text(c: &Command) -> String {
    match c {
        Command::Shell(s) => s.clone(),
        Command::Exec(v) => json(v),
    }
}
