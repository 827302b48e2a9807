//! Phase 1, parse: Dockerfile text → [`Ast`] of instruction nodes with line
//! ranges. No LLB, no variables: exactly BuildKit's parser semantics, so
//! [`Node::dump`] reproduces BuildKit's AST dump byte for byte.
//!
//! The pest grammar (`grammars/dockerfile.pest`) classifies physical lines and
//! recognises directives, heredoc markers and the JSON exec form; this module
//! joins continued lines, collects heredoc bodies and splits each instruction
//! into keyword, flags and arguments the way BuildKit's line parsers do.

use pest::Parser as _;

use crate::shell::{go_quote, Lexer, NoEnv};

/// The pest grammar of Dockerfile lines (`grammars/dockerfile.pest`).
#[allow(missing_docs, reason = "pest generates the rule enum and its parse function")]
mod grammar {
    #[derive(pest_derive::Parser)]
    #[grammar = "../../../grammars/dockerfile.pest"]
    pub(super) struct Grammar;
}
use grammar::{Grammar, Rule};

/// A byte range in the Dockerfile.
pub type Span = std::ops::Range<usize>;

/// A parser directive (`# syntax=…`, `# escape=…`, `# check=…`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directive {
    /// Lower-cased name.
    pub name: String,
    /// Value, trimmed.
    pub value: String,
    /// 1-based line.
    pub line: usize,
}

/// A heredoc attached to an instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heredoc {
    /// Delimiter word (quotes removed).
    pub name: String,
    /// File descriptor before `<<` (0 when absent).
    pub fd: u32,
    /// Whether variables in the body are expanded (delimiter not quoted).
    pub expand: bool,
    /// `<<-`: leading tabs are stripped.
    pub chomp: bool,
    /// The body, line endings included.
    pub content: String,
}

/// One instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The keyword as written.
    pub keyword: String,
    /// `--flag` words before the arguments.
    pub flags: Vec<String>,
    /// Arguments as BuildKit's line parser for the keyword splits them
    /// (ENV/LABEL: key, value, separator triples; HEALTHCHECK: type then command).
    pub args: Vec<String>,
    /// The instruction wrapped by ONBUILD.
    pub sub: Option<Box<Node>>,
    /// Whether the arguments were given in JSON (exec) form.
    pub json: bool,
    /// Heredocs opened by the instruction.
    pub heredocs: Vec<Heredoc>,
    /// The logical line after joining continuations.
    pub original: String,
    /// First line (1-based).
    pub start_line: usize,
    /// Last line, heredoc bodies included.
    pub end_line: usize,
    /// Source span of the instruction.
    pub span: Span,
    /// Comment lines directly above the instruction.
    pub comments: Vec<String>,
    /// Maps offsets in `original` back to the source: (offset in original, offset in source, length).
    segments: Vec<(usize, usize, usize)>,
}

/// A parse warning (BuildKit warns about empty continuation lines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// Message.
    pub message: String,
    /// Where.
    pub span: Span,
}

/// A parse error with its source span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// Stable code suffix, e.g. `unterminated_heredoc`.
    pub code: &'static str,
    /// Message.
    pub message: String,
    /// Where.
    pub span: Span,
}

/// The parsed Dockerfile.
#[derive(Debug, Clone)]
pub struct Ast {
    /// Parser directives.
    pub directives: Vec<Directive>,
    /// The escape character.
    pub escape: char,
    /// Instructions in order.
    pub nodes: Vec<Node>,
    /// Warnings.
    pub warnings: Vec<Warning>,
}

impl Ast {
    /// BuildKit's `Node.Dump()` of the whole file, one S-expression per line.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            out.push('(');
            out.push_str(&n.dump());
            out.push_str(")\n");
        }
        out
    }

    /// The value of a directive.
    pub fn directive(&self, name: &str) -> Option<&Directive> {
        self.directives.iter().find(|d| d.name == name)
    }
}

impl Node {
    /// BuildKit's S-expression for this node (without the outer parentheses).
    pub fn dump(&self) -> String {
        let mut s = self.keyword.to_lowercase();
        if !self.flags.is_empty() {
            s.push_str(" [");
            let quoted: Vec<String> = self.flags.iter().map(|f| go_quote(f)).collect();
            s.push_str(&quoted.join(" "));
            s.push(']');
        }
        if let Some(sub) = &self.sub {
            s.push_str(" (");
            s.push_str(&sub.dump());
            s.push(')');
        }
        for a in &self.args {
            s.push(' ');
            s.push_str(&go_quote(a));
        }
        s.trim().to_string()
    }

