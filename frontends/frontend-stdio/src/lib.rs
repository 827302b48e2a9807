//! kiln's frontend protocol (version 1, `frontends/PROTOCOL.md`) over a
//! byte stream: JSON lines on the frontend's stdin and stdout. One host
//! implementation serves native frontend binaries and, later, WASM plugins
//! (whose WASI stdin/stdout carry the same lines).
//!
//! - [`serve`]: the frontend side (read the request, call the host, reply).
//! - [`run`]: the host side (start a frontend, answer its calls, read its response).
//! - [`detect_syntax`]: the `# syntax=` directive, read as BuildKit reads it.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};

use base64::Engine as _;
use kiln_frontend::{Diagnostic, Host, HostError, ImageConfig, Platform, Request, ResolvedImage, Response};
use prost::Message as _;
use serde::{Deserialize, Serialize};

/// Protocol version.
pub const VERSION: u32 = 1;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(s: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| format!("bad base64: {e}"))
}

/// Host → frontend.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToFrontend {
    /// The first line: what to compile.
    Request {
        /// [`VERSION`].
        version: u32,
        /// The definition file, base64.
        definition: String,
        /// Its name.
        filename: String,
        /// Build arguments.
        #[serde(default)]
        build_args: BTreeMap<String, String>,
        /// Target stage.
        #[serde(default)]
        target: Option<String>,
        /// Target platform.
        #[serde(default)]
        platform: Option<Platform>,
        /// Build platform.
        build_platform: Platform,
        /// One of several target platforms.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        multi_platform: bool,
        /// Named build contexts.
        #[serde(default)]
        named_contexts: BTreeMap<String, String>,
        /// `.dockerignore` patterns.
        #[serde(default)]
        ignore_patterns: Vec<String>,
        /// Default network mode for steps.
        #[serde(default)]
        network: Option<String>,
        /// Extra `/etc/hosts` entries for every step: `[host, ip]` pairs.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        extra_hosts: Vec<(String, String)>,
    },
    /// Answer to `resolve_image`.
    Resolved {
        /// The call's id.
        id: u64,
        /// The image, if the host resolves it (`null`: compile without it).
        image: Option<WireImage>,
        /// Why it could not be resolved.
        #[serde(default)]
        error: Option<String>,
    },
    /// Answer to `read_file`.
    File {
        /// The call's id.
        id: u64,
        /// The bytes, base64; `null` if there is no such file.
        data: Option<String>,
    },
}

/// A resolved image on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub struct WireImage {
    /// Pinned reference or source identifier.
    pub reference: String,
    /// Its config.
    pub config: ImageConfig,
}

/// Frontend → host.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromFrontend {
    /// Resolve an image's config.
    ResolveImage {
        /// Call id, echoed in the answer.
        id: u64,
        /// Normalized reference.
        reference: String,
        /// For this platform.
        platform: Platform,
    },
    /// Read a file of the build context (relative path).
    ReadFile {
        /// Call id.
        id: u64,
        /// Path relative to the context.
        path: String,
    },
    /// Progress to show (no answer).
    Progress {
        /// A line of text.
        message: String,
    },
    /// The last line: the result.
    Response {
        /// The marshalled `pb.Definition`, base64; `null` when compilation failed.
        definition: Option<String>,
        /// The image config.
        #[serde(default)]
        image_config: Option<Box<ImageConfig>>,
        /// Errors and warnings with spans.
        #[serde(default)]
        diagnostics: Vec<Diagnostic>,
    },
}

/// The request as its first line.
pub fn request_message(r: &Request) -> ToFrontend {
    ToFrontend::Request {
        version: VERSION,
        definition: b64(&r.definition),
        filename: r.filename.clone(),
        build_args: r.build_args.clone(),
        target: r.target.clone(),
        platform: r.platform.clone(),
        build_platform: r.build_platform.clone(),
        multi_platform: r.multi_platform,
        named_contexts: r.named_contexts.clone(),
        ignore_patterns: r.ignore_patterns.clone(),
        network: r.network.clone(),
        extra_hosts: r.extra_hosts.clone(),
    }
}

