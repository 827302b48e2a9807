//! Phase 2, type: AST nodes → instructions with validated flags.
//!
//! Values are kept unexpanded; variables are expanded while lowering, when the
//! stage's environment is known.

use crate::parser::{Heredoc, Node, Span};

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

/// A typed instruction.
#[derive(Debug, Clone)]
pub enum Instruction {
    /// `FROM [--platform=P] image [AS name]`.
    From {
        /// Image or stage reference (unexpanded).
        image: String,
        /// Stage name.
        name: Option<String>,
        /// `--platform`.
        platform: Option<String>,
    },
    /// `RUN`.
    Run {
        /// Command (shell form: one element).
        args: Vec<String>,
        /// Exec form.
        json: bool,
        /// `--mount` values.
        mounts: Vec<String>,
        /// `--network`.
        network: Option<String>,
        /// `--security`.
        security: Option<String>,
        /// Heredocs.
        heredocs: Vec<Heredoc>,
    },
    /// `COPY` or `ADD`.
    Copy(Box<CopyInstr>),
    /// `ENV k=v…`.
    Env(Vec<(String, String)>),
    /// `ARG k[=v]…`.
    Arg(Vec<(String, Option<String>)>),
    /// `LABEL k=v…`.
    Label(Vec<(String, String)>),
    /// `WORKDIR`.
    Workdir(String),
    /// `USER`.
    User(String),
    /// `SHELL [..]`.
    Shell(Vec<String>),
    /// `CMD`.
    Cmd(Vec<String>, bool),
    /// `ENTRYPOINT`.
    Entrypoint(Vec<String>, bool),
    /// `EXPOSE`.
    Expose(Vec<String>),
    /// `VOLUME`.
    Volume(Vec<String>),
    /// `STOPSIGNAL`.
    StopSignal(String),
    /// `HEALTHCHECK`.
    Healthcheck {
        /// `NONE` or `CMD …`.
        args: Vec<String>,
        /// Exec form.
        json: bool,
        /// Flag values.
        flags: Flags,
    },
    /// `ONBUILD <instruction>`: the trigger text.
    Onbuild(String),
    /// `MAINTAINER`.
    Maintainer(String),
}

/// `COPY`/`ADD` arguments.
#[derive(Debug, Clone)]
pub struct CopyInstr {
    /// ADD (URLs, git, tar unpacking).
    pub is_add: bool,
    /// Sources (unexpanded).
    pub sources: Vec<String>,
    /// Destination (unexpanded).
    pub dest: String,
    /// `--from`.
    pub from: Option<String>,
    /// `--chown`.
    pub chown: Option<String>,
    /// `--chmod`.
    pub chmod: Option<String>,
    /// `--link`.
    pub link: bool,
    /// `--parents`.
    pub parents: bool,
    /// `--exclude`.
    pub excludes: Vec<String>,
    /// ADD `--keep-git-dir`.
    pub keep_git_dir: bool,
    /// ADD `--checksum`.
    pub checksum: Option<String>,
    /// ADD `--unpack`.
    pub unpack: Option<bool>,
    /// Heredoc sources.
    pub heredocs: Vec<Heredoc>,
}

fn pairs(args: &[String]) -> Vec<(String, String)> {
    args.chunks(3)
        .map(|c| (c[0].clone(), c.get(1).cloned().unwrap_or_default()))
        .collect()
}

/// Types one node.
pub fn type_node(node: &Node) -> Result<Instruction, TypeError> {
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
            Instruction::From {
                image,
                name,
                platform: flags.get("platform").map(str::to_string),
            }
        }
        "run" => {
            let flags = Flags::parse(node, &["mount*", "network", "security", "device*"])?;
            need(1, "at least one argument")?;
            Instruction::Run {
                args: node.args.clone(),
                json: node.json,
                mounts: flags.all("mount").into_iter().map(str::to_string).collect(),
                network: flags.get("network").map(str::to_string),
                security: flags.get("security").map(str::to_string),
                heredocs: node.heredocs.clone(),
            }
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
                chown: flags.get("chown").map(str::to_string),
                chmod: flags.get("chmod").map(str::to_string),
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
            Instruction::Healthcheck {
                args: node.args.clone(),
                json: node.json,
                flags,
            }
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
    Ok(inst)
}