    /// The lower-cased keyword.
    pub fn command(&self) -> String {
        self.keyword.to_ascii_lowercase()
    }

    /// The source span of `needle` inside this instruction's text, or the whole instruction.
    pub fn span_of(&self, needle: &str) -> Span {
        match self.original.find(needle) {
            Some(at) if !needle.is_empty() => self.map(at)..self.map(at + needle.len() - 1) + 1,
            _ => self.span.clone(),
        }
    }

    /// How offsets in `original` map to the source: (offset in original,
    /// offset in source, length).
    pub fn segments(&self) -> &[(usize, usize, usize)] {
        &self.segments
    }

    /// The source span of the keyword.
    pub fn keyword_span(&self) -> Span {
        self.span.start..self.span.start + self.keyword.len()
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

/// How the grammar classified a physical line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineKind {
    Comment,
    Blank,
    /// Ends with the escape character: the instruction goes on.
    Continued,
    Plain,
}

struct PhysLine<'a> {
    kind: LineKind,
    /// The line without its end-of-line characters.
    text: &'a str,
    /// For a continued line, the text before the escape character.
    continued_text: &'a str,
    /// The line with its end-of-line characters.
    raw: &'a str,
    start: usize,
    number: usize,
}

/// Parses a Dockerfile. Errors do not stop the parse: every instruction that
/// can be parsed is returned together with all errors found.
pub fn parse(source: &str) -> (Ast, Vec<ParseError>) {
    let bom = if source.starts_with('\u{feff}') { 3 } else { 0 };
    let text = &source[bom..];
    let mut errors = Vec::new();
    let (directives, escape) = parse_directives(text, bom, &mut errors);
    let lines = physical_lines(text, escape, bom);
    let mut ast = Ast {
        directives,
        escape,
        nodes: Vec::new(),
        warnings: Vec::new(),
    };
    let mut comments: Vec<String> = Vec::new();
    let directive_lines = ast.directives.iter().map(|d| d.line).max().unwrap_or(0);
    let mut i = 0;
    while i < lines.len() {
        let first = &lines[i];
        match first.kind {
            LineKind::Comment => {
                if first.number > directive_lines {
                    let c = first.text.trim_start().trim_start_matches('#').trim();
                    if c.is_empty() {
                        comments.clear();
                    } else {
                        comments.push(c.to_string());
                    }
                }
                i += 1;
                continue;
            }
            LineKind::Blank => {
                i += 1;
                continue;
            }
            _ => {}
        }
        let mut builder = LineBuilder::default();
        let continued = first.kind == LineKind::Continued;
        let body = if continued { first.continued_text } else { first.text };
        let trimmed = body.trim_start();
        builder.push(trimmed, first.start + (body.len() - trimmed.len()));
        let start_line = first.number;
        let span_start = first.start + (first.text.len() - first.text.trim_start().len());
        let mut last = i;
        let mut empty_continuation = false;
        if continued {
            let mut j = i + 1;
            while j < lines.len() {
                let l = &lines[j];
                last = j;
                j += 1;
                match l.kind {
                    LineKind::Comment => continue,
                    LineKind::Blank => {
                        empty_continuation = true;
                        continue;
                    }
                    LineKind::Continued => builder.push(l.continued_text, l.start),
                    _ => {
                        builder.push(l.text, l.start);
                        break;
                    }
                }
            }
        }
        i = last + 1;
        let span = span_start..lines[last].start + lines[last].text.len();
        if empty_continuation {
            ast.warnings.push(Warning {
                message: format!("Empty continuation line found in: {}", builder.text),
                span: span.clone(),
            });
        }
        let mut node = match node_from_line(&builder.text, escape) {
            Ok(node) => node,
            Err((code, message)) => {
                errors.push(ParseError { code, message, span });
                continue;
            }
        };
        node.start_line = start_line;
        node.end_line = lines[last].number;
        node.span = span;
        node.segments = builder.segments;
        node.comments = std::mem::take(&mut comments);
        if can_contain_heredoc(&node) && builder.text.contains("<<") {
            match heredocs_from_line(&builder.text) {
                Ok(docs) => {
                    for mut doc in docs {
                        let mut content = String::new();
                        let mut terminated = false;
                        while i < lines.len() {
                            let l = &lines[i];
                            i += 1;
                            node.end_line = l.number;
                            node.span.end = l.start + l.text.len();
                            let candidate = l.text.trim_end_matches(['\r', '\n']);
                            let candidate = if doc.chomp { candidate.trim_start_matches('\t') } else { candidate };
                            if candidate == doc.name {
                                terminated = true;
                                break;
                            }
                            content.push_str(l.raw);
                        }
                        if !terminated {
                            errors.push(ParseError {
                                code: "unterminated_heredoc",
                                message: format!("unterminated heredoc {}: no line ends it", doc.name),
                                span: node.span_of(&format!("<<{}", if doc.chomp { "-" } else { "" })),
                            });
                            break;
                        }
                        doc.content = content;
                        node.heredocs.push(doc);
                    }
                }
                Err(message) => errors.push(ParseError {
                    code: "invalid_heredoc",
                    message,
                    span: node.span.clone(),
                }),
            }
        }
        ast.nodes.push(node);
    }
    if ast.nodes.is_empty() && errors.is_empty() {
        errors.push(ParseError {
            code: "empty_dockerfile",
            message: "file with no instructions".into(),
            span: source.len()..source.len(),
        });
    }
    (ast, errors)
}

