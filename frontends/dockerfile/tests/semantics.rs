//! Variable semantics checked on the compiled result: what RUN sees and
//! what the image config records.

use kiln_frontend::{OfflineHost, Platform, Request};

fn compile(text: &str) -> kiln_frontend::Response {
    let request = Request {
        definition: text.as_bytes().to_vec(),
        filename: "Dockerfile".into(),
        build_platform: Platform::linux_amd64(),
        multi_platform: false,
        ..Default::default()
    };
    let response = kiln_dockerfile::compile(&request, &OfflineHost);
    assert!(response.diagnostics.is_empty(), "{:?}", response.diagnostics);
    response
}

#[test]
fn env_values_use_the_variables_from_before_the_instruction() {
    let r = compile("FROM scratch\nENV a=old\nENV a=new b=$a\n");
    let env = r.image_config.expect("config").config.env;
    assert!(env.contains(&"a=new".to_string()), "{env:?}");
    assert!(env.contains(&"b=old".to_string()), "{env:?}");
}

#[test]
fn env_wins_over_arg_and_args_reach_run_but_not_the_image() {
    let r = compile("FROM alpine\nARG V=from-arg\nARG ONLY=arg-value\nENV V=from-env\nRUN echo $V\nLABEL v=$V only=$ONLY\n");
    let config = r.image_config.expect("config");
    assert_eq!(config.config.labels.get("v").map(String::as_str), Some("from-env"));
    assert_eq!(config.config.labels.get("only").map(String::as_str), Some("arg-value"));
    assert!(!config.config.env.iter().any(|e| e.starts_with("ONLY=")));
    let def = r.definition.expect("llb");
    let exec_env: Vec<String> = def
        .def
        .iter()
        .filter_map(|bytes| <kiln_llb::pb::Op as prost::Message>::decode(bytes.as_slice()).ok())
        .filter_map(|op| match op.op {
            Some(kiln_llb::pb::op::Op::Exec(e)) => e.meta.map(|m| m.env),
            _ => None,
        })
        .flatten()
        .collect();
    assert!(exec_env.contains(&"V=from-env".to_string()), "{exec_env:?}");
    assert!(exec_env.contains(&"ONLY=arg-value".to_string()), "{exec_env:?}");
    assert!(!exec_env.contains(&"V=from-arg".to_string()), "{exec_env:?}");
}

#[test]
fn a_forced_network_mode_is_the_default_that_run_network_default_keeps() {
    let text = "FROM alpine\nRUN a\nRUN --network=default b\nRUN --network=none c\n";
    let request = Request {
        definition: text.as_bytes().to_vec(),
        filename: "Dockerfile".into(),
        build_platform: Platform::linux_amd64(),
        multi_platform: false,
        network: Some("host".into()),
        ..Default::default()
    };
    let response = kiln_dockerfile::compile(&request, &OfflineHost);
    assert!(response.diagnostics.is_empty(), "{:?}", response.diagnostics);
    let def = response.definition.expect("llb");
    let mut modes: Vec<(String, i32)> = def
        .def
        .iter()
        .filter_map(|bytes| <kiln_llb::pb::Op as prost::Message>::decode(bytes.as_slice()).ok())
        .filter_map(|op| match op.op {
            Some(kiln_llb::pb::op::Op::Exec(e)) => Some((e.meta.map(|m| m.args.join(" ")).unwrap_or_default(), e.network)),
            _ => None,
        })
        .collect();
    modes.sort();
    let host = kiln_llb::pb::NetMode::Host as i32;
    let none = kiln_llb::pb::NetMode::None as i32;
    assert_eq!(
        modes,
        [
            ("/bin/sh -c a".to_string(), host),
            ("/bin/sh -c b".to_string(), host),
            ("/bin/sh -c c".to_string(), none)
        ]
    );
}
