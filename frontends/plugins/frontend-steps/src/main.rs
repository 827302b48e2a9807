//! `steps`: kiln's example frontend plugin. A build is one step per line:
//!
//! ```text
//! # syntax=./steps.wasm
//! base busybox                 # or `base scratch`
//! workdir /app
//! copy site /app/site          # from the build context
//! file /app/hello.txt Hello!\n # contents with \n and \\ escapes
//! run echo built > /app/built
//! env GREETING=hello
//! user nobody
//! label org.example.kind=demo
//! cmd cat /app/hello.txt       # words, split on spaces
//! ```
//!
//! The same source builds `kiln-frontend-steps` (a native frontend found on
//! PATH) and `kiln-frontend-steps.wasm` (a sandboxed plugin).

use kiln_guest::{Build, Diagnostic, Host, Request, Response, Stage};

const VERBS: &[&str] = &[
    "base",
    "workdir",
    "copy",
    "file",
    "run",
    "env",
    "user",
    "label",
    "cmd",
    "entrypoint",
];

fn main() {
    kiln_guest::main(compile)
}

/// One line: verb, arguments and where they are.
struct Line<'a> {
    number: usize,
    verb: &'a str,
    verb_at: usize,
    rest: &'a str,
    rest_at: usize,
}

fn lines(text: &str) -> Vec<Line<'_>> {
    let mut out = Vec::new();
    let mut offset = 0;
    for (i, raw) in text.split_inclusive('\n').enumerate() {
        let start = offset;
        offset += raw.len();
        let body = raw.trim_end_matches(['\n', '\r']);
        let indent = body.len() - body.trim_start().len();
        let trimmed = body.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let (verb, rest) = trimmed.split_once(char::is_whitespace).unwrap_or((trimmed, ""));
        let rest_trimmed = rest.trim_start();
        let rest_at = start + indent + verb.len() + (rest.len() - rest_trimmed.len()) + usize::from(!rest.is_empty());
        out.push(Line {
            number: i + 1,
            verb,
            verb_at: start + indent,
            rest: rest_trimmed.trim_end(),
            rest_at,
        });
    }
    out
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match (c, c == '\\') {
            (_, true) => match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some(other) => out.push(other),
                None => out.push('\\'),
            },
            (c, false) => out.push(c),
        }
    }
    out
}

fn compile(request: &Request, host: &dyn Host) -> Response {
    let text = String::from_utf8_lossy(&request.definition).into_owned();
    let build = Build::new(request, host);
    let mut diagnostics: Vec<Diagnostic> = Vec::new();
    let mut stage: Option<Stage> = None;
    for line in lines(&text) {
        let rest_span = line.rest_at..line.rest_at + line.rest.len().max(1);
        let verb_span = line.verb_at..line.verb_at + line.verb.len();
        let need = |what: &str, diagnostics: &mut Vec<Diagnostic>| {
            diagnostics.push(build.error(
                "kiln::steps::missing_argument",
                format!("`{}` needs {what}", line.verb),
                verb_span.clone(),
            ));
        };
        if line.verb == "base" {
            if stage.is_some() {
                diagnostics.push(build.error("kiln::steps::second_base", "a build has one `base` line", verb_span.clone()));
                continue;
            }
            stage = match line.rest {
                "" => {
                    need("an image reference or `scratch`", &mut diagnostics);
                    continue;
                }
                "scratch" => Some(build.scratch()),
                reference => match build.image(reference) {
                    Ok(s) => Some(s),
                    Err(mut d) => {
                        d.offset = rest_span.start;
                        d.length = rest_span.len();
                        diagnostics.push(*d);
                        continue;
                    }
                },
            };
            continue;
        }
        if !VERBS.contains(&line.verb) {
            let mut d = build.error(
                "kiln::steps::unknown_verb",
                format!("unknown step `{}`", line.verb),
                verb_span.clone(),
            );
            d.help = Some(match kiln_guest::closest(&line.verb.to_ascii_lowercase(), VERBS.iter().copied()) {
                Some(v) => format!("did you mean `{v}`?"),
                None => format!("steps are: {}", VERBS.join(", ")),
            });
            diagnostics.push(d);
            continue;
        }
        let Some(current) = stage.take() else {
            diagnostics.push(build.error(
                "kiln::steps::no_base",
                "the first step must be `base IMAGE` (or `base scratch`)",
                verb_span.clone(),
            ));
            continue;
        };
        let s = current.at_lines(line.number, line.number);
        let words: Vec<&str> = line.rest.split_whitespace().collect();
        let next = match (line.verb, words.as_slice()) {
            ("run", [_, ..]) => s.run(line.rest),
            ("workdir", [dir]) => s.workdir(dir),
            ("copy", [src, dest]) => s.copy(build.context(), src, dest),
            ("file", [path, ..]) => {
                let contents = line.rest[path.len()..].trim_start();
                s.write(path, unescape(contents).as_bytes(), 0o644)
            }
            ("env" | "label", [pair]) if pair.contains('=') => {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                if line.verb == "env" {
                    s.env(k, v)
                } else {
                    s.label(k, v)
                }
            }
            ("user", [user]) => s.user(user),
            ("cmd", [_, ..]) => s.cmd(&words),
            ("entrypoint", [_, ..]) => s.entrypoint(&words),
            (verb, _) => {
                let usage = match verb {
                    "run" => "a command",
                    "workdir" | "user" => "one word",
                    "copy" => "SOURCE DEST",
                    "file" => "PATH CONTENTS",
                    "env" | "label" => "KEY=VALUE",
                    _ => "arguments",
                };
                diagnostics.push(build.error("kiln::steps::bad_arguments", format!("`{verb}` takes {usage}"), rest_span.clone()));
                s
            }
        };
        stage = Some(next);
    }
    let Some(stage) = stage else {
        if diagnostics.is_empty() {
            diagnostics.push(build.error("kiln::steps::empty", "no steps: start with `base IMAGE`", 0..0));
        }
        return Response {
            diagnostics,
            ..Default::default()
        };
    };
    if !diagnostics.is_empty() {
        return Response {
            diagnostics,
            ..Default::default()
        };
    }
    build.finish(&stage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_know_their_numbers_and_offsets() {
        let text = "# c\n\nbase  busybox\n  run echo hi\n";
        let l = lines(text);
        assert_eq!(l.len(), 2);
        assert_eq!((l[0].number, l[0].verb, l[0].rest), (3, "base", "busybox"));
        assert_eq!(&text[l[0].rest_at..l[0].rest_at + 7], "busybox");
        assert_eq!((l[1].number, &text[l[1].verb_at..l[1].verb_at + 3]), (4, "run"));
    }

    #[test]
    fn misspelt_verbs_get_a_suggestion_and_a_span() {
        let req = Request {
            definition: b"base scratch\nrnu echo\n".to_vec(),
            filename: "Stepfile".into(),
            build_platform: kiln_guest::Platform::linux_amd64(),
            ..Default::default()
        };
        let r = compile(&req, &kiln_guest::OfflineHost);
        assert_eq!(r.diagnostics.len(), 1);
        let d = &r.diagnostics[0];
        assert_eq!((d.code.as_str(), d.offset, d.length), ("kiln::steps::unknown_verb", 13, 3));
        assert_eq!(d.help.as_deref(), Some("did you mean `run`?"));
    }

    #[test]
    fn escapes_in_file_contents() {
        assert_eq!(unescape(r"a\nb\\c\t"), "a\nb\\c\t");
    }
}
