//! Exporters: the final result as an OCI image (kiln's store, an OCI layout
//! tarball, a `docker load` tarball) or as plain files (a directory, a tar).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::Path;

use kiln_solver_protocol::Exporter;
use serde_json::{json, Value as Json};
use sha2::{Digest as _, Sha256};

use crate::error::{Failure, SolveError};
use crate::root::{write_atomic, StateRoot};
use crate::snapshot::layer::export_layer;
use crate::snapshot::{layer_fs, mount_stack, read_layer_blob, write_layer_blob, LayerBlob};

/// OCI media types.
pub(crate) const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// An image made of the result's layers.
pub(crate) struct Image {
    /// Manifest digest.
    pub digest: String,
    /// Manifest size.
    pub size: usize,
    /// Config digest.
    pub config_digest: String,
    /// Layer blobs, bottom first.
    pub layers: Vec<LayerBlob>,
    /// The platform of the config.
    pub platform: Json,
}

pub(crate) fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

pub(crate) fn store_blob(root: &StateRoot, bytes: &[u8]) -> std::io::Result<String> {
    let d = sha(bytes);
    let p = root.blob_path(&d);
    if !p.exists() {
        write_atomic(&p, bytes, false)?;
    }
    Ok(d)
}

/// The compressed blobs of the layers in the store, making those not made
/// before and fetching those a cache offered (several at once).
pub(crate) fn layer_blobs(root: &StateRoot, layers: &[String], epoch: Option<i64>) -> Result<Vec<LayerBlob>, Failure> {
    let mut out: Vec<Option<LayerBlob>> = layers
        .iter()
        .map(|id| read_layer_blob(root, id, epoch).filter(|b| root.blob_is_local(&b.digest)))
        .collect();
    let missing: Vec<usize> = (0..layers.len()).filter(|i| out[*i].is_none()).collect();
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .min(missing.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: std::sync::Mutex<Vec<(usize, Result<LayerBlob, Failure>)>> = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&i) = missing.get(k) else { break };
                let r = layer_blob(root, &layers[i], epoch).and_then(|b| {
                    root.fetch_blob(&b.digest)
                        .map_err(Failure::io(Some("fetching layer"), &b.digest))
                        .map(|()| b)
                });
                if let Ok(mut v) = results.lock() {
                    v.push((i, r));
                }
            });
        }
    });
    for (i, r) in results
        .into_inner()
        .map_err(|_| Failure::Internal("a layer compression thread panicked".into()))?
    {
        out[i] = Some(r?);
    }
    out.into_iter()
        .map(|b| b.ok_or_else(|| Failure::Internal("a layer blob is missing after compression".into())))
        .collect()
}

/// The compressed blob of one layer, made and remembered if it was not
/// (one a cache offered is not fetched here).
pub(crate) fn layer_blob(root: &StateRoot, id: &str, epoch: Option<i64>) -> Result<LayerBlob, Failure> {
    if let Some(b) = read_layer_blob(root, id, epoch) {
        return Ok(b);
    }
    let clamp = if id.starts_with("blob-") { None } else { epoch };
    export_layer(root, &layer_fs(root, id), clamp)
        .and_then(|b| write_layer_blob(root, id, epoch, &b).map(|()| b))
        .map_err(Failure::io(Some("compressing layer"), id))
}

