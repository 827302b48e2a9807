//! BuildKit's Dockerfile checks (what `docker build --check` reports, and
//! what every build prints as warnings), under BuildKit's rule names and
//! messages, without IO: [`check`] on the syntax tree, [`check_from`] on
//! each FROM with the global ARGs expanded. Configured as BuildKit does:
//! the `# check=skip=A,B;error=true` directive, replaced whole by the build
//! argument `BUILDKIT_DOCKERFILE_CHECK`.
//!
//! Rules that need a stage's dispatch state (CMD, ENTRYPOINT, WORKDIR, ENV,
//! LABEL, ARG, EXPOSE) are checked in every stage, as `--check` does.
//! [`check_copy_ignored`] reads the `.dockerignore` patterns. UndefinedVar
//! and InvalidBaseImagePlatform need the lowering's environment and the
//! base image: the lowering reports them (`lower/`).

use std::collections::{HashMap, HashSet};

use crate::parser::{Ast, Node, Span};

/// One finding: the rule, BuildKit's message for it, where.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Finding {
    /// BuildKit's rule name, e.g. `StageNameCasing`.
    pub rule: &'static str,
    /// BuildKit's message.
    pub message: String,
    /// The instruction (or line) it is about.
    pub span: Span,
}

/// Which rules run and whether a finding fails the build.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// `skip=all`.
    pub skip_all: bool,
    /// `skip=A,B`.
    pub skip: HashSet<String>,
    /// `error=true`: findings are errors.
    pub error: bool,
    /// `experimental=A,B` or `all`: experimental rules to run (InvalidDefinitionDescription).
    pub experimental: HashSet<String>,
}

/// Parses a check configuration (`skip=…;error=…;experimental=…`) as
/// BuildKit's `ParseLintOptions` does.
pub fn parse_config(text: &str) -> Result<Config, String> {
    let text = text.trim();
    let mut config = Config::default();
    if text.is_empty() {
        return Ok(config);
    }
    for part in text.splitn(3, ';') {
        let Some((key, value)) = part.split_once('=') else {
            return Err(format!("invalid check option {part:?}"));
        };
        let value = value.trim();
        let list = || value.split(',').map(|r| r.trim().to_string()).collect::<HashSet<_>>();
        match key.trim() {
            "skip" if value == "all" => config.skip_all = true,
            "skip" => config.skip = list(),
            "experimental" => config.experimental = list(),
            "error" => {
                config.error = match value {
                    "1" | "t" | "T" | "true" | "TRUE" | "True" => true,
                    "0" | "f" | "F" | "false" | "FALSE" | "False" => false,
                    _ => return Err(format!("failed to parse check option {part:?}: {value:?} is not a boolean")),
                }
            }
            other => return Err(format!("invalid check option {other:?}")),
        }
    }
    Ok(config)
}

/// The configuration of a build: the `BUILDKIT_DOCKERFILE_CHECK` build
/// argument when given, else the `# check=` directive.
pub fn config(ast: &Ast, build_args: &std::collections::BTreeMap<String, String>) -> Result<Config, String> {
    if let Some(v) = build_args.get("BUILDKIT_DOCKERFILE_CHECK") {
        return parse_config(v).map_err(|e| format!("BUILDKIT_DOCKERFILE_CHECK: {e}"));
    }
    match ast.directives.iter().find(|d| d.name == "check") {
        Some(d) => parse_config(&d.value).map_err(|e| format!("check directive: {e}")),
        None => Ok(Config::default()),
    }
}

