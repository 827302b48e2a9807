//! The typed, spanned frontend IR: what lowering takes, whatever the
//! definition was written in. [`crate::instructions`] builds it from a
//! Dockerfile's syntax tree; the recipe frontend builds it from YAML. No
//! parser type appears here and nothing is text to be parsed again: a value
//! is either typed (mount options, health-check durations, owners, modes,
//! platforms) or one word that lowering expands with the stage's variables
//! (paths, sources), because variables are only known then. A typed flag
//! written with a variable ([`FlagValue`]) is typed after expansion, by the
//! same rules.

use crate::parser::{Node, Span};
pub use kiln_frontend::Platform;

pub use crate::parser::Heredoc;

/// A whole definition: global ARGs, stages, the escape character.
#[derive(Debug, Clone, Default)]
pub struct Program {
    /// `ARG`s before the first stage, each with where it was written.
    pub meta_args: Vec<(Located, Vec<ArgDecl>)>,
    /// Stages in order.
    pub stages: Vec<Stage>,
    /// The escape character word expansion uses (`\` unless a directive says otherwise).
    pub escape: char,
}

/// An ARG declaration: name and optional default (a word).
pub type ArgDecl = (String, Option<String>);

/// One stage: its FROM and the instructions after it.
#[derive(Debug, Clone)]
pub struct Stage {
    /// `FROM` image (a word).
    pub image: String,
    /// `AS` name, lower-cased.
    pub name: Option<String>,
    /// `--platform`.
    pub platform: Option<FlagValue<Platform>>,
    /// Where the FROM is.
    pub from: Located,
    /// The rest, in order.
    pub instructions: Vec<(Located, Instruction)>,
}

/// Where an instruction is in its definition file and how it reads.
#[derive(Debug, Clone, Default)]
pub struct Located {
    /// The keyword as written (`RUN`, `run`).
    pub keyword: String,
    /// The instruction as written, continuation lines joined (progress names
    /// and history are made from it), or as a Dockerfile would say it.
    pub original: String,
    /// Byte span in the definition file.
    pub span: Span,
    /// First line (1-based), for the source map.
    pub start_line: usize,
    /// Last line.
    pub end_line: usize,
    /// Offsets in `original` mapped to the file: (offset in original, offset
    /// in file, length). Empty when `original` is not the file's text.
    segments: Vec<(usize, usize, usize)>,
    /// Places of values written apart from `original` (a recipe's YAML values).
    words: Vec<(String, Span)>,
}

impl Located {
    /// The place of a Dockerfile instruction.
    pub fn from_node(node: &Node) -> Located {
        Located {
            keyword: node.keyword.clone(),
            original: node.original.clone(),
            span: node.span.clone(),
            start_line: node.start_line,
            end_line: node.end_line,
            segments: node.segments().to_vec(),
            words: Vec::new(),
        }
    }

    /// An instruction whose text is not the file's (a recipe step): `original`
    /// is how a Dockerfile would say it, `span` and `line` where it is.
    pub fn synthetic(keyword: &str, original: String, span: Span, line: usize) -> Located {
        Located {
            keyword: keyword.to_string(),
            original,
            span,
            start_line: line,
            end_line: line,
            segments: Vec::new(),
            words: Vec::new(),
        }
    }

    /// The same place, shown as `original`.
    pub fn with_text(mut self, original: String) -> Located {
        self.original = original;
        self
    }

    /// Records where a value of this instruction is, for errors about it.
    pub fn with_word(mut self, word: &str, span: Span) -> Located {
        if !word.is_empty() {
            self.words.push((word.to_string(), span));
        }
        self
    }

    /// The same instruction reported at another place (ONBUILD triggers run
    /// at the FROM that inherits them).
    pub fn relocated(&self, at: &Located) -> Located {
        Located {
            span: at.span.clone(),
            start_line: at.start_line,
            end_line: at.end_line,
            segments: Vec::new(),
            words: Vec::new(),
            ..self.clone()
        }
    }