fn line<T: Serialize>(out: &mut dyn Write, msg: &T) -> Result<(), String> {
    let mut s = serde_json::to_string(msg).map_err(|e| e.to_string())?;
    s.push('\n');
    out.write_all(s.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| format!("writing to the frontend protocol stream: {e}"))
}

/// A [`Host`] that asks over the protocol stream.
struct StreamHost<'a> {
    input: std::cell::RefCell<&'a mut dyn BufRead>,
    output: std::cell::RefCell<&'a mut dyn Write>,
    next: std::cell::Cell<u64>,
}

impl Host for StreamHost<'_> {
    fn resolve_image(&self, reference: &str, platform: &Platform) -> Result<Option<ResolvedImage>, HostError> {
        let id = self.next.get();
        self.next.set(id + 1);
        let call = FromFrontend::ResolveImage {
            id,
            reference: reference.to_string(),
            platform: platform.clone(),
        };
        let herr = |message: String| HostError { message };
        line(*self.output.borrow_mut(), &call).map_err(herr)?;
        let mut text = String::new();
        self.input.borrow_mut().read_line(&mut text).map_err(|e| herr(e.to_string()))?;
        match serde_json::from_str::<ToFrontend>(&text).map_err(|e| herr(format!("bad answer from the host: {e}")))? {
            ToFrontend::Resolved { id: got, image, error } if got == id => match error {
                Some(message) => Err(HostError { message }),
                None => Ok(image.map(|i| ResolvedImage {
                    reference: i.reference,
                    config: i.config,
                })),
            },
            other => Err(herr(format!("unexpected answer from the host: {other:?}"))),
        }
    }

    fn read_file(&self, path: &str) -> Option<Vec<u8>> {
        let id = self.next.get();
        self.next.set(id + 1);
        line(
            *self.output.borrow_mut(),
            &FromFrontend::ReadFile {
                id,
                path: path.to_string(),
            },
        )
        .ok()?;
        let mut text = String::new();
        self.input.borrow_mut().read_line(&mut text).ok()?;
        match serde_json::from_str::<ToFrontend>(&text).ok()? {
            ToFrontend::File { id: got, data: Some(data) } if got == id => unb64(&data).ok(),
            _ => None,
        }
    }

    fn progress(&self, message: &str) {
        let _ = line(
            *self.output.borrow_mut(),
            &FromFrontend::Progress {
                message: message.to_string(),
            },
        );
    }
}

/// The frontend side: reads the request from `input`, compiles it with
/// `compile` (whose host calls go over the stream), writes the response.
pub fn serve(input: &mut dyn BufRead, output: &mut dyn Write, compile: impl Fn(&Request, &dyn Host) -> Response) -> Result<(), String> {
    let mut first = String::new();
    input.read_line(&mut first).map_err(|e| format!("reading the request: {e}"))?;
    let msg: ToFrontend = serde_json::from_str(&first).map_err(|e| format!("the first line is not a request: {e}"))?;
    let ToFrontend::Request {
        version,
        definition,
        filename,
        build_args,
        target,
        platform,
        build_platform,
        multi_platform,
        named_contexts,
        ignore_patterns,
        network,
        extra_hosts,
    } = msg
    else {
        return Err("the first line is not a request".into());
    };
    if version != VERSION {
        return Err(format!(
            "frontend protocol version {version} is not supported (this frontend speaks {VERSION})"
        ));
    }
    let request = Request {
        definition: unb64(&definition)?,
        filename,
        build_args,
        target,
        platform,
        build_platform,
        multi_platform,
        named_contexts,
        ignore_patterns,
        network,
        extra_hosts,
    };
    let host = StreamHost {
        input: std::cell::RefCell::new(input),
        output: std::cell::RefCell::new(output),
        next: std::cell::Cell::new(1),
    };
    let r = compile(&request, &host);
    line(
        host.output.into_inner(),
        &FromFrontend::Response {
            definition: r.definition.as_ref().map(|d| b64(&kiln_llb::marshal::encode_definition(d))),
            image_config: r.image_config.map(Box::new),
            diagnostics: r.diagnostics,
        },
    )
}

