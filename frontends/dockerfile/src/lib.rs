//! The Dockerfile frontend: Dockerfile text → LLB + image config.
//!
//! Phases, each its own module: [`parser`] (text → AST, BuildKit-compatible),
//! [`instructions`] (AST → typed instructions, flags validated), [`lower`]
//! (instructions → LLB through `kiln_llb`'s builder). [`shell`] is the word
//! expansion they share. [`compile`] runs them and turns every error into a
//! diagnostic with a span.
//!
//! **Architecture invariant:** no IO. Base image configs come from the
//! [`kiln_frontend::Host`]; nothing here reads files, the network or the clock.

pub mod instructions;
pub mod lower;
pub mod parser;
pub mod shell;

use kiln_frontend::{Diagnostic, Host, Request, Response};
use kiln_llb::pb;

use instructions::Instruction;

/// Diagnostic code prefix.
const CODE: &str = "kiln::dockerfile::";

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
    for w in &ast.warnings {
        response
            .diagnostics
            .push(diag("empty_continuation", w.message.clone(), w.span.clone()).warning());
    }
    let mut typed = Vec::with_capacity(ast.nodes.len());
    for node in &ast.nodes {
        match instructions::type_node(node) {
            Ok(inst) => typed.push((node, inst)),
            Err((code, message, span)) => response.diagnostics.push(diag(code, message, span)),
        }
    }
    let mut meta_args = Vec::new();
    let mut stages: Vec<lower::StageDef<'_>> = Vec::new();
    for (node, inst) in typed {
        match inst {
            Instruction::From { image, name, platform } => {
                if let Some(n) = &name {
                    if stages.iter().any(|s| s.name.as_ref() == Some(n)) {
                        response
                            .diagnostics
                            .push(diag("duplicate_stage", format!("duplicate stage name {n:?}"), node.span_of(n)));
                    }
                }
                stages.push(lower::StageDef {
                    image,
                    name,
                    platform,
                    from: node,
                    instructions: Vec::new(),
                });
            }
            Instruction::Arg(args) if stages.is_empty() => meta_args.push((node, args)),
            other => match stages.last_mut() {
                Some(stage) => stage.instructions.push((node, other)),
                None => response.diagnostics.push(diag(
                    "no_from",
                    format!("{} comes before the first FROM; only ARG may", node.keyword.to_uppercase()),
                    node.keyword_span(),
                )),
            },
        }
    }
    if stages.is_empty() && !response.has_errors() {
        response
            .diagnostics
            .push(diag("no_from", "the Dockerfile has no FROM instruction".into(), 0..0));
    }
    if response.has_errors() {
        response.diagnostics.sort_by_key(|d| d.offset);
        return response;
    }
    let input = lower::LowerInput {
        meta_args,
        stages,
        request,
        host,
        escape: ast.escape,
    };
    let result = lower::lower(&input);
    // The syntax tree and instructions are not needed to marshal: free them first.
    drop(input);
    drop(ast);
    match result {
        Ok(lowered) => {
            let info = pb::SourceInfo {
                filename: file.clone(),
                data: request.definition.clone(),
                language: "Dockerfile".into(),
                definition: None,
            };
            response.definition = Some(lowered.state.marshal(vec![info]));
            response.image_config = Some(lowered.config);
        }
        Err(errors) => {
            for (code, message, span) in errors {
                response.diagnostics.push(diag(code, message, span));
            }
        }
    }
    response
}
