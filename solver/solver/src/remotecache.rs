//! The cache beyond one state root: `--cache-to` writes a build's cache
//! records and their layers in BuildKit's format (an OCI layout whose
//! manifest's config is a `application/vnd.buildkit.cacheconfig.v0`),
//! `--cache-from` lets a build on another root take results from it.
//!
//! # Keys
//! kiln's cache keys (`cache.rs`, scheme [`KEY_SCHEME`]) cover what a step
//! reads, by content; an exported record's digest is
//! [`record_digest`]`(key, output)`, one record per output of a vertex,
//! whose result is the top of its layer chain (no result: an empty
//! output). Records carry no input links: a kiln key already covers its
//! inputs. BuildKit's records (keys over Go's JSON of ops) never equal a
//! kiln record digest: a cache BuildKit wrote imports cleanly and simply
//! never matches, and BuildKit reads kiln's as records it never matches.
//!
//! # Safety
//! The manifest and config are read only up to [`MAX_SIZE`] and checked
//! against their digests; every blob is checked against its digest when
//! copied in and against its diff id when unpacked. A blob that fails is a
//! miss for the vertex that needed it, never content of another.
//! Exports write blobs by temp and rename, `index.json` last, so two
//! builds exporting to one directory leave a valid cache (the last one's).

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use kiln_oci::cacheconfig::{self, CacheConfig, CacheLayer, CacheRecord, CacheResult, LayerAnnotations, MAX_SIZE};
use serde_json::{json, Value as Json};

use crate::cache::{hash, KEY_SCHEME};
use crate::error::Failure;
use crate::root::{write_atomic, StateRoot};
use crate::snapshot::LayerBlob;
use crate::source::pull;

/// The record digest of a vertex output, as exported.
pub(crate) fn record_digest(key: &str, output: usize) -> String {
    hash(&[KEY_SCHEME, b"record", key.as_bytes(), &(output as u64).to_le_bytes()])
}

/// A cache read from a `--cache-from` source.
pub(crate) struct Imported {
    /// Where its blobs are (`DIR/blobs/sha256/…`).
    dir: PathBuf,
    config: CacheConfig,
    /// Record index by digest.
    records: HashMap<String, usize>,
    /// Diff id, size and media type of each blob the manifest lists.
    blobs: HashMap<String, LayerBlob>,
}

/// Reads a file of at most [`MAX_SIZE`] bytes whose sha256 must be `digest`.
fn read_verified(path: &Path, digest: &str) -> Result<Vec<u8>, String> {
    let f = fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    f.take(MAX_SIZE as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() > MAX_SIZE {
        return Err(format!("{} is over the {MAX_SIZE} byte limit", path.display()));
    }
    if !digest.is_empty() && crate::export::sha(&bytes) != digest {
        return Err(format!("{} does not have digest {digest}", path.display()));
    }
    Ok(bytes)
}

fn blob_path(dir: &Path, digest: &str) -> PathBuf {
    dir.join("blobs/sha256").join(digest.strip_prefix("sha256:").unwrap_or(digest))
}

/// Reads a `type=local` cache: its `index.json`, the manifest tagged `tag`
/// (default `latest`; the only one when it has one), the cache config.
pub(crate) fn import_local(dir: &Path, tag: Option<&str>) -> Result<Imported, String> {
    let index: Json = serde_json::from_slice(&read_verified(&dir.join("index.json"), "")?)
        .map_err(|e| format!("{}: {e}", dir.join("index.json").display()))?;
    let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
    let tag = tag.unwrap_or("latest");
    let entry = manifests
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str() == Some(tag))
        .or(if manifests.len() == 1 { manifests.first() } else { None })
        .ok_or_else(|| format!("{} has no cache tagged {tag:?}", dir.display()))?;
    let digest = entry["digest"]
        .as_str()
        .filter(|d| cacheconfig::is_digest(d))
        .ok_or("the cache's index names no manifest digest")?;
    let manifest: Json =
        serde_json::from_slice(&read_verified(&blob_path(dir, digest), digest)?).map_err(|e| format!("cache manifest {digest}: {e}"))?;
    let config = &manifest["config"];
    if config["mediaType"].as_str() != Some(cacheconfig::MEDIA_TYPE) {
        return Err(format!(
            "{} is not a cache: its manifest's config is {}",
            dir.display(),
            config["mediaType"]
        ));
    }
    let config_digest = config["digest"]
        .as_str()
        .filter(|d| cacheconfig::is_digest(d))
        .ok_or("the cache manifest names no config digest")?;
    let config = CacheConfig::parse(&read_verified(&blob_path(dir, config_digest), config_digest)?)?;
    let mut blobs = HashMap::new();
    for l in manifest["layers"].as_array().into_iter().flatten() {
        let (Some(d), Some(diff_id)) = (l["digest"].as_str(), l["annotations"]["containerd.io/uncompressed"].as_str()) else {
            continue;
        };
        blobs.insert(
            d.to_string(),
            LayerBlob {
                digest: d.to_string(),
                diff_id: diff_id.to_string(),
                size: l["size"].as_u64().unwrap_or(0),
                media_type: l["mediaType"].as_str().unwrap_or(crate::snapshot::layer::GZIP_LAYER).to_string(),
            },
        );
    }
    let records = config
        .records
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.digest.is_empty())
        .map(|(i, r)| (r.digest.clone(), i))
        .collect();
    Ok(Imported {
        dir: dir.to_path_buf(),
        config,
        records,
        blobs,
    })
}