/// A rule's one-line explanation (BuildKit's description, without its link).
pub fn description(rule: &str) -> &'static str {
    match rule {
        "StageNameCasing" => "Stage names should be lowercase",
        "FromAsCasing" => "The 'as' keyword should match the case of the 'from' keyword",
        "NoEmptyContinuation" => "Empty continuation lines will become errors in a future release",
        "ConsistentInstructionCasing" => "All commands within the Dockerfile should use the same casing (either upper or lower)",
        "DuplicateStageName" => "Stage names should be unique",
        "ReservedStageName" => "Reserved words should not be used as stage names",
        "JSONArgsRecommended" => "JSON arguments recommended for ENTRYPOINT/CMD to prevent unintended behavior related to OS signals",
        "MaintainerDeprecated" => "The MAINTAINER instruction is deprecated, use a label instead to define an image author",
        "WorkdirRelativePath" => {
            "Relative workdir without an absolute workdir declared within the build can have unexpected results if the base image changes"
        }
        "MultipleInstructionsDisallowed" => "Multiple instructions of the same type should not be used in the same stage",
        "LegacyKeyValueFormat" => "Legacy key/value format with whitespace separator should not be used",
        "SecretsUsedInArgOrEnv" => "Sensitive data should not be used in the ARG or ENV commands",
        "ExposeProtoCasing" => "Protocol in EXPOSE instruction should be lowercase",
        "UndefinedArgInFrom" => "FROM command must use declared ARGs",
        "InvalidDefaultArgInFrom" => "Default value for global ARG results in an empty or invalid base image name",
        "RedundantTargetPlatform" => "Setting platform to predefined $TARGETPLATFORM in FROM is redundant as this is the default behavior",
        "FromPlatformFlagConstDisallowed" => "FROM --platform flag should not use a constant value",
        "UndefinedVar" => "Variables should be defined before their use",
        "InvalidBaseImagePlatform" => "Base image platform does not match expected target platform",
        "CopyIgnoredFile" => "Attempting to Copy file that is excluded by .dockerignore",
        "InvalidDefinitionDescription" => {
            "Comment for build stage or argument should follow the format: `# <arg/stage name> <description>`. If this is not intended to be a description comment, add an empty line or comment between the instruction and the comment."
        }
        "ExposeInvalidFormat" => {
            "IP address and host-port mapping should not be used in EXPOSE instruction. This will become an error in a future release"
        }
        _ => "",
    }
}

/// Reserved stage names.
const RESERVED: [&str; 2] = ["context", "scratch"];

fn is_lower(s: &str) -> bool {
    s == s.to_lowercase()
}

fn is_upper(s: &str) -> bool {
    s == s.to_uppercase()
}

/// What a stage carries into the stages built on it.
#[derive(Clone, Default)]
struct StageState {
    shell_set: bool,
    workdir_set: bool,
}