/// Builds and stores the image config and manifest for the layers. A
/// config without a platform gets `platform`'s (`os/arch[/variant]`), else amd64.
pub(crate) fn make_image(
    root: &StateRoot,
    layers: &[String],
    config: Option<&Json>,
    platform: Option<&str>,
    epoch: Option<i64>,
) -> Result<Image, Failure> {
    let blobs = layer_blobs(root, layers, epoch)?;
    let mut config = config.cloned().unwrap_or_else(|| json!({}));
    let obj = config
        .as_object_mut()
        .ok_or_else(|| Failure::invalid("the image config is not a JSON object"))?;
    let wanted = platform.and_then(kiln_image::Platform::parse);
    if let Some(p) = &wanted {
        if !obj.contains_key("architecture") && !p.variant.is_empty() {
            obj.insert("variant".into(), json!(p.variant));
        }
    }
    obj.entry("architecture")
        .or_insert_with(|| json!(wanted.as_ref().map_or("amd64", |p| p.architecture.as_str())));
    obj.entry("os")
        .or_insert_with(|| json!(wanted.as_ref().map_or("linux", |p| p.os.as_str())));
    let diff_ids: Vec<Json> = blobs.iter().map(|b| json!(b.diff_id)).collect();
    obj.insert("rootfs".into(), json!({"type": "layers", "diff_ids": diff_ids}));
    align_history(obj, blobs.len());
    let created: Vec<i64> = match epoch {
        // Reproducible: every time this build sets is SOURCE_DATE_EPOCH.
        Some(e) => vec![e; layers.len()],
        None => layers.iter().map(|id| crate::snapshot::layer_created(root, id)).collect(),
    };
    stamp_history(obj, &created);
    if let Some(e) = epoch {
        obj.insert("created".into(), json!(rfc3339(e)));
    }
    let mut platform = json!({"architecture": obj["architecture"], "os": obj["os"]});
    if let Some(v) = obj.get("variant").filter(|v| v.as_str().is_some_and(|v| !v.is_empty())) {
        platform["variant"] = v.clone();
    }
    let config_bytes = serde_json::to_vec(&config).map_err(json_err)?;
    let config_digest = store_blob(root, &config_bytes).map_err(blob_err(root))?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, "digest": config_digest, "size": config_bytes.len()},
        "layers": blobs.iter().map(|b| json!({"mediaType": b.media_type, "digest": b.digest, "size": b.size})).collect::<Vec<_>>(),
    });
    let manifest_bytes = serde_json::to_vec(&manifest).map_err(json_err)?;
    let digest = store_blob(root, &manifest_bytes).map_err(blob_err(root))?;
    Ok(Image {
        digest,
        size: manifest_bytes.len(),
        config_digest,
        layers: blobs,
        platform,
    })
}

/// Makes the history have one non-empty entry per layer, as BuildKit's
/// exporter does: missing entries are added for unaccounted layers, extra
/// non-empty entries (steps that made no layer) are marked empty.
fn align_history(obj: &mut serde_json::Map<String, Json>, layers: usize) {
    let Some(history) = obj.get_mut("history").and_then(|h| h.as_array_mut()) else {
        return;
    };
    let non_empty = history
        .iter()
        .filter(|h| !h.get("empty_layer").and_then(Json::as_bool).unwrap_or(false))
        .count();
    if non_empty < layers {
        for _ in non_empty..layers {
            history.push(json!({"created_by": "kiln: layer without a history entry"}));
        }
    } else if non_empty > layers {
        let mut extra = non_empty - layers;
        for h in history.iter_mut().rev() {
            if extra == 0 {
                break;
            }
            if !h.get("empty_layer").and_then(Json::as_bool).unwrap_or(false) {
                if let Some(o) = h.as_object_mut() {
                    o.insert("empty_layer".into(), json!(true));
                }
                extra -= 1;
            }
        }
    }
}

/// Gives history entries without a `created` time the time their layer was
/// made (an empty entry that of the layer before it), and the image the
/// last one: a rebuild from cache gives the same config, hence the same id.
fn stamp_history(obj: &mut serde_json::Map<String, Json>, created: &[i64]) {
    let last = created.iter().copied().max().unwrap_or(0);
    if let Some(history) = obj.get_mut("history").and_then(|h| h.as_array_mut()) {
        let mut layer = 0usize;
        let mut current = created.first().copied().unwrap_or(0);
        for h in history.iter_mut() {
            let empty = h.get("empty_layer").and_then(Json::as_bool).unwrap_or(false);
            if !empty {
                current = created.get(layer).copied().unwrap_or(current);
                layer += 1;
            }
            if let Some(o) = h.as_object_mut() {
                if !o.contains_key("created") && current > 0 {
                    o.insert("created".into(), json!(rfc3339(current)));
                }
            }
        }
        let t = history
            .last()
            .and_then(|h| h.get("created"))
            .and_then(Json::as_str)
            .map(str::to_string);
        if let Some(t) = t {
            obj.entry("created").or_insert(json!(t));
            return;
        }
    }
    if last > 0 {
        obj.entry("created").or_insert(json!(rfc3339(last)));
    }
}