impl Imported {
    /// The records this cache holds (for progress).
    pub(crate) fn len(&self) -> usize {
        self.records.len()
    }

    /// The blobs of each output of the vertex keyed `key`, bottom first, if
    /// the cache holds them all (a record for output 0, 1, … until none).
    fn outputs(&self, key: &str) -> Option<Vec<Vec<LayerBlob>>> {
        let mut outputs = Vec::new();
        while let Some(&i) = self.records.get(&record_digest(key, outputs.len())) {
            let record = &self.config.records[i];
            let chain = match record.results.first() {
                None => Vec::new(),
                Some(r) => {
                    let layers = self.config.chain(usize::try_from(r.layer).ok()?).ok()?;
                    layers
                        .iter()
                        .map(|l| self.blobs.get(&l.blob).cloned())
                        .collect::<Option<Vec<_>>>()?
                }
            };
            outputs.push(chain);
        }
        (!outputs.is_empty()).then_some(outputs)
    }

    /// The vertex keyed `key` from this cache: its blobs copied into the
    /// state root (each checked against its digest), unpacked (each checked
    /// against its diff id), as each output's layer ids. `None`: a miss
    /// (not there, or not intact: the reason is returned beside).
    pub(crate) fn take(&self, root: &StateRoot, key: &str) -> Result<Option<Vec<Vec<String>>>, String> {
        let Some(outputs) = self.outputs(key) else { return Ok(None) };
        let mut ids = Vec::with_capacity(outputs.len());
        for chain in outputs {
            let mut layer_ids = Vec::with_capacity(chain.len());
            for blob in chain {
                self.copy_in(root, &blob)?;
                pull::unpack_blob(root, &blob).map_err(|e| match e {
                    pull::Unpack::Refused(why) => why,
                    pull::Unpack::Failed(f) => f.to_string(),
                })?;
                layer_ids.push(pull::layer_id_for_blob(&blob.digest));
            }
            ids.push(layer_ids);
        }
        Ok(Some(ids))
    }

    /// Copies a blob into the state root's store, checking its digest.
    fn copy_in(&self, root: &StateRoot, blob: &LayerBlob) -> Result<(), String> {
        let dest = root.blob_path(&blob.digest);
        if dest.is_file() {
            return Ok(());
        }
        let src = blob_path(&self.dir, &blob.digest);
        let tmp = root.temp_dir().map_err(|e| e.to_string())?;
        let part = tmp.join("blob");
        let copied = fs::copy(&src, &part)
            .map_err(|e| format!("{}: {e}", src.display()))
            .and_then(|_| pull::file_digest(&part).map_err(|e| e.to_string()));
        let result = match copied {
            Ok(actual) if actual == blob.digest => fs::rename(&part, &dest).map_err(|e| format!("{}: {e}", dest.display())),
            Ok(actual) => Err(format!("cache blob {} has digest {actual}", blob.digest)),
            Err(e) => Err(e),
        };
        let _ = fs::remove_dir_all(&tmp);
        result
    }
}

/// What an export wrote.
pub(crate) struct Exported {
    /// Records written.
    pub records: usize,
    /// Layer blobs listed.
    pub layers: usize,
    /// Bytes of blobs copied (blobs already there not counted).
    pub copied: u64,
}