/// Runs every rule `config` leaves on over `ast`; findings in file order.
pub fn check(ast: &Ast, config: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut add = |rule: &'static str, message: String, span: &Span| {
        if !config.skip_all && !config.skip.contains(rule) {
            out.push(Finding {
                rule,
                message,
                span: span.clone(),
            });
        }
    };
    for w in &ast.warnings {
        add("NoEmptyContinuation", "Empty continuation line".into(), &w.span);
    }
    // Instructions before the first FROM are global ARGs: not a stage's.
    let first_from = ast.nodes.iter().position(|n| n.keyword.eq_ignore_ascii_case("from"));
    let staged: &[Node] = first_from.map_or(&[], |i| &ast.nodes[i..]);

    // ConsistentInstructionCasing: the majority over the stages' keywords.
    let (mut lower, mut upper) = (0usize, 0usize);
    for n in staged {
        if is_lower(&n.keyword) {
            lower += 1;
        } else if is_upper(&n.keyword) {
            upper += 1;
        }
    }
    let majority_lower = lower > upper;

    let mut stage_names: HashSet<String> = HashSet::new();
    let mut states: HashMap<String, StageState> = HashMap::new();
    let mut state = StageState::default();
    let mut used_once: HashMap<&'static str, Span> = HashMap::new();
    let mut current: Option<String> = None;
    for (i, n) in ast.nodes.iter().enumerate() {
        let keyword = n.keyword.to_lowercase();
        if keyword == "maintainer" {
            add(
                "MaintainerDeprecated",
                "Maintainer instruction is deprecated in favor of using label".into(),
                &n.span,
            );
        }
        // Experimental: a comment right above a named FROM or an ARG describes it.
        let experimental = config.experimental.contains("all") || config.experimental.contains("InvalidDefinitionDescription");
        if let (true, Some(last)) = (experimental, n.comments.last()) {
            let keys: Vec<&str> = match keyword.as_str() {
                "from" if n.args.len() >= 3 => vec![n.args[2].as_str()],
                "arg" => n.args.iter().map(|d| d.split_once('=').map_or(d.as_str(), |(k, _)| k)).collect(),
                _ => Vec::new(),
            };
            let first_word = last.split(' ').next().unwrap_or("");
            if !keys.is_empty() && !keys.contains(&first_word) {
                let example = if keys.len() > 1 { "<arg_key>" } else { keys[0] };
                add(
                    "InvalidDefinitionDescription",
                    format!(
                        "Comment for {} should follow the format: `# {example} <description>`",
                        keyword.to_uppercase()
                    ),
                    &n.span,
                );
            }
        }
        if first_from.is_some_and(|f| i >= f) {
            let wrong = if majority_lower && !is_lower(&n.keyword) {
                Some("lowercase")
            } else if !majority_lower && !is_upper(&n.keyword) {
                Some("uppercase")
            } else {
                None
            };
            if let Some(casing) = wrong {
                add(
                    "ConsistentInstructionCasing",
                    format!("Command '{}' should match the case of the command majority ({casing})", n.keyword),
                    &n.span,
                );
            }
        }
        match keyword.as_str() {
            "from" => {
                if n.args.len() == 3 && !is_lower(&n.args[2]) {
                    add(
                        "StageNameCasing",
                        format!("Stage name '{}' should be lowercase", n.args[2]),
                        &n.span,
                    );
                }
                if n.args.len() >= 3 {
                    let (from, as_) = (&n.keyword, &n.args[1]);
                    let mismatch = if is_lower(from) {
                        !is_lower(as_)
                    } else if is_upper(from) {
                        !is_upper(as_)
                    } else {
                        false
                    };
                    if mismatch {
                        add(
                            "FromAsCasing",
                            format!("'{as_}' and '{from}' keywords' casing do not match"),
                            &n.span,
                        );
                    }
                }
                let name = (n.args.len() == 3).then(|| n.args[2].to_lowercase());
                if let Some(name) = &name {
                    if RESERVED.contains(&name.as_str()) {
                        add(
                            "ReservedStageName",
                            format!("Stage name should not use the same name as reserved stage {name:?}"),
                            &n.span,
                        );
                    }
                    if !stage_names.insert(name.clone()) {
                        add(
                            "DuplicateStageName",
                            format!("Duplicate stage name {name:?}, stage names should be unique"),
                            &n.span,
                        );
                    }
                }
                // A stage built on an earlier one carries its shell and workdir.
                state = n
                    .args
                    .first()
                    .and_then(|base| states.get(&base.to_lowercase()))
                    .cloned()
                    .unwrap_or_default();
                used_once.clear();
                current = name;
            }
            "shell" => state.shell_set = true,
            "cmd" | "entrypoint" | "healthcheck" => {
                let rule_key: &'static str = match keyword.as_str() {
                    "cmd" => "cmd",
                    "entrypoint" => "entrypoint",
                    _ => "healthcheck",
                };
                // The earlier one is the one ignored: it is reported.
                if let Some(prev) = used_once.insert(rule_key, n.span.clone()) {
                    add(
                        "MultipleInstructionsDisallowed",
                        format!(
                            "Multiple {} instructions should not be used in the same stage because only the last one will be used",
                            n.keyword
                        ),
                        &prev,
                    );
                }
                if keyword != "healthcheck" && !n.json && !state.shell_set {
                    add(
                        "JSONArgsRecommended",
                        format!(
                            "JSON arguments recommended for {} to prevent unintended behavior related to OS signals",
                            n.keyword
                        ),
                        &n.span,
                    );
                }
            }
            "workdir" => {
                let path = n.args.first().map(String::as_str).unwrap_or("");
                // A path from a variable is known only once expanded.
                if !state.workdir_set && !path.starts_with('/') && !path.contains('$') {
                    add(
                        "WorkdirRelativePath",
                        format!("Relative workdir {path:?} can have unexpected results if the base image changes"),
                        &n.span,
                    );
                }
                state.workdir_set = true;
            }
            "env" | "label" => {
                for triple in n.args.chunks(3) {
                    if triple.len() == 3 && triple[2].is_empty() {
                        add(
                            "LegacyKeyValueFormat",
                            format!(
                                "\"{0} key=value\" should be used instead of legacy \"{0} key value\" format",
                                n.keyword
                            ),
                            &n.span,
                        );
                    }
                    if keyword == "env" {
                        if let Some(key) = triple.first() {
                            secret_key("ENV", key, &n.span, &mut add);
                        }
                    }
                }
            }
            "arg" => {
                for decl in &n.args {
                    let key = decl.split_once('=').map_or(decl.as_str(), |(k, _)| k);
                    secret_key("ARG", key, &n.span, &mut add);
                }
            }
            "expose" => {
                for port in &n.args {
                    expose(port, &n.span, &mut add);
                }
            }
            _ => {}
        }
        if let Some(name) = &current {
            states.insert(name.clone(), state.clone());
        }
    }
    out.sort_by_key(|f| f.span.start);
    out
}

