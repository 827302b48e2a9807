//! `recipe.schema.json` agrees with the frontend: the example recipes are
//! valid, and recipes the frontend refuses for their shape are invalid.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test helper that panics fails its test with the message"
)]

use std::path::Path;

fn validator() -> jsonschema::Validator {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("recipe.schema.json")).expect("schema");
    let schema: serde_json::Value = serde_json::from_str(&text).expect("the schema is JSON");
    jsonschema::validator_for(&schema).expect("the schema is a valid JSON Schema")
}

fn as_json(yaml: &str) -> serde_json::Value {
    kiln_recipe::yaml::to_json(yaml).expect("YAML")
}

#[test]
fn the_example_recipes_are_valid() {
    let v = validator();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pairs");
    let mut n = 0;
    for e in std::fs::read_dir(dir).expect("pairs") {
        let p = e.expect("entry").path();
        if p.extension().and_then(|x| x.to_str()) == Some("yaml") {
            let doc = as_json(&std::fs::read_to_string(&p).expect("read"));
            let errors: Vec<String> = v.iter_errors(&doc).map(|e| format!("{} at {}", e, e.instance_path())).collect();
            assert!(errors.is_empty(), "{}: {errors:?}", p.display());
            n += 1;
        }
    }
    assert!(n >= 3);
}

#[test]
fn recipes_of_the_wrong_shape_are_invalid_for_schema_and_frontend_alike() {
    let v = validator();
    for bad in [
        "stages:\n  main:\n    from: busybox\n    steps:\n      - rnu: make\n",
        "stages:\n  main:\n    form: busybox\n",
        "stages:\n  main:\n    from: busybox\n    steps:\n      - run: make\n        workdir: /x\n",
        "stages:\n  main:\n    from: busybox\n    steps:\n      - workdir: /x\n        to: /y\n",
        "stages:\n  main:\n    from: busybox\n    steps:\n      - copy: x\n",
        "stages:\n  main:\n    from: busybox\n    steps:\n      - run: make\n        mounts: [{cache: /a, tmpfs: /b}]\n",
        "stages:\n  Main:\n    from: busybox\n",
    ] {
        assert!(!v.is_valid(&as_json(bad)), "the schema accepts:\n{bad}");
        let request = kiln_frontend::Request {
            definition: bad.as_bytes().to_vec(),
            filename: "recipe.yaml".into(),
            build_platform: kiln_frontend::Platform::linux_amd64(),
            multi_platform: false,
            ..Default::default()
        };
        assert!(
            kiln_recipe::compile(&request, &kiln_frontend::OfflineHost).has_errors(),
            "the frontend accepts:\n{bad}"
        );
    }
}

#[test]
fn the_readme_example_is_valid_and_compiles() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).expect("README");
    let example = readme
        .split("```yaml\n")
        .nth(1)
        .and_then(|r| r.split("```").next())
        .expect("a yaml block");
    let errors: Vec<String> = validator().iter_errors(&as_json(example)).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{errors:?}");
    let request = kiln_frontend::Request {
        definition: example.as_bytes().to_vec(),
        filename: "recipe.yaml".into(),
        build_platform: kiln_frontend::Platform::linux_amd64(),
        multi_platform: false,
        ..Default::default()
    };
    let r = kiln_recipe::compile(&request, &kiln_frontend::OfflineHost);
    assert!(!r.has_errors(), "{:?}", r.diagnostics);
    let config = r.image_config.expect("config");
    assert_eq!(config.config.entrypoint, Some(vec!["/app".to_string()]));
    assert_eq!(config.config.user, "65532");
}
