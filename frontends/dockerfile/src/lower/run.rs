//! Lowering RUN: the command (shell, exec or heredoc form), its network and
//! security modes, and its mounts, each mount value expanded with the step's
//! variables and then read, as BuildKit does.

use super::*;

impl<'a, 'b> Lowerer<'a, 'b> {
    pub(super) fn run(&mut self, index: usize, b: &mut Built, cx: &mut StageCx, node: &Located, run: &RunInstr) -> Result<(), LowerError> {
        let (args, json, heredocs) = (&run.args, run.json, &run.heredocs);
        let (network, security) = (run.network, run.security);
        // A RUN whose whole command is one heredoc runs the heredoc's body (BuildKit's "fake" heredoc).
        let cmd = args.join(" ");
        let whole_heredoc = !json && heredocs.len() == 1 && crate::parser::parse_heredoc(&cmd).ok().flatten().is_some();
        let mut name = self.display_text(node, b, true);
        if whole_heredoc {
            name = format!("{name} ({})", summarize_heredoc(&heredocs[0].content));
        }
        let customname = cx.prefix(&name, &b.env);
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
            extra_hosts: self
                .input
                .request
                .extra_hosts
                .iter()
                .map(|(host, ip)| pb::HostIp {
                    host: host.clone(),
                    ip: ip.clone(),
                })
                .collect(),
            ..Default::default()
        };
        let network = match network {
            Some(n) if n != NetworkMode::Default => Some(n),
            // `kiln build --network` is the stage's mode, as in BuildKit: it
            // applies to steps that name none or `default`.
            _ => match self.input.request.network.as_deref() {
                Some(n) => Some(NetworkMode::read(n).map_err(|m| ("malformed_flag", m, node.span.clone()))?),
                None => None,
            },
        };
        exec.network = match network {
            None | Some(NetworkMode::Default) => pb::NetMode::Unset,
            Some(NetworkMode::None) => pb::NetMode::None,
            Some(NetworkMode::Host) => pb::NetMode::Host,
        };
        exec.security = match security {
            None | Some(SecurityMode::Sandbox) => pb::SecurityMode::Sandbox,
            Some(SecurityMode::Insecure) => pb::SecurityMode::Insecure,
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

    #[allow(
        clippy::too_many_arguments,
        reason = "a mount needs the step's state, place, variables and its shared counters"
    )]
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
            k.check(v.as_deref()).map_err(bad)?;
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

    pub(super) fn heredoc_content(&self, doc: &Heredoc, env: &dyn Env, node: &Located) -> Result<String, LowerError> {
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
}

/// BuildKit's one-line summary of a heredoc body.
pub(super) fn summarize_heredoc(doc: &str) -> String {
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
pub(super) fn proxy_env(build_args: &BTreeMap<String, String>) -> Option<pb::ProxyEnv> {
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
pub(super) fn inline_document(name: &str, mode: i32, data: String) -> State {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes() {
        assert_eq!(crate::instructions::parse_duration("1m30s"), Some(90_000_000_000));
        assert_eq!(crate::instructions::parse_duration("5x"), None);
        assert_eq!(parse_size("64m"), Some(64 << 20));
    }
}
