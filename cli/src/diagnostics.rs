//! Rendering frontend diagnostics with miette: file, line, column, a caret
//! under the span, the stable code and any help.

use kiln_frontend::{Diagnostic, Severity};
use miette::{GraphicalReportHandler, GraphicalTheme, LabeledSpan};

/// A diagnostic as miette sees it, over the text it points into.
struct Report<'a, S> {
    diag: &'a Diagnostic,
    source: S,
}

/// The text a diagnostic points into, under the diagnostic's file name.
struct Snippet<'a> {
    name: &'a str,
    source: &'a Indexed<'a>,
}

/// A definition file with the offset of each line's start, so that a
/// diagnostic's snippet is found by a binary search: miette's own source
/// types count lines from the start of the text for every diagnostic, which
/// made 1,300 warnings on a 5,000-line file take a quarter of a second.
struct Indexed<'a> {
    text: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> Indexed<'a> {
    fn new(text: &'a str) -> Indexed<'a> {
        // Lines end as miette counts them: at \n, \r\n or a lone \r.
        let bytes = text.as_bytes();
        let ends_line = |i: usize| bytes[i] == b'\n' || (bytes[i] == b'\r' && bytes.get(i + 1) != Some(&b'\n'));
        let line_starts = std::iter::once(0)
            .chain((0..bytes.len()).filter(|&i| ends_line(i)).map(|i| i + 1))
            .collect();
        Indexed { text, line_starts }
    }

    /// The line (from 0) that holds byte `offset`.
    fn line_of(&self, offset: usize) -> usize {
        self.line_starts.partition_point(|&start| start <= offset).saturating_sub(1)
    }

    /// The byte where line `line` starts, or the end of the text.
    fn start_of(&self, line: usize) -> usize {
        self.line_starts.get(line).copied().unwrap_or(self.text.len())
    }
}

impl miette::SourceCode for Snippet<'_> {
    fn read_span<'a>(
        &'a self,
        span: &miette::SourceSpan,
        context_lines_before: usize,
        context_lines_after: usize,
    ) -> Result<Box<dyn miette::SpanContents<'a> + 'a>, miette::MietteError> {
        // miette reads only the lines around the span, with line numbers
        // counted from the window's first line; they are shifted back here.
        // One line more on each side than it shows: a span that ends on a
        // newline counts the next line as its own.
        let first = self.source.line_of(span.offset()).saturating_sub(context_lines_before + 1);
        let last = self.source.line_of(span.offset() + span.len()) + context_lines_after + 1;
        let (from, to) = (self.source.start_of(first), self.source.start_of(last + 1));
        let window = self.source.text.get(from..to).ok_or(miette::MietteError::OutOfBounds)?;
        let inner = miette::SourceSpan::new(span.offset().saturating_sub(from).into(), span.len());
        let contents = window.read_span(&inner, context_lines_before, context_lines_after)?;
        let outer = miette::SourceSpan::new((contents.span().offset() + from).into(), contents.span().len());
        Ok(Box::new(miette::MietteSpanContents::new_named(
            self.name.to_string(),
            contents.data(),
            outer,
            contents.line() + first,
            contents.column(),
            contents.line_count(),
        )))
    }
}

impl<S> std::fmt::Debug for Report<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.diag.message)
    }
}

impl<S> std::fmt::Display for Report<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.diag.message)
    }
}

impl<S> std::error::Error for Report<'_, S> {}

impl<S: miette::SourceCode> miette::Diagnostic for Report<'_, S> {
    fn code<'a>(&'a self) -> Option<Box<dyn std::fmt::Display + 'a>> {
        Some(Box::new(self.diag.code.clone()))
    }

    fn severity(&self) -> Option<miette::Severity> {
        Some(match self.diag.severity {
            Severity::Error => miette::Severity::Error,
            Severity::Warning => miette::Severity::Warning,
        })
    }

    fn help<'a>(&'a self) -> Option<Box<dyn std::fmt::Display + 'a>> {
        self.diag.help.as_ref().map(|h| Box::new(h.clone()) as Box<dyn std::fmt::Display>)
    }

    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        Some(&self.source)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        let span = LabeledSpan::new(Some(self.diag.label.clone()), self.diag.offset, self.diag.length);
        Some(Box::new(std::iter::once(span)))
    }
}

/// Renders one diagnostic against its source text.
pub fn render(diag: &Diagnostic, source: &str, color: bool) -> String {
    render_in(diag, &Indexed::new(source), color)
}

/// Renders every diagnostic, errors and warnings, in order.
pub fn render_all(diags: &[Diagnostic], source: &str, color: bool) -> String {
    let indexed = Indexed::new(source);
    diags.iter().map(|d| render_in(d, &indexed, color)).collect()
}

fn render_in(diag: &Diagnostic, source: &Indexed, color: bool) -> String {
    // miette prints `[file:line:column]` above the snippet.
    // A plugin's span may point past the text or inside a character: clamp it.
    let span = kiln_frontend::diagnostic::clamp_span(source.text, diag.offset, diag.length);
    let clamped = Diagnostic {
        offset: span.start,
        length: span.len(),
        ..diag.clone()
    };
    let report = Report {
        diag: &clamped,
        source: Snippet { name: &diag.file, source },
    };
    render_report(&report, color)
}

/// miette's rendering of `report`, or one plain line when it fails.
fn render_report<S: miette::SourceCode>(report: &Report<S>, color: bool) -> String {
    let theme = if color {
        GraphicalTheme::unicode()
    } else {
        GraphicalTheme::unicode_nocolor()
    };
    let handler = GraphicalReportHandler::new_themed(theme).with_width(100).with_wrap_lines(false);
    let mut out = String::new();
    if handler.render_report(&mut out, report).is_err() {
        let diag = report.diag;
        out = format!("{}: {} ({})\n", diag.file, diag.message, diag.code);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What miette renders when it is given the whole text, as before the index.
    fn whole_text(diag: &Diagnostic, source: &str) -> String {
        let source = miette::NamedSource::new(diag.file.clone(), source.to_string());
        render_report(&Report { diag, source }, false)
    }

    #[test]
    fn the_line_index_renders_what_miette_renders_from_the_whole_text() {
        // First and last lines, a span over several lines, an empty line,
        // CRLF endings, lone CRs, no newline at the end, multi-byte text.
        let texts = [
            "FROM busybox\nRUN echo one \\\n  two\n\nCOPY a b\nCMD [\"sh\"]",
            "FROM busybox\r\nRUN true\r\n\r\nENV A=1\r\n",
            "X",
            "FROM a\rRUN b\rRUN c\nRUN d\r",
            "FROM é\nRUN echo ü ∂ \\\n  ß\nCMD x",
        ];
        for text in texts {
            for offset in 0..text.len() {
                for length in [0, 1, 5, 20] {
                    let length = length.min(text.len() - offset);
                    if !text.is_char_boundary(offset) || !text.is_char_boundary(offset + length) {
                        continue;
                    }
                    let diag = Diagnostic::error("kiln::test", "message", "Dockerfile", offset..offset + length);
                    let expected = whole_text(&diag, text);
                    // A real snippet, not the plain line a failed render falls back to.
                    assert!(expected.contains("╭─[Dockerfile:"), "{expected}");
                    assert_eq!(
                        render_in(&diag, &Indexed::new(text), false),
                        expected,
                        "{text:?} at {offset}+{length}"
                    );
                }
            }
        }
    }
}
