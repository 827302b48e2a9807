//! Properties: arbitrary input never panics the frontend; stages that share
//! only their base image lower to independent branches.

use std::collections::{HashMap, HashSet};

use kiln_frontend::{OfflineHost, Platform, Request};
use kiln_llb::LoadedDefinition;
use proptest::prelude::*;
use prost::Message;

fn request(bytes: Vec<u8>) -> Request {
    Request {
        definition: bytes,
        filename: "Dockerfile".into(),
        build_platform: Platform::linux_amd64(),
        multi_platform: false,
        ..Default::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = kiln_dockerfile::compile(&request(bytes), &OfflineHost);
    }

    #[test]
    fn dockerfile_like_text_never_panics(lines in proptest::collection::vec(
        prop_oneof![
            Just("FROM alpine AS a".to_string()),
            Just("FROM a".to_string()),
            Just("RUN <<EOF".to_string()),
            Just("EOF".to_string()),
            Just("\\".to_string()),
            Just("# escape=`".to_string()),
            "[A-Z]{2,10} [ -~]{0,30}",
            "(RUN|COPY|ADD|ENV|ARG|ONBUILD|HEALTHCHECK|LABEL) [ -~]{0,40}",
        ], 0..12)) {
        let _ = kiln_dockerfile::compile(&request(lines.join("\n").into_bytes()), &OfflineHost);
    }
}

#[test]
fn eight_stages_sharing_a_base_are_independent_branches() {
    let mut text = String::from("FROM alpine AS base\n");
    for i in 0..8 {
        text.push_str(&format!("FROM base AS s{i}\nRUN echo {i} > /out{i}\n"));
    }
    text.push_str("FROM scratch\n");
    for i in 0..8 {
        text.push_str(&format!("COPY --from=s{i} /out{i} /\n"));
    }
    let response = kiln_dockerfile::compile(&request(text.into_bytes()), &OfflineHost);
    assert!(response.diagnostics.is_empty(), "{:?}", response.diagnostics);
    let def = LoadedDefinition::decode(&response.definition.expect("llb").encode_to_vec()).expect("valid");
    let execs: Vec<&kiln_llb::definition::LoadedOp> = def
        .ops
        .iter()
        .filter(|o| matches!(o.op.op, Some(kiln_llb::pb::op::Op::Exec(_))))
        .collect();
    assert_eq!(execs.len(), 8);
    let inputs: HashMap<String, Vec<String>> = def
        .ops
        .iter()
        .map(|o| (o.digest.to_string(), o.op.inputs.iter().map(|i| i.digest.clone()).collect()))
        .collect();
    let ancestors = |start: &str| {
        let mut seen = HashSet::new();
        let mut stack = vec![start.to_string()];
        while let Some(d) = stack.pop() {
            for i in inputs.get(&d).into_iter().flatten() {
                if seen.insert(i.clone()) {
                    stack.push(i.clone());
                }
            }
        }
        seen
    };
    for a in &execs {
        let up = ancestors(a.digest.as_str());
        for b in &execs {
            assert!(!up.contains(b.digest.as_str()), "exec {} depends on exec {}", a.digest, b.digest);
        }
    }
}

/// Inputs deep enough to overflow a recursive implementation on a test thread's
/// 2 MiB stack: a long RUN chain, a long chain of stages, deeply nested `${}`.
#[test]
fn deep_inputs_compile_without_overflowing_the_stack() {
    let mut chain = String::from("FROM scratch\n");
    for i in 0..10_000 {
        chain.push_str(&format!("RUN echo {i}\n"));
    }
    let mut stages = String::from("FROM scratch AS s0\n");
    for i in 1..3_000 {
        stages.push_str(&format!("FROM s{} AS s{i}\nRUN true\n", i - 1));
    }
    let nested = format!("FROM scratch\nENV A={}y{}\n", "${X:-".repeat(10_000), "}".repeat(10_000));
    for (name, text) in [("chain", chain), ("stages", stages), ("nested", nested)] {
        let response = kiln_dockerfile::compile(&request(text.into_bytes()), &OfflineHost);
        // Only check warnings (`${X:-…}` uses X, never set: UndefinedVar, as in BuildKit).
        let not_checks: Vec<_> = response
            .diagnostics
            .iter()
            .filter(|d| !d.code.starts_with(kiln_dockerfile::LINT))
            .collect();
        assert!(not_checks.is_empty(), "{name}: {:?}", not_checks.first());
        assert!(response.definition.is_some(), "{name}");
    }
}
