//! Shell-style word processing: quotes, escapes and `$var` expansion, with the
//! semantics of BuildKit's `shell.Lex` (checked against its `envVarTest` and
//! `wordsTest` tables).

use regex::Regex;

/// Variables visible to expansion.
pub trait Env {
    /// The value of `name`, if set.
    fn get(&self, name: &str) -> Option<&str>;

    /// Whether words expanded with this environment are checked for
    /// variables never set (the UndefinedVar check; a build stage's
    /// environment is, the global ARGs of FROM are not).
    fn checks_undefined(&self) -> bool {
        false
    }

    /// Whether `name` was declared (an `ARG` without a value counts).
    fn declared(&self, _name: &str) -> bool {
        false
    }

    /// Every name set, for a did-you-mean.
    fn names(&self) -> Vec<&str> {
        Vec::new()
    }
}

impl Env for [(String, String)] {
    fn get(&self, name: &str) -> Option<&str> {
        self.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

impl Env for &[(String, String)] {
    fn get(&self, name: &str) -> Option<&str> {
        Env::get(*self, name)
    }
}

impl Env for Vec<(String, String)> {
    fn get(&self, name: &str) -> Option<&str> {
        Env::get(self.as_slice(), name)
    }
}

/// No variables at all.
pub struct NoEnv;

impl Env for NoEnv {
    fn get(&self, _: &str) -> Option<&str> {
        None
    }
}

/// An expansion error (unterminated quote, bad substitution, `${v:?msg}`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LexError(pub String);

/// The result of processing one word.
#[derive(Debug, Default, Clone)]
pub struct Processed {
    /// The word with quotes removed and variables expanded.
    pub result: String,
    /// The result split into words, quoting respected.
    pub words: Vec<String>,
    /// Variables that were referenced but unset.
    pub unmatched: Vec<String>,
}

/// A configured lexer.
#[derive(Debug, Clone, Copy)]
pub struct Lexer {
    /// `\` or `` ` ``.
    pub escape: char,
    /// Keep quote characters in the output.
    pub raw_quotes: bool,
    /// Keep escape characters in the output.
    pub raw_escapes: bool,
    /// Treat quotes as ordinary characters.
    pub skip_process_quotes: bool,
    /// Leave references to unset variables as written.
    pub skip_unset_env: bool,
}

impl Lexer {
    /// A lexer with the given escape character and default options.
    pub fn new(escape: char) -> Lexer {
        Lexer {
            escape,
            raw_quotes: false,
            raw_escapes: false,
            skip_process_quotes: false,
            skip_unset_env: false,
        }
    }

    /// Expands `word` into one string (spaces between words kept).
    pub fn process_word(&self, word: &str, env: &dyn Env) -> Result<Processed, LexError> {
        self.process(word, env)
    }

    /// Expands `word` and splits it into words.
    pub fn process_words(&self, word: &str, env: &dyn Env) -> Result<Vec<String>, LexError> {
        Ok(self.process(word, env)?.words)
    }

    fn process(&self, word: &str, env: &dyn Env) -> Result<Processed, LexError> {
        // Most words have nothing to expand, unquote or unescape: they come back
        // as they are, split on whitespace, exactly as the scanner would.
        if !word.contains(['$', '\'', '"', '<', self.escape]) {
            return Ok(Processed {
                result: word.to_string(),
                words: word
                    .split(char::is_whitespace)
                    .filter(|w| !w.is_empty())
                    .map(str::to_string)
                    .collect(),
                unmatched: Vec::new(),
            });
        }
        let mut sw = Scanner {
            lex: *self,
            chars: word.chars().collect(),
            pos: 0,
            env,
            raw_escapes: self.raw_escapes,
            unmatched: Vec::new(),
        };
        let (result, words) = sw
            .process_stop_on(None, self.raw_escapes)
            .map_err(|e| LexError(format!("failed to process {}: {}", go_quote(word), e.0)))?;
        Ok(Processed {
            result,
            words,
            unmatched: sw.unmatched,
        })
    }
}

struct Scanner<'a> {
    lex: Lexer,
    chars: Vec<char>,
    pos: usize,
    env: &'a dyn Env,
    raw_escapes: bool,
    unmatched: Vec<String>,
}

#[derive(Default)]
struct Words {
    buf: String,
    words: Vec<String>,
    in_word: bool,
}

impl Words {
    fn add_char(&mut self, ch: char) {
        if ch.is_whitespace() && self.in_word {
            if !self.buf.is_empty() {
                self.words.push(std::mem::take(&mut self.buf));
                self.in_word = false;
            }
        } else if !ch.is_whitespace() {
            self.add_raw_char(ch);
        }
    }
    fn add_raw_char(&mut self, ch: char) {
        self.buf.push(ch);
        self.in_word = true;
    }
    fn add_string(&mut self, s: &str) {
        for ch in s.chars() {
            self.add_char(ch);
        }
    }
    fn add_raw_string(&mut self, s: &str) {
        self.buf.push_str(s);
        self.in_word = true;
    }
    fn finish(mut self) -> Vec<String> {
        if !self.buf.is_empty() {
            self.words.push(std::mem::take(&mut self.buf));
        }
        self.words
    }
}

fn err<T>(msg: impl Into<String>) -> Result<T, LexError> {
    Err(LexError(msg.into()))
}

impl Scanner<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.chars.get(self.pos).copied();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    fn process_stop_on(&mut self, stop: Option<char>, raw_escapes: bool) -> Result<(String, Vec<String>), LexError> {
        let saved = self.raw_escapes;
        self.raw_escapes = raw_escapes;
        // `${a:-${b:-…}}` nests without bound: grow the stack instead of overflowing it.
        let r = stacker::maybe_grow(crate::lower::STACK_RED_ZONE, crate::lower::STACK_SEGMENT, || {
            self.process_stop_on_inner(stop)
        });
        self.raw_escapes = saved;
        r
    }

