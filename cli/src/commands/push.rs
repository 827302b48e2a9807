//! `kiln push NAME`: send an image from kiln's store to its registry.

use std::io::Write;
use std::path::PathBuf;

use serde_json::Value;

use crate::{EXIT_OK, EXIT_OTHER, EXIT_USAGE};

/// `kiln push` flags.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The image's name in kiln's store, which is also where it goes (`registry/repo:tag`).
    pub name: String,
    /// kiln's state root; default $KILN_ROOT or ~/.local/share/kiln.
    #[arg(long)]
    pub root: Option<PathBuf>,
}

/// Runs the command.
pub fn run(args: &Args, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let root = crate::host::state_root(args.root.as_deref());
    let name = match kiln_image::Reference::parse(&args.name) {
        Ok(r) => r.normalized(),
        Err(e) => {
            let _ = writeln!(err, "error: {:?} is not an image reference: {e}", args.name);
            return EXIT_USAGE;
        }
    };
    let index: Value = std::fs::read(root.join("store/index.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    let digest = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str() == Some(name.as_str()))
        .and_then(|m| m["digest"].as_str().map(str::to_string));
    let Some(digest) = digest else {
        let _ = writeln!(err, "error: no image {name} in kiln's store {} (see `kiln images`)", root.display());
        return EXIT_USAGE;
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(err, "error: {e}");
            return EXIT_OTHER;
        }
    };
    let client = kiln_oci::RegistryClient::new(kiln_oci::Credentials::from_docker_config());
    match runtime.block_on(kiln_oci::push_from_store(&client, &root, &digest, &name)) {
        Ok(r) => {
            let _ = writeln!(
                err,
                "pushed {name}: {} blobs uploaded, {} already there, {} mounted from another repository",
                r.uploaded, r.existing, r.mounted
            );
            let _ = writeln!(out, "{digest}");
            EXIT_OK
        }
        Err(e) => {
            let _ = writeln!(err, "error: pushing {name}: {e}");
            EXIT_OTHER
        }
    }
}
