//! BuildKit's cache format (`application/vnd.buildkit.cacheconfig.v0`):
//! the config of a cache manifest, listing layer blobs as chains (each
//! names its parent) and cache records (a digest, the records it links
//! from, and the layer its result ends with). Field names and omissions as
//! BuildKit's `cacheimporttypes`, so either tool reads the other's.

use serde::{Deserialize, Serialize};

/// The config's media type.
pub const MEDIA_TYPE: &str = "application/vnd.buildkit.cacheconfig.v0";

/// The largest cache config or manifest read (BuildKit's bound).
pub const MAX_SIZE: usize = 1 << 20;

/// A cache config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheConfig {
    /// Layer blobs, each with its parent's index.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<CacheLayer>,
    /// Cache records.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub records: Vec<CacheRecord>,
}

/// One layer blob of a chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheLayer {
    /// The compressed blob's digest.
    pub blob: String,
    /// The index of the layer below it, -1 for none (0 is omitted, as Go omits it).
    #[serde(default, rename = "parent", skip_serializing_if = "is_zero")]
    pub parent: i64,
    /// Media type, diff id, size and creation time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<LayerAnnotations>,
}

/// What BuildKit notes of a layer in the config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerAnnotations {
    /// The blob's media type.
    #[serde(default, rename = "mediaType", skip_serializing_if = "String::is_empty")]
    pub media_type: String,
    /// The uncompressed tar's digest.
    #[serde(default, rename = "diffID", skip_serializing_if = "String::is_empty")]
    pub diff_id: String,
    /// The blob's size.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: i64,
    /// RFC 3339.
    #[serde(default, rename = "createdAt")]
    pub created_at: String,
}

/// One cache record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheRecord {
    /// Results: the top layer of each.
    #[serde(default, rename = "layers", skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<CacheResult>,
    /// Results given as several chains (BuildKit's merged results).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chains: Vec<ChainedResult>,
    /// The record's cache key digest.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
    /// For each input of the vertex, the records it links from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<Vec<CacheInput>>,
}

/// A result: the index of its top layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheResult {
    /// Index into [`CacheConfig::layers`].
    pub layer: i64,
    /// RFC 3339.
    #[serde(default, rename = "createdAt")]
    pub created_at: String,
}

/// A result made of several chains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChainedResult {
    /// Indexes into [`CacheConfig::layers`].
    pub layers: Vec<i64>,
    /// RFC 3339.
    #[serde(default, rename = "createdAt")]
    pub created_at: String,
}

/// A link from another record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheInput {
    /// What the link selects of the input (a content checksum, for BuildKit).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub selector: String,
    /// Index into [`CacheConfig::records`].
    pub link: i64,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// Whether `s` is a `sha256:` digest of 64 lowercase hex digits.