/// Writes the cache of `entries` (each vertex's key and its outputs' layer
/// ids) to `dest` as an OCI layout tagged `tag`.
pub(crate) fn export_local(root: &StateRoot, dest: &Path, tag: &str, entries: &[(String, Vec<Vec<String>>)]) -> Result<Exported, Failure> {
    let mut config = CacheConfig::default();
    let mut layer_index: HashMap<(String, i64), i64> = HashMap::new();
    let mut blobs: Vec<LayerBlob> = Vec::new();
    for (key, outputs) in entries {
        for (n, chain) in outputs.iter().enumerate() {
            let mut parent = -1i64;
            let mut created = String::new();
            for id in chain {
                let blob = crate::export::layer_blob(root, id, None)?;
                created = crate::export::rfc3339(crate::snapshot::layer_created(root, id));
                parent = match layer_index.get(&(blob.digest.clone(), parent)) {
                    Some(&i) => i,
                    None => {
                        let i = config.layers.len() as i64;
                        config.layers.push(CacheLayer {
                            blob: blob.digest.clone(),
                            parent,
                            annotations: Some(LayerAnnotations {
                                media_type: blob.media_type.clone(),
                                diff_id: blob.diff_id.clone(),
                                size: blob.size as i64,
                                created_at: created.clone(),
                            }),
                        });
                        layer_index.insert((blob.digest.clone(), parent), i);
                        if !blobs.iter().any(|b| b.digest == blob.digest) {
                            blobs.push(blob);
                        }
                        i
                    }
                };
            }
            config.records.push(CacheRecord {
                results: if chain.is_empty() {
                    Vec::new()
                } else {
                    vec![CacheResult {
                        layer: parent,
                        created_at: created,
                    }]
                },
                digest: record_digest(key, n),
                ..Default::default()
            });
        }
    }
    let io = |what: &'static str, path: &Path| Failure::io(Some(what), path.display().to_string());
    let blob_dir = dest.join("blobs/sha256");
    fs::create_dir_all(&blob_dir).map_err(|e| io("creating", &blob_dir)(e))?;
    let mut copied = 0u64;
    for b in &blobs {
        let target = blob_path(dest, &b.digest);
        if target.is_file() {
            continue;
        }
        let tmp = target.with_extension(format!("tmp-{}", std::process::id()));
        fs::copy(root.blob_path(&b.digest), &tmp).map_err(|e| io("copying a layer to", &tmp)(e))?;
        fs::rename(&tmp, &target).map_err(|e| io("writing", &target)(e))?;
        copied += b.size;
    }
    let put = |bytes: &[u8]| -> Result<String, Failure> {
        let digest = crate::export::sha(bytes);
        let target = blob_path(dest, &digest);
        if !target.is_file() {
            write_atomic(&target, bytes, false).map_err(|e| io("writing", &target)(e))?;
        }
        Ok(digest)
    };
    let config_bytes = serde_json::to_vec(&config).map_err(|e| Failure::Internal(format!("the cache config: {e}")))?;
    let config_digest = put(&config_bytes)?;
    let layers: Vec<Json> = blobs
        .iter()
        .map(|b| {
            json!({
                "mediaType": b.media_type,
                "digest": b.digest,
                "size": b.size,
                "annotations": {"containerd.io/uncompressed": b.diff_id},
            })
        })
        .collect();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": crate::export::MANIFEST,
        "config": {"mediaType": cacheconfig::MEDIA_TYPE, "digest": config_digest, "size": config_bytes.len()},
        "layers": layers,
    });
    let manifest_bytes = serde_json::to_vec(&manifest).map_err(|e| Failure::Internal(format!("the cache manifest: {e}")))?;
    let manifest_digest = put(&manifest_bytes)?;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": crate::export::MANIFEST,
            "digest": manifest_digest,
            "size": manifest_bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    let layout = dest.join("oci-layout");
    write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#, false).map_err(|e| io("writing", &layout)(e))?;
    let index_path = dest.join("index.json");
    let index_bytes = serde_json::to_vec(&index).map_err(|e| Failure::Internal(format!("the cache index: {e}")))?;
    write_atomic(&index_path, &index_bytes, true).map_err(|e| io("writing", &index_path)(e))?;
    Ok(Exported {
        records: config.records.len(),
        layers: config.layers.len(),
        copied,
    })
}
