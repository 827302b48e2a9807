//! The one module that knows the YAML library (`marked-yaml`, a maintained
//! parser whose nodes carry their positions): the recipe is read into typed
//! data whose [`Spanned`] values know where they were written, and errors
//! come with a byte span. Positions are the parser's own: nothing here reads
//! the text to guess where something is.

use std::ops::Range;

use serde::de::DeserializeOwned;

pub use marked_yaml::Spanned;

/// Why a recipe could not be read.
#[derive(Debug, Clone)]
pub struct YamlError {
    /// What is wrong, with the path to it when known (`stages.main.steps[0]`).
    pub message: String,
    /// Byte span in the text.
    pub span: Range<usize>,
    /// For an unknown key: the key and the keys allowed there.
    pub unknown: Option<(String, Vec<String>)>,
}

/// The parsed document's nodes, for the places of mapping keys (values that
/// need a place are [`Spanned`] in the typed data).
pub struct Document {
    node: marked_yaml::Node,
    text: String,
}

impl Document {
    /// Where the key at the end of `path` is written: its span and 1-based line.
    pub fn key_place(&self, path: &[&str]) -> Option<(Range<usize>, usize)> {
        let (last, parents) = path.split_last()?;
        let (key, _) = self.node_at(parents)?.as_mapping()?.iter().find(|(k, _)| k.as_str() == *last)?;
        let m = key.span().start()?;
        Some((marker_span(&self.text, m), m.line()))
    }

    /// Where the `index`th item of the sequence at `path` is written (its first key).
    pub fn item_span(&self, path: &[&str], index: usize) -> Option<(Range<usize>, usize)> {
        let m = first_marker(self.node_at(path)?.as_sequence()?.get(index)?)?;
        Some((marker_span(&self.text, &m), m.line()))
    }

    /// The node reached by following `path` (mapping keys from the top).
    fn node_at(&self, path: &[&str]) -> Option<&marked_yaml::Node> {
        let mut node = &self.node;
        for p in path {
            node = node.as_mapping()?.get(*p)?;
        }
        Some(node)
    }
}

/// Parses `text` into `T` and the document's nodes. Anchors, aliases and
/// tags are refused (the parser's rule: a recipe reads the same top to
/// bottom), and so is a key given twice in one mapping.
pub fn parse_document<T: DeserializeOwned>(text: &str) -> Result<(T, Document), YamlError> {
    // Quoted scalars stay strings; plain ones are read as YAML reads them (`1.10` is a number).
    let options = marked_yaml::LoaderOptions::default()
        .error_on_duplicate_keys(true)
        .prevent_coercion(true);
    let node = marked_yaml::parse_yaml_with_options(0, text, options)
        .map_err(marked_yaml::FromYamlError::ParseYaml)
        .map_err(|e| error(e, text))?;
    let value = marked_yaml::from_node(&node).map_err(|e| {
        // The parser's span for an error inside a mapping is the mapping's;
        // the path it reports leads to the key or value itself.
        let unknown_key = match &*e {
            marked_yaml::Error::UnknownFieldError(key, ..) => Some(key.len()),
            _ => None,
        };
        let at = e.path().and_then(|p| resolve(&node, p, unknown_key.is_some()));
        let mut err = error(marked_yaml::FromYamlError::FromNode(e), text);
        if let Some(m) = at {
            err.span = marker_span(text, &m);
            // An unknown key: the caret under the key alone.
            if let Some(len) = unknown_key {
                err.span.end = (err.span.start + len).min(err.span.end);
            }
        }
        err
    })?;
    Ok((
        value,
        Document {
            node,
            text: text.to_string(),
        },
    ))
}

/// Parses `text` into `T` (see [`parse_document`]).
pub fn parse<T: DeserializeOwned>(text: &str) -> Result<T, YamlError> {
    parse_document(text).map(|(v, _)| v)
}

fn error(e: marked_yaml::FromYamlError, text: &str) -> YamlError {
    match e {
        marked_yaml::FromYamlError::ParseYaml(load) => YamlError {
            message: load.to_string(),
            span: load_error_marker(&load).map(|m| marker_span(text, m)).unwrap_or(0..0),
            unknown: None,
        },
        marked_yaml::FromYamlError::FromNode(node) => {
            let span = node.start_mark().map(|m| marker_span(text, &m)).unwrap_or(0..0);
            let path = node.path().filter(|p| !p.is_empty() && *p != ".").map(str::to_string);
            let (message, unknown) = match &*node {
                marked_yaml::Error::UnknownFieldError(key, expected, _) => (
                    match &path {
                        // The path ends at the unknown key; the context is its parent.
                        Some(p) => match p.rsplit_once('.') {
                            Some((parent, _)) => format!("unknown key `{key}` in {parent}"),
                            None => format!("unknown key `{key}`"),
                        },
                        None => format!("unknown key `{key}`"),
                    },
                    Some((key.clone(), expected.iter().map(|s| s.to_string()).collect())),
                ),
                other => (
                    match &path {
                        Some(p) => format!("{p}: {other}"),
                        None => other.to_string(),
                    },
                    None,
                ),
            };
            YamlError { message, span, unknown }
        }
    }
}

