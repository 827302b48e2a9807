//! Phase 2, type: AST nodes → the typed IR ([`crate::ir`]) with validated
//! flags: mount options split and their keys checked, health-check timings
//! parsed, booleans read, all with errors at the flag.
//!
//! Values that variables may change are kept unexpanded; lowering expands
//! them when the stage's environment is known.

use crate::ir::{
    CopyInstr, FlagType, FlagValue, HealthcheckInstr, Instruction, Located, MountKey, MountSpec, Platform, Program, RunInstr, Stage,
};
use crate::parser::{Ast, Node, Span};

/// A typing error: (code, message, span).
pub type TypeError = (&'static str, String, Span);

/// Parsed `--flag` values of one instruction.
#[derive(Debug, Default, Clone)]
pub struct Flags {
    values: Vec<(String, Option<String>)>,
}

impl Flags {
    /// Validates `node.flags` against the allowed names (`name` or `name*` for repeatable).
    pub fn parse(node: &Node, allowed: &[&str]) -> Result<Flags, TypeError> {
        let mut values: Vec<(String, Option<String>)> = Vec::new();
        for raw in &node.flags {
            let Some(body) = raw.strip_prefix("--") else {
                return Err((
                    "malformed_flag",
                    format!("malformed flag {raw:?}: flags start with --"),
                    node.span_of(raw),
                ));
            };
            let (name, value) = match body.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (body.to_string(), None),
            };
            let repeatable = allowed.iter().any(|a| a.strip_suffix('*') == Some(name.as_str()));
            if !repeatable && !allowed.contains(&name.as_str()) {
                let hint = if allowed.is_empty() {
                    format!("{} takes no flags", node.keyword.to_uppercase())
                } else {
                    format!(
                        "{} accepts: {}",
                        node.keyword.to_uppercase(),
                        allowed
                            .iter()
                            .map(|a| format!("--{}", a.trim_end_matches('*')))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                return Err(("unknown_flag", format!("unknown flag: --{name} ({hint})"), node.span_of(raw)));
            }
            if !repeatable && values.iter().any(|(n, _)| *n == name) {
                return Err(("duplicate_flag", format!("duplicate flag specified: --{name}"), node.span_of(raw)));
            }
            values.push((name, value));
        }
        Ok(Flags { values })
    }

    /// The value of a single-valued flag (`--flag` alone gives "").
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_deref().unwrap_or(""))
    }

    /// All values of a repeatable flag.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.values
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_deref().unwrap_or(""))
            .collect()
    }

    /// A typed flag's value (see [`FlagValue`]), an error at the flag when
    /// it is written plainly and is not a `T`.
    pub fn typed<T: FlagType>(&self, node: &Node, name: &str, code: &'static str) -> Result<Option<FlagValue<T>>, TypeError> {
        self.parse_value(node, name, code, FlagValue::new)
    }

    /// A flag read as a `T` as written (not expanded), an error at the flag.
    pub fn read<T: FlagType>(&self, node: &Node, name: &str) -> Result<Option<T>, TypeError> {
        self.parse_value(node, name, "malformed_flag", T::read)
    }

    /// The flag `name` through `parse`; its error points at the value as
    /// written (or at `--name` when it has none).
    fn parse_value<V>(
        &self,
        node: &Node,
        name: &str,
        code: &'static str,
        parse: impl FnOnce(&str) -> Result<V, String>,
    ) -> Result<Option<V>, TypeError> {
        let Some(written) = self.get(name) else { return Ok(None) };
        parse(written).map(Some).map_err(|message| {
            let at = if written.is_empty() {
                format!("--{name}")
            } else {
                written.to_string()
            };
            (code, message, node.span_of(&at))
        })
    }

    /// A boolean flag: absent, `--flag`, `--flag=true|false`.
    pub fn bool(&self, name: &str) -> Result<bool, String> {
        match self.values.iter().find(|(n, _)| n == name) {
            None => Ok(false),
            Some((_, None)) => Ok(true),
            Some((_, Some(v))) => match v.to_ascii_lowercase().as_str() {
                "true" | "1" | "" => Ok(true),
                "false" | "0" => Ok(false),
                _ => Err(format!("expecting boolean value for flag --{name}, not: {v}")),
            },
        }
    }
}

