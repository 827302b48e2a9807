//! The YAML recipe frontend (`# syntax=recipe`; format in
//! frontends/recipe/README.md, schema in `recipe.schema.json`).
//!
//! A recipe is read into typed data ([`model`]), checked (one kind per step,
//! known stages, no cycles, known target) with errors at YAML lines and
//! columns, then written as the Dockerfile instructions that say the same
//! thing and lowered by the Dockerfile frontend's own lowering. So a recipe
//! and the equivalent Dockerfile give the same ops, byte for byte; the
//! source map and any later diagnostic are mapped back to the YAML lines.

pub mod model;
pub mod positions;

use kiln_frontend::diagnostic::closest;
use kiln_frontend::{Diagnostic, Host, Request, Response};
use kiln_llb::pb;

use model::{Command, MountSpec, Ordered, Recipe, Scalar, Step};
use positions::{Place, Places};

/// Diagnostic code prefix.
const CODE: &str = "kiln::recipe::";

/// Compiles a recipe request to LLB.
pub fn compile(request: &Request, host: &dyn Host) -> Response {
    let source = String::from_utf8_lossy(&request.definition).into_owned();
    let file = request.filename.clone();
    let places = positions::find(&source);
    let mut response = Response::default();
    let recipe: Recipe = match serde_yaml::from_str(&source) {
        Ok(r) => r,
        Err(e) => {
            response.diagnostics.push(yaml_error(&e, &source, &file));
            return response;
        }
    };
    let mut out = Translation::new(&file, &places, &source);
    out.recipe(&recipe, request.target.as_deref());
    if !out.errors.is_empty() {
        response.diagnostics = out.errors;
        response.diagnostics.sort_by_key(|d| d.offset);
        return response;
    }
    let lowered_request = Request {
        definition: out.text.clone().into_bytes(),
        target: request.target.clone().or(recipe.target.clone()),
        ..request.clone()
    };
    let mut lowered = kiln_dockerfile::compile(&lowered_request, host);
    // Back from the generated instructions to the YAML.
    for d in &mut lowered.diagnostics {
        let place = out.yaml_place_of_offset(d.offset);
        d.offset = place.offset;
        d.length = place.len;
        d.file = file.clone();
    }
    if let Some(def) = &mut lowered.definition {
        if let Some(src) = &mut def.source {
            for locs in src.locations.values_mut() {
                for loc in &mut locs.locations {
                    for r in &mut loc.ranges {
                        for pos in [&mut r.start, &mut r.end].into_iter().flatten() {
                            pos.line = out.yaml_line(pos.line as usize) as i32;
                            pos.character = 0;
                        }
                    }
                }
            }
            src.infos = vec![pb::SourceInfo {
                filename: file.clone(),
                data: request.definition.clone(),
                language: "YAML".into(),
                definition: None,
            }];
        }
    }
    lowered
}

/// A serde_yaml error as a diagnostic at its line and column, with a
/// did-you-mean for unknown keys.
fn yaml_error(e: &serde_yaml::Error, source: &str, file: &str) -> Diagnostic {
    let message = e.to_string();
    let (offset, len) = match e.location() {
        Some(loc) => {
            let rest = &source[loc.index().min(source.len())..];
            let word = rest.find([':', '\n']).unwrap_or(rest.len()).max(1);
            (loc.index(), word)
        }
        None => (0, 0),
    };
    // serde_yaml: "stages.build.steps[0]: unknown field `rnu`, expected one of `run`, … at line 5 column 7"
    let text = message.split(" at line ").next().unwrap_or(&message).to_string();
    let unknown = text
        .split("unknown field `")
        .nth(1)
        .and_then(|r| r.split('`').next())
        .map(str::to_string);
    let expected: Vec<String> = text
        .split("expected one of ")
        .nth(1)
        .or_else(|| text.split("expected ").nth(1))
        .map(|r| r.split('`').skip(1).step_by(2).map(str::to_string).collect())
        .unwrap_or_default();
    let (code, text) = match &unknown {
        Some(key) => ("unknown_key", format!("unknown key `{key}`{}", context_of(&text))),
        None => ("invalid", text.clone()),
    };
    let mut d = Diagnostic::error(&format!("{CODE}{code}"), text, file, offset..offset + len);
    if let Some(key) = unknown {
        d.help = Some(match closest(&key, expected.iter().map(String::as_str)) {
            Some(m) => format!("did you mean `{m}`?"),
            None => format!("keys here: {}", expected.join(", ")),
        });
    }
    d
}