/// Normalizes a tag as Docker does (`app` → `docker.io/library/app:latest`).
pub(crate) fn normalize_name(name: &str) -> String {
    kiln_image::Reference::parse(name)
        .map(|r| r.normalized())
        .unwrap_or_else(|_| name.to_string())
}

/// Adds names to kiln's image store (its `index.json`).
pub(crate) fn tag_in_store(root: &StateRoot, made: &Made, names: &[String]) -> Result<(), Failure> {
    let names: Vec<String> = names.iter().map(|n| normalize_name(n)).collect();
    store_names(root, &names, &made.digest, made.media_type, made.size, made.platform())
}

/// Points names in the store's `index.json` at a manifest or index. An
/// entry already pointing there is left as it is (no rewrite).
pub(crate) fn store_names(
    root: &StateRoot,
    names: &[String],
    digest: &str,
    media_type: &str,
    size: usize,
    platform: Option<&Json>,
) -> Result<(), Failure> {
    let index_path = root.store().join("index.json");
    let _lock = root.lock_store().map_err(Failure::io(Some("locking"), index_path.display()))?;
    let mut index: Json = fs::read(&index_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| json!({"schemaVersion": 2, "manifests": []}));
    let manifests = index
        .get_mut("manifests")
        .and_then(|m| m.as_array_mut())
        .ok_or_else(|| Failure::invalid(format!("{} has no manifests list", index_path.display())))?;
    let unchanged = names.iter().all(|n| {
        manifests.iter().any(|m| {
            m["annotations"]["org.opencontainers.image.ref.name"].as_str() == Some(n.as_str()) && m["digest"].as_str() == Some(digest)
        })
    });
    if unchanged {
        return Ok(());
    }
    manifests.retain(|m| {
        let n = m["annotations"]["org.opencontainers.image.ref.name"].as_str().unwrap_or("");
        !names.iter().any(|x| x == n)
    });
    let created = now_rfc3339();
    for n in names {
        let mut entry = json!({
            "mediaType": media_type,
            "digest": digest,
            "size": size,
            "annotations": {
                "org.opencontainers.image.ref.name": n,
                "org.opencontainers.image.created": created,
            },
        });
        if let Some(p) = platform {
            entry["platform"] = p.clone();
        }
        manifests.push(entry);
    }
    let bytes = serde_json::to_vec_pretty(&index).map_err(json_err)?;
    write_atomic(&index_path, &bytes, true).map_err(Failure::io(Some("writing"), index_path.display()))
}

/// Seconds since the epoch as RFC 3339 (UTC).
pub(crate) fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    rfc3339(secs)
}

/// Formats Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
pub(crate) fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, (rem % 3600) / 60, rem % 60)
}

fn append_file<W: Write>(tar: &mut tar::Builder<W>, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_size(bytes.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut h, name, bytes)
}

fn append_blob<W: Write>(tar: &mut tar::Builder<W>, root: &StateRoot, digest: &str) -> std::io::Result<()> {
    let path = root.blob_path(digest);
    let f = fs::File::open(&path)?;
    let len = f.metadata()?.len();
    let mut h = tar::Header::new_ustar();
    h.set_size(len);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    tar.append_data(&mut h, format!("blobs/sha256/{hex}"), f)
}

