//! The `kiln-frontend-recipe` program answers a request over the frontend
//! protocol with the same LLB as the library.

use std::io::BufReader;
use std::process::{Command, Stdio};

use kiln_frontend::{OfflineHost, Platform, Request};
use prost::Message;

#[test]
fn the_binary_compiles_a_recipe_over_stdio() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln-frontend-recipe"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starts");
    let mut to = child.stdin.take().expect("stdin");
    let mut from = BufReader::new(child.stdout.take().expect("stdout"));
    let request = Request {
        definition: b"# syntax=recipe\nstages:\n  main:\n    from: busybox\n    steps:\n      - run: echo hi\n".to_vec(),
        filename: "recipe.yaml".into(),
        build_platform: Platform::linux_amd64(),
        multi_platform: false,
        ..Default::default()
    };
    let response = kiln_frontend_stdio::run(&mut to, &mut from, &request, &OfflineHost, None, |_| {}).expect("response");
    drop(to);
    assert!(child.wait().expect("exits").success());
    let direct = kiln_recipe::compile(&request, &OfflineHost);
    assert_eq!(
        response.definition.expect("definition").encode_to_vec(),
        direct.definition.expect("definition").encode_to_vec()
    );
}