#[derive(Default)]
struct LineBuilder {
    text: String,
    segments: Vec<(usize, usize, usize)>,
}

impl LineBuilder {
    fn push(&mut self, piece: &str, source_offset: usize) {
        self.segments.push((self.text.len(), source_offset, piece.len()));
        self.text.push_str(piece);
    }
}

fn parse_directives(text: &str, offset: usize, errors: &mut Vec<ParseError>) -> (Vec<Directive>, char) {
    let mut directives: Vec<Directive> = Vec::new();
    let mut escape = '\\';
    let mut pos = offset;
    for (n, raw) in text.split_inclusive('\n').enumerate() {
        let line = raw.trim_end_matches(['\r', '\n']);
        let trimmed = line.trim_start();
        let Ok(mut pairs) = Grammar::parse(Rule::directive, trimmed) else {
            break;
        };
        let mut inner = pairs.next().map(|p| p.into_inner()).into_iter().flatten();
        let name = inner.next().map(|p| p.as_str().to_ascii_lowercase()).unwrap_or_default();
        let value = inner.next().map(|p| p.as_str().to_string()).unwrap_or_default();
        if !matches!(name.as_str(), "syntax" | "escape" | "check") {
            break;
        }
        let span = pos..pos + line.len();
        pos += raw.len();
        if directives.iter().any(|d| d.name == name) {
            errors.push(ParseError {
                code: "duplicate_directive",
                message: format!("only one {name} parser directive can be used"),
                span,
            });
            continue;
        }
        if name == "escape" {
            match value.as_str() {
                "\\" => escape = '\\',
                "`" => escape = '`',
                _ => {
                    errors.push(ParseError {
                        code: "invalid_escape",
                        message: format!("invalid escape token '{value}' does not match ` or \\"),
                        span,
                    });
                    continue;
                }
            }
        }
        directives.push(Directive { name, value, line: n + 1 });
    }
    (directives, escape)
}

fn physical_lines(text: &str, escape: char, offset: usize) -> Vec<PhysLine<'_>> {
    let mut input = String::with_capacity(text.len() + 1);
    input.push(escape);
    input.push_str(text);
    let mut out = Vec::new();
    let Ok(mut file) = Grammar::parse(Rule::file, &input) else {
        // The grammar accepts every input; treat a failure as an empty file.
        return out;
    };
    let Some(file) = file.next() else { return out };
    for (number, pair) in file
        .into_inner()
        .filter(|p| p.as_rule() != Rule::escape_char && p.as_rule() != Rule::EOI)
        .enumerate()
    {
        let span = pair.as_span();
        let (start, end) = (span.start() - 1, span.end() - 1);
        let line_text = &text[start..end];
        let mut raw_end = end;
        if text[end..].starts_with("\r\n") {
            raw_end += 2;
        } else if text[end..].starts_with('\n') {
            raw_end += 1;
        }
        let (kind, continued_text) = match pair.as_rule() {
            Rule::comment_line => (LineKind::Comment, ""),
            Rule::blank_line => (LineKind::Blank, ""),
            _ => {
                let mut inner = pair.into_inner();
                let head = inner
                    .next()
                    .map(|p| &text[p.as_span().start() - 1..p.as_span().end() - 1])
                    .unwrap_or("");
                match inner.next().map(|p| p.as_rule()) {
                    Some(Rule::continuation) => (LineKind::Continued, head),
                    _ => (LineKind::Plain, ""),
                }
            }
        };
        out.push(PhysLine {
            kind,
            text: line_text,
            continued_text,
            raw: &text[start..raw_end],
            start: start + offset,
            number: number + 1,
        });
    }
    out
}