    /// The span of `needle` inside this instruction, or the whole instruction.
    pub fn span_of(&self, needle: &str) -> Span {
        if needle.is_empty() {
            return self.span.clone();
        }
        if let Some((_, span)) = self.words.iter().find(|(w, _)| w == needle) {
            return span.clone();
        }
        match self.original.find(needle) {
            Some(at) if !self.segments.is_empty() => self.map(at)..self.map(at + needle.len() - 1) + 1,
            _ => self.span.clone(),
        }
    }

    /// The span of the keyword (the whole instruction when not file text).
    pub fn keyword_span(&self) -> Span {
        if self.segments.is_empty() {
            return self.span.clone();
        }
        self.span.start..self.span.start + self.keyword.len()
    }

    /// The text after the keyword.
    pub fn arguments_text(&self) -> &str {
        self.original.trim().get(self.keyword.len()..).unwrap_or("").trim()
    }

    fn map(&self, offset: usize) -> usize {
        for &(o, s, len) in &self.segments {
            if offset >= o && offset < o + len.max(1) {
                return s + (offset - o);
            }
        }
        self.span.start
    }
}

/// A typed instruction. Words are kept unexpanded; lowering expands them.
#[derive(Debug, Clone)]
pub enum Instruction {
    /// `RUN`.
    Run(Box<RunInstr>),
    /// `COPY` or `ADD`.
    Copy(Box<CopyInstr>),
    /// `ENV k=v…`.
    Env(Vec<(String, String)>),
    /// `ARG k[=v]…`.
    Arg(Vec<ArgDecl>),
    /// `LABEL k=v…`.
    Label(Vec<(String, String)>),
    /// `WORKDIR`.
    Workdir(String),
    /// `USER`.
    User(String),
    /// `SHELL [..]`.
    Shell(Vec<String>),
    /// `CMD` (arguments, exec form).
    Cmd(Vec<String>, bool),
    /// `ENTRYPOINT` (arguments, exec form).
    Entrypoint(Vec<String>, bool),
    /// `EXPOSE`.
    Expose(Vec<String>),
    /// `VOLUME`.
    Volume(Vec<String>),
    /// `STOPSIGNAL`.
    StopSignal(String),
    /// `HEALTHCHECK`.
    Healthcheck(Box<HealthcheckInstr>),
    /// `ONBUILD <instruction>`: the trigger text (kept as text: it goes into
    /// the image config and is parsed by whoever builds FROM the image).
    Onbuild(String),
    /// `MAINTAINER`.
    Maintainer(String),
}

/// `RUN` arguments.
#[derive(Debug, Clone, Default)]
pub struct RunInstr {
    /// Command (shell form: one element).
    pub args: Vec<String>,
    /// Exec form.
    pub json: bool,
    /// `--mount`s.
    pub mounts: Vec<MountSpec>,
    /// `--network`.
    pub network: Option<NetworkMode>,
    /// `--security`.
    pub security: Option<SecurityMode>,
    /// Heredocs.
    pub heredocs: Vec<Heredoc>,
}

/// One `--mount`: its options with keys checked and lower-cased, values
/// unexpanded (BuildKit expands each value, then reads it).
#[derive(Debug, Clone, Default)]
pub struct MountSpec {
    /// The flag's value as written, to point errors at.
    pub raw: String,
    /// `(key, value)`; a key alone (`ro`, `rw`, `required`) has no value.
    pub options: Vec<(MountKey, Option<String>)>,
}

/// The keys a `--mount` knows (synonyms folded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountKey {
    /// `type`.
    Type,
    /// `target`, `dst`, `destination`.
    Target,
    /// `source`, `src`.
    Source,
    /// `from`.
    From,
    /// `ro`, `readonly`.
    ReadOnly,
    /// `rw`, `readwrite`.
    ReadWrite,
    /// `id`.
    Id,
    /// `sharing`.
    Sharing,
    /// `mode`.
    Mode,
    /// `uid`.
    Uid,
    /// `gid`.
    Gid,
    /// `size`.
    Size,
    /// `required`.
    Required,
    /// `env`.
    Env,
}