/// CopyIgnoredFile: a COPY or ADD from the build context of a path the
/// `.dockerignore` patterns exclude (it would not be there to copy). As
/// BuildKit, not checked when the patterns have `!` exceptions, and the
/// context root (`.`) only counts as excluded under `*`, `**` or `**/*`.
/// Sources written with variables are not checked.
pub fn check_copy_ignored(program: &crate::ir::Program, ignore_patterns: &[String]) -> Vec<Finding> {
    let mut out = Vec::new();
    let Ok(matcher) = kiln_patterns::Matcher::new(ignore_patterns) else {
        return out;
    };
    if matcher.is_empty() || matcher.has_exceptions() {
        return out;
    }
    let root_ignored = matcher
        .patterns()
        .any(|(exclusion, p)| !exclusion && matches!(p.as_str(), "*" | "**" | "**/*"));
    for stage in &program.stages {
        for (at, instruction) in &stage.instructions {
            let crate::ir::Instruction::Copy(c) = instruction else { continue };
            if c.from.is_some() {
                continue;
            }
            for src in &c.sources {
                let remote = src.contains("://") || src.starts_with("git@");
                if remote || src.contains('$') {
                    continue;
                }
                let clean = kiln_patterns::clean_rel(src);
                if clean.is_empty() && !root_ignored {
                    continue;
                }
                if matcher.matches(&clean) {
                    let shown = if clean.is_empty() { ".".to_string() } else { clean };
                    out.push(Finding {
                        rule: "CopyIgnoredFile",
                        message: format!(
                            "Attempting to {} file {shown:?} that is excluded by .dockerignore",
                            if c.is_add { "Add" } else { "Copy" }
                        ),
                        span: at.span.clone(),
                    });
                }
            }
        }
    }
    out
}

/// BuildKit's `suggest.Search`: the closest option under edit distance 3
/// (case-sensitive), none for an exact match.
pub(crate) fn suggest(value: &str, options: &[&str]) -> Option<String> {
    let mut best: Option<(usize, &str)> = None;
    for opt in options {
        if *opt == value {
            return None;
        }
        if let Some(d) = kiln_frontend::diagnostic::edit_distance_below(value, opt, best.map_or(3, |(b, _)| b)) {
            best = Some((d, opt));
        }
    }
    best.map(|(_, o)| o.to_string())
}

