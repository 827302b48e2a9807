//! Where things are in the YAML text: each stage's name and `from:`, each
//! step's `-`, the `image:` key and `target:`, found by reading block-style
//! YAML by indentation (serde gives values, not places). Anything not found
//! falls back to its stage's line, so errors always point somewhere useful.

/// A place in the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Place {
    /// 1-based line.
    pub line: usize,
    /// Byte offset.
    pub offset: usize,
    /// Length in bytes.
    pub len: usize,
}

/// The places of one stage.
#[derive(Debug, Default, Clone)]
pub struct StagePlaces {
    /// The stage's name (the key).
    pub name: Place,
    /// The value of `from:`.
    pub from: Option<Place>,
    /// The `image:` key.
    pub image: Option<Place>,
    /// Each step's item, in order.
    pub steps: Vec<Place>,
}

/// The places of a recipe.
#[derive(Debug, Default)]
pub struct Places {
    /// Stages in order.
    pub stages: Vec<StagePlaces>,
    /// The value of `target:`.
    pub target: Option<Place>,
}

fn value_place(line: usize, offset: usize, text: &str, key: &str) -> Place {
    // `key: value  # comment` → the value.
    let after = &text[key.len() + 1..];
    let value = after.split(" #").next().unwrap_or("").trim();
    let start = offset + key.len() + 1 + (after.len() - after.trim_start().len());
    Place {
        line,
        offset: start,
        len: value.len().max(1),
    }
}

/// The place of `value` written as `key: value` in the lines of `source`
/// from `from` (a step's place) up to the next line as indented as it or less.
pub fn key_in_item(source: &str, from: Place, key: &str, value: &str) -> Option<Place> {
    let start_of_line = source[..from.offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let item_indent = from.offset - start_of_line;
    let mut offset = start_of_line;
    for (i, raw) in source[start_of_line..].split_inclusive('\n').enumerate() {
        let line_start = offset;
        offset += raw.len();
        let text = raw.trim_end_matches(['\n', '\r']);
        let trimmed = text.trim_start();
        let indent = text.len() - trimmed.len();
        if i > 0 && !trimmed.is_empty() && indent <= item_indent {
            break;
        }
        let body = trimmed.trim_start_matches("- ").trim_start_matches(['{', ' ']);
        for part in body.split([',', '{', '}']) {
            let part = part.trim();
            if let Some(v) = part.strip_prefix(key).and_then(|r| r.strip_prefix(':')) {
                if v.trim().trim_matches(['"', '\'']) == value {
                    let at = line_start + text.find(part).unwrap_or(indent) + key.len() + 1 + (v.len() - v.trim_start().len());
                    return Some(Place {
                        line: from.line + i,
                        offset: at,
                        len: v.trim().len(),
                    });
                }
            }
        }
    }
    None
}

/// Reads the places of `source`.
pub fn find(source: &str) -> Places {
    let mut places = Places::default();
    let mut in_stages = false;
    let mut stage_indent: Option<usize> = None;
    let mut steps_key_indent: Option<usize> = None;
    let mut item_indent: Option<usize> = None;
    let mut offset = 0;
    for (i, raw) in source.split_inclusive('\n').enumerate() {
        let line_start = offset;
        offset += raw.len();
        let text = raw.trim_end_matches(['\n', '\r']);
        let trimmed = text.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let indent = text.len() - trimmed.len();
        let at = line_start + indent;
        let line = i + 1;
        if indent == 0 {
            in_stages = trimmed.starts_with("stages:");
            stage_indent = None;
            steps_key_indent = None;
            if trimmed.starts_with("target:") {
                places.target = Some(value_place(line, at, trimmed, "target"));
            }
            continue;
        }
        if !in_stages {
            continue;
        }
        let indent_of_stage = *stage_indent.get_or_insert(indent);
        if indent == indent_of_stage {
            let name = trimmed.split(':').next().unwrap_or("").trim_matches(['"', '\'']);
            places.stages.push(StagePlaces {
                name: Place {
                    line,
                    offset: at,
                    len: name.len().max(1),
                },
                ..Default::default()
            });
            steps_key_indent = None;
            continue;
        }
        let Some(stage) = places.stages.last_mut() else { continue };
        let is_item = trimmed == "-" || trimmed.starts_with("- ");
        if let Some(steps_indent) = steps_key_indent {
            if is_item && indent >= steps_indent {
                if indent == *item_indent.get_or_insert(indent) {
                    let first = trimmed.split(" #").next().unwrap_or(trimmed).trim_end();
                    stage.steps.push(Place {
                        line,
                        offset: at,
                        len: first.len(),
                    });
                }
                continue;
            }
            if indent > steps_indent {
                continue;
            }
            steps_key_indent = None;
        }
        if trimmed.starts_with("steps:") {
            steps_key_indent = Some(indent);
            item_indent = None;
        } else if trimmed.starts_with("from:") {
            stage.from = Some(value_place(line, at, trimmed, "from"));
        } else if trimmed.starts_with("image:") {
            stage.image = Some(Place {
                line,
                offset: at,
                len: "image".len(),
            });
        }
    }
    places
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_steps_and_values_are_found_by_indentation() {
        let text = "stages:\n  build:\n    from: busybox  # base\n    steps:\n    - run: a\n      mounts:\n      - cache: /c\n    - copy: x\n      to: /y\n    image:\n      cmd: [x]\n  final:\n    from: build\ntarget: final\n";
        let p = find(text);
        assert_eq!(p.stages.len(), 2);
        let b = &p.stages[0];
        assert_eq!(&text[b.name.offset..b.name.offset + b.name.len], "build");
        let from = b.from.expect("from");
        assert_eq!(&text[from.offset..from.offset + from.len], "busybox");
        assert_eq!(b.steps.iter().map(|s| s.line).collect::<Vec<_>>(), [5, 8]);
        assert_eq!(b.image.map(|i| i.line), Some(10));
        assert_eq!(p.stages[1].from.map(|f| f.line), Some(13));
        let t = p.target.expect("target");
        assert_eq!(&text[t.offset..t.offset + t.len], "final");
    }
}