impl MountKey {
    /// The key a `--mount` field names, if known.
    pub fn parse(key: &str) -> Option<MountKey> {
        Some(match key.to_ascii_lowercase().as_str() {
            "type" => MountKey::Type,
            "target" | "dst" | "destination" => MountKey::Target,
            "source" | "src" => MountKey::Source,
            "from" => MountKey::From,
            "ro" | "readonly" => MountKey::ReadOnly,
            "rw" | "readwrite" => MountKey::ReadWrite,
            "id" => MountKey::Id,
            "sharing" => MountKey::Sharing,
            "mode" => MountKey::Mode,
            "uid" => MountKey::Uid,
            "gid" => MountKey::Gid,
            "size" => MountKey::Size,
            "required" => MountKey::Required,
            "env" => MountKey::Env,
            _ => return None,
        })
    }

    /// Checks a value of this key by the rules lowering reads it with (after
    /// expansion; a plain value is checked when the IR is built too).
    pub fn check(self, value: Option<&str>) -> Result<(), String> {
        let Some(v) = value else { return Ok(()) };
        let ok = match self {
            MountKey::Type => {
                let t = v.to_ascii_lowercase();
                if !["bind", "cache", "tmpfs", "secret", "ssh"].contains(&t.as_str()) {
                    return Err(format!("unsupported mount type {t:?} (bind, cache, tmpfs, secret or ssh)"));
                }
                true
            }
            MountKey::ReadOnly | MountKey::ReadWrite | MountKey::Required => {
                ["true", "1", "false", "0"].contains(&v.to_ascii_lowercase().as_str())
            }
            MountKey::Sharing => {
                if !["shared", "private", "locked"].contains(&v) {
                    return Err(format!("unsupported sharing value {v:?} (shared, private or locked)"));
                }
                true
            }
            MountKey::Mode => u32::from_str_radix(v, 8).is_ok(),
            MountKey::Uid | MountKey::Gid => v.parse::<u32>().is_ok(),
            MountKey::Size => parse_size(v).is_some(),
            MountKey::Target | MountKey::Source | MountKey::From | MountKey::Id | MountKey::Env => true,
        };
        match (ok, self) {
            (true, _) => Ok(()),
            (false, MountKey::ReadOnly | MountKey::ReadWrite | MountKey::Required) => {
                Err(format!("invalid value for {}: {v:?}", self.name()))
            }
            (false, _) => Err(format!("invalid {} {v:?}", self.name())),
        }
    }

    /// The key's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            MountKey::Type => "type",
            MountKey::Target => "target",
            MountKey::Source => "source",
            MountKey::From => "from",
            MountKey::ReadOnly => "readonly",
            MountKey::ReadWrite => "readwrite",
            MountKey::Id => "id",
            MountKey::Sharing => "sharing",
            MountKey::Mode => "mode",
            MountKey::Uid => "uid",
            MountKey::Gid => "gid",
            MountKey::Size => "size",
            MountKey::Required => "required",
            MountKey::Env => "env",
        }
    }
}

impl MountSpec {
    /// Checks the plainly written values (see [`MountKey::check`]).
    pub fn check_plain(&self) -> Result<(), String> {
        for (k, v) in &self.options {
            if v.as_deref().is_none_or(is_plain) {
                k.check(v.as_deref())?;
            }
        }
        Ok(())
    }

    /// The last value given for `key` (`Some("")` for a key alone).
    pub fn get(&self, key: MountKey) -> Option<&str> {
        self.options
            .iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_deref().unwrap_or(""))
    }
}