    fn process_stop_on_inner(&mut self, stop: Option<char>) -> Result<(String, Vec<String>), LexError> {
        let mut result = String::new();
        let mut words = Words::default();
        while let Some(ch) = self.peek() {
            if Some(ch) == stop {
                self.next();
                return Ok((result, words.finish()));
            }
            let special = match ch {
                '$' => Some(self.process_dollar()?),
                '<' => Some(self.process_possible_heredoc()),
                '\'' if !self.lex.skip_process_quotes => Some(self.process_single_quote()?),
                '"' if !self.lex.skip_process_quotes => Some(self.process_double_quote()?),
                _ => None,
            };
            if let Some(tmp) = special {
                result.push_str(&tmp);
                if ch == '$' {
                    words.add_string(&tmp);
                } else {
                    words.add_raw_string(&tmp);
                }
                continue;
            }
            let mut ch = self.next().unwrap_or(ch);
            if ch == self.lex.escape {
                if self.raw_escapes {
                    words.add_raw_char(ch);
                    result.push(ch);
                }
                match self.next() {
                    None => break,
                    Some(c) => {
                        ch = c;
                        words.add_raw_char(ch);
                    }
                }
            } else {
                words.add_char(ch);
            }
            result.push(ch);
        }
        if let Some(stop) = stop {
            return err(format!("unexpected end of statement while looking for matching {stop}"));
        }
        Ok((result, words.finish()))
    }

    fn process_single_quote(&mut self) -> Result<String, LexError> {
        let mut result = String::new();
        let open = self.next();
        if self.lex.raw_quotes {
            result.extend(open);
        }
        loop {
            match self.next() {
                None => return err("unexpected end of statement while looking for matching single-quote"),
                Some('\'') => {
                    if self.lex.raw_quotes {
                        result.push('\'');
                    }
                    return Ok(result);
                }
                Some(c) => result.push(c),
            }
        }
    }