/// A frontend program's `main`: serves one request on this process's
/// stdin/stdout with `compile`, then exits (0, or 2 with `name: error` on
/// stderr when the protocol failed).
pub fn serve_stdio(name: &str, compile: impl Fn(&Request, &dyn Host) -> Response) -> ! {
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let mut output = std::io::stdout().lock();
    match serve(&mut input, &mut output, compile) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("{name}: {e}");
            std::process::exit(2)
        }
    }
}

/// A file of the context `dir`, only inside it: no absolute paths, no
/// `..`, and no symlink that leads out of it.
fn read_in_context(dir: &std::path::Path, path: &str) -> Option<Vec<u8>> {
    if path.starts_with('/') || path.split('/').any(|c| c == "..") {
        return None;
    }
    let root = dir.canonicalize().ok()?;
    let file = dir.join(path).canonicalize().ok()?;
    if !file.starts_with(&root) {
        return None;
    }
    std::fs::read(file).ok()
}

/// The host side: sends `request` to a started frontend (its stdin and
/// stdout), answers its calls with `host` (`read_file` from `context`, or
/// by `host` too when there is none), and returns its response.
pub fn run(
    to_frontend: &mut dyn Write,
    from_frontend: &mut dyn BufRead,
    request: &Request,
    host: &dyn Host,
    context: Option<&std::path::Path>,
    mut progress: impl FnMut(&str),
) -> Result<Response, String> {
    line(to_frontend, &request_message(request))?;
    loop {
        let mut text = String::new();
        let n = from_frontend
            .read_line(&mut text)
            .map_err(|e| format!("reading from the frontend: {e}"))?;
        if n == 0 {
            return Err("the frontend exited without a response".into());
        }
        let msg: FromFrontend = serde_json::from_str(&text)
            .map_err(|e| format!("the frontend wrote something that is not protocol: {e}: {}", text.trim_end()))?;
        match msg {
            FromFrontend::ResolveImage { id, reference, platform } => {
                let answer = match host.resolve_image(&reference, &platform) {
                    Ok(image) => ToFrontend::Resolved {
                        id,
                        image: image.map(|i| WireImage {
                            reference: i.reference,
                            config: i.config,
                        }),
                        error: None,
                    },
                    Err(e) => ToFrontend::Resolved {
                        id,
                        image: None,
                        error: Some(e.message),
                    },
                };
                line(to_frontend, &answer)?;
            }
            FromFrontend::ReadFile { id, path } => {
                let data = match context {
                    Some(c) => read_in_context(c, &path),
                    // No context here: `host` answers (a relay such as
                    // kiln-plugin-host passes the call on to the CLI).
                    None => host.read_file(&path),
                }
                .map(|b| b64(&b));
                line(to_frontend, &ToFrontend::File { id, data })?;
            }
            FromFrontend::Progress { message } => progress(&message),
            FromFrontend::Response {
                definition,
                image_config,
                diagnostics,
            } => {
                let definition = match definition {
                    Some(d) => Some(
                        kiln_llb::pb::Definition::decode(unb64(&d)?.as_slice()).map_err(|e| format!("the frontend's definition: {e}"))?,
                    ),
                    None => None,
                };
                return Ok(Response {
                    definition,
                    image_config: image_config.map(|c| *c),
                    diagnostics,
                });
            }
        }
    }
}