/// Go's `unicode.IsSpace` on one character.
fn is_space(c: char) -> bool {
    c.is_whitespace()
}

/// BuildKit's `reWhitespace`: `[\t\v\f\r ]+`.
fn is_re_whitespace(c: char) -> bool {
    matches!(c, '\t' | '\u{b}' | '\u{c}' | '\r' | ' ')
}

fn split_re_whitespace(s: &str, limit: usize) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut rest = s;
    while parts.len() + 1 < limit || limit == 0 {
        match rest.find(is_re_whitespace) {
            Some(at) => {
                parts.push(&rest[..at]);
                let after = &rest[at..];
                let skip = after.len() - after.trim_start_matches(is_re_whitespace).len();
                rest = &after[skip..];
            }
            None => break,
        }
    }
    parts.push(rest);
    parts
}

type NodeError = (&'static str, String);

fn node_from_line(line: &str, escape: char) -> Result<Node, NodeError> {
    let trimmed = line.trim_matches(is_space);
    let parts = split_re_whitespace(trimmed, 2);
    let keyword = parts[0].to_string();
    let (flags, rest) = if parts.len() == 2 {
        extract_flags(parts[1], escape)
    } else {
        (Vec::new(), String::new())
    };
    let rest = rest.trim_matches(is_space).to_string();
    let mut node = Node {
        keyword,
        flags,
        args: Vec::new(),
        sub: None,
        json: false,
        heredocs: Vec::new(),
        original: line.to_string(),
        start_line: 0,
        end_line: 0,
        span: 0..0,
        comments: Vec::new(),
        segments: Vec::new(),
    };
    match node.command().as_str() {
        "add" | "copy" | "volume" => {
            (node.args, node.json) = maybe_json_to_list(&rest)?;
        }
        "cmd" | "entrypoint" | "run" | "shell" => {
            (node.args, node.json) = maybe_json(&rest)?;
        }
        "arg" => node.args = parse_words(&rest, escape),
        "env" | "label" => node.args = parse_name_val(&rest, &node.keyword.to_ascii_uppercase(), escape)?,
        "expose" | "from" => node.args = whitespace_delimited(&rest),
        "healthcheck" => (node.args, node.json) = parse_health(&rest)?,
        "maintainer" | "stopsignal" | "user" | "workdir" => {
            if !rest.is_empty() {
                node.args = vec![rest];
            }
        }
        "onbuild" => {
            if !rest.is_empty() {
                let mut sub = node_from_line(&rest, escape)?;
                sub.original = rest;
                node.sub = Some(Box::new(sub));
            }
        }
        _ => node.args = vec![String::new()],
    }
    Ok(node)
}

fn can_contain_heredoc(node: &Node) -> bool {
    let n = match (&node.sub, node.command().as_str()) {
        (Some(sub), "onbuild") => sub.as_ref(),
        _ => node,
    };
    matches!(n.command().as_str(), "add" | "copy" | "run") && !n.json
}

/// BuildKit's `extractBuilderFlags`: leading `--words`, byte-wise.
fn extract_flags(line: &str, escape: char) -> (Vec<String>, String) {
    let bytes = line.as_bytes();
    let esc = escape as u8;
    let mut words = Vec::new();
    let mut word = String::new();
    let (mut in_word, mut in_quote, mut blank_ok) = (false, false, false);
    let mut quote = 0u8;
    let mut pos = 0;
    while pos <= bytes.len() {
        let at_end = pos == bytes.len();
        let ch = if at_end { 0 } else { bytes[pos] };
        if !in_word && !in_quote {
            if at_end {
                break;
            }
            if (ch as char).is_ascii_whitespace() || ch == 0x0b {
                pos += 1;
                continue;
            }
            if ch != b'-' || pos + 1 == bytes.len() || bytes[pos + 1] != b'-' {
                return (words, line[pos..].to_string());
            }
            in_word = true;
        }
        if at_end {
            if word != "--" && (blank_ok || !word.is_empty()) {
                words.push(word);
            }
            break;
        }
        if in_quote {
            if ch == quote {
                in_quote = false;
                in_word = true;
                pos += 1;
                continue;
            }
            let mut c = ch;
            if ch == esc {
                if pos + 1 == bytes.len() {
                    in_quote = false;
                    in_word = true;
                    pos += 1;
                    continue;
                }
                pos += 1;
                c = bytes[pos];
            }
            word.push(c as char);
            pos += 1;
            continue;
        }
        // in a word
        if (ch as char).is_ascii_whitespace() || ch == 0x0b {
            if word == "--" {
                return (words, line[pos..].to_string());
            }
            in_word = false;
            if blank_ok || !word.is_empty() {
                words.push(std::mem::take(&mut word));
            }
            word.clear();
            blank_ok = false;
            pos += 1;
            continue;
        }
        if ch == b'\'' || ch == b'"' {
            quote = ch;
            blank_ok = true;
            in_quote = true;
            in_word = false;
            pos += 1;
            continue;
        }
        let mut c = ch;
        if ch == esc {
            if pos + 1 == bytes.len() {
                pos += 1;
                continue;
            }
            pos += 1;
            c = bytes[pos];
        }
        word.push(c as char);
        pos += 1;
    }
    (words, String::new())
}

/// BuildKit's `parseWords`: words split on spaces, quotes and escapes kept.
fn parse_words(rest: &str, escape: char) -> Vec<String> {
    let chars: Vec<char> = rest.chars().collect();
    let mut words = Vec::new();
    let mut word = String::new();
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote,
    }
    let mut phase = Phase::Spaces;
    let mut quote = '\0';
    let mut blank_ok = false;
    let mut pos = 0;
    while pos <= chars.len() {
        let at_end = pos == chars.len();
        let mut ch = if at_end { '\0' } else { chars[pos] };
        if phase == Phase::Spaces {
            if at_end {
                break;
            }
            if is_space(ch) {
                pos += 1;
                continue;
            }
            phase = Phase::Word;
        }
        if at_end {
            if blank_ok || !word.is_empty() {
                words.push(word);
            }
            break;
        }
        if phase == Phase::Word {
            if is_space(ch) {
                phase = Phase::Spaces;
                if blank_ok || !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                word.clear();
                blank_ok = false;
                pos += 1;
                continue;
            }
            if ch == '\'' || ch == '"' {
                quote = ch;
                blank_ok = true;
                phase = Phase::Quote;
            }
            if ch == escape {
                if pos + 1 == chars.len() {
                    pos += 1;
                    continue;
                }
                word.push(ch);
                pos += 1;
                ch = chars[pos];
            }
            word.push(ch);
            pos += 1;
            continue;
        }
        // in quotes
        if ch == quote {
            phase = Phase::Word;
        }
        if ch == escape && quote != '\'' {
            if pos + 1 == chars.len() {
                phase = Phase::Word;
                pos += 1;
                continue;
            }
            pos += 1;
            word.push(ch);
            ch = chars[pos];
        }
        word.push(ch);
        pos += 1;
    }
    words
}