/// `COPY`/`ADD` arguments.
#[derive(Debug, Clone, Default)]
pub struct CopyInstr {
    /// ADD (URLs, git, tar unpacking).
    pub is_add: bool,
    /// Sources (words).
    pub sources: Vec<String>,
    /// Destination (a word).
    pub dest: String,
    /// `--from`.
    pub from: Option<String>,
    /// `--chown`.
    pub chown: Option<FlagValue<Chown>>,
    /// `--chmod`.
    pub chmod: Option<FlagValue<Chmod>>,
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

/// `HEALTHCHECK`: the test and its timings, parsed.
#[derive(Debug, Clone, Default)]
pub struct HealthcheckInstr {
    /// `NONE` or `CMD …` as written.
    pub args: Vec<String>,
    /// Exec form.
    pub json: bool,
    /// `--interval` in nanoseconds (0: unset).
    pub interval: i64,
    /// `--timeout` in nanoseconds.
    pub timeout: i64,
    /// `--start-period` in nanoseconds.
    pub start_period: i64,
    /// `--start-interval` in nanoseconds.
    pub start_interval: i64,
    /// `--retries`.
    pub retries: i64,
}

/// Sizes such as `64m`, `1g`, `1024` (a tmpfs mount's `size=`).
pub fn parse_size(s: &str) -> Option<i64> {
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

/// Whether a flag value is written plainly: no variable, quote or escape,
/// so expanding it changes nothing and it can be checked now.
fn is_plain(written: &str) -> bool {
    !written.contains(['$', '"', '\'', '\\', '`'])
}

/// A flag value of type `T`. Written plainly it is typed when the IR is
/// built, so a bad value is reported at its flag before anything is
/// lowered; written with a variable, quotes or escapes it is kept as the
/// word and typed after lowering expands it.
#[derive(Debug, Clone, PartialEq)]
pub struct FlagValue<T> {
    /// As written (history and progress names show it).
    pub written: String,
    /// The value, unless it waits for expansion.
    pub typed: Option<T>,
}

/// A type a flag's text is read as.
pub trait FlagType: Sized + Clone {
    /// Reads an (expanded) value; the error says what would be accepted.
    fn read(text: &str) -> Result<Self, String>;
}

impl<T: FlagType> FlagValue<T> {
    /// `written`, typed now unless it needs the stage's variables.
    pub fn new(written: &str) -> Result<FlagValue<T>, String> {
        Ok(FlagValue {
            written: written.to_string(),
            typed: if is_plain(written) { Some(T::read(written)?) } else { None },
        })
    }
}

/// One side of `--chown`: a numeric id, or a name looked up in the
/// filesystem copied onto (`root` is 0 without a lookup, as in BuildKit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A numeric id.
    Id(u32),
    /// A user or group name.
    Name(String),
}

impl Principal {
    fn read(text: &str) -> Principal {
        if text == "root" {
            return Principal::Id(0);
        }
        // Negative ids wrap as BuildKit's do (Go's int to uint32).
        match text.parse::<i32>() {
            Ok(n) => Principal::Id(n as u32),
            Err(_) => Principal::Name(text.to_string()),
        }
    }
}

/// `--chown=user[:group]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chown {
    /// The owner.
    pub user: Principal,
    /// The group; without one, the user's primary group.
    pub group: Option<Principal>,
}

impl FlagType for Chown {
    fn read(text: &str) -> Result<Chown, String> {
        let (user, group) = match text.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (text, None),
        };
        Ok(Chown {
            user: Principal::read(user),
            group: group.map(Principal::read),
        })
    }
}

/// `--chmod`: octal, or symbolic as chmod(1) reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chmod {
    /// Octal bits, at most 07777.
    Octal(u32),
    /// Symbolic clauses (`u=rwX,go=rX`), applied to each file's own mode.
    Symbolic(String),
}

impl FlagType for Chmod {
    fn read(text: &str) -> Result<Chmod, String> {
        match u32::from_str_radix(text, 8) {
            Ok(v) if v <= 0o7777 => Ok(Chmod::Octal(v)),
            _ if is_symbolic_mode(text) => Ok(Chmod::Symbolic(text.to_string())),
            _ => Err(format!(
                "invalid --chmod value {text:?}: octal between 0 and 07777, or symbolic such as u=rwX,go=rX"
            )),
        }
    }
}