/// ` in stages.build.steps[0]` from serde_yaml's path prefix, if any.
fn context_of(text: &str) -> String {
    match text.split_once(": unknown field") {
        Some((path, _)) if !path.is_empty() => format!(" in {path}"),
        _ => String::new(),
    }
}

/// Double-quoted for a Dockerfile value (expansion of `$VAR` stays on, as in a Dockerfile).
fn dq(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn json(list: &[String]) -> String {
    serde_json::to_string(list).unwrap_or_default()
}

/// The generated Dockerfile and, for each of its lines, the YAML place it came from.
struct Translation<'a> {
    file: &'a str,
    source: &'a str,
    places: &'a Places,
    text: String,
    origins: Vec<Place>,
    errors: Vec<Diagnostic>,
}

impl<'a> Translation<'a> {
    fn new(file: &'a str, places: &'a Places, source: &'a str) -> Translation<'a> {
        Translation {
            file,
            source,
            places,
            text: String::new(),
            origins: Vec::new(),
            errors: Vec::new(),
        }
    }

    fn emit(&mut self, line: &str, origin: Place) {
        for l in line.split('\n') {
            self.text.push_str(l);
            self.text.push('\n');
            self.origins.push(origin);
        }
    }

    fn error(&mut self, code: &str, message: String, at: Place, help: Option<String>) {
        let mut d = Diagnostic::error(&format!("{CODE}{code}"), message, self.file, at.offset..at.offset + at.len);
        d.help = help;
        self.errors.push(d);
    }

    /// The YAML line of a generated line (1-based).
    fn yaml_line(&self, generated: usize) -> usize {
        self.origins.get(generated.saturating_sub(1)).map(|p| p.line).unwrap_or(1)
    }

    /// The YAML place of a byte offset in the generated text.
    fn yaml_place_of_offset(&self, offset: usize) -> Place {
        let line = self.text[..offset.min(self.text.len())].matches('\n').count();
        self.origins.get(line).copied().unwrap_or_default()
    }

    fn recipe(&mut self, recipe: &Recipe, target: Option<&str>) {
        let names: Vec<&str> = recipe.stages.0.iter().map(|(n, _)| n.as_str()).collect();
        let top = Place {
            line: 1,
            offset: 0,
            len: 0,
        };
        if names.is_empty() {
            self.error("no_stages", "the recipe has no stages".into(), top, None);
            return;
        }
        for (k, v) in &recipe.args.0 {
            let line = match v {
                Some(Scalar(v)) => format!("ARG {k}={}", dq(v)),
                None => format!("ARG {k}"),
            };
            self.emit(&line, top);
        }
        for (index, (name, stage)) in recipe.stages.0.iter().enumerate() {
            let places = self.places.stages.get(index).cloned().unwrap_or_default();
            self.stage(name, stage, &places, &names);
        }
        if let Some(t) = target.or(recipe.target.as_deref()) {
            if !names.contains(&t) {
                let at = self.places.target.filter(|_| target.is_none()).unwrap_or(top);
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
    }

    fn stage(&mut self, name: &str, stage: &model::Stage, places: &positions::StagePlaces, names: &[&str]) {
        let valid = name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-".contains(c));
        if !valid {
            self.error(
                "invalid_stage_name",
                format!("stage name `{name}`: use lowercase letters, digits, `_`, `.` and `-`"),
                places.name,
                None,
            );
        }
        let from_at = places.from.unwrap_or(places.name);
        if stage.from == name {
            self.error("cycle", format!("stage `{name}` is built from itself"), from_at, None);
        }
        let platform = stage.platform.as_ref().map(|p| format!("--platform={p} ")).unwrap_or_default();
        self.emit(&format!("FROM {platform}{} AS {name}", stage.from), from_at);
        for (i, step) in stage.steps.iter().enumerate() {
            let at = places.steps.get(i).copied().unwrap_or(places.name);
            self.step(step, at, names);
        }
        if let Some(image) = &stage.image {
            let at = places.image.unwrap_or(places.name);
            if let Some(env) = &image.env {
                self.env(env, at);
            }
            if let Some(u) = &image.user {
                self.emit(&format!("USER {u}"), at);
            }
            if let Some(w) = &image.workdir {
                self.emit(&format!("WORKDIR {w}"), at);
            }
            if let Some(labels) = &image.labels {
                let pairs: Vec<String> = labels.0.iter().map(|(k, Scalar(v))| format!("{}={}", dq(k), dq(v))).collect();
                if !pairs.is_empty() {
                    self.emit(&format!("LABEL {}", pairs.join(" ")), at);
                }
            }
            if let Some(ports) = &image.ports {
                let ports: Vec<&str> = ports.iter().map(|Scalar(p)| p.as_str()).collect();
                if !ports.is_empty() {
                    self.emit(&format!("EXPOSE {}", ports.join(" ")), at);
                }
            }
            if let Some(volumes) = &image.volumes {
                self.emit(&format!("VOLUME {}", json(volumes)), at);
            }
            if let Some(ep) = &image.entrypoint {
                self.emit(&format!("ENTRYPOINT {}", command(ep)), at);
            }
            if let Some(cmd) = &image.cmd {
                self.emit(&format!("CMD {}", command(cmd)), at);
            }
        }
    }

    fn env(&mut self, env: &Ordered<Scalar>, at: Place) {
        let pairs: Vec<String> = env.0.iter().map(|(k, Scalar(v))| format!("{k}={}", dq(v))).collect();
        if !pairs.is_empty() {
            self.emit(&format!("ENV {}", pairs.join(" ")), at);
        }
    }

    fn check_stage_ref(&mut self, what: &str, name: &str, at: Place, names: &[&str]) {
        if !names.contains(&name) {
            let at = positions::key_in_item(self.source, at, "from", name).unwrap_or(at);
            let help = closest(name, names.iter().copied())
                .map(|m| format!("did you mean `{m}`?"))
                .or_else(|| Some(format!("stages: {}", names.join(", "))));
            self.error("unknown_stage", format!("{what} names no stage `{name}`"), at, help);
        }
    }

    fn step(&mut self, step: &Step, at: Place, names: &[&str]) {
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
                at,
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
                at,
                None,
            );
            return;
        }
        match *kind {
            "run" => self.run(step, at, names),
            "copy" => {
                let Some(to) = &step.to else {
                    self.error("missing_key", "a `copy` step needs `to:` (the destination)".into(), at, None);
                    return;
                };
                let mut flags = String::new();
                if let Some(from) = &step.from {
                    self.check_stage_ref("`from`", from, at, names);
                    flags.push_str(&format!("--from={from} "));
                }
                if let Some(c) = &step.chown {
                    flags.push_str(&format!("--chown={c} "));
                }
                if let Some(Scalar(m)) = &step.chmod {
                    flags.push_str(&format!("--chmod={m} "));
                }
                let mut args = step.copy.as_ref().map(model::OneOrMany::to_vec).unwrap_or_default();
                args.push(to.clone());
                self.emit(&format!("COPY {flags}{}", json(&args)), at);
            }
            "env" => {
                if let Some(env) = &step.env {
                    self.env(env, at);
                }
            }
            "workdir" => {
                let dir = step.workdir.clone().unwrap_or_default();
                self.emit(&format!("WORKDIR {dir}"), at);
            }
            "user" => {
                let user = step.user.clone().unwrap_or_default();
                self.emit(&format!("USER {user}"), at);
            }
            _ => {
                for (k, v) in step.args.iter().flat_map(|a| a.0.iter()) {
                    let line = match v {
                        Some(Scalar(v)) => format!("ARG {k}={}", dq(v)),
                        None => format!("ARG {k}"),
                    };
                    self.emit(&line, at);
                }
            }
        }
    }

    fn run(&mut self, step: &Step, at: Place, names: &[&str]) {
        let mut flags = String::new();
        for m in step.mounts.iter().flatten() {
            match self.mount(m, at, names) {
                Some(spec) => flags.push_str(&format!("--mount={spec} ")),
                None => return,
            }
        }
        if let Some(n) = &step.network {
            flags.push_str(&format!("--network={n} "));
        }
        match &step.run {
            Some(Command::Shell(script)) if script.trim_end().contains('\n') => {
                let body = script.trim_end();
                if body.lines().any(|l| l == "KILN_RECIPE_EOF") {
                    self.error("invalid", "a script line may not be KILN_RECIPE_EOF".into(), at, None);
                    return;
                }
                self.emit(&format!("RUN {flags}<<KILN_RECIPE_EOF\n{body}\nKILN_RECIPE_EOF"), at);
            }
            Some(Command::Shell(script)) => self.emit(&format!("RUN {flags}{script}"), at),
            Some(Command::Exec(argv)) => self.emit(&format!("RUN {flags}{}", json(argv)), at),
            None => {}
        }
    }

    /// The `--mount=` value of a mount, or None after reporting an error.
    fn mount(&mut self, m: &MountSpec, at: Place, names: &[&str]) -> Option<String> {
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
                at,
                None,
            );
            return None;
        };
        let mut parts = vec![format!("type={kind}")];
        match *kind {
            "secret" | "ssh" => parts.push(format!("id={value}")),
            _ => parts.push(format!("target={value}")),
        }
        if let Some(from) = &m.from {
            self.check_stage_ref("the mount's `from`", from, at, names);
        }
        let opts: [(&str, Option<String>); 11] = [
            ("id", m.id.clone()),
            ("sharing", m.sharing.clone()),
            ("from", m.from.clone()),
            ("source", m.source.clone()),
            ("target", m.target.clone()),
            ("env", m.env.clone()),
            ("required", m.required.map(|b| b.to_string())),
            ("mode", m.mode.as_ref().map(|s| s.0.clone())),
            ("uid", m.uid.map(|u| u.to_string())),
            ("gid", m.gid.map(|g| g.to_string())),
            ("size", m.size.as_ref().map(|s| s.0.clone())),
        ];
        for (k, v) in opts {
            if let Some(v) = v {
                parts.push(format!("{k}={v}"));
            }
        }
        if m.readwrite == Some(true) {
            parts.push("rw=true".into());
        }
        if parts.iter().any(|p| p.contains([',', '"', '\n'])) {
            self.error("invalid", "mount values may not contain `,`, `\"` or newlines".into(), at, None);
            return None;
        }
        Some(parts.join(","))
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
                    refs.extend(step.from.as_deref());
                    refs.extend(step.mounts.iter().flatten().filter_map(|m| m.from.as_deref()));
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
                    let first = cycle[0];
                    let places = self.places.stages.get(first).cloned().unwrap_or_default();
                    let text: Vec<&str> = cycle.iter().map(|&c| names[c]).collect();
                    self.error(
                        "cycle",
                        format!("stages depend on each other in a cycle: {}", text.join(" → ")),
                        places.from.unwrap_or(places.name),
                        None,
                    );
                    return;
                }
            }
        }
    }
}

/// A command in Dockerfile syntax: shell form as written, exec form as JSON.
fn command(c: &Command) -> String {
    match c {
        Command::Shell(s) => s.clone(),
        Command::Exec(v) => json(v),
    }
}
