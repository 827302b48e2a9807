//! Generates the LLB wire types from `proto/ops.proto` with prost.
//!
//! The proto is compiled in pure Rust (protox), so no `protoc` is needed. Every
//! map becomes a `BTreeMap` (sorted keys make marshalling deterministic), and
//! serde attributes are derived from the descriptor so the JSON form matches
//! what `buildctl debug dump-llb` prints: proto field names, zero values
//! omitted, enums as numbers, bytes as base64.

use prost_build::Config;
use protox::prost_reflect::prost_types::field_descriptor_proto::{Label, Type};
use protox::prost_reflect::prost_types::{DescriptorProto, FieldDescriptorProto};

/// Messages whose JSON form is written by hand in `src/json.rs`.
const CUSTOM_JSON: &[&str] = &["pb.Op", "pb.FileAction", "pb.UserOpt"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/ops.proto");
    let fds = protox::compile(["proto/ops.proto"], ["proto"])?;
    let mut config = Config::new();
    config.btree_map(["."]);
    for file in &fds.file {
        let package = file.package();
        for message in &file.message_type {
            annotate(&mut config, package, message);
        }
    }
    config.enum_attribute(
        ".pb.Op.op",
        "#[derive(serde::Serialize, serde::Deserialize)] #[serde(rename_all = \"lowercase\")]",
    );
    config.enum_attribute(
        ".pb.FileAction.action",
        "#[derive(serde::Serialize, serde::Deserialize)] #[serde(rename_all = \"lowercase\")]",
    );
    config.enum_attribute(
        ".pb.UserOpt.user",
        "#[derive(serde::Serialize, serde::Deserialize)] #[serde(rename_all = \"camelCase\")]",
    );
    config.compile_fds(fds)?;
    Ok(())
}

fn annotate(config: &mut Config, package: &str, message: &DescriptorProto) {
    let name = format!("{package}.{}", message.name());
    if !CUSTOM_JSON.contains(&name.as_str()) {
        config.message_attribute(
            format!(".{name}"),
            "#[derive(serde::Serialize, serde::Deserialize)] #[serde(default)]",
        );
    }
    if CUSTOM_JSON.contains(&name.as_str()) {
        return;
    }
    for field in &message.field {
        config.field_attribute(format!(".{name}.{}", field.name()), field_serde(field));
    }
}

fn field_serde(field: &FieldDescriptorProto) -> String {
    let mut attrs = vec![
        format!("rename = \"{}\"", field.name()),
        "skip_serializing_if = \"crate::json::is_default\"".to_string(),
    ];
    if field.r#type() == Type::Bytes {
        if field.label() == Label::Repeated {
            attrs.push("with = \"crate::json::base64_list\"".into());
        } else {
            attrs.push("with = \"crate::json::base64_bytes\"".into());
        }
    }
    format!("#[serde({})]", attrs.join(", "))
}
