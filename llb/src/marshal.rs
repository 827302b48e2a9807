//! Deterministic marshalling of ops and their digests.
//!
//! Bytes match Go's deterministic protobuf encoding as BuildKit uses it:
//! fields in tag order (prost's derive sorts them) except that a oneof comes
//! last, map entries sorted by key
//! and, unlike prost's default, written with both key and value even when they
//! are empty, as Go's map codec does.

use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::fmt;

use crate::pb;

/// A content digest, `sha256:<hex>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Digest(String);

impl Digest {
    /// Wraps a digest string as found in `Input.digest` (not validated).
    pub fn from_string(s: impl Into<String>) -> Digest {
        Digest(s.into())
    }

    /// The `sha256:<hex>` text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The `sha256:<hex>` text, owned.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `sha256:` + hex of `bytes`: the identity of a marshalled op.
pub fn digest_of(bytes: &[u8]) -> Digest {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let sum = Sha256::digest(bytes);
    let mut text = String::with_capacity(7 + 64);
    text.push_str("sha256:");
    for b in sum {
        text.push(HEX[usize::from(b >> 4)] as char);
        text.push(HEX[usize::from(b & 0xf)] as char);
    }
    Digest(text)
}

/// Marshals an op exactly as BuildKit's Go client does.
///
/// Go's protobuf runtime writes a message's ordinary fields in tag order and
/// its oneof last, so an Op is `inputs, platform, constraints, op`.
pub fn marshal_op(op: &pb::Op) -> Vec<u8> {
    marshal_op_with_inputs(op, &op.inputs)
}

/// Marshals `op` as if its `inputs` were `inputs` (the op's own are ignored),
/// so a graph builder need not copy an op to fill in its input digests.
pub fn marshal_op_with_inputs(op: &pb::Op, inputs: &[pb::Input]) -> Vec<u8> {
    use pb::op::Op as O;
    use prost::encoding::message::encoded_len;
    // The exact size up front: definitions keep these bytes, so no growth
    // copies and no slack.
    let source = match &op.op {
        Some(O::Source(v)) => Some(marshal_source(v)),
        _ => None,
    };
    let body = match &op.op {
        Some(O::Exec(v)) => encoded_len(2, v),
        Some(O::Source(_)) => {
            let len = source.as_ref().map_or(0, Vec::len);
            1 + encoded_len_varint(len as u64) + len
        }
        Some(O::File(v)) => encoded_len(4, v),
        Some(O::Build(v)) => encoded_len(5, v),
        Some(O::Merge(v)) => encoded_len(6, v),
        Some(O::Diff(v)) => encoded_len(7, v),
        Some(O::Passthrough(v)) => encoded_len(8, v),
        None => 0,
    };
    let size = inputs.iter().map(|i| encoded_len(1, i)).sum::<usize>()
        + op.platform.as_ref().map_or(0, |p| encoded_len(10, p))
        + op.constraints.as_ref().map_or(0, |c| encoded_len(11, c))
        + body;
    let mut buf = Vec::with_capacity(size);
    for input in inputs {
        prost::encoding::message::encode(1, input, &mut buf);
    }
    if let Some(platform) = &op.platform {
        prost::encoding::message::encode(10, platform, &mut buf);
    }
    if let Some(constraints) = &op.constraints {
        prost::encoding::message::encode(11, constraints, &mut buf);
    }
    match &op.op {
        Some(O::Exec(v)) => prost::encoding::message::encode(2, v, &mut buf),
        Some(O::Source(_)) => {
            let body = source.unwrap_or_default();
            encode_key(3, WireType::LengthDelimited, &mut buf);
            encode_varint(body.len() as u64, &mut buf);
            buf.extend_from_slice(&body);
        }
        Some(O::File(v)) => prost::encoding::message::encode(4, v, &mut buf),
        Some(O::Build(v)) => prost::encoding::message::encode(5, v, &mut buf),
        Some(O::Merge(v)) => prost::encoding::message::encode(6, v, &mut buf),
        Some(O::Diff(v)) => prost::encoding::message::encode(7, v, &mut buf),
        Some(O::Passthrough(v)) => prost::encoding::message::encode(8, v, &mut buf),
        None => {}
    }
    debug_assert_eq!(buf.len(), size);
    buf
}

/// Encodes a Definition exactly as `prost::Message::encode_to_vec` does, but
/// sizes each op's metadata once: prost's map codec measures every value
/// again for its entry and once more for the value itself.
pub fn encode_definition(def: &pb::Definition) -> Vec<u8> {
    use prost::encoding::{key_len, string};
    use prost::Message as _;
    let empty = pb::OpMetadata::default();
    // (key bytes on the wire, value length or None when prost skips it).
    let entries: Vec<(usize, Option<usize>)> = def
        .metadata
        .iter()
        .map(|(k, v)| {
            let key = if k.is_empty() { 0 } else { string::encoded_len(1, k) };
            let value = (*v != empty).then(|| v.encoded_len());
            (key, value)
        })
        .collect();
    let entry_len = |&(key, value): &(usize, Option<usize>)| key + value.map_or(0, |len| key_len(2) + encoded_len_varint(len as u64) + len);
    let source_len = def.source.as_ref().map(|s| s.encoded_len());
    let size = def
        .def
        .iter()
        .map(|d| key_len(1) + encoded_len_varint(d.len() as u64) + d.len())
        .sum::<usize>()
        + entries
            .iter()
            .map(|e| {
                let len = entry_len(e);
                key_len(2) + encoded_len_varint(len as u64) + len
            })
            .sum::<usize>()
        + source_len.map_or(0, |len| key_len(3) + encoded_len_varint(len as u64) + len);
    let mut buf = Vec::with_capacity(size);
    for d in &def.def {
        prost::encoding::bytes::encode(1, d, &mut buf);
    }
    for ((k, v), e) in def.metadata.iter().zip(&entries) {
        encode_key(2, WireType::LengthDelimited, &mut buf);
        encode_varint(entry_len(e) as u64, &mut buf);
        if e.0 > 0 {
            string::encode(1, k, &mut buf);
        }
        if let Some(len) = e.1 {
            encode_key(2, WireType::LengthDelimited, &mut buf);
            encode_varint(len as u64, &mut buf);
            v.encode_raw(&mut buf);
        }
    }
    if let (Some(source), Some(len)) = (&def.source, source_len) {
        encode_key(3, WireType::LengthDelimited, &mut buf);
        encode_varint(len as u64, &mut buf);
        source.encode_raw(&mut buf);
    }
    debug_assert_eq!(buf.len(), size);
    buf
}

fn marshal_source(source: &pb::SourceOp) -> Vec<u8> {
    let mut buf = Vec::new();
    if !source.identifier.is_empty() {
        prost::encoding::string::encode(1, &source.identifier, &mut buf);
    }
    encode_string_map(2, &source.attrs, &mut buf);
    buf
}

/// Writes a `map<string,string>` field with every entry's key and value present.
fn encode_string_map(tag: u32, map: &BTreeMap<String, String>, buf: &mut Vec<u8>) {
    for (k, v) in map {
        let entry_len = 1 + encoded_len_varint(k.len() as u64) + k.len() + 1 + encoded_len_varint(v.len() as u64) + v.len();
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(entry_len as u64, buf);
        encode_key(1, WireType::LengthDelimited, buf);
        encode_varint(k.len() as u64, buf);
        buf.extend_from_slice(k.as_bytes());
        encode_key(2, WireType::LengthDelimited, buf);
        encode_varint(v.len() as u64, buf);
        buf.extend_from_slice(v.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn definitions_encode_as_prost_does() {
        let mut metadata = BTreeMap::new();
        let mut description = BTreeMap::new();
        description.insert("llb.customname".to_string(), "[1/2] RUN x".to_string());
        let mut caps = BTreeMap::new();
        caps.insert("exec.meta.base".to_string(), true);
        metadata.insert(
            "sha256:aa".to_string(),
            pb::OpMetadata {
                description,
                caps,
                ignore_cache: true,
                ..Default::default()
            },
        );
        // prost leaves out a default value and an empty key in a map entry.
        metadata.insert("sha256:bb".to_string(), pb::OpMetadata::default());
        metadata.insert(String::new(), pb::OpMetadata::default());
        let mut locations = BTreeMap::new();
        locations.insert("sha256:aa".to_string(), pb::Locations::default());
        let with_source = pb::Definition {
            def: vec![vec![1, 2, 3], Vec::new(), vec![7; 300]],
            metadata,
            source: Some(pb::Source {
                locations,
                infos: vec![pb::SourceInfo {
                    filename: "Dockerfile".into(),
                    data: b"FROM scratch\n".to_vec(),
                    ..Default::default()
                }],
            }),
        };
        let mut without_source = with_source.clone();
        without_source.source = None;
        for def in [with_source, without_source, pb::Definition::default()] {
            let ours = encode_definition(&def);
            assert_eq!(ours, def.encode_to_vec());
            assert_eq!(pb::Definition::decode(ours.as_slice()).expect("decodes"), def);
        }
    }

    #[test]
    fn empty_attr_values_are_written() {
        let mut attrs = BTreeMap::new();
        attrs.insert("b".to_string(), String::new());
        attrs.insert("a".to_string(), "x".to_string());
        let op = pb::Op {
            op: Some(pb::op::Op::Source(pb::SourceOp {
                identifier: "local://context".into(),
                attrs,
            })),
            ..Default::default()
        };
        let bytes = marshal_op(&op);
        // Decoding gives the same op back, and the "b" entry carries an explicit empty value.
        let back = pb::Op::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(back, op);
        let needle = [0x12, 0x05, 0x0a, 0x01, b'b', 0x12, 0x00];
        assert!(bytes.windows(needle.len()).any(|w| w == needle), "{bytes:?}");
        // "a" sorts before "b".
        let a = bytes.iter().position(|&b| b == b'a').expect("a");
        let b = bytes.iter().rposition(|&b| b == b'b').expect("b");
        assert!(a < b);
    }
}