pub fn is_digest(s: &str) -> bool {
    s.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

impl CacheConfig {
    /// Reads a config: at most [`MAX_SIZE`] bytes, every digest well-formed
    /// and every index in range, layer chains without cycles.
    pub fn parse(bytes: &[u8]) -> Result<CacheConfig, String> {
        if bytes.len() > MAX_SIZE {
            return Err(format!("the cache config is {} bytes, over the {MAX_SIZE} byte limit", bytes.len()));
        }
        let config: CacheConfig = serde_json::from_slice(bytes).map_err(|e| format!("the cache config is not valid: {e}"))?;
        let layers = config.layers.len() as i64;
        for (i, l) in config.layers.iter().enumerate() {
            if !is_digest(&l.blob) {
                return Err(format!("cache layer {i} has blob {:?}, not a sha256 digest", l.blob));
            }
            if l.parent < -1 || l.parent >= layers || l.parent == i as i64 {
                return Err(format!("cache layer {i} has parent {} of {layers}", l.parent));
            }
        }
        for i in 0..config.layers.len() {
            config.chain(i)?;
        }
        let records = config.records.len() as i64;
        for (i, r) in config.records.iter().enumerate() {
            if !r.digest.is_empty() && !is_digest(&r.digest) {
                return Err(format!("cache record {i} has digest {:?}, not a sha256 digest", r.digest));
            }
            let layer_ok = |l: i64| (0..layers).contains(&l);
            if let Some(bad) = r
                .results
                .iter()
                .map(|x| x.layer)
                .chain(r.chains.iter().flat_map(|c| c.layers.iter().copied()))
                .find(|l| !layer_ok(*l))
            {
                return Err(format!("cache record {i} names layer {bad} of {layers}"));
            }
            if let Some(bad) = r.inputs.iter().flatten().map(|x| x.link).find(|l| !(0..records).contains(l)) {
                return Err(format!("cache record {i} links record {bad} of {records}"));
            }
        }
        Ok(config)
    }

    /// The blobs of the chain ending at layer `top`, bottom first. An error
    /// for an index out of range or a cycle.
    pub fn chain(&self, top: usize) -> Result<Vec<&CacheLayer>, String> {
        let mut out = Vec::new();
        let mut at = top as i64;
        while at >= 0 {
            let layer = self
                .layers
                .get(at as usize)
                .ok_or_else(|| format!("cache layer {at} of {} is missing", self.layers.len()))?;
            if out.len() > self.layers.len() {
                return Err(format!("cache layer {top}'s parents form a cycle"));
            }
            out.push(layer);
            at = layer.parent;
        }
        out.reverse();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> String {
        format!("sha256:{}", hex::encode([n; 32]))
    }

    #[test]
    fn go_omissions_are_read_as_go_writes_them() {
        // An absent parent is 0 (omitempty), -1 is written out.
        let text = format!(
            r#"{{"layers":[{{"blob":"{}","parent":-1}},{{"blob":"{}"}}],
                "records":[{{"digest":"{}","layers":[{{"layer":1,"createdAt":"2026-11-28T03:48:47Z"}}]}},{{"digest":"{}","inputs":[[{{"link":0}}]]}}]}}"#,
            digest(1),
            digest(2),
            digest(3),
            digest(4)
        );
        let c = CacheConfig::parse(text.as_bytes()).expect("parses");
        let chain: Vec<&str> = c.chain(1).expect("chain").iter().map(|l| l.blob.as_str()).collect();
        assert_eq!(chain, [digest(1), digest(2)]);
        let again = serde_json::to_string(&c).expect("json");
        assert!(again.contains(r#""parent":-1"#) && !again.contains(r#""parent":0"#), "{again}");
        assert_eq!(CacheConfig::parse(again.as_bytes()).expect("round trip"), c);
    }

    #[test]
    fn bad_configs_are_refused() {
        let cycle = format!(r#"{{"layers":[{{"blob":"{}","parent":1}},{{"blob":"{}"}}]}}"#, digest(1), digest(2));
        assert!(CacheConfig::parse(cycle.as_bytes()).unwrap_err().contains("cycle"));
        let out_of_range = format!(r#"{{"layers":[{{"blob":"{}","parent":7}}]}}"#, digest(1));
        assert!(CacheConfig::parse(out_of_range.as_bytes()).is_err());
        let bad_blob = r#"{"layers":[{"blob":"sha256:zz","parent":-1}]}"#;
        assert!(CacheConfig::parse(bad_blob.as_bytes()).is_err());
        let bad_link = format!(r#"{{"records":[{{"digest":"{}","inputs":[[{{"link":3}}]]}}]}}"#, digest(1));
        assert!(CacheConfig::parse(bad_link.as_bytes()).is_err());
        let huge = vec![b' '; MAX_SIZE + 1];
        assert!(CacheConfig::parse(&huge).unwrap_err().contains("limit"));
        assert!(CacheConfig::parse(b"{\"layers\": 3}").is_err());
    }
}
