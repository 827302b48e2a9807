//! The recipe frontend: recipes and the Dockerfiles that say the same thing
//! give the same ops byte for byte; errors point at YAML lines and columns.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test helper that panics fails its test with the message"
)]

use std::path::Path;

use kiln_frontend::{Host, HostError, ImageConfig, OfflineHost, Platform, Request, ResolvedImage, Response};

fn request(file: &str, text: &str) -> Request {
    Request {
        definition: text.as_bytes().to_vec(),
        filename: file.into(),
        build_platform: Platform::linux_amd64(),
        multi_platform: false,
        ..Default::default()
    }
}

/// Resolves every image to a pinned digest with a config, as a registry would.
struct Pinning;

impl Host for Pinning {
    fn resolve_image(&self, reference: &str, _: &Platform) -> Result<Option<ResolvedImage>, HostError> {
        let mut config = ImageConfig::default();
        config.set_env("PATH", "/usr/bin:/bin");
        config.config.working_dir = "/".into();
        Ok(Some(ResolvedImage {
            reference: format!("{reference}@sha256:{}", "b".repeat(64)),
            config,
        }))
    }
}

fn ops(r: &Response) -> Vec<Vec<u8>> {
    assert!(!r.has_errors(), "{:?}", r.diagnostics);
    r.definition.as_ref().expect("definition").def.clone()
}

#[test]
fn each_recipe_gives_the_ops_of_its_dockerfile() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pairs");
    let mut pairs = 0;
    for entry in std::fs::read_dir(&dir).expect("pairs") {
        let yaml = entry.expect("entry").path();
        if yaml.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let dockerfile = yaml.with_extension("Dockerfile");
        let recipe_text = std::fs::read_to_string(&yaml).expect("yaml");
        let dockerfile_text = std::fs::read_to_string(&dockerfile).expect("Dockerfile");
        for host in [&OfflineHost as &dyn Host, &Pinning] {
            for target in [None, Some("build"), Some("main"), Some("a")] {
                let mut rr = request("recipe.yaml", &recipe_text);
                let mut dr = request("Dockerfile", &dockerfile_text);
                if let Some(t) = target {
                    if !recipe_text.contains(&format!("\n  {t}:\n")) {
                        continue;
                    }
                    rr.target = Some(t.into());
                    dr.target = Some(t.into());
                }
                let from_recipe = kiln_recipe::compile(&rr, host);
                let from_dockerfile = kiln_dockerfile::compile(&dr, host);
                assert_eq!(ops(&from_recipe), ops(&from_dockerfile), "{} (target {target:?})", yaml.display());
                assert_eq!(
                    serde_json::to_value(from_recipe.image_config.as_ref().map(|c| &c.config)).expect("json"),
                    serde_json::to_value(from_dockerfile.image_config.as_ref().map(|c| &c.config)).expect("json"),
                    "{}: image config",
                    yaml.display()
                );
            }
        }
        pairs += 1;
    }
    assert!(pairs >= 3, "only {pairs} pairs");
}

#[test]
fn independent_stages_are_independent_branches() {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pairs/parallel.yaml")).expect("yaml");
    let r = kiln_recipe::compile(&request("recipe.yaml", &text), &OfflineHost);
    let def = kiln_llb::LoadedDefinition::from_definition(r.definition.expect("definition")).expect("loads");
    let execs: Vec<_> = def
        .ops
        .iter()
        .filter(|o| matches!(o.op.op, Some(kiln_llb::pb::op::Op::Exec(_))))
        .collect();
    assert_eq!(execs.len(), 2);
    // Neither RUN depends on the other: both read only the base image.
    let digests: Vec<String> = execs.iter().map(|o| o.digest.as_str().to_string()).collect();
    for e in &execs {
        assert!(e.op.inputs.iter().all(|i| !digests.contains(&i.digest)));
    }
}

#[test]
fn the_source_map_points_at_yaml_lines() {
    let text = "stages:\n  main:\n    from: busybox\n    steps:\n      - run: echo one\n      - run: echo two\n";
    let r = kiln_recipe::compile(&request("recipe.yaml", text), &OfflineHost);
    let def = r.definition.expect("definition");
    let source = def.source.expect("source map");
    assert_eq!(source.infos[0].filename, "recipe.yaml");
    assert_eq!(source.infos[0].language, "YAML");
    let mut lines: Vec<i32> = source
        .locations
        .values()
        .flat_map(|l| {
            l.locations
                .iter()
                .flat_map(|l| l.ranges.iter().filter_map(|r| r.start.as_ref().map(|p| p.line)))
        })
        .collect();
    lines.sort();
    lines.dedup();
    assert_eq!(lines, [3, 5, 6], "FROM at `from:`, each RUN at its step");
}