    fn process_double_quote(&mut self) -> Result<String, LexError> {
        let mut result = String::new();
        let open = self.next();
        if self.lex.raw_quotes {
            result.extend(open);
        }
        loop {
            match self.peek() {
                None => return err("unexpected end of statement while looking for matching double-quote"),
                Some('"') => {
                    self.next();
                    if self.lex.raw_quotes {
                        result.push('"');
                    }
                    return Ok(result);
                }
                Some('$') => {
                    let v = self.process_dollar()?;
                    result.push_str(&v);
                }
                Some(_) => {
                    let mut ch = self.next().unwrap_or_default();
                    if ch == self.lex.escape {
                        if self.raw_escapes {
                            result.push(ch);
                        }
                        match self.peek() {
                            None => continue,
                            Some(c) if c == '"' || c == '$' || c == self.lex.escape => {
                                ch = c;
                                self.next();
                            }
                            Some(_) => {}
                        }
                    }
                    result.push(ch);
                }
            }
        }
    }

    fn lookup(&mut self, name: &str) -> Option<String> {
        let v = self.env.get(name).map(str::to_string);
        if v.is_none() && !self.unmatched.iter().any(|n| n == name) {
            self.unmatched.push(name.to_string());
        }
        v
    }

    fn process_dollar(&mut self) -> Result<String, LexError> {
        self.next();
        if self.peek() != Some('{') {
            let name = self.process_name();
            if name.is_empty() {
                return Ok("$".into());
            }
            return Ok(match self.lookup(&name) {
                Some(v) => v,
                None if self.lex.skip_unset_env => format!("${name}"),
                None => String::new(),
            });
        }
        self.next();
        match self.peek() {
            None => return err("syntax error: missing '}'"),
            Some('{' | '}' | ':') => return err("syntax error: bad substitution"),
            _ => {}
        }
        let name = self.process_name();
        let Some(mut ch) = self.next() else {
            return err("syntax error: missing '}'");
        };
        let mut chs = ch.to_string();
        let mut null_is_unset = false;
        match ch {
            '}' => Ok(match self.lookup(&name) {
                Some(v) => v,
                None if self.lex.skip_unset_env => format!("${{{name}}}"),
                None => String::new(),
            }),
            ':' | '+' | '-' | '?' | '#' | '%' => {
                if ch == ':' {
                    null_is_unset = true;
                    match self.next() {
                        Some(c) => {
                            ch = c;
                            chs.push(c);
                        }
                        None => return err("syntax error: missing '}'"),
                    }
                    if !matches!(ch, '+' | '-' | '?' | '#' | '%') {
                        return err(format!("unsupported modifier ({chs}) in substitution"));
                    }
                }
                let raw = ch == '#' || ch == '%';
                if null_is_unset && raw {
                    return err(format!("unsupported modifier ({chs}) in substitution"));
                }
                let word = self.word_until('}', raw, "syntax error: missing '}'")?;
                let value = self.lookup(&name);
                if self.lex.skip_unset_env && value.is_none() {
                    return Ok(format!("${{{name}{chs}{word}}}"));
                }
                let set = value.is_some();
                let value = value.unwrap_or_default();
                let absent = !set || (null_is_unset && value.is_empty());
                match ch {
                    '-' => Ok(if absent { word } else { value }),
                    '+' => Ok(if absent { String::new() } else { word }),
                    '?' => {
                        let problem = if !set {
                            Some("unset")
                        } else if null_is_unset && value.is_empty() {
                            Some("empty")
                        } else {
                            None
                        };
                        match problem {
                            Some(p) if word.is_empty() => err(format!("{name}: is not allowed to be {p}")),
                            Some(_) => err(format!("{name}: {word}")),
                            None => Ok(value),
                        }
                    }
                    _ => {
                        let mut pattern = word.as_str();
                        let greedy = pattern.starts_with(ch);
                        if greedy {
                            pattern = &pattern[ch.len_utf8()..];
                        }
                        if ch == '%' {
                            trim_suffix(pattern, &value, greedy)
                        } else {
                            trim_prefix(pattern, &value, greedy)
                        }
                    }
                }
            }
            '/' => {
                let replace_all = self.peek() == Some('/');
                if replace_all {
                    self.next();
                }
                let pattern = self.word_until('/', true, "syntax error: missing '/' in ${}")?;
                let replacement = self.word_until('}', true, "syntax error: missing '}'")?;
                let value = self.lookup(&name);
                if self.lex.skip_unset_env && value.is_none() {
                    return Ok(format!("${{{name}/{pattern}/{replacement}}}"));
                }
                let value = value.unwrap_or_default();
                let re = shell_pattern_regex(&pattern, true, false)
                    .map_err(|e| LexError(format!("invalid pattern ({pattern}) in substitution: {e}")))?;
                if replace_all {
                    Ok(re.replace_all(&value, regex::NoExpand(&replacement)).into_owned())
                } else {
                    Ok(match re.find(&value) {
                        Some(m) => format!("{}{}{}", &value[..m.start()], replacement, &value[m.end()..]),
                        None => value,
                    })
                }
            }
            _ => err(format!("unsupported modifier ({chs}) in substitution")),
        }
    }