/// Writes an OCI layout tarball (`docker` adds `manifest.json` for `docker load`).
/// A multi-platform build's `index.json` points at its image index.
fn write_image_tar(root: &StateRoot, made: &Made, dest: &Path, names: &[String], docker: bool) -> Result<(), Failure> {
    let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(Failure::io(Some("creating"), parent.display()))?;
    let tmp = parent.join(format!(
        ".{}.kiln-tmp",
        dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    ));
    let file = fs::File::create(&tmp).map_err(Failure::io(Some("creating"), tmp.display()))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::with_capacity(1 << 20, file));
    let io = |e: std::io::Error| Failure::io(Some("writing"), dest.display())(e);
    append_file(&mut tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io)?;
    let full_names: Vec<String> = names.iter().map(|n| normalize_name(n)).collect();
    let top = |annotations: Option<&BTreeMap<&str, String>>| {
        let mut entry = json!({"mediaType": made.media_type, "digest": made.digest, "size": made.size});
        if let Some(p) = made.platform() {
            entry["platform"] = p.clone();
        }
        if let Some(a) = annotations {
            entry["annotations"] = json!(a);
        }
        entry
    };
    let mut manifests = Vec::new();
    if full_names.is_empty() {
        manifests.push(top(None));
    }
    for n in &full_names {
        let mut annotations = BTreeMap::new();
        annotations.insert("org.opencontainers.image.ref.name", n.clone());
        if docker {
            annotations.insert("io.containerd.image.name", n.clone());
        }
        manifests.push(top(Some(&annotations)));
    }
    let index = json!({"schemaVersion": 2, "mediaType": INDEX, "manifests": manifests});
    append_file(&mut tar, "index.json", &serde_json::to_vec(&index).map_err(json_err)?).map_err(io)?;
    if docker {
        let [image] = made.images.as_slice() else {
            return Err(Failure::invalid(
                "a docker tarball holds one platform: use type=oci or type=image for a multi-platform image",
            ));
        };
        let config_hex = image.config_digest.strip_prefix("sha256:").unwrap_or(&image.config_digest);
        let layers: Vec<String> = image
            .layers
            .iter()
            .map(|l| format!("blobs/sha256/{}", l.digest.strip_prefix("sha256:").unwrap_or(&l.digest)))
            .collect();
        let repo_tags: Vec<String> = names.iter().map(|n| docker_tag(n)).collect();
        let manifest = json!([{"Config": format!("blobs/sha256/{config_hex}"), "RepoTags": repo_tags, "Layers": layers}]);
        append_file(&mut tar, "manifest.json", &serde_json::to_vec(&manifest).map_err(json_err)?).map_err(io)?;
    }
    let mut seen = std::collections::HashSet::new();
    for d in std::iter::once(&made.digest).chain(made.images.iter().flat_map(|image| {
        std::iter::once(&image.digest)
            .chain(std::iter::once(&image.config_digest))
            .chain(image.layers.iter().map(|l| &l.digest))
    })) {
        if seen.insert(d.clone()) {
            append_blob(&mut tar, root, d).map_err(io)?;
        }
    }
    let w = tar.into_inner().map_err(io)?;
    let f = w.into_inner().map_err(|e| io(e.into_error()))?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, dest).map_err(io)?;
    Ok(())
}

/// `docker.io/library/app:1` → `app:1`, as `docker images` shows it.
fn docker_tag(name: &str) -> String {
    let full = normalize_name(name);
    let short = full
        .strip_prefix("docker.io/library/")
        .or_else(|| full.strip_prefix("docker.io/"))
        .unwrap_or(&full);
    short.to_string()
}

/// Whether an exporter writes an image (kiln's store, OCI or docker tarball).
pub(crate) fn wants_image(exporters: &[Exporter]) -> bool {
    exporters
        .iter()
        .any(|e| matches!(e, Exporter::Image { .. } | Exporter::Oci { .. } | Exporter::Docker { .. }))
}

/// One target platform's result, for the exporters.
pub(crate) struct Target {
    /// `os/arch[/variant]` in a multi-platform build; `None` in a single one.
    pub platform: Option<String>,
    /// Its layers, bottom first.
    pub layers: crate::snapshot::Layers,
    /// The frontend's image config.
    pub config: Option<Json>,
}

/// What the image exporters made: one image manifest, or (several
/// platforms) an image index listing one manifest per platform.
pub(crate) struct Made {
    /// The manifest's or index's digest.
    pub digest: String,
    /// [`MANIFEST`] or [`INDEX`].
    pub media_type: &'static str,
    /// Its size.
    pub size: usize,
    /// The config digest (the image id) of a single image.
    pub config_digest: Option<String>,
    /// The images, one per platform.
    pub images: Vec<Image>,
}

