//! The JSON form of LLB, as `buildctl debug dump-llb` prints it.
//!
//! One object per op and line: `{"Op":…,"Digest":"sha256:…","OpMetadata":…}`.
//! Field names are the proto names, zero values are left out, enums are
//! numbers and bytes are base64, like Go's `encoding/json` over BuildKit's
//! generated types. `<`, `>` and `&` are escaped as Go does, so lines compare
//! byte for byte with BuildKit's.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::marshal::Digest;
use crate::pb;

/// Whether a field holds its zero value (Go's `omitempty`).
pub fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// serde adapter: `bytes` as base64 text.
pub mod base64_bytes {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes bytes as standard base64.
    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    /// Reads standard base64 (null reads as empty).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text.unwrap_or_default())
            .map_err(serde::de::Error::custom)
    }
}

/// serde adapter: `repeated bytes` as a list of base64 texts.
pub mod base64_list {
    use base64::Engine as _;
    use serde::ser::SerializeSeq;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes each element as standard base64.
    pub fn serialize<S: Serializer>(list: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(list.len()))?;
        for bytes in list {
            seq.serialize_element(&base64::engine::general_purpose::STANDARD.encode(bytes))?;
        }
        seq.end()
    }

    /// Reads a list of standard base64 texts.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        let texts: Option<Vec<String>> = Option::deserialize(d)?;
        texts
            .unwrap_or_default()
            .iter()
            .map(|t| {
                base64::engine::general_purpose::STANDARD
                    .decode(t)
                    .map_err(serde::de::Error::custom)
            })
            .collect()
    }
}

/// Go's `jsonOp`: the oneof sits between inputs and platform and is always printed.
#[derive(Serialize, Deserialize, Default)]
struct OpJson<T> {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    inputs: Vec<pb::Input>,
    #[serde(rename = "Op", default)]
    op: T,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    platform: Option<pb::Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    constraints: Option<pb::WorkerConstraints>,
}

/// The oneof as an object with at most one key (`{}` for the terminator).
#[derive(Serialize, Deserialize, Default)]
struct OneofJson {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exec: Option<pb::ExecOp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source: Option<pb::SourceOp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    file: Option<pb::FileOp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    build: Option<pb::BuildOp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    merge: Option<pb::MergeOp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    diff: Option<pb::DiffOp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    passthrough: Option<pb::PassthroughOp>,
}

impl Serialize for pb::Op {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use pb::op::Op as O;
        let mut oneof = OneofJson::default();
        match &self.op {
            Some(O::Exec(v)) => oneof.exec = Some(v.clone()),
            Some(O::Source(v)) => oneof.source = Some(v.clone()),
            Some(O::File(v)) => oneof.file = Some(v.clone()),
            Some(O::Build(v)) => oneof.build = Some(v.clone()),
            Some(O::Merge(v)) => oneof.merge = Some(v.clone()),
            Some(O::Diff(v)) => oneof.diff = Some(*v),
            Some(O::Passthrough(v)) => oneof.passthrough = Some(v.clone()),
            None => {}
        }
        OpJson {
            inputs: self.inputs.clone(),
            op: oneof,
            platform: self.platform.clone(),
            constraints: self.constraints.clone(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for pb::Op {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use pb::op::Op as O;
        let json = OpJson::<OneofJson>::deserialize(d)?;
        let o = json.op;
        let op = o
            .exec
            .map(O::Exec)
            .or(o.source.map(O::Source))
            .or(o.file.map(O::File))
            .or(o.build.map(O::Build))
            .or(o.merge.map(O::Merge))
            .or(o.diff.map(O::Diff))
            .or(o.passthrough.map(O::Passthrough));
        Ok(pb::Op {
            inputs: json.inputs,
            op,
            platform: json.platform,
            constraints: json.constraints,
        })
    }
}

/// One line of `dump-llb` output.
#[derive(Serialize, Deserialize)]
pub struct DumpLine {
    /// The decoded op.
    #[serde(rename = "Op")]
    pub op: pb::Op,
    /// Its digest.
    #[serde(rename = "Digest")]
    pub digest: String,
    /// Its metadata, if the Definition has any for it.
    #[serde(rename = "OpMetadata")]
    pub metadata: Option<pb::OpMetadata>,
}

/// Renders one op as a `dump-llb` JSON line (without the newline).
pub fn dump_line(op: &pb::Op, digest: &Digest, metadata: Option<&pb::OpMetadata>) -> String {
    #[derive(Serialize)]
    struct Line<'a> {
        #[serde(rename = "Op")]
        op: &'a pb::Op,
        #[serde(rename = "Digest")]
        digest: &'a str,
        #[serde(rename = "OpMetadata")]
        metadata: Option<&'a pb::OpMetadata>,
    }
    let line = Line {
        op,
        digest: digest.as_str(),
        metadata,
    };
    go_escape(&serde_json::to_string(&line).unwrap_or_default())
}

/// Parses one `dump-llb` JSON line.
pub fn parse_line(line: &str) -> Result<DumpLine, serde_json::Error> {
    serde_json::from_str(line)
}

/// Escapes `<`, `>`, `&`, U+2028 and U+2029 as Go's encoder does. They can only
/// occur inside JSON strings, so a plain replacement is exact.
fn go_escape(json: &str) -> String {
    if !json.contains(['<', '>', '&', '\u{2028}', '\u{2029}']) {
        return json.to_string();
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

/// Go's `jsonFileAction`: indexes always printed, then the action object.
#[derive(Serialize, Deserialize)]
struct FileActionJson {
    #[serde(default)]
    input: i64,
    #[serde(rename = "secondaryInput", default)]
    secondary_input: i64,
    #[serde(default)]
    output: i64,
    #[serde(rename = "Action", default, with = "oneof_object")]
    action: Option<pb::file_action::Action>,
}

impl Serialize for pb::FileAction {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        FileActionJson {
            input: self.input,
            secondary_input: self.secondary_input,
            output: self.output,
            action: self.action.clone(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for pb::FileAction {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let j = FileActionJson::deserialize(d)?;
        Ok(pb::FileAction {
            input: j.input,
            secondary_input: j.secondary_input,
            output: j.output,
            action: j.action,
        })
    }
}

/// Go's `jsonUserOpt`: `{"User":{"byName":…}}` or `{"User":{"byId":N}}`.
#[derive(Serialize, Deserialize)]
struct UserOptJson {
    #[serde(rename = "User", default, with = "oneof_object")]
    user: Option<pb::user_opt::User>,
}

impl Serialize for pb::UserOpt {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        UserOptJson { user: self.user.clone() }.serialize(s)
    }
}

impl<'de> Deserialize<'de> for pb::UserOpt {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(pb::UserOpt {
            user: UserOptJson::deserialize(d)?.user,
        })
    }
}

/// A oneof as a JSON object with one key, or `{}` when unset.
mod oneof_object {
    use serde::de::DeserializeOwned;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<T: Serialize, S: Serializer>(value: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(v) => v.serialize(s),
            None => serde_json::Map::new().serialize(s),
        }
    }

    pub(super) fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(d: D) -> Result<Option<T>, D::Error> {
        let value = Option::<serde_json::Value>::deserialize(d)?;
        match value {
            None => Ok(None),
            Some(serde_json::Value::Object(map)) if map.is_empty() => Ok(None),
            Some(v) => serde_json::from_value(v).map(Some).map_err(serde::de::Error::custom),
        }
    }
}