    /// The expanded text up to `stop`; running out of input is the `missing` error.
    fn word_until(&mut self, stop: char, raw_escapes: bool, missing: &str) -> Result<String, LexError> {
        match self.process_stop_on(Some(stop), raw_escapes) {
            Ok((word, _)) => Ok(word),
            Err(_) if self.peek().is_none() => err(missing),
            Err(e) => Err(e),
        }
    }

    fn process_name(&mut self) -> String {
        let mut name = String::new();
        while let Some(ch) = self.peek() {
            if name.is_empty() && ch.is_numeric() {
                while let Some(c) = self.peek().filter(|c| c.is_numeric()) {
                    self.next();
                    name.push(c);
                }
                return name;
            }
            if name.is_empty() && matches!(ch, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0') {
                self.next();
                return ch.to_string();
            }
            if !ch.is_alphabetic() && !ch.is_numeric() && ch != '_' {
                break;
            }
            self.next();
            name.push(ch);
        }
        name
    }

    fn process_possible_heredoc(&mut self) -> String {
        self.next();
        if self.peek() != Some('<') {
            return "<".into();
        }
        self.next();
        let mut result = String::from("<<");
        while let Some(c) = self.peek().filter(|c| matches!(c, '\t' | '\r' | ' ')) {
            result.push(c);
            self.next();
        }
        result
    }
}

/// Converts a shell wildcard pattern (`*`, `?`, `\` escapes) to a regex.
fn shell_pattern_regex(pattern: &str, greedy: bool, anchored: bool) -> Result<Regex, String> {
    let mut out = String::with_capacity(pattern.len() + 4);
    if anchored {
        out.push('^');
    }
    let star = if greedy { ".*" } else { ".*?" };
    let chars: Vec<char> = pattern.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let tok = chars[i];
        i += 1;
        match tok {
            '*' => out.push_str(star),
            '?' => out.push('.'),
            '\\' => {
                if matches!(chars.get(i), Some('}' | '/')) {
                    continue;
                }
                match chars.get(i) {
                    Some(&c @ ('*' | '?' | '\\')) => {
                        out.push('\\');
                        out.push(c);
                        i += 1;
                    }
                    Some(c) => return Err(format!("invalid escape '\\{c}'")),
                    None => return Err("invalid escape '\\'".into()),
                }
            }
            '[' | ']' | '{' | '}' | '.' | '+' | '(' | ')' | '|' | '^' | '$' => {
                out.push('\\');
                out.push(tok);
            }
            c => out.push(c),
        }
    }
    // (?s): Go's `.` does not match a newline either, but values rarely hold one;
    // keep Go's behaviour by not enabling dot-all.
    Regex::new(&out).map_err(|e| e.to_string())
}