/// The rules about each FROM that need the global ARGs' values:
/// UndefinedArgInFrom, InvalidDefaultArgInFrom, RedundantTargetPlatform and
/// FromPlatformFlagConstDisallowed. `builtin` are the platform variables
/// (`TARGETPLATFORM`, `BUILDOS`, …) with their values.
pub fn check_from(
    program: &crate::ir::Program,
    build_args: &std::collections::BTreeMap<String, String>,
    builtin: &[(String, String)],
) -> Vec<Finding> {
    use crate::shell::Lexer;
    let lexer = Lexer::new(program.escape);
    let declared: Vec<&str> = program
        .meta_args
        .iter()
        .flat_map(|(_, decls)| decls.iter().map(|(k, _)| k.as_str()))
        .collect();
    // The global environment with the build's arguments, and with defaults alone.
    let env = |with_args: bool| -> Vec<(String, String)> {
        let mut env = builtin.to_vec();
        for (_, decls) in &program.meta_args {
            for (k, default) in decls {
                let value = match (with_args, build_args.get(k)) {
                    (true, Some(v)) => Some(v.clone()),
                    _ => default.as_ref().and_then(|d| lexer.process_word(d, &env).ok()).map(|p| p.result),
                };
                if let Some(v) = value {
                    env.push((k.clone(), v));
                }
            }
        }
        env
    };
    let (full, defaults) = (env(true), env(false));
    let mut known: Vec<&str> = declared.clone();
    known.extend(full.iter().map(|(k, _)| k.as_str()));
    known.sort_unstable();
    known.dedup();
    let mut out = Vec::new();
    for stage in &program.stages {
        let span = stage.from.span.clone();
        let undeclared = |word: &str, out: &mut Vec<Finding>| {
            let Ok(p) = lexer.process_word(word, &full) else { return None };
            let mut unmatched = p.unmatched.clone();
            unmatched.sort();
            unmatched.dedup();
            for var in unmatched.iter().filter(|v| !known.contains(&v.as_str())) {
                let hint = suggest(var, &declared).map(|s| format!(" (did you mean {s}?)")).unwrap_or_default();
                out.push(Finding {
                    rule: "UndefinedArgInFrom",
                    message: format!("FROM argument '{var}' is not declared{hint}"),
                    span: span.clone(),
                });
            }
            Some(p)
        };
        undeclared(&stage.image, &mut out);
        if let Ok(p) = lexer.process_word(&stage.image, &defaults) {
            if kiln_image::reference::Reference::parse(&p.result).is_err() && !p.result.eq_ignore_ascii_case("scratch") {
                out.push(Finding {
                    rule: "InvalidDefaultArgInFrom",
                    message: format!("Default value for ARG {} results in empty or invalid base image name", stage.image),
                    span: span.clone(),
                });
            }
        }
        let Some(platform) = &stage.platform else { continue };
        let written = platform.written.as_str();
        let Some(p) = undeclared(written, &mut out) else { continue };
        let referenced = written.contains('$');
        let only_target_platform = {
            let t = written.trim_matches(|c| c == '"' || c == '\'');
            t == "$TARGETPLATFORM" || t == "${TARGETPLATFORM}"
        };
        if only_target_platform && full.iter().any(|(k, v)| k == "TARGETPLATFORM" && *v == p.result) {
            out.push(Finding {
                rule: "RedundantTargetPlatform",
                message: format!("Setting platform to predefined {written} in FROM is redundant as this is the default behavior"),
                span: span.clone(),
            });
        }
        if !referenced {
            if let Some(parsed) = crate::ir::Platform::parse(&p.result) {
                let name = stage.name.as_deref().unwrap_or("");
                if !name.contains(&parsed.os) && !name.contains(&parsed.architecture) {
                    out.push(Finding {
                        rule: "FromPlatformFlagConstDisallowed",
                        message: format!("FROM --platform flag should not use constant value {:?}", p.result),
                        span,
                    });
                }
            }
        }
    }
    out
}

