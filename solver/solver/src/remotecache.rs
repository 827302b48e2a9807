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
//! Also: `cache-mounts=true` adds one layer and record per cache mount id
//! ([`cache_mount_digest`]), which fills a cache mount a root does not
//! have yet; `type=inline` puts the result's records in the image config
//! (`moby.buildkit.cache.v0`: base64 of the records, results indexing the
//! image's layers), read back when `--cache-from` names an image.
//!
//! # Lazy blobs
//! A hit takes no blob: its layers are adopted and the state root is
//! offered how to fetch each ([`crate::root::StateRoot::offer_blob`]); a
//! blob is downloaded when something reads it (a mount, the image
//! exporter, a cache export), so a result nothing reads is never fetched.
//!
//! # Safety
//! A cache is trusted as a base image is: whoever can write it decides what
//! a hit contains. Within that, the manifest and config are refused over
//! [`MAX_SIZE`] and checked against their digests; every blob is checked
//! against its digest when fetched and against its diff id when unpacked.
//! A blob that fails is a miss for the vertex that needed it (when it was
//! needed after the vertex was taken, the solve runs again without it),
//! never content of another.
//! Exports write blobs by temp and rename, `index.json` last, so two
//! builds exporting to one directory leave a valid cache (the last one's).

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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

/// Where an imported cache's blobs are.
enum Source {
    /// `DIR/blobs/sha256/…` of a `type=local` cache.
    Dir(PathBuf),
    /// The repository of a `type=registry` cache.
    Registry {
        reference: String,
        client: kiln_oci::RegistryClient,
        /// The runtime its fetches run on (from whichever thread needs a blob).
        runtime: tokio::runtime::Handle,
    },
}

/// The record digest of a cache mount's contents (`cache-mounts=true`).
pub(crate) fn cache_mount_digest(id: &str) -> String {
    hash(&[KEY_SCHEME, b"cache-mount", id.as_bytes()])
}

/// A cache read from a `--cache-from` source.
pub(crate) struct Imported {
    source: Arc<Source>,
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
    let manifest = read_verified(&blob_path(dir, digest), digest)?;
    from_manifest(Source::Dir(dir.to_path_buf()), &manifest, |config_digest| {
        read_verified(&blob_path(dir, config_digest), config_digest)
    })
}

/// Reads a `type=registry` cache: the manifest `reference` names (at most
/// [`MAX_SIZE`], checked against its digest) and its cache config.
pub(crate) async fn import_registry(reference: &str) -> Result<Imported, String> {
    let client = kiln_oci::RegistryClient::new(kiln_oci::Credentials::from_docker_config());
    let (manifest, _) = client.fetch_top_manifest(reference).await.map_err(|e| e.to_string())?;
    if manifest.len() > MAX_SIZE {
        return Err(format!("{reference}: the cache manifest is over the {MAX_SIZE} byte limit"));
    }
    let mut parsed: Json = serde_json::from_slice(&manifest).map_err(|e| format!("{reference}: {e}"))?;
    if cache_config_descriptor(&parsed).is_err() {
        // An image: its inline cache, if it has one (of an index, the
        // manifest of this machine's platform).
        if let Some(entries) = parsed["manifests"].as_array() {
            let host = kiln_image::Platform::host();
            let entry = entries
                .iter()
                .find(|m| m["platform"]["architecture"].as_str() == Some(host.architecture.as_str()))
                .or(entries.first())
                .and_then(|m| m["digest"].as_str())
                .ok_or_else(|| format!("{reference}: an empty index"))?;
            let bytes = client.fetch_manifest(reference, entry).await.map_err(|e| e.to_string())?;
            parsed = serde_json::from_slice(&bytes).map_err(|e| format!("{reference}: {e}"))?;
        }
        let config_desc = &parsed["config"];
        let digest = config_desc["digest"]
            .as_str()
            .filter(|d| cacheconfig::is_digest(d))
            .ok_or_else(|| format!("{reference} is neither a cache nor an image"))?;
        let size = config_desc["size"].as_u64().unwrap_or(0);
        let image_config = fetch_small(&client, reference, digest, size, "image config").await?;
        let image_config: Json = serde_json::from_slice(&image_config).map_err(|e| format!("{reference}: {e}"))?;
        let (config, blobs) = inline_cache(&parsed, &image_config)?
            .ok_or_else(|| format!("{reference} is an image without an inline cache (build it with --cache-to type=inline)"))?;
        let source = Source::Registry {
            reference: reference.to_string(),
            client,
            runtime: tokio::runtime::Handle::current(),
        };
        return Ok(Imported::new(source, config, blobs));
    }
    let (config_digest, config_size) = cache_config_descriptor(&parsed)?;
    let config = fetch_small(&client, reference, config_digest, config_size, "cache config").await?;
    from_manifest(
        Source::Registry {
            reference: reference.to_string(),
            client,
            runtime: tokio::runtime::Handle::current(),
        },
        &manifest,
        |_| Ok(config),
    )
}