fn trim_prefix(pattern: &str, value: &str, greedy: bool) -> Result<String, LexError> {
    let re =
        shell_pattern_regex(pattern, greedy, true).map_err(|e| LexError(format!("invalid pattern ({pattern}) in substitution: {e}")))?;
    Ok(match re.find(value) {
        Some(m) => value[m.end()..].to_string(),
        None => value.to_string(),
    })
}

/// Reverses a pattern but keeps `\x` escapes in order.
fn reverse_pattern(pattern: &str) -> String {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = vec!['\0'; chars.len()];
    let last = chars.len().wrapping_sub(1);
    let mut i = 0;
    while i < chars.len() {
        let out_idx = last - i;
        if chars[i] == '\\' && i != last {
            out[out_idx - 1] = chars[i];
            out[out_idx] = chars[i + 1];
            i += 2;
        } else {
            out[out_idx] = chars[i];
            i += 1;
        }
    }
    out.into_iter().collect()
}

fn trim_suffix(pattern: &str, value: &str, greedy: bool) -> Result<String, LexError> {
    let reversed: String = value.chars().rev().collect();
    let trimmed = trim_prefix(&reverse_pattern(pattern), &reversed, greedy)?;
    Ok(trimmed.chars().rev().collect())
}

/// Quotes a string as Go's `strconv.Quote` does (used in BuildKit-compatible dumps and messages).
pub fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if c.is_control() => {
                if (c as u32) < 0x10000 {
                    out.push_str(&format!("\\u{:04x}", c as u32))
                } else {
                    out.push_str(&format!("\\U{:08x}", c as u32))
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_conversion_matches_buildkit() {
        let cases = [
            ("*", "^.*"),
            ("?", "^."),
            ("\\*", "^\\*"),
            ("(()[]{\\}^$.\\*\\?|\\\\", "^\\(\\(\\)\\[\\]\\{\\}\\^\\$\\.\\*\\?\\|\\\\"),
        ];
        for (pattern, expected) in cases {
            assert_eq!(shell_pattern_regex(pattern, true, true).expect("valid").as_str(), expected);
        }
        for bad in ["\\", "\\x", "\\\\\\"] {
            assert!(shell_pattern_regex(bad, true, true).is_err(), "{bad}");
        }
    }

    #[test]
    fn reverse_pattern_keeps_escapes() {
        for (p, e) in [("a\\*c", "c\\*a"), ("\\\\\\ab", "b\\a\\\\"), ("ab\\", "\\ba"), ("\\\\b", "b\\\\")] {
            assert_eq!(reverse_pattern(p), e);
        }
    }

    #[test]
    fn mandatory_variables() {
        let lex = Lexer::new('\\');
        let set: Vec<(String, String)> = vec![("VAR".into(), "plain".into()), ("ARG".into(), "x".into())];
        let empty: Vec<(String, String)> = vec![("VAR".into(), String::new()), ("ARG".into(), "x".into())];
        let unset: Vec<(String, String)> = vec![("ARG".into(), "x".into())];
        assert_eq!(lex.process_word("${VAR:?message here$ARG}", &set).expect("set").result, "plain");
        assert!(lex
            .process_word("${VAR:?message here$ARG}", &empty)
            .unwrap_err()
            .0
            .contains("message herex"));
        assert!(lex
            .process_word("${VAR:?message here$ARG}", &unset)
            .unwrap_err()
            .0
            .contains("message herex"));
        assert_eq!(lex.process_word("${VAR?message here$ARG}", &empty).expect("empty ok").result, "");
        assert!(lex
            .process_word("${VAR?message here$ARG}", &unset)
            .unwrap_err()
            .0
            .contains("message herex"));
    }
}