/// A node typed: a FROM starts a stage, anything else is an instruction.
#[derive(Debug, Clone)]
pub enum Typed {
    /// `FROM [--platform=P] image [AS name]`.
    From {
        /// Image or stage reference (a word).
        image: String,
        /// Stage name, lower-cased.
        name: Option<String>,
        /// `--platform`.
        platform: Option<FlagValue<Platform>>,
    },
    /// Any other instruction.
    Other(Instruction),
}

/// Types a whole syntax tree into a [`Program`], collecting every error
/// (code, message, span) so one run reports them all.
pub fn program(ast: &Ast) -> (Program, Vec<TypeError>) {
    let mut errors = Vec::new();
    let mut program = Program {
        escape: ast.escape,
        ..Program::default()
    };
    // A FROM that failed to type still starts a stage: what follows it is
    // not also told that it comes before the first FROM.
    let mut from_seen = false;
    for node in &ast.nodes {
        from_seen |= node.keyword.eq_ignore_ascii_case("from");
        let typed = match type_node(node) {
            Ok(t) => t,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        let at = Located::from_node(node);
        match typed {
            Typed::From { image, name, platform } => {
                if let Some(n) = &name {
                    if program.stages.iter().any(|s| s.name.as_ref() == Some(n)) {
                        errors.push(("duplicate_stage", format!("duplicate stage name {n:?}"), node.span_of(n)));
                    }
                }
                program.stages.push(Stage {
                    image,
                    name,
                    platform,
                    from: at,
                    instructions: Vec::new(),
                });
            }
            Typed::Other(Instruction::Arg(args)) if program.stages.is_empty() => program.meta_args.push((at, args)),
            Typed::Other(other) => match program.stages.last_mut() {
                Some(stage) => stage.instructions.push((at, other)),
                None if from_seen => {}
                None => errors.push((
                    "no_from",
                    format!("{} comes before the first FROM; only ARG may", node.keyword.to_uppercase()),
                    node.keyword_span(),
                )),
            },
        }
    }
    if program.stages.is_empty() && errors.is_empty() {
        errors.push(("no_from", "the Dockerfile has no FROM instruction".into(), 0..0));
    }
    (program, errors)
}

/// Splits a `--mount` value into checked options (fields split on commas,
/// double quotes honoured, keys lower-cased and known).
pub fn mount_spec(raw: &str) -> Result<MountSpec, String> {
    let mut options = Vec::new();
    for field in split_csv(raw) {
        let (k, v) = match field.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.to_string())),
            None => (field.trim(), None),
        };
        let key = MountKey::parse(k).ok_or_else(|| format!("unknown mount option {:?}", k.to_ascii_lowercase()))?;
        options.push((key, v));
    }
    Ok(MountSpec {
        raw: raw.to_string(),
        options,
    })
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