impl Made {
    /// The platform of a single image (an index has none).
    fn platform(&self) -> Option<&Json> {
        match (self.media_type, self.images.as_slice()) {
            (MANIFEST, [image]) => Some(&image.platform),
            _ => None,
        }
    }
}

/// Makes the image (several platforms: each platform's and their index).
fn make(root: &StateRoot, targets: &[Target], epoch: Option<i64>) -> Result<Made, Failure> {
    let multi = targets.len() > 1 || targets.iter().any(|t| t.platform.is_some());
    let mut images = Vec::with_capacity(targets.len());
    for t in targets {
        images.push(make_image(root, &t.layers, t.config.as_ref(), t.platform.as_deref(), epoch)?);
    }
    if !multi {
        let image = images.pop().ok_or_else(|| Failure::Internal("no result to export".into()))?;
        return Ok(Made {
            digest: image.digest.clone(),
            media_type: MANIFEST,
            size: image.size,
            config_digest: Some(image.config_digest.clone()),
            images: vec![image],
        });
    }
    let manifests: Vec<Json> = images
        .iter()
        .map(|i| json!({"mediaType": MANIFEST, "digest": i.digest, "size": i.size, "platform": i.platform}))
        .collect();
    let index = json!({"schemaVersion": 2, "mediaType": INDEX, "manifests": manifests});
    let bytes = serde_json::to_vec(&index).map_err(json_err)?;
    let digest = store_blob(root, &bytes).map_err(blob_err(root))?;
    Ok(Made {
        digest,
        media_type: INDEX,
        size: bytes.len(),
        config_digest: None,
        images,
    })
}

/// A platform's folder in a multi-platform `local` or `tar` output, as
/// buildx names it: `linux/arm64/v8` → `linux_arm64_v8`.
fn platform_dir(platform: &str) -> String {
    platform.replace('/', "_")
}

/// Runs the exporters on the final layers. Returns the image (if one was
/// made) and what was written.
pub(crate) fn export(
    root: &StateRoot,
    targets: &[Target],
    exporters: &[Exporter],
    epoch: Option<i64>,
) -> Result<(Option<Made>, Vec<String>), SolveError> {
    let mut made: Option<Made> = None;
    let mut written = Vec::new();
    let multi = targets.iter().any(|t| t.platform.is_some());
    if multi {
        if let Some(e) = exporters.iter().find(|e| matches!(e, Exporter::Docker { .. })) {
            return Err(SolveError::Export {
                what: describe(e),
                failure: Failure::invalid(
                    "a docker tarball holds one platform: for several, use type=oci (an OCI layout with the index), \
                     type=image (kiln's store, then `kiln push`) or push=true",
                ),
            });
        }
    }
    if wants_image(exporters) {
        made = Some(make(root, targets, epoch).map_err(|failure| SolveError::Export {
            what: "making the image".into(),
            failure,
        })?);
    }
    for e in exporters {
        let failed = |failure: Failure| SolveError::Export {
            what: describe(e),
            failure,
        };
        match e {
            Exporter::Image { names, .. } => {
                if let Some(m) = &made {
                    tag_in_store(root, m, names).map_err(failed)?;
                    written.extend(names.iter().map(|n| normalize_name(n)));
                }
            }
            Exporter::Oci { dest, names } | Exporter::Docker { dest, names } => {
                if let Some(m) = &made {
                    write_image_tar(root, m, Path::new(dest), names, matches!(e, Exporter::Docker { .. })).map_err(failed)?;
                    written.push(dest.clone());
                }
            }
            Exporter::Local { dest } => {
                for t in targets {
                    let dest_path = match &t.platform {
                        Some(p) => Path::new(dest).join(platform_dir(p)),
                        None => Path::new(dest).to_path_buf(),
                    };
                    let view = mount_stack(root, &t.layers, None).map_err(|e| failed(Failure::mount("the result")(e)))?;
                    fs::create_dir_all(&dest_path).map_err(|e| failed(Failure::io(Some("creating"), dest_path.display())(e)))?;
                    crate::execute::fileop::copy_tree(&dest_path, &crate::execute::fileop::SourceView::Dir(view.path())).map_err(failed)?;
                }
                if crate::rootless::in_user_namespace() {
                    // Files leave the build as the user's own, as BuildKit's
                    // client writes them: ids of the subordinate range would
                    // be files the user cannot remove.
                    own_tree(Path::new(dest)).map_err(|e| failed(Failure::io(Some("taking ownership of"), dest)(e)))?;
                }
                written.push(dest.clone());
            }
            Exporter::Tar { dest } => {
                let dest_path = Path::new(dest);
                let tmp = dest_path.with_extension("kiln-tmp");
                let writing = |e| failed(Failure::io(Some("writing"), dest)(e));
                let f = fs::File::create(&tmp).map_err(writing)?;
                let mut tar = crate::snapshot::layer::tar_builder(std::io::BufWriter::with_capacity(1 << 20, f));
                for t in targets {
                    let view = mount_stack(root, &t.layers, None).map_err(|e| failed(Failure::mount("the result")(e)))?;
                    let prefix = match &t.platform {
                        Some(p) => {
                            // The platform's folder itself, then its tree in it.
                            let mut h = tar::Header::new_gnu();
                            h.set_entry_type(tar::EntryType::Directory);
                            h.set_mode(0o755);
                            h.set_size(0);
                            h.set_mtime(epoch.unwrap_or(0).max(0) as u64);
                            tar.append_data(&mut h, format!("{}/", platform_dir(p)), std::io::empty())
                                .map_err(writing)?;
                            std::path::PathBuf::from(platform_dir(p))
                        }
                        None => std::path::PathBuf::new(),
                    };
                    crate::snapshot::layer::append_tree(&mut tar, view.path(), &prefix, epoch).map_err(writing)?;
                }
                let w = tar.into_inner().map_err(writing)?;
                w.into_inner().map_err(|e| writing(e.into_error()))?;
                fs::rename(&tmp, dest_path).map_err(writing)?;
                written.push(dest.clone());
            }
        }
    }
    Ok((made, written))
}

