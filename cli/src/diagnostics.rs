//! Rendering frontend diagnostics with miette: file, line, column, a caret
//! under the span, the stable code and any help.

use kiln_frontend::{Diagnostic, Severity};
use miette::{GraphicalReportHandler, GraphicalTheme, LabeledSpan, NamedSource};

struct Report<'a> {
    diag: &'a Diagnostic,
    source: NamedSource<String>,
}

impl std::fmt::Debug for Report<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.diag.message)
    }
}

impl std::fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.diag.message)
    }
}

impl std::error::Error for Report<'_> {}

impl miette::Diagnostic for Report<'_> {
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
    let theme = if color {
        GraphicalTheme::unicode()
    } else {
        GraphicalTheme::unicode_nocolor()
    };
    let handler = GraphicalReportHandler::new_themed(theme).with_width(100).with_wrap_lines(false);
    // miette prints `[file:line:column]` above the snippet.
    // A plugin's span may point past the text or inside a character: clamp it.
    let span = kiln_frontend::diagnostic::clamp_span(source, diag.offset, diag.length);
    let clamped = Diagnostic {
        offset: span.start,
        length: span.len(),
        ..diag.clone()
    };
    let report = Report {
        diag: &clamped,
        source: NamedSource::new(diag.file.clone(), source.to_string()),
    };
    let mut out = String::new();
    if handler.render_report(&mut out, &report).is_err() {
        out = format!("{}: {} ({})\n", diag.file, diag.message, diag.code);
    }
    out
}

/// Renders every diagnostic, errors and warnings, in order.
pub fn render_all(diags: &[Diagnostic], source: &str, color: bool) -> String {
    diags.iter().map(|d| render(d, source, color)).collect()
}