/// Each blob's diff id, size and media type, by digest.
type BlobInfo = HashMap<String, LayerBlob>;

/// BuildKit's inline cache of an image: its config's
/// `moby.buildkit.cache.v0` (base64 of the JSON of the records, whose
/// result layers index the image's layers), as a cache over the image's
/// layer blobs. `Ok(None)`: the image has none.
fn inline_cache(manifest: &Json, image_config: &Json) -> Result<Option<(CacheConfig, BlobInfo)>, String> {
    use base64::Engine as _;
    let Some(encoded) = image_config["moby.buildkit.cache.v0"].as_str() else {
        return Ok(None);
    };
    let records = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|e| format!("the inline cache is not base64: {e}"))?;
    let records: Json = serde_json::from_slice(&records).map_err(|e| format!("the inline cache: {e}"))?;
    let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
    let diff_ids = image_config["rootfs"]["diff_ids"].as_array().cloned().unwrap_or_default();
    if layers.len() != diff_ids.len() {
        return Err("the image's config and manifest list different numbers of layers".into());
    }
    let mut blobs = HashMap::new();
    let mut chain = Vec::new();
    for (i, (l, diff_id)) in layers.iter().zip(&diff_ids).enumerate() {
        let (Some(d), Some(diff_id)) = (l["digest"].as_str(), diff_id.as_str()) else {
            return Err("an image layer has no digest or diff id".into());
        };
        chain.push(json!({"blob": d, "parent": i as i64 - 1}));
        blobs.insert(d.to_string(), layer_of(l, d, diff_id));
    }
    let config = json!({"layers": chain, "records": records});
    let bytes = serde_json::to_vec(&config).map_err(|e| e.to_string())?;
    Ok(Some((CacheConfig::parse(&bytes)?, blobs)))
}

