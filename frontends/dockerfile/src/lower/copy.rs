//! Lowering COPY and ADD: one FileOp with a copy action per source (the
//! context, another stage or image, git, HTTP, a heredoc), owners and modes,
//! `--link` onto scratch and merged.

use super::*;

impl<'a, 'b> Lowerer<'a, 'b> {
    /// COPY and ADD, as BuildKit lowers them: one FileOp with a copy action per
    /// source (context, another stage or image, git, HTTP, heredoc), onto the
    /// stage's filesystem, or with `--link` onto scratch and merged.
    pub(super) fn copy(&mut self, index: usize, b: &mut Built, cx: &mut StageCx, node: &Located, c: &CopyInstr) -> Result<(), LowerError> {
        let cmd = if c.is_add { "ADD" } else { "COPY" };
        let name = self.display_text(node, b, false);
        let link = c.link && c.chmod.is_none();
        let pg_name = cx.prefix(&name, &b.env);
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
            Some(ch) => Some(chown_opt(&self.flag(ch, env, node, "malformed_flag")?, base)),
            None => None,
        };
        let (mode, mode_str) = match &c.chmod {
            None => (-1, String::new()),
            Some(m) => match self.flag(m, env, node, "malformed_flag")? {
                Chmod::Octal(v) => (v as i32, String::new()),
                // As BuildKit: the string alone, the numeric mode left unset.
                Chmod::Symbolic(s) => (0, s),
            },
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
        let mut meta = Self::meta(node, pg_name.clone(), false).cap("file.base");
        if !mode_str.is_empty() {
            meta = meta.cap("file.copy.modestring");
        }
        b.state = if link {
            // Shown as one step: the copy and the merge share a progress group.
            let group = format!("{}-{}", cx.name, cx.index);
            let copied = State::file(fop, meta.progress_group(group.clone(), pg_name.clone(), true));
            cx.index -= 1;
            let merge_name = cx.prefix(&format!("LINK {name}"), &b.env);
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
            created_by.push_str(&format!(" --chown={}", ch.written));
        }
        if let Some(m) = &c.chmod {
            created_by.push_str(&format!(" --chmod={}", m.written));
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

/// An owner as BuildKit's `WithUser`: ids as they are, names looked up in
/// the filesystem of input `base`.
pub(super) fn chown_opt(chown: &Chown, base: i64) -> pb::ChownOpt {
    let user_opt = |p: &Principal| pb::UserOpt {
        user: Some(match p {
            Principal::Id(id) => pb::user_opt::User::ById(*id),
            Principal::Name(name) => pb::user_opt::User::ByName(pb::NamedUserOpt {
                name: name.clone(),
                input: base,
            }),
        }),
    };
    pb::ChownOpt {
        user: Some(user_opt(&chown.user)),
        group: chown.group.as_ref().map(user_opt),
    }
}

/// A git source of ADD: remote URL, ref and sub-directory (`URL#ref:subdir`).
pub(super) struct GitRef {
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
pub(super) fn http_filename(url: &str) -> String {
    let after_scheme = url.split_once("://").map_or(url, |(_, r)| r);
    let path = after_scheme.find('/').map_or("", |i| &after_scheme[i..]);
    let path = path.split(['?', '#']).next().unwrap_or("");
    match path.trim_end_matches('/').rsplit('/').next() {
        Some(base) if !base.is_empty() && base != "." => base.to_string(),
        _ => "__unnamed__".to_string(),
    }
}

/// Whether a path holds glob characters.
pub(super) fn has_wildcards(p: &str) -> bool {
    p.contains(['*', '?', '['])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_git_sources() {
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
}