/// Whether `m` is a list of symbolic mode clauses, as chmod(1) writes them:
/// `[ugoa]*` then one or more `[+-=]` each followed by `[rwxXst]*` or by one
/// of `u`, `g`, `o` (copying that class's bits).
fn is_symbolic_mode(m: &str) -> bool {
    !m.is_empty()
        && m.split(',').all(|clause| {
            let who_end = clause.find(|c: char| !"ugoa".contains(c)).unwrap_or(clause.len());
            let mut rest = &clause[who_end..];
            if rest.is_empty() {
                return false;
            }
            while let Some(op) = rest.chars().next() {
                if !"+-=".contains(op) {
                    return false;
                }
                let end = rest[1..].find(['+', '-', '=']).map_or(rest.len(), |i| i + 1);
                let perms = &rest[1..end];
                let copy = matches!(perms, "u" | "g" | "o");
                if !copy && !perms.chars().all(|c| "rwxXst".contains(c)) {
                    return false;
                }
                rest = &rest[end..];
            }
            true
        })
}

/// `RUN --network` (and `kiln build --network`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkMode {
    /// The builder's default.
    Default,
    /// No network.
    None,
    /// The host's network.
    Host,
}

impl FlagType for NetworkMode {
    fn read(text: &str) -> Result<NetworkMode, String> {
        match text {
            "default" => Ok(NetworkMode::Default),
            "none" => Ok(NetworkMode::None),
            "host" => Ok(NetworkMode::Host),
            other => Err(format!("unsupported network mode {other:?} (default, none or host)")),
        }
    }
}

/// `RUN --security`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecurityMode {
    /// The default sandbox.
    Sandbox,
    /// All capabilities (an entitlement).
    Insecure,
}

impl FlagType for SecurityMode {
    fn read(text: &str) -> Result<SecurityMode, String> {
        match text {
            "sandbox" => Ok(SecurityMode::Sandbox),
            "insecure" => Ok(SecurityMode::Insecure),
            other => Err(format!("unsupported security mode {other:?} (sandbox or insecure)")),
        }
    }
}

impl FlagType for Platform {
    fn read(text: &str) -> Result<Platform, String> {
        Platform::parse(text).ok_or_else(|| format!("invalid platform {text:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_flag_values_are_typed_and_checked_when_built() {
        let chown = FlagValue::<Chown>::new("app:0").expect("chown");
        assert_eq!(
            chown.typed,
            Some(Chown {
                user: Principal::Name("app".into()),
                group: Some(Principal::Id(0)),
            })
        );
        assert_eq!(
            FlagValue::<Chown>::new("root").expect("root").typed.map(|c| c.user),
            Some(Principal::Id(0))
        );
        assert_eq!(FlagValue::<Chmod>::new("0755").expect("octal").typed, Some(Chmod::Octal(0o755)));
        assert_eq!(
            FlagValue::<Chmod>::new("u=rwX,go=rX").expect("symbolic").typed,
            Some(Chmod::Symbolic("u=rwX,go=rX".into()))
        );
        assert!(FlagValue::<Chmod>::new("9999").expect_err("not octal").contains("07777"));
        for symbolic in ["g=u", "go=u", "u+x,g-w", "a=rX", "+x", "u=rwx,g=rx,o="] {
            assert!(FlagValue::<Chmod>::new(symbolic).is_ok(), "{symbolic}");
        }
        for bad in ["g=uw", "u", "g=q", "u=r,"] {
            assert!(FlagValue::<Chmod>::new(bad).is_err(), "{bad}");
        }
        assert!(FlagValue::<Platform>::new("linux")
            .expect_err("no arch")
            .contains("invalid platform"));
        // With a variable, quotes or an escape: typed after expansion.
        for word in ["$MODE", "\"0755\"", "07\\55"] {
            let v = FlagValue::<Chmod>::new(word).expect("deferred");
            assert_eq!((v.written.as_str(), v.typed), (word, None));
        }
    }
}
