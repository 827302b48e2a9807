//! Diagnostics with source spans, rendered by the CLI with miette.

/// How bad a diagnostic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Compilation fails.
    Error,
    /// Compilation goes on.
    Warning,
}

/// One finding in a definition file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Diagnostic {
    /// Stable code, e.g. `kiln::dockerfile::unknown_instruction`.
    pub code: String,
    /// Severity.
    pub severity: Severity,
    /// One-line message.
    pub message: String,
    /// The file it points into.
    pub file: String,
    /// Byte offset of the span's start.
    pub offset: usize,
    /// Span length in bytes.
    pub length: usize,
    /// Label shown under the span.
    pub label: String,
    /// Optional hint.
    pub help: Option<String>,
}

impl Diagnostic {
    /// An error at `span` of `file`.
    pub fn error(code: &str, message: impl Into<String>, file: &str, span: std::ops::Range<usize>) -> Diagnostic {
        Diagnostic {
            code: code.to_string(),
            severity: Severity::Error,
            message: message.into(),
            file: file.to_string(),
            offset: span.start,
            length: span.end.saturating_sub(span.start),
            label: String::from("here"),
            help: None,
        }
    }

    /// Makes it a warning.
    pub fn warning(mut self) -> Diagnostic {
        self.severity = Severity::Warning;
        self
    }

    /// 1-based line and column of the span start in `source`. An offset
    /// past the end or inside a character (a plugin may send either) counts
    /// as the nearest character start before it.
    pub fn line_column(&self, source: &str) -> (usize, usize) {
        let upto = &source[..floor_char_boundary(source, self.offset)];
        let line = upto.matches('\n').count() + 1;
        let column = upto.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
        (line, column)
    }
}

/// The largest character boundary of `s` at or before `offset`.
pub fn floor_char_boundary(s: &str, offset: usize) -> usize {
    let mut at = offset.min(s.len());
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// The span `offset..offset+length` clamped to `s` and moved onto character
/// boundaries, so that slicing or rendering it cannot fail.
pub fn clamp_span(s: &str, offset: usize, length: usize) -> std::ops::Range<usize> {
    let start = floor_char_boundary(s, offset);
    let mut end = offset.saturating_add(length).min(s.len()).max(start);
    while !s.is_char_boundary(end) {
        end += 1;
    }
    start..end
}

/// Levenshtein distance, for did-you-mean hints.
pub fn edit_distance(a: &str, b: &str) -> usize {
    // No distance reaches usize::MAX, so the bound never cuts this short.
    edit_distance_below(a, b, usize::MAX).unwrap_or(usize::MAX)
}

/// [`edit_distance`] when it is below `bound`, else None. Hints compare one
/// word with many candidates: this allocates nothing for words of up to 32
/// characters and stops as soon as the bound cannot be met.
pub fn edit_distance_below(a: &str, b: &str, bound: usize) -> Option<usize> {
    const SHORT: usize = 32;
    let (la, lb) = (a.chars().count(), b.chars().count());
    if la.abs_diff(lb) >= bound {
        return None;
    }
    // Two rows of the table: on the stack for short words.
    let mut stack = [0usize; 2 * (SHORT + 1)];
    let mut heap = Vec::new();
    let cells: &mut [usize] = if lb <= SHORT {
        &mut stack[..2 * (lb + 1)]
    } else {
        heap.resize(2 * (lb + 1), 0);
        &mut heap
    };
    let (mut prev, mut cur) = cells.split_at_mut(lb + 1);
    for (j, cell) in prev.iter_mut().enumerate() {
        *cell = j;
    }
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        let mut row_min = cur[0];
        for (j, cb) in b.chars().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
            row_min = row_min.min(cur[j + 1]);
        }
        // A row's minimum never decreases further down.
        if row_min >= bound {
            return None;
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    Some(prev[lb]).filter(|&d| d < bound)
}

/// The candidate nearest to `word` within two edits (for "did you mean …?").
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .filter_map(|c| Some((edit_distance_below(c, word, 3)?, c)))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_edit_distance_agrees_with_the_full_one() {
        // Known distances, short and past the 32 characters kept on the stack.
        let long = "A".repeat(40);
        let longer = format!("{long}B");
        let other = format!("B{}", "A".repeat(39));
        for (a, b, d) in [
            ("kitten", "sitting", 3),
            ("", "abc", 3),
            ("BASE", "BASES", 1),
            ("é", "e", 1),
            ("VERSION", "VERSOIN", 2),
            (long.as_str(), longer.as_str(), 1),
            (long.as_str(), other.as_str(), 1),
            (long.as_str(), "", 40),
        ] {
            assert_eq!(edit_distance(a, b), d, "{a:?} {b:?}");
            assert_eq!(edit_distance(b, a), d, "{b:?} {a:?}");
        }
        let words = [
            long.as_str(),
            longer.as_str(),
            "",
            "a",
            "BASE",
            "BASES",
            "A40_10",
            "A41_10",
            "VERSION",
            "VERSOIN",
            "é",
            "éa",
            "TARGETPLATFORM",
        ];
        for a in words {
            for b in words {
                let full = edit_distance(a, b);
                for bound in 0..6 {
                    assert_eq!(
                        edit_distance_below(a, b, bound),
                        Some(full).filter(|&d| d < bound),
                        "{a:?} {b:?} below {bound}"
                    );
                }
            }
        }
    }

    #[test]
    fn offsets_inside_a_character_or_past_the_end_are_clamped() {
        let text = "FROM é\nRUN x";
        let mut d = Diagnostic::error("c", "m", "f", 6..7); // inside `é`
        assert_eq!(d.line_column(text), (1, 6));
        d.offset = 1000;
        assert_eq!(d.line_column(text), (2, 6));
        assert_eq!(clamp_span(text, 6, 1), 5..7);
        assert_eq!(clamp_span(text, 1000, 5), text.len()..text.len());
        assert_eq!(clamp_span(text, 0, usize::MAX), 0..text.len());
    }
}