/// Follows a path as the parser renders it (`stages.main.steps[0].mounts`)
/// to where it is written: the key itself when `key` is set (an unknown
/// key), else the value (a mapping or sequence by its first entry).
fn resolve(root: &marked_yaml::Node, path: &str, key: bool) -> Option<marked_yaml::Marker> {
    let mut node = root;
    let mut key_marker = None;
    for segment in path.split('.') {
        let (name, indices) = match segment.find('[') {
            Some(i) => (&segment[..i], &segment[i..]),
            None => (segment, ""),
        };
        if !name.is_empty() {
            let (k, v) = node.as_mapping()?.iter().find(|(k, _)| k.as_str() == name)?;
            key_marker = k.span().start().copied();
            node = v;
        }
        for index in indices.split(['[', ']']).filter(|s| !s.is_empty()) {
            node = node.as_sequence()?.get(index.parse::<usize>().ok()?)?;
            key_marker = None;
        }
    }
    if key {
        return key_marker;
    }
    first_marker(node)
}

/// Where a node's text starts: a scalar's own start, a mapping's first key,
/// a sequence's first item.
pub(crate) fn first_marker(node: &marked_yaml::Node) -> Option<marked_yaml::Marker> {
    match node {
        marked_yaml::Node::Mapping(m) => match m.iter().next() {
            Some((k, _)) => k.span().start().copied(),
            None => m.span().start().copied(),
        },
        marked_yaml::Node::Sequence(s) => match s.first() {
            Some(item) => first_marker(item),
            None => s.span().start().copied(),
        },
        marked_yaml::Node::Scalar(v) => v.span().start().copied(),
    }
}

/// The byte span a value starts at: its first line (or the value itself when
/// it is a plain scalar on one line).
pub fn span_of<T>(value: &Spanned<T>, text: &str) -> Range<usize> {
    value.span().start().map(|m| marker_span(text, m)).unwrap_or(0..0)
}

/// The 1-based line a value starts on.
pub fn line_of<T>(value: &Spanned<T>) -> usize {
    value.span().start().map(|m| m.line()).unwrap_or(1)
}

/// From a marker (a character index) to the bytes of the rest of its line,
/// up to a comment: what a caret under the value should cover.
fn marker_span(text: &str, m: &marked_yaml::Marker) -> Range<usize> {
    let start = text.char_indices().nth(m.character()).map(|(b, _)| b).unwrap_or(text.len());
    let rest = &text[start..];
    let line_end = rest.find('\n').unwrap_or(rest.len());
    let line = &rest[..line_end];
    let end = line.find(" #").unwrap_or(line.len());
    start..start + line[..end].trim_end().len().max(usize::from(!line.is_empty()))
}

fn load_error_marker(e: &marked_yaml::LoadError) -> Option<&marked_yaml::Marker> {
    use marked_yaml::LoadError as L;
    Some(match e {
        L::TopLevelMustBeMapping(m)
        | L::TopLevelMustBeSequence(m)
        | L::UnexpectedAnchor(m)
        | L::MappingKeyMustBeScalar(m)
        | L::UnexpectedTag(m)
        | L::ScanError(m, _) => m,
        L::DuplicateKey(d) => return d.key.span().start(),
    })
}

/// The document as JSON (what the JSON Schema of recipes is checked
/// against): plain scalars read by YAML 1.2's core schema (null, booleans,
/// numbers), quoted ones as strings.
pub fn to_json(text: &str) -> Result<serde_json::Value, YamlError> {
    let (_, doc) = parse_document::<serde::de::IgnoredAny>(text)?;
    Ok(json_of(&doc.node))
}

fn json_of(node: &marked_yaml::Node) -> serde_json::Value {
    use serde_json::Value;
    match node {
        marked_yaml::Node::Mapping(m) => Value::Object(m.iter().map(|(k, v)| (k.as_str().to_string(), json_of(v))).collect()),
        marked_yaml::Node::Sequence(s) => Value::Array(s.iter().map(json_of).collect()),
        marked_yaml::Node::Scalar(v) if !v.may_coerce() => Value::String(v.as_str().to_string()),
        marked_yaml::Node::Scalar(v) => {
            let t = v.as_str();
            match t {
                "" | "~" | "null" | "Null" | "NULL" => Value::Null,
                "true" | "True" | "TRUE" => Value::Bool(true),
                "false" | "False" | "FALSE" => Value::Bool(false),
                _ => t
                    .parse::<i64>()
                    .map(Value::from)
                    .ok()
                    .or_else(|| t.parse::<f64>().ok().and_then(serde_json::Number::from_f64).map(Value::Number))
                    .unwrap_or_else(|| Value::String(t.to_string())),
            }
        }
    }
}
