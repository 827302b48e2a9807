//! Path patterns: `.dockerignore`-style matchers (moby's patternmatcher
//! semantics: `*`, `?`, `[…]`, `**`, `!` exceptions, last match wins, a
//! pattern matching a parent directory matches what is inside) and Go's
//! `filepath.Match` for COPY wildcards. Shared by the solver (what a local
//! source offers, what a copy takes) and the Dockerfile checks
//! (CopyIgnoredFile). **Invariant:** no IO.

use regex::Regex;

/// A pattern that cannot be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid pattern {0:?}")]
pub struct InvalidPattern(pub String);

/// One compiled pattern.
#[derive(Debug, Clone)]
struct Pattern {
    regex: Regex,
    exclusion: bool,
    /// Path components, to tell whether a directory could contain a match.
    parts: Vec<String>,
}

/// A list of patterns, applied in order.
#[derive(Debug, Clone)]
pub struct Matcher {
    patterns: Vec<Pattern>,
}

/// Converts one glob to an anchored regex; `double_star` enables `**`.
fn glob_regex(glob: &str, double_star: bool) -> Option<Regex> {
    let mut re = String::from("^");
    let chars: Vec<char> = glob.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '*' => {
                if double_star && chars.get(i + 1) == Some(&'*') {
                    i += 1;
                    if chars.get(i + 1) == Some(&'/') {
                        i += 1;
                        re.push_str("(.*/)?");
                    } else {
                        re.push_str(".*");
                    }
                } else {
                    re.push_str("[^/]*");
                }
            }
            '?' => re.push_str("[^/]"),
            '[' => {
                let mut j = i + 1;
                let mut class = String::from("[");
                if chars.get(j) == Some(&'^') || chars.get(j) == Some(&'!') {
                    class.push('^');
                    j += 1;
                }
                let mut closed = false;
                while j < chars.len() {
                    match chars[j] {
                        ']' => {
                            closed = true;
                            break;
                        }
                        '\\' if j + 1 < chars.len() => {
                            class.push_str(&regex::escape(&chars[j + 1].to_string()));
                            j += 2;
                            continue;
                        }
                        '-' => class.push('-'),
                        ch => class.push_str(&regex::escape(&ch.to_string())),
                    }
                    j += 1;
                }
                if !closed {
                    return None;
                }
                class.push(']');
                re.push_str(&class);
                i = j;
            }
            '\\' => {
                i += 1;
                let next = chars.get(i)?;
                re.push_str(&regex::escape(&next.to_string()));
            }
            ch => re.push_str(&regex::escape(&ch.to_string())),
        }
        i += 1;
    }
    re.push('$');
    Regex::new(&re).ok()
}

/// Cleans a pattern or path as Go's `filepath.Clean`, without a leading `/`.
pub fn clean_rel(p: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for part in p.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            x => out.push(x),
        }
    }
    out.join("/")
}

impl Matcher {
    /// Compiles patterns; invalid ones are reported.
    pub fn new(patterns: &[String]) -> Result<Matcher, InvalidPattern> {
        let mut out = Vec::new();
        for raw in patterns {
            let raw = raw.trim();
            if raw.is_empty() {
                continue;
            }
            let (exclusion, body) = match raw.strip_prefix('!') {
                Some(rest) => (true, rest),
                None => (false, raw),
            };
            let cleaned = clean_rel(body);
            if cleaned.is_empty() {
                continue;
            }
            let regex = glob_regex(&cleaned, true).ok_or_else(|| InvalidPattern(raw.to_string()))?;
            out.push(Pattern {
                regex,
                exclusion,
                parts: cleaned.split('/').map(str::to_string).collect(),
            });
        }
        Ok(Matcher { patterns: out })
    }

