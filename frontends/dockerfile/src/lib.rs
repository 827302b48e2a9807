//! The Dockerfile frontend: Dockerfile text → LLB + image config.
//!
//! Phases, each its own module: [`parser`] (text → AST, BuildKit-compatible),
//! [`instructions`] (AST → the typed, spanned IR of [`ir`], flags validated),
//! [`lower`] (IR → LLB through `kiln_llb`'s builder). [`shell`] is the word
//! expansion they share. [`compile`] runs them and turns every error into a
//! diagnostic with a span; [`lower_program`] is the entry for other frontends
//! that build the IR themselves (the recipe frontend).
//!
//! **Architecture invariant:** no IO. Base image configs come from the
//! [`kiln_frontend::Host`]; nothing here reads files, the network or the clock.

pub mod instructions;
pub mod ir;
pub mod lint;
pub mod lower;
pub mod parser;
pub mod shell;

use kiln_frontend::{Diagnostic, Host, Request, Response};
use kiln_llb::pb;

/// Diagnostic code prefix.
const CODE: &str = "kiln::dockerfile::";
/// Code prefix of the checks' findings: `kiln::check::StageNameCasing`.
pub const LINT: &str = "kiln::check::";

/// Compiles a Dockerfile request to LLB.
pub fn compile(request: &Request, host: &dyn Host) -> Response {
    let source = String::from_utf8_lossy(&request.definition).into_owned();
    let file = request.filename.clone();
    let diag = |code: &str, message: String, span: parser::Span| Diagnostic::error(&format!("{CODE}{code}"), message, &file, span);
    let mut response = Response::default();
    let (ast, errors) = parser::parse(&source);
    for e in errors {
        response.diagnostics.push(diag(e.code, e.message, e.span));
    }
    // BuildKit's checks: warnings, or errors under `error=true`.
    let checks = match lint::config(&ast, &request.build_args) {
        Ok(config) => Some(config),
        Err(e) => {
            response.diagnostics.push(diag("invalid_check", e, 0..0));
            None
        }
    };
    let report = |findings: Vec<lint::Finding>, response: &mut Response| {
        let Some(config) = &checks else { return };
        for f in findings {
            if config.skip_all || config.skip.contains(f.rule) {
                continue;
            }
            let mut d = Diagnostic::error(&format!("{LINT}{}", f.rule), f.message, &file, f.span);
            d.label = f.rule.to_string();
            d.help = Some(lint::description(f.rule).to_string()).filter(|h| !h.is_empty());
            response.diagnostics.push(if config.error { d } else { d.warning() });
        }
    };
    if let Some(config) = &checks {
        report(lint::check(&ast, config), &mut response);
    }
    let (program, mut type_errors) = instructions::program(&ast);
    // The syntax tree is not needed to lower: free it first.
    drop(ast);
    if response.has_errors() {
        // A file that does not parse is not also told it has no FROM.
        type_errors.retain(|(code, _, span)| !(*code == "no_from" && *span == (0..0)));
    }
    for (code, message, span) in type_errors {
        response.diagnostics.push(diag(code, message, span));
    }
    if !response.has_errors() {
        let target = request.platform.clone().unwrap_or_else(|| request.build_platform.clone());
        let mut builtin = lower::platform_args("TARGET", &target);
        builtin.extend(lower::platform_args("BUILD", &request.build_platform));
        report(lint::check_from(&program, &request.build_args, &builtin), &mut response);
        report(lint::check_copy_ignored(&program, &request.ignore_patterns), &mut response);
        response.diagnostics.sort_by_key(|d| d.offset);
    }
    if response.has_errors() {
        response.diagnostics.sort_by_key(|d| d.offset);
        return response;
    }
    let info = pb::SourceInfo {
        filename: file.clone(),
        data: request.definition.clone(),
        language: "Dockerfile".into(),
        definition: None,
    };
    let (lowered, findings) = lower_program_checked(&program, request, host, info);
    report(findings, &mut response);
    response.diagnostics.extend(lowered.diagnostics);
    response.diagnostics.sort_by_key(|d| d.offset);
    response.definition = lowered.definition;
    response.image_config = lowered.image_config;
    response
}

/// Lowers a typed program, from a Dockerfile or from any frontend that builds
/// the IR ([`ir`]), to LLB and the image config. `info` names the definition
/// file in the source map; diagnostics point into `request.filename`.
pub fn lower_program(program: &ir::Program, request: &Request, host: &dyn Host, info: pb::SourceInfo) -> Response {
    lower_program_checked(program, request, host, info).0
}

/// [`lower_program`], with the Dockerfile check findings only lowering can
/// make (UndefinedVar, InvalidBaseImagePlatform) for the caller to report.
pub fn lower_program_checked(
    program: &ir::Program,
    request: &Request,
    host: &dyn Host,
    info: pb::SourceInfo,
) -> (Response, Vec<lint::Finding>) {
    let mut response = Response::default();
    let mut findings = Vec::new();
    let input = lower::LowerInput { program, request, host };
    match lower::lower(&input) {
        Ok(lowered) => {
            response.definition = Some(lowered.state.marshal(vec![info]));
            response.image_config = Some(lowered.config);
            findings = lowered.findings;
        }
        Err(errors) => {
            for (code, message, span) in errors {
                response
                    .diagnostics
                    .push(Diagnostic::error(&format!("{CODE}{code}"), message, &request.filename, span));
            }
        }
    }
    (response, findings)
}