/// Go-style durations: `30s`, `1m30s`, `500ms`, `1h`.
pub fn parse_duration(s: &str) -> Option<i64> {
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

fn pairs(args: &[String]) -> Vec<(String, String)> {
    args.chunks(3)
        .map(|c| (c[0].clone(), c.get(1).cloned().unwrap_or_default()))
        .collect()
}

/// Types one node.
pub fn type_node(node: &Node) -> Result<Typed, TypeError> {
    let cmd = node.command();
    let need = |n: usize, what: &str| -> Result<(), TypeError> {
        if node.args.len() < n {
            Err((
                "missing_argument",
                format!("{} requires {what}", node.keyword.to_uppercase()),
                node.span.clone(),
            ))
        } else {
            Ok(())
        }
    };
    let no_flags = |node: &Node| Flags::parse(node, &[]);
    let inst = match cmd.as_str() {
        "from" => {
            let flags = Flags::parse(node, &["platform"])?;
            need(1, "at least one argument")?;
            let (image, name) = match node.args.as_slice() {
                [image] => (image.clone(), None),
                [image, as_kw, name] if as_kw.eq_ignore_ascii_case("as") => (image.clone(), Some(name.to_ascii_lowercase())),
                _ => {
                    return Err((
                        "from_syntax",
                        "FROM requires either one or three arguments: FROM <image> [AS <name>]".into(),
                        node.span.clone(),
                    ))
                }
            };
            return Ok(Typed::From {
                image,
                name,
                platform: flags.typed(node, "platform", "invalid_platform")?,
            });
        }
        "run" => {
            let flags = Flags::parse(node, &["mount*", "network", "security", "device*"])?;
            need(1, "at least one argument")?;
            let mut mounts = Vec::new();
            for raw in flags.all("mount") {
                let spec = mount_spec(raw).map_err(|m| ("malformed_mount", m, node.span_of(raw)))?;
                spec.check_plain().map_err(|m| ("malformed_mount", m, node.span_of(raw)))?;
                mounts.push(spec);
            }
            Instruction::Run(Box::new(RunInstr {
                args: node.args.clone(),
                json: node.json,
                mounts,
                network: flags.read(node, "network")?,
                security: flags.read(node, "security")?,
                heredocs: node.heredocs.clone(),
            }))
        }
        "copy" | "add" => {
            let is_add = cmd == "add";
            let allowed: &[&str] = if is_add {
                &[
                    "chown",
                    "chmod",
                    "link",
                    "exclude*",
                    "keep-git-dir",
                    "checksum",
                    "unpack",
                    "parents",
                ]
            } else {
                &["from", "chown", "chmod", "link", "exclude*", "parents"]
            };
            let flags = Flags::parse(node, allowed)?;
            let bool_flag = |n: &str| flags.bool(n).map_err(|m| ("malformed_flag", m, node.span_of(&format!("--{n}"))));
            let heredocs = node.heredocs.clone();
            if node.args.len() < 2 && heredocs.is_empty() {
                return Err((
                    "missing_argument",
                    format!(
                        "{} requires at least two arguments, but only {} provided",
                        cmd.to_uppercase(),
                        node.args.len()
                    ),
                    node.span.clone(),
                ));
            }
            let (dest, sources) = match node.args.split_last() {
                Some((d, s)) => (d.clone(), s.to_vec()),
                None => (String::new(), Vec::new()),
            };
            Instruction::Copy(Box::new(CopyInstr {
                is_add,
                sources,
                dest,
                from: flags.get("from").map(str::to_string),
                chown: flags.typed(node, "chown", "malformed_flag")?,
                chmod: flags.typed(node, "chmod", "malformed_flag")?,
                link: bool_flag("link")?,
                parents: bool_flag("parents")?,
                excludes: flags.all("exclude").into_iter().map(str::to_string).collect(),
                keep_git_dir: bool_flag("keep-git-dir")?,
                checksum: flags.get("checksum").map(str::to_string),
                unpack: if flags.get("unpack").is_some() {
                    Some(bool_flag("unpack")?)
                } else {
                    None
                },
                heredocs,
            }))
        }
        "env" => {
            no_flags(node)?;
            need(1, "at least one argument")?;
            Instruction::Env(pairs(&node.args))
        }
        "label" => {
            no_flags(node)?;
            need(1, "at least one argument")?;
            Instruction::Label(pairs(&node.args))
        }
        "arg" => {
            no_flags(node)?;
            need(1, "at least one argument")?;
            Instruction::Arg(
                node.args
                    .iter()
                    .map(|w| match w.split_once('=') {
                        Some((k, v)) => (k.to_string(), Some(v.to_string())),
                        None => (w.clone(), None),
                    })
                    .collect(),
            )
        }
        "workdir" => {
            no_flags(node)?;
            need(1, "exactly one argument")?;
            Instruction::Workdir(node.args[0].clone())
        }
        "user" => {
            no_flags(node)?;
            need(1, "exactly one argument")?;
            Instruction::User(node.args[0].clone())
        }
        "shell" => {
            no_flags(node)?;
            if !node.json {
                return Err((
                    "shell_not_json",
                    "SHELL requires the arguments to be in JSON form".into(),
                    node.span.clone(),
                ));
            }
            need(1, "at least one argument")?;
            Instruction::Shell(node.args.clone())
        }
        "cmd" => {
            no_flags(node)?;
            Instruction::Cmd(node.args.clone(), node.json)
        }
        "entrypoint" => {
            no_flags(node)?;
            Instruction::Entrypoint(node.args.clone(), node.json)
        }
        "expose" => {
            no_flags(node)?;
            need(1, "at least one argument")?;
            Instruction::Expose(node.args.clone())
        }
        "volume" => {
            no_flags(node)?;
            need(1, "at least one argument")?;
            Instruction::Volume(node.args.clone())
        }
        "stopsignal" => {
            no_flags(node)?;
            need(1, "exactly one argument")?;
            Instruction::StopSignal(node.args[0].clone())
        }
        "healthcheck" => {
            let flags = Flags::parse(node, &["interval", "timeout", "start-period", "start-interval", "retries"])?;
            need(1, "at least one argument")?;
            let typ = node.args[0].to_ascii_uppercase();
            if typ != "NONE" && typ != "CMD" {
                return Err((
                    "healthcheck_type",
                    format!("unknown type {typ:?} in HEALTHCHECK (try CMD)"),
                    node.span_of(&node.args[0]),
                ));
            }
            if typ == "NONE" && node.args.len() > 1 {
                return Err(("healthcheck_none", "HEALTHCHECK NONE takes no arguments".into(), node.span.clone()));
            }
            let dur = |n: &str| -> Result<i64, TypeError> {
                match flags.get(n) {
                    None => Ok(0),
                    Some(v) => parse_duration(v).ok_or(("malformed_flag", format!("invalid duration for --{n}: {v:?}"), node.span_of(v))),
                }
            };
            let retries = match flags.get("retries") {
                None => 0,
                Some(r) => r
                    .parse::<i64>()
                    .map_err(|_| ("malformed_flag", format!("invalid --retries value {r:?}"), node.span_of(r)))?,
            };
            Instruction::Healthcheck(Box::new(HealthcheckInstr {
                args: node.args.clone(),
                json: node.json,
                interval: dur("interval")?,
                timeout: dur("timeout")?,
                start_period: dur("start-period")?,
                start_interval: dur("start-interval")?,
                retries,
            }))
        }
        "onbuild" => {
            no_flags(node)?;
            let Some(sub) = &node.sub else {
                return Err((
                    "missing_argument",
                    "ONBUILD requires at least one argument".into(),
                    node.span.clone(),
                ));
            };
            match sub.command().as_str() {
                "onbuild" => {
                    return Err((
                        "onbuild_chain",
                        "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed".into(),
                        node.span.clone(),
                    ))
                }
                "from" | "maintainer" => {
                    return Err((
                        "onbuild_trigger",
                        format!("{} isn't allowed as an ONBUILD trigger", sub.keyword.to_uppercase()),
                        node.span.clone(),
                    ))
                }
                _ => {}
            }
            type_node(sub).map_err(|(c, m, _)| (c, m, node.span.clone()))?;
            let text = node.original.trim_start();
            let trigger = text.get(node.keyword.len()..).unwrap_or("").trim().to_string();
            Instruction::Onbuild(trigger)
        }
        "maintainer" => {
            no_flags(node)?;
            need(1, "exactly one argument")?;
            Instruction::Maintainer(node.args[0].clone())
        }
        _ => {
            let known = [
                "from",
                "run",
                "copy",
                "add",
                "env",
                "arg",
                "label",
                "workdir",
                "user",
                "shell",
                "cmd",
                "entrypoint",
                "expose",
                "volume",
                "stopsignal",
                "healthcheck",
                "onbuild",
                "maintainer",
            ];
            let suggestion = kiln_frontend::diagnostic::closest(&cmd, known.iter().copied());
            let msg = format!("unknown instruction: {}", node.keyword);
            let msg = match suggestion {
                Some(s) => format!("{msg} (did you mean {}?)", s.to_uppercase()),
                None => msg,
            };
            return Err(("unknown_instruction", msg, node.keyword_span()));
        }
    };
    Ok(Typed::Other(inst))
}