    /// Whether there are no patterns.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The patterns as given (cleaned), `!` kept, in order.
    pub fn patterns(&self) -> impl Iterator<Item = (bool, String)> + '_ {
        self.patterns.iter().map(|p| (p.exclusion, p.parts.join("/")))
    }

    /// Whether any pattern is an `!exception`.
    pub fn has_exceptions(&self) -> bool {
        self.patterns.iter().any(|p| p.exclusion)
    }

    /// Whether `rel` (clean, relative) or one of its parents matches, the
    /// last matching pattern deciding.
    pub fn matches(&self, rel: &str) -> bool {
        let mut matched = false;
        for p in &self.patterns {
            if p.exclusion != matched {
                continue;
            }
            let mut m = p.regex.is_match(rel);
            if !m {
                let mut end = 0;
                while let Some(pos) = rel[end..].find('/') {
                    end += pos;
                    if p.regex.is_match(&rel[..end]) {
                        m = true;
                        break;
                    }
                    end += 1;
                }
            }
            if m {
                matched = !p.exclusion;
            }
        }
        matched
    }

    /// Whether the directory `rel` could contain a path some non-exclusion
    /// pattern matches (so a walk limited to these patterns must enter it).
    pub fn may_contain_match(&self, rel: &str) -> bool {
        let dir: Vec<&str> = if rel.is_empty() { Vec::new() } else { rel.split('/').collect() };
        self.patterns.iter().filter(|p| !p.exclusion).any(|p| {
            for (i, d) in dir.iter().enumerate() {
                let Some(part) = p.parts.get(i) else {
                    return true; // the pattern matches a parent: everything inside is in
                };
                if part.contains("**") {
                    return true;
                }
                if !glob_match(part, d) {
                    return false;
                }
            }
            true
        })
    }
}

/// Include and exclude patterns together: what a local source offers and
/// what a copy takes (`COPY --parents`/`--exclude`).
#[derive(Debug, Default)]
pub struct Filter {
    include: Option<Matcher>,
    exclude: Option<Matcher>,
}

impl Filter {
    /// A filter of `include` patterns (none: everything) minus `exclude` ones.
    pub fn new(include: &[String], exclude: &[String]) -> Result<Filter, InvalidPattern> {
        let matcher = |p: &[String]| if p.is_empty() { Ok(None) } else { Matcher::new(p).map(Some) };
        Ok(Filter {
            include: matcher(include)?,
            exclude: matcher(exclude)?,
        })
    }

    /// Whether the relative path is taken (the root always is).
    pub fn includes(&self, rel: &str) -> bool {
        if rel.is_empty() {
            return true;
        }
        if self.include.as_ref().is_some_and(|i| !i.matches(rel)) {
            return false;
        }
        !self.exclude.as_ref().is_some_and(|e| e.matches(rel))
    }

    /// Whether a walk must enter the directory `rel`: it or something below
    /// may be taken (an excluded directory may hold `!exception` paths).
    pub fn may_enter(&self, rel: &str) -> bool {
        if rel.is_empty() {
            return true;
        }
        if self.include.as_ref().is_some_and(|i| !i.matches(rel) && !i.may_contain_match(rel)) {
            return false;
        }
        match &self.exclude {
            Some(e) if e.matches(rel) => e.has_exceptions(),
            _ => true,
        }
    }

    /// Whether everything below `rel` is taken, so no pattern needs checking there.
    pub fn takes_all_below(&self, rel: &str) -> bool {
        self.exclude.is_none()
            && self
                .include
                .as_ref()
                .is_none_or(|i| rel.is_empty() && i.is_empty() || i.matches(rel))
    }
}

/// Go's `filepath.Match`: `*` and `?` do not cross `/`.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    glob_regex(pattern, false).is_some_and(|r| r.is_match(name))
}

/// Whether a string has glob metacharacters.
pub fn has_wildcards(s: &str) -> bool {
    s.contains(['*', '?', '[', '\\'])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &[&str]) -> Matcher {
        Matcher::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("patterns")
    }

    #[test]
    fn dockerignore_semantics() {
        let ig = m(&["*.log", "!keep.log", "build", "**/tmp", "docs/**/*.md"]);
        assert!(ig.matches("a.log"));
        assert!(!ig.matches("keep.log"));
        assert!(!ig.matches("sub/a.log"), "* does not cross /");
        assert!(ig.matches("build/x/y"), "a matching parent matches what is inside");
        assert!(ig.matches("tmp") && ig.matches("a/b/tmp/c"));
        assert!(ig.matches("docs/a.md") && ig.matches("docs/x/y/a.md"));
        assert!(!ig.matches("src/main.rs"));
    }

    #[test]
    fn walk_pruning() {
        let inc = m(&["files/d000", "last.txt"]);
        assert!(inc.may_contain_match(""));
        assert!(inc.may_contain_match("files"));
        assert!(inc.may_contain_match("files/d000/sub"));
        assert!(!inc.may_contain_match("files/d001"));
        assert!(!inc.may_contain_match("big"));
    }

    #[test]
    fn filepath_match() {
        assert!(glob_match("*.txt", "a.txt"));
        assert!(!glob_match("*.txt", "d/a.txt"));
        assert!(glob_match("d/?.t[xy]t", "d/a.tyt"));
        assert!(glob_match("[!a]*", "b1"));
        assert!(!glob_match("[!a]*", "a1"));
        assert!(glob_match("a\\*b", "a*b"));
    }
}