/// The `# syntax=` directive of a definition file, as BuildKit reads it:
/// the first line (after a UTF-8 BOM and a `#!` line) as `# syntax=REF`,
/// `// syntax=REF` or a JSON comment `# {"syntax": "REF"}`.
pub fn detect_syntax(definition: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(definition).ok()?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines = text.lines();
    let mut first = lines.next()?;
    if first.starts_with("#!") {
        first = lines.next()?;
    }
    let t = first.trim();
    let body = t.strip_prefix('#').or_else(|| t.strip_prefix("//"))?.trim();
    if body.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(body).ok()?;
        return v
            .get("syntax")
            .and_then(|s| s.as_str())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty());
    }
    let (key, value) = body.split_once('=')?;
    (key.trim().eq_ignore_ascii_case("syntax"))
        .then(|| value.trim().to_string())
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax_directive_forms() {
        assert_eq!(
            detect_syntax(b"# syntax=docker/dockerfile:1\nFROM x"),
            Some("docker/dockerfile:1".into())
        );
        assert_eq!(detect_syntax(b"\xef\xbb\xbf#syntax = recipe\n"), Some("recipe".into()));
        assert_eq!(detect_syntax(b"#!/usr/bin/env kiln\n// syntax=mine\n"), Some("mine".into()));
        assert_eq!(detect_syntax(b"# {\"syntax\": \"./f.wasm\"}\n"), Some("./f.wasm".into()));
        assert_eq!(detect_syntax(b"FROM x\n# syntax=late\n"), None);
        assert_eq!(detect_syntax(b"# escape=`\n"), None);
    }

    /// What [`probing_frontend`] reads, and what a host confined to the
    /// context of [`context_with_an_escape`] gives it.
    const PROBED: [&str; 5] = ["sub/inside.txt", "escape", "../outside.txt", "/etc/hostname", "missing"];
    const CONFINED: &str = "sub/inside.txt=Some(\"in\") escape=None ../outside.txt=None /etc/hostname=None missing=None";

    /// `DIR/ctx` holding `sub/inside.txt` and a symlink `escape` to a file
    /// beside the context.
    fn context_with_an_escape(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-stdio-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("ctx/sub")).expect("ctx");
        std::fs::write(dir.join("ctx/sub/inside.txt"), "in").expect("file");
        std::fs::write(dir.join("outside.txt"), "secret").expect("file");
        std::os::unix::fs::symlink("../outside.txt", dir.join("ctx/escape")).expect("symlink");
        dir
    }

    /// A frontend serving on a thread: it reports progress, then what
    /// reading each of [`PROBED`] gave, as its one diagnostic.
    fn probing_frontend(input: std::io::PipeReader, output: std::io::PipeWriter) -> std::thread::JoinHandle<Result<(), String>> {
        std::thread::spawn(move || {
            let mut input = std::io::BufReader::new(input);
            let mut output = output;
            serve(&mut input, &mut output, |_, host| {
                host.progress("reading");
                let seen: Vec<String> = PROBED
                    .iter()
                    .map(|p| format!("{p}={:?}", host.read_file(p).map(|b| String::from_utf8_lossy(&b).into_owned())))
                    .collect();
                Response {
                    diagnostics: vec![kiln_frontend::Diagnostic::error("probe", seen.join(" "), "f", 0..0)],
                    ..Default::default()
                }
            })
        })
    }

    /// The CLI's side: runs a request over `to`/`from` answering reads from
    /// `DIR/ctx`; returns the response and the progress lines that came.
    fn ask_with_context(to: &mut std::io::PipeWriter, from: &mut std::io::PipeReader, dir: &std::path::Path) -> (Response, Vec<String>) {
        let mut reader = std::io::BufReader::new(from);
        let mut progress = Vec::new();
        let request = Request::default();
        let r = run(
            to,
            &mut reader,
            &request,
            &kiln_frontend::OfflineHost,
            Some(&dir.join("ctx")),
            |m| progress.push(m.to_string()),
        )
        .expect("response");
        (r, progress)
    }

    #[test]
    fn read_file_is_confined_to_the_context_and_progress_reaches_the_host() {
        let dir = context_with_an_escape("read-file");
        let (host_to_fe_r, mut host_to_fe_w) = std::io::pipe().expect("pipe");
        let (mut fe_to_host_r, fe_to_host_w) = std::io::pipe().expect("pipe");
        let fe = probing_frontend(host_to_fe_r, fe_to_host_w);
        let (r, progress) = ask_with_context(&mut host_to_fe_w, &mut fe_to_host_r, &dir);
        fe.join().expect("thread").expect("serve");
        assert_eq!(progress, ["reading"]);
        assert_eq!(r.diagnostics[0].message, CONFINED);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_relay_without_a_context_passes_file_reads_on_to_its_host() {
        // As kiln-plugin-host stands between the CLI and a plugin: the
        // frontend asks the relay, which has no context and asks the CLI,
        // which answers from its own, with the same confinement.
        let dir = context_with_an_escape("relay");
        let (cli_to_relay_r, mut cli_to_relay_w) = std::io::pipe().expect("pipe");
        let (mut relay_to_cli_r, relay_to_cli_w) = std::io::pipe().expect("pipe");
        let (fe_in_r, fe_in_w) = std::io::pipe().expect("pipe");
        let (fe_out_r, fe_out_w) = std::io::pipe().expect("pipe");
        let frontend = probing_frontend(fe_in_r, fe_out_w);
        let relay = std::thread::spawn(move || {
            let mut input = std::io::BufReader::new(cli_to_relay_r);
            let mut output = relay_to_cli_w;
            serve(&mut input, &mut output, |request, host| {
                let mut to_frontend = fe_in_w.try_clone().expect("clone");
                let mut from_frontend = std::io::BufReader::new(fe_out_r.try_clone().expect("clone"));
                run(&mut to_frontend, &mut from_frontend, request, host, None, |m| host.progress(m)).expect("relayed")
            })
        });
        let (r, progress) = ask_with_context(&mut cli_to_relay_w, &mut relay_to_cli_r, &dir);
        relay.join().expect("relay").expect("relay serves");
        frontend.join().expect("frontend").expect("frontend serves");
        assert_eq!(progress, ["reading"], "progress is relayed too");
        assert_eq!(r.diagnostics[0].message, CONFINED);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_frontend_and_its_host_talk_over_the_stream() {
        // Run the frontend side in a thread, connected by pipes, with the Dockerfile frontend.
        let (host_to_fe_r, mut host_to_fe_w) = std::io::pipe().expect("pipe");
        let (mut fe_to_host_r, fe_to_host_w) = std::io::pipe().expect("pipe");
        let fe = std::thread::spawn(move || {
            let mut input = std::io::BufReader::new(host_to_fe_r);
            let mut output = fe_to_host_w;
            serve(&mut input, &mut output, kiln_dockerfile::compile)
        });
        struct Fixed;
        impl Host for Fixed {
            fn resolve_image(&self, reference: &str, _: &Platform) -> Result<Option<ResolvedImage>, HostError> {
                let mut config = ImageConfig::default();
                config.config.working_dir = "/from-host".into();
                Ok(Some(ResolvedImage {
                    reference: format!("{reference}@sha256:{}", "a".repeat(64)),
                    config,
                }))
            }
        }
        let request = Request {
            definition: b"FROM alpine\nRUN pwd\n".to_vec(),
            filename: "Dockerfile".into(),
            build_platform: Platform::linux_amd64(),
            multi_platform: false,
            ..Default::default()
        };
        let mut reader = std::io::BufReader::new(&mut fe_to_host_r);
        let over_stream = run(&mut host_to_fe_w, &mut reader, &request, &Fixed, None, |_| {}).expect("response");
        fe.join().expect("thread").expect("serve");
        let direct = kiln_dockerfile::compile(&request, &Fixed);
        assert_eq!(over_stream.definition, direct.definition, "same LLB through the protocol");
        assert_eq!(over_stream.image_config, direct.image_config);
        assert!(over_stream.definition.is_some());
    }
}