fn parse_name_val(rest: &str, key: &str, escape: char) -> Result<Vec<String>, NodeError> {
    let words = parse_words(rest, escape);
    if words.is_empty() {
        return Ok(Vec::new());
    }
    if !words[0].contains('=') {
        let parts = split_re_whitespace(rest, 2);
        if parts.len() < 2 {
            return Err(("missing_value", format!("{key} must have two arguments")));
        }
        return Ok(vec![parts[0].to_string(), parts[1].to_string(), String::new()]);
    }
    let mut out = Vec::with_capacity(words.len() * 3);
    for word in words {
        let Some((k, v)) = word.split_once('=') else {
            return Err((
                "missing_equals",
                format!(
                    "Syntax error - can't find = in {}. Must be of the form: name=value",
                    go_quote(&word)
                ),
            ));
        };
        out.extend([k.to_string(), v.to_string(), "=".to_string()]);
    }
    Ok(out)
}

fn whitespace_delimited(rest: &str) -> Vec<String> {
    if rest.is_empty() {
        return Vec::new();
    }
    split_re_whitespace(rest, 0).into_iter().map(str::to_string).collect()
}

enum JsonError {
    NotArray,
    NotStrings,
}

/// The JSON exec form: `Ok` only for an array of strings.
fn parse_json(rest: &str) -> Result<Vec<String>, JsonError> {
    let rest = rest.trim_start_matches(is_space);
    if !rest.starts_with('[') {
        return Err(JsonError::NotArray);
    }
    let mut pairs = Grammar::parse(Rule::exec_form, rest).map_err(|_| JsonError::NotArray)?;
    let array = pairs.next().and_then(|p| p.into_inner().next()).ok_or(JsonError::NotArray)?;
    let mut out = Vec::new();
    for value in array.into_inner() {
        if value.as_rule() != Rule::json_string {
            return Err(JsonError::NotStrings);
        }
        out.push(serde_json::from_str::<String>(value.as_str()).map_err(|_| JsonError::NotArray)?);
    }
    Ok(out)
}