/// The inline cache (`moby.buildkit.cache.v0`) for an image of `layers`:
/// the records of `entries` whose output is a bottom part of the image's
/// layers, each result the index of its top layer in the image.
/// Record times are `epoch` when set (SOURCE_DATE_EPOCH: the config stays reproducible).
pub(crate) fn inline_records(entries: &[(String, Vec<Vec<String>>)], layers: &[String], epoch: Option<i64>) -> Option<String> {
    use base64::Engine as _;
    let mut records = Vec::new();
    for (key, outputs) in entries {
        for (n, chain) in outputs.iter().enumerate() {
            if chain.is_empty() || chain.len() > layers.len() || chain[..] != layers[..chain.len()] {
                continue;
            }
            records.push(CacheRecord {
                results: vec![CacheResult {
                    layer: chain.len() as i64 - 1,
                    created_at: epoch.map_or_else(crate::export::now_rfc3339, crate::export::rfc3339),
                }],
                digest: record_digest(key, n),
                ..Default::default()
            });
        }
    }
    let bytes = serde_json::to_vec(&records).ok()?;
    (!records.is_empty()).then(|| base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// A config blob of `reference`'s repository (`what`, for messages): at
/// most [`MAX_SIZE`] as its descriptor says and as read, checked against its digest.
async fn fetch_small(client: &kiln_oci::RegistryClient, reference: &str, digest: &str, size: u64, what: &str) -> Result<Vec<u8>, String> {
    if size > MAX_SIZE as u64 {
        return Err(format!("{reference}: the {what} is over the {MAX_SIZE} byte limit"));
    }
    let tmp = std::env::temp_dir().join(format!("kiln-config-{}-{}", std::process::id(), crate::snapshot::new_layer_id()));
    let fetched = client.fetch_blob(reference, digest, size as i64, &tmp).await;
    let bytes = fetched.map_err(|e| e.to_string()).and_then(|()| read_verified(&tmp, digest));
    let _ = fs::remove_file(&tmp);
    bytes
}

/// The cache config's descriptor in a cache manifest: its config (BuildKit's
/// image-manifest form), or the index entry of the config's media type
/// (BuildKit's older form: an index of the layers and the config).
fn cache_config_descriptor(manifest: &Json) -> Result<(&str, u64), String> {
    let is_config = |d: &&Json| d["mediaType"].as_str() == Some(cacheconfig::MEDIA_TYPE);
    let desc = if manifest["config"].is_object() {
        Some(&manifest["config"]).filter(is_config)
    } else {
        manifest["manifests"].as_array().and_then(|m| m.iter().find(is_config))
    }
    .ok_or("not a cache: it has no config of type application/vnd.buildkit.cacheconfig.v0")?;
    let digest = desc["digest"]
        .as_str()
        .filter(|d| cacheconfig::is_digest(d))
        .ok_or("the cache config has no digest")?;
    Ok((digest, desc["size"].as_u64().unwrap_or(0)))
}

/// A layer descriptor (`l`, whose digest is `digest`) with its diff id.
fn layer_of(l: &Json, digest: &str, diff_id: &str) -> LayerBlob {
    LayerBlob {
        digest: digest.to_string(),
        diff_id: diff_id.to_string(),
        size: l["size"].as_u64().unwrap_or(0),
        media_type: l["mediaType"].as_str().unwrap_or(crate::snapshot::layer::GZIP_LAYER).to_string(),
    }
}

/// An import from its manifest's bytes; `config` reads the config blob.
fn from_manifest(source: Source, manifest: &[u8], config: impl FnOnce(&str) -> Result<Vec<u8>, String>) -> Result<Imported, String> {
    let manifest: Json = serde_json::from_slice(manifest).map_err(|e| format!("the cache manifest: {e}"))?;
    let (config_digest, _) = cache_config_descriptor(&manifest)?;
    let config = CacheConfig::parse(&config(config_digest)?)?;
    let mut blobs = HashMap::new();
    let listed = manifest["layers"].as_array().or(manifest["manifests"].as_array());
    for l in listed.into_iter().flatten() {
        let (Some(d), Some(diff_id)) = (l["digest"].as_str(), l["annotations"]["containerd.io/uncompressed"].as_str()) else {
            continue;
        };
        blobs.insert(d.to_string(), layer_of(l, d, diff_id));
    }
    Ok(Imported::new(source, config, blobs))
}

impl Imported {
    /// An import of `config`, its records found by digest.
    fn new(source: Source, config: CacheConfig, blobs: BlobInfo) -> Imported {
        let records = config
            .records
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.digest.is_empty())
            .map(|(i, r)| (r.digest.clone(), i))
            .collect();
        Imported {
            source: Arc::new(source),
            config,
            records,
            blobs,
        }
    }

    /// The records this cache holds (for progress).
    pub(crate) fn len(&self) -> usize {
        self.records.len()
    }

    /// The layers this cache lists and their total size (for progress).
    pub(crate) fn layers(&self) -> (usize, u64) {
        (self.blobs.len(), self.blobs.values().map(|b| b.size).sum())
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

    /// Whether this cache holds every output of the vertex keyed `key`,
    /// none of their layers known to be damaged.
    pub(crate) fn holds(&self, root: &StateRoot, key: &str) -> bool {
        self.outputs(key)
            .is_some_and(|outputs| !outputs.iter().flatten().any(|b| root.is_damaged(&b.digest)))
    }

    /// The vertex keyed `key` from this cache, as each output's layer ids:
    /// its layers adopted without their blobs, which the state root fetches
    /// (each checked against its digest) only when something reads them —
    /// a step mounting a layer (its diff id checked as it is unpacked), an
    /// image or cache exporter. A result no later step or exporter reads is
    /// never downloaded. `None`: a miss (not there, or not intact: the
    /// reason is returned beside).
    pub(crate) fn take(&self, root: &StateRoot, key: &str) -> Result<Option<Vec<Vec<String>>>, String> {
        let Some(outputs) = self.outputs(key) else { return Ok(None) };
        let mut ids = Vec::with_capacity(outputs.len());
        for chain in outputs {
            let mut layer_ids = Vec::with_capacity(chain.len());
            for blob in chain {
                if root.is_damaged(&blob.digest) {
                    return Err(format!("layer {} of this cache failed to fetch before", blob.digest));
                }
                if !root.blob_is_local(&blob.digest) {
                    if let Source::Registry { reference, .. } = self.source.as_ref() {
                        // A push to another repository of that registry
                        // mounts the blob from the cache's instead of uploading it.
                        let _ = kiln_oci::record_blob_source(root.path(), &blob.digest, pull::repository_of(reference));
                    }
                    let source = self.source.clone();
                    let wanted = blob.clone();
                    root.offer_blob(&blob.digest, Arc::new(move |root: &StateRoot| fetch(&source, root, &wanted)));
                }
                pull::adopt_blob(root, &blob).map_err(|e| format!("adopting layer {}: {e}", blob.digest))?;
                layer_ids.push(pull::layer_id_for_blob(&blob.digest));
            }
            ids.push(layer_ids);
        }
        Ok(Some(ids))
    }

    /// Fills the new directory `dest` of the cache mount `id` with the
    /// contents this cache holds for it (blob checked as any). `false`:
    /// it holds none.
    pub(crate) fn restore_mount(&self, root: &StateRoot, id: &str, dest: &Path) -> Result<bool, String> {
        let Some(&i) = self.records.get(&cache_mount_digest(id)) else {
            return Ok(false);
        };
        let Some(result) = self.config.records[i].results.first() else {
            return Ok(false);
        };
        let chain = self.config.chain(usize::try_from(result.layer).map_err(|e| e.to_string())?)?;
        let [layer] = chain.as_slice() else {
            return Err(format!("the cache mount {id:?} is not one layer"));
        };
        let blob = self
            .blobs
            .get(&layer.blob)
            .ok_or_else(|| format!("the cache mount {id:?} has no diff id"))?;
        fetch(&self.source, root, blob)?;
        let got = fs::File::open(root.blob_path(&blob.digest))
            .and_then(|f| crate::snapshot::layer::unpack_layer(f, dest))
            .map_err(|e| format!("unpacking the cache mount {id:?}: {e}"))?;
        if got != blob.diff_id {
            return Err(format!("the cache mount {id:?} unpacks to {got}, not {}", blob.diff_id));
        }
        Ok(true)
    }
}

/// Copies a blob of a cache into the state root's store, checking its digest.
fn fetch(source: &Source, root: &StateRoot, blob: &LayerBlob) -> Result<(), String> {
    let dest = root.blob_path(&blob.digest);
    if dest.is_file() {
        return Ok(());
    }
    let tmp = root.temp_dir().map_err(|e| e.to_string())?;
    let part = tmp.join("blob");
    let copied = match source {
        Source::Dir(dir) => {
            let src = blob_path(dir, &blob.digest);
            fs::copy(&src, &part).map(|_| ()).map_err(|e| format!("{}: {e}", src.display()))
        }
        // On a thread of its own: whoever needs the blob may be on the runtime.
        Source::Registry {
            reference,
            client,
            runtime,
        } => std::thread::scope(|s| {
            s.spawn(|| runtime.block_on(client.fetch_blob(reference, &blob.digest, blob.size as i64, &part)))
                .join()
                .map_err(|_| "the blob fetch panicked".to_string())?
                .map_err(|e| e.to_string())
        }),
    };
    let result = copied
        .and_then(|()| pull::file_digest(&part).map_err(|e| e.to_string()))
        .and_then(|actual| {
            if actual == blob.digest {
                fs::rename(&part, &dest).map_err(|e| format!("{}: {e}", dest.display()))
            } else {
                Err(format!("cache blob {} has digest {actual}", blob.digest))
            }
        });
    let _ = fs::remove_dir_all(&tmp);
    result
}

/// What an export wrote.
pub(crate) struct Exported {
    /// Records written.
    pub records: usize,
    /// Layer blobs listed.
    pub layers: usize,
    /// What was sent: bytes written, or blobs uploaded and found there.
    pub sent: String,
}

/// A cache made from a solve, ready to be written.
struct Built {
    config: Vec<u8>,
    manifest: Vec<u8>,
    /// The layer blobs it lists (in the state root's store).
    blobs: Vec<LayerBlob>,
    records: usize,
    layers: usize,
}

/// The cache config and manifest of `entries` (each vertex's key and its
/// outputs' layer ids); the config blob is stored in the state root.
fn build(root: &StateRoot, entries: &[(String, Vec<Vec<String>>)], mounts: &[(String, PathBuf)]) -> Result<Built, Failure> {
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
    // Cache mounts: each directory's contents as one layer of its own.
    for (id, dir) in mounts {
        let blob = crate::snapshot::layer::export_layer(root, dir, None).map_err(Failure::io(Some("packing the cache mount"), id))?;
        let created = crate::export::now_rfc3339();
        config.layers.push(CacheLayer {
            blob: blob.digest.clone(),
            parent: -1,
            annotations: Some(LayerAnnotations {
                media_type: blob.media_type.clone(),
                diff_id: blob.diff_id.clone(),
                size: blob.size as i64,
                created_at: created.clone(),
            }),
        });
        config.records.push(CacheRecord {
            results: vec![CacheResult {
                layer: config.layers.len() as i64 - 1,
                created_at: created,
            }],
            digest: cache_mount_digest(id),
            ..Default::default()
        });
        if !blobs.iter().any(|b| b.digest == blob.digest) {
            blobs.push(blob);
        }
    }
    let config_bytes = serde_json::to_vec(&config).map_err(|e| Failure::Internal(format!("the cache config: {e}")))?;
    let config_digest = crate::export::store_blob(root, &config_bytes)
        .map_err(|e| Failure::io(Some("storing the cache config in"), root.store().display().to_string())(e))?;
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
    let manifest = serde_json::to_vec(&manifest).map_err(|e| Failure::Internal(format!("the cache manifest: {e}")))?;
    Ok(Built {
        config: config_bytes,
        manifest,
        blobs,
        records: config.records.len(),
        layers: config.layers.len(),
    })
}

/// Writes the cache of `entries` (each vertex's key and its outputs' layer
/// ids) to `dest` as an OCI layout tagged `tag`.
pub(crate) fn export_local(
    root: &StateRoot,
    dest: &Path,
    tag: &str,
    entries: &[(String, Vec<Vec<String>>)],
    mounts: &[(String, PathBuf)],
) -> Result<Exported, Failure> {
    let built = build(root, entries, mounts)?;
    let io = |what: &'static str, path: &Path| Failure::io(Some(what), path.display().to_string());
    let blob_dir = dest.join("blobs/sha256");
    fs::create_dir_all(&blob_dir).map_err(|e| io("creating", &blob_dir)(e))?;
    let mut copied = 0u64;
    for b in &built.blobs {
        let target = blob_path(dest, &b.digest);
        if target.is_file() {
            continue;
        }
        root.fetch_blob(&b.digest).map_err(Failure::io(Some("fetching layer"), &b.digest))?;
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
    put(&built.config)?;
    let manifest_bytes = built.manifest;
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
        records: built.records,
        layers: built.layers,
        sent: format!("{copied} bytes written"),
    })
}

/// Pushes the cache of `entries` to `reference` (blobs the repository has
/// are not sent again, blobs pulled from another repository of the same
/// registry are mounted; the manifest last, under the reference's tag).
pub(crate) async fn export_registry(
    root: &StateRoot,
    reference: &str,
    entries: &[(String, Vec<Vec<String>>)],
    mounts: &[(String, PathBuf)],
) -> Result<Exported, Failure> {
    let built = tokio::task::block_in_place(|| build(root, entries, mounts))?;
    let config_digest = crate::export::sha(&built.config);
    let mut blobs: Vec<kiln_oci::PushBlob> = built
        .blobs
        .iter()
        .map(|b| kiln_oci::PushBlob {
            digest: b.digest.clone(),
            path: root.blob_path(&b.digest),
            size: b.size,
            source: kiln_oci::blob_source(root.path(), &b.digest),
        })
        .collect();
    blobs.push(kiln_oci::PushBlob {
        path: root.blob_path(&config_digest),
        digest: config_digest,
        size: built.config.len() as u64,
        source: None,
    });
    let client = kiln_oci::RegistryClient::new(kiln_oci::Credentials::from_docker_config());
    // A layer a cache offered and this solve never read is fetched only if
    // the registry has it nowhere to mount from.
    let fetch = |b: &kiln_oci::PushBlob| tokio::task::block_in_place(|| root.fetch_blob(&b.digest)).map_err(|e| e.to_string());
    let report = client
        .push_with(reference, &blobs, &built.manifest, crate::export::MANIFEST, &fetch)
        .await
        .map_err(|e| Failure::Registry {
            image: reference.to_string(),
            message: e.to_string(),
        })?;
    Ok(Exported {
        records: built.records,
        layers: built.layers,
        sent: format!(
            "{} blobs uploaded, {} already there, {} mounted",
            report.uploaded, report.existing, report.mounted
        ),
    })
}
