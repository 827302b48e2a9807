//! Graphviz rendering of a Definition.

use std::fmt::Write as _;

use crate::definition::LoadedDefinition;
use crate::pb;

/// Renders the DAG: nodes labelled with the op's progress name (or a summary),
/// edges labelled with the mount point they are mounted at.
pub fn to_dot(def: &LoadedDefinition) -> String {
    let mut out = String::from("digraph llb {\n  rankdir=BT;\n  node [fontname=\"monospace\"];\n");
    let last = def.ops.len().saturating_sub(1);
    for (i, op) in def.ops.iter().enumerate() {
        if i == last {
            continue;
        }
        let (summary, shape) = summarise(&op.op);
        let label = match def.metadata_of(&op.digest).and_then(|m| m.description.get("llb.customname")) {
            Some(name) => name.clone(),
            None => summary,
        };
        let _ = writeln!(
            out,
            "  {} [label={} shape={}];",
            quote(op.digest.as_str()),
            quote(&shorten(&label, 80)),
            shape
        );
    }
    for (i, op) in def.ops.iter().enumerate() {
        if i == last {
            continue;
        }
        for (index, input) in op.op.inputs.iter().enumerate() {
            let _ = writeln!(
                out,
                "  {} -> {} [label={}];",
                quote(&input.digest),
                quote(op.digest.as_str()),
                quote(&edge_label(&op.op, index))
            );
        }
    }
    out.push_str("}\n");
    out
}

fn edge_label(op: &pb::Op, index: usize) -> String {
    match &op.op {
        Some(pb::op::Op::Exec(exec)) => exec
            .mounts
            .iter()
            .filter(|m| m.input == index as i64)
            .map(|m| m.dest.clone())
            .collect::<Vec<_>>()
            .join(","),
        Some(pb::op::Op::File(file)) => {
            let mut roles = Vec::new();
            for a in &file.actions {
                if a.input == index as i64 {
                    roles.push("target");
                }
                if a.secondary_input == index as i64 {
                    roles.push("source");
                }
            }
            roles.dedup();
            roles.join(",")
        }
        _ => String::new(),
    }
}

fn summarise(op: &pb::Op) -> (String, &'static str) {
    use pb::file_action::Action;
    match &op.op {
        Some(pb::op::Op::Source(s)) => (s.identifier.clone(), "ellipse"),
        Some(pb::op::Op::Exec(e)) => (e.meta.as_ref().map(|m| m.args.join(" ")).unwrap_or_default(), "box"),
        Some(pb::op::Op::Build(_)) => ("build".into(), "box3d"),
        Some(pb::op::Op::Merge(_)) => ("merge".into(), "invtriangle"),
        Some(pb::op::Op::Diff(_)) => ("diff".into(), "doublecircle"),
        Some(pb::op::Op::Passthrough(p)) => (format!("passthrough {}", p.id), "box"),
        Some(pb::op::Op::File(f)) => {
            let names: Vec<String> = f
                .actions
                .iter()
                .map(|a| match &a.action {
                    Some(Action::Copy(c)) => format!("copy{{src={}, dest={}}}", c.src, c.dest),
                    Some(Action::Mkfile(m)) => format!("mkfile{{path={}}}", m.path),
                    Some(Action::Mkdir(m)) => format!("mkdir{{path={}}}", m.path),
                    Some(Action::Rm(r)) => format!("rm{{path={}}}", r.path),
                    Some(Action::Symlink(s)) => {
                        format!("symlink{{{} -> {}}}", s.newpath, s.oldpath)
                    }
                    None => "unknown".into(),
                })
                .collect();
            (names.join(", "), "note")
        }
        None => ("result".into(), "plaintext"),
    }
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut t: String = s.chars().take(max - 1).collect();
    t.push('…');
    t
}

/// A Graphviz quoted string.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