/// Gives everything under `dir` to this process's user, keeping modes.
fn own_tree(dir: &Path) -> std::io::Result<()> {
    let me = (rustix::process::getuid(), rustix::process::getgid());
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d)? {
            let path = entry?.path();
            let meta = fs::symlink_metadata(&path)?;
            rustix::fs::chownat(
                rustix::fs::CWD,
                &path,
                Some(me.0),
                Some(me.1),
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )?;
            if !meta.file_type().is_symlink() {
                // chown clears setuid and setgid.
                fs::set_permissions(&path, meta.permissions())?;
            }
            if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    Ok(())
}

/// An exporter as `--output` spells it, for messages.
fn describe(e: &Exporter) -> String {
    match e {
        Exporter::Image { names, .. } => format!("type=image,name={}", names.join(",")),
        Exporter::Oci { dest, .. } => format!("type=oci,dest={dest}"),
        Exporter::Docker { dest, .. } => format!("type=docker,dest={dest}"),
        Exporter::Local { dest } => format!("type=local,dest={dest}"),
        Exporter::Tar { dest } => format!("type=tar,dest={dest}"),
    }
}

/// JSON this module made cannot fail to serialize; if it does, it is a bug.
fn json_err(e: serde_json::Error) -> Failure {
    Failure::Internal(format!("serializing JSON: {e}"))
}

/// Maps an error storing a blob in `root`.
fn blob_err(root: &StateRoot) -> impl FnOnce(std::io::Error) -> Failure {
    Failure::io(Some("storing a blob in"), root.store().display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn history_matches_layers() {
        let mut cfg = json!({"history": [{"created_by": "a"}, {"created_by": "ENV", "empty_layer": true}, {"created_by": "b"}]});
        let obj = cfg.as_object_mut().expect("object");
        align_history(obj, 3);
        assert_eq!(obj["history"].as_array().expect("array").len(), 4);
        let mut cfg = json!({"history": [{"created_by": "a"}, {"created_by": "b"}]});
        let obj = cfg.as_object_mut().expect("object");
        align_history(obj, 1);
        assert_eq!(obj["history"][1]["empty_layer"], json!(true));
    }
}