/// Diagnostics as `line:column code: message (help)`.
fn errors(text: &str) -> String {
    let r = kiln_recipe::compile(&request("recipe.yaml", text), &OfflineHost);
    assert!(r.has_errors(), "expected errors");
    r.diagnostics
        .iter()
        .map(|d| {
            let (l, c) = d.line_column(text);
            let help = d.help.as_ref().map(|h| format!(" ({h})")).unwrap_or_default();
            format!("{l}:{c} [{}] {}: {}{help}", &text[d.offset..d.offset + d.length], d.code, d.message)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn settings() -> insta::Settings {
    let mut s = insta::Settings::clone_current();
    s.set_snapshot_path(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../snapshots/recipe"));
    s.set_prepend_module_to_snapshot(false);
    s
}

#[test]
fn errors_point_at_yaml_lines_and_columns() {
    let cases = [
        ("unknown-key", "stages:\n  main:\n    from: busybox\n    steps:\n      - rnu: make\n"),
        ("unknown-stage-key", "stages:\n  main:\n    form: busybox\n"),
        ("wrong-type", "stages:\n  main:\n    from: busybox\n    steps:\n      - run: make\n        mounts: /cache\n"),
        ("unknown-stage", "stages:\n  build:\n    from: busybox\n  main:\n    from: scratch\n    steps:\n      - copy: /x\n        from: biuld\n        to: /\n"),
        ("cycle", "stages:\n  a:\n    from: b\n  b:\n    from: a\n"),
        ("unknown-target", "stages:\n  build:\n    from: busybox\ntarget: biuld\n"),
        ("two-kinds", "stages:\n  main:\n    from: busybox\n    steps:\n      - run: make\n        workdir: /x\n"),
        ("misplaced", "stages:\n  main:\n    from: busybox\n    steps:\n      - workdir: /x\n        to: /y\n"),
        ("syntax", "stages:\n  main:\n    from: [busybox\n"),
        ("lowering", "stages:\n  main:\n    from: busybox\n    steps:\n      - workdir: ${DIR:?is not set}\n"),
        ("bad-network", "stages:\n  main:\n    from: busybox\n    steps:\n      - run: make\n        network: moon\n"),
        ("bad-chmod", "stages:\n  main:\n    from: busybox\n    steps:\n      - copy: a\n        to: /a\n        chmod: \"0999\"\n"),
        ("bad-platform", "stages:\n  main:\n    from: busybox\n    platform: linux\n"),
    ];
    let all: Vec<String> = cases.iter().map(|(name, text)| format!("--- {name}\n{}", errors(text))).collect();
    settings().bind(|| insta::assert_snapshot!("errors", all.join("\n")));
}

/// The ops of a compiled recipe: (exec argv, mkdir paths) in order.
fn execs_and_mkdirs(text: &str) -> (Vec<Vec<String>>, Vec<String>) {
    let r = kiln_recipe::compile(&request("recipe.yaml", text), &OfflineHost);
    assert!(!r.has_errors(), "{:?}", r.diagnostics);
    let def = kiln_llb::LoadedDefinition::from_definition(r.definition.expect("definition")).expect("loads");
    let (mut execs, mut mkdirs) = (Vec::new(), Vec::new());
    for op in &def.ops {
        match &op.op.op {
            Some(kiln_llb::pb::op::Op::Exec(e)) => execs.push(e.meta.as_ref().map(|m| m.args.clone()).unwrap_or_default()),
            Some(kiln_llb::pb::op::Op::File(f)) => {
                for a in &f.actions {
                    if let Some(kiln_llb::pb::file_action::Action::Mkdir(m)) = &a.action {
                        mkdirs.push(m.path.clone());
                    }
                }
            }
            _ => {}
        }
    }
    (execs, mkdirs)
}

/// Values are values: nothing in one becomes an instruction, and no value
/// swallows the next step (the recipe was once lowered through Dockerfile text).
#[test]
fn a_value_never_becomes_or_swallows_a_step() {
    let newline = "stages:\n  main:\n    from: busybox\n    steps:\n      - workdir: \"/a\\nRUN touch /injected\"\n      - run: echo hi\n";
    let (execs, mkdirs) = execs_and_mkdirs(newline);
    assert_eq!(mkdirs, ["/a\nRUN touch /injected"], "one literal WORKDIR");
    assert_eq!(
        execs,
        [vec!["/bin/sh".to_string(), "-c".into(), "echo hi".into()]],
        "only the RUN runs"
    );

    let backslash = "stages:\n  main:\n    from: busybox\n    steps:\n      - workdir: 'C:\\'\n      - run: echo hi\n";
    let (execs, mkdirs) = execs_and_mkdirs(backslash);
    assert_eq!(mkdirs.len(), 1, "one WORKDIR: {mkdirs:?}");
    assert!(mkdirs[0].starts_with("/C:"), "{mkdirs:?}");
    assert_eq!(
        execs,
        [vec!["/bin/sh".to_string(), "-c".into(), "echo hi".into()]],
        "the RUN is its own step"
    );

    // Quotes, commas and `#` in env and mount values stay in the value.
    let odd = "stages:\n  main:\n    from: busybox\n    steps:\n      - env:\n          A: 'x\" RUN y'\n      - run: echo $A\n        mounts:\n          - cache: /c,d\n            id: 'a,b'\n";
    let (execs, _) = execs_and_mkdirs(odd);
    assert_eq!(execs.len(), 1, "{execs:?}");
}