const NOT_STRINGS: &str = "when using JSON array syntax, arrays must be comprised of strings only";

fn maybe_json(rest: &str) -> Result<(Vec<String>, bool), NodeError> {
    if rest.is_empty() {
        return Ok((Vec::new(), false));
    }
    match parse_json(rest) {
        Ok(args) => Ok((args, true)),
        Err(JsonError::NotStrings) => Err(("json_not_strings", NOT_STRINGS.into())),
        Err(JsonError::NotArray) => Ok((vec![rest.to_string()], false)),
    }
}

fn maybe_json_to_list(rest: &str) -> Result<(Vec<String>, bool), NodeError> {
    match parse_json(rest) {
        Ok(args) => Ok((args, true)),
        Err(JsonError::NotStrings) => Err(("json_not_strings", NOT_STRINGS.into())),
        Err(JsonError::NotArray) => Ok((whitespace_delimited(rest), false)),
    }
}

fn parse_health(rest: &str) -> Result<(Vec<String>, bool), NodeError> {
    let bytes = rest.as_bytes();
    let sep = bytes.iter().position(|b| (*b as char).is_ascii_whitespace()).unwrap_or(bytes.len());
    if sep == 0 {
        return Ok((Vec::new(), false));
    }
    let next = bytes[sep..]
        .iter()
        .position(|b| !(*b as char).is_ascii_whitespace())
        .map(|p| p + sep)
        .unwrap_or(bytes.len());
    let (mut cmd, json) = maybe_json(&rest[next..])?;
    let mut args = vec![rest[..sep].to_string()];
    args.append(&mut cmd);
    Ok((args, json))
}

/// Finds the heredocs an instruction line opens (BuildKit's `heredocsFromLine`).
fn heredocs_from_line(line: &str) -> Result<Vec<Heredoc>, String> {
    let mut lex = Lexer::new('\\');
    lex.raw_quotes = true;
    lex.raw_escapes = true;
    lex.skip_unset_env = true;
    let words = lex.process_words(line, &NoEnv).unwrap_or_default();
    let mut docs = Vec::new();
    for word in words {
        if let Some(doc) = parse_heredoc(&word)? {
            docs.push(doc);
        }
    }
    Ok(docs)
}

/// Parses one heredoc marker word such as `<<-"EOF"`; `None` when it is not one.
pub fn parse_heredoc(word: &str) -> Result<Option<Heredoc>, String> {
    let Ok(mut pairs) = Grammar::parse(Rule::heredoc_marker, word) else {
        return Ok(None);
    };
    let Some(marker) = pairs.next() else {
        return Ok(None);
    };
    let mut fd = 0;
    let mut chomp = false;
    let mut rest = "";
    for p in marker.into_inner() {
        match p.as_rule() {
            Rule::heredoc_fd => fd = p.as_str().parse().unwrap_or(0),
            Rule::heredoc_chomp => chomp = p.as_str() == "-",
            Rule::heredoc_word => rest = p.as_str(),
            _ => {}
        }
    }
    let mut lex = Lexer::new('\\');
    lex.skip_unset_env = true;
    let words = lex.process_words(rest, &NoEnv).map_err(|e| e.0)?;
    if words.len() != 1 {
        return Ok(None);
    }
    lex.raw_quotes = true;
    let raw = lex.process_words(rest, &NoEnv).map_err(|e| e.0)?;
    if raw.len() != words.len() {
        return Err(format!("internal lexing of heredoc produced inconsistent results: {rest}"));
    }
    let count = |s: &str| s.matches(['\'', '"']).count();
    let expand = count(&words[0]) == count(&raw[0]);
    Ok(Some(Heredoc {
        name: words[0].clone(),
        fd,
        expand,
        chomp,
        content: String::new(),
    }))
}

/// Strips leading tabs from every line of a `<<-` heredoc body.
pub fn chomp_heredoc_content(content: &str) -> String {
    content.split_inclusive('\n').map(|l| l.trim_start_matches('\t')).collect()
}