/// SecretsUsedInArgOrEnv: a key with a secret-sounding word at either end
/// (or whole), unless it also has an allowed one.
fn secret_key(instruction: &str, key: &str, span: &Span, add: &mut impl FnMut(&'static str, String, &Span)) {
    const DENY: [&str; 10] = [
        "apikey",
        "auth",
        "credential",
        "credentials",
        "key",
        "password",
        "pword",
        "passwd",
        "secret",
        "token",
    ];
    const ALLOW: [&str; 3] = ["public", "file", "version"];
    let lower = key.to_lowercase();
    let words: Vec<&str> = lower.split('_').collect();
    // `(?:_|^)word(?:_|$)`: a whole `_`-separated part.
    let has = |list: &[&str]| words.iter().any(|w| list.contains(w));
    if has(&DENY) && !has(&ALLOW) {
        add(
            "SecretsUsedInArgOrEnv",
            format!("Do not use ARG or ENV instructions for sensitive data ({instruction} {key:?})"),
            span,
        );
    }
}

/// ExposeProtoCasing and ExposeInvalidFormat for one `[ip:][host:]port[/proto]`.
fn expose(raw: &str, span: &Span, add: &mut impl FnMut(&'static str, String, &Span)) {
    let (ports, proto) = raw.rsplit_once('/').unwrap_or((raw, "tcp"));
    if proto != proto.to_lowercase() {
        add(
            "ExposeProtoCasing",
            format!("Defined protocol '{raw}' in EXPOSE instruction should be lowercase"),
            span,
        );
    }
    // An IP or a host port before the container port.
    if ports.contains(':') {
        add(
            "ExposeInvalidFormat",
            format!("EXPOSE instruction should not define an IP address or host-port mapping, found '{raw}'"),
            span,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(src: &str) -> Vec<(&'static str, String)> {
        let (ast, _) = crate::parser::parse(src);
        check(&ast, &Config::default()).into_iter().map(|f| (f.rule, f.message)).collect()
    }

    #[test]
    fn a_clean_file_has_no_findings() {
        assert_eq!(
            rules("FROM busybox AS build\nWORKDIR /src\nENV A=b\nCMD [\"sh\"]\nFROM build\nRUN true\n"),
            vec![]
        );
    }

    #[test]
    fn definition_descriptions_are_checked_only_when_asked_for() {
        // BuildKit's own test file for the experimental rule.
        let src = "# bar this is the bar\nARG foo=bar\n# BasE this is the BasE image\nFROM scratch AS base\n\
                   # definitely a bad comment\nARG version=latest\n# definitely a bad comment\nARG foo=baz bar=qux baz=quux\n\
                   # good this is good\nARG good\n#\nARG after_reset\n# comment for something else\nCOPY a b\n";
        let (ast, _) = crate::parser::parse(src);
        assert!(
            rules(src).iter().all(|(r, _)| *r != "InvalidDefinitionDescription"),
            "experimental: off by default"
        );
        let on = parse_config("experimental=InvalidDefinitionDescription").unwrap_or_default();
        let found: Vec<String> = check(&ast, &on)
            .into_iter()
            .filter(|f| f.rule == "InvalidDefinitionDescription")
            .map(|f| f.message)
            .collect();
        assert_eq!(
            found,
            [
                "Comment for ARG should follow the format: `# foo <description>`",
                "Comment for FROM should follow the format: `# base <description>`",
                "Comment for ARG should follow the format: `# version <description>`",
                "Comment for ARG should follow the format: `# <arg_key> <description>`",
            ]
        );
    }

    #[test]
    fn the_check_configuration_reads_as_buildkit_reads_it() {
        let c = parse_config("skip=JSONArgsRecommended, StageNameCasing;error=true").expect("valid");
        assert!(c.error && c.skip.contains("StageNameCasing") && c.skip.contains("JSONArgsRecommended"));
        assert!(parse_config("skip=all").expect("valid").skip_all);
        assert!(parse_config("nonsense").is_err());
        assert!(parse_config("error=maybe").is_err());
        assert!(parse_config("colour=blue").is_err());
        assert_eq!(parse_config("  ").expect("empty"), Config::default());
    }

    #[test]
    fn secret_words_count_only_as_whole_parts() {
        let found = |key: &str| !rules(&format!("FROM a\nARG {key}\n")).is_empty();
        assert!(found("API_KEY") && found("password") && found("GITHUB_TOKEN") && found("secret_MESSAGE") && found("AUTH"));
        assert!(!found("KEYBOARD") && !found("PUBLIC_KEY") && !found("KEY_FILE") && !found("TOKENIZER"));
    }
}
