//! Writing the OCI image layout (one layer, config, manifest, index) into a
//! byte-for-byte reproducible tar archive.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::Context as _;
use sha2::{Digest as _, Sha256};

use super::{Arch, VERSION, image_name};

/// Where the binary sits in the image, as the manifests' `command` expects.
pub(super) const BINARY_PATH: &str = "usr/local/bin/imdsguard";
pub(super) const EPOCH: &str = "1970-01-01T00:00:00Z";

pub(super) const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(super) const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(super) const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub(super) const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

/// The image's one layer: the binary at /usr/local/bin/imdsguard and its
/// parent directories, sorted, owned by 0:0, mtime 0.
pub(super) fn layer(binary: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    let parts: Vec<&str> = BINARY_PATH.split('/').collect();
    for i in 1..parts.len() {
        let dir = format!("{}/", parts[..i].join("/"));
        append(&mut tar, &dir, 0o755, &[])?;
    }
    append(&mut tar, BINARY_PATH, 0o755, binary)?;
    Ok(tar.into_inner()?)
}

/// One tar member with fixed metadata: a directory when `name` ends in `/`.
pub(super) fn append<W: std::io::Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    mode: u32,
    data: &[u8],
) -> anyhow::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mode(mode);
    header.set_size(data.len() as u64);
    header.set_entry_type(if name.ends_with('/') {
        tar::EntryType::Directory
    } else {
        tar::EntryType::Regular
    });
    tar.append_data(&mut header, name, data)
        .with_context(|| format!("add {name} to the tar"))
}

/// The OCI platform object of `arch`.
pub(super) fn platform(arch: Arch) -> serde_json::Value {
    let mut p = serde_json::json!({ "architecture": arch.name(), "os": "linux" });
    if let Some(v) = arch.variant() {
        p["variant"] = v.into();
    }
    p
}

/// The image config: the entrypoint, command and user the chart expects (root,
/// on purpose: Kubernetes puts the added capabilities into the effective
/// set only for uid 0; deploy/README.md, "The image").
pub(super) fn config(arch: Arch, diff_id: &str) -> anyhow::Result<Vec<u8>> {
    let labels = BTreeMap::from([
        ("org.opencontainers.image.title", "imdsguard"),
        (
            "org.opencontainers.image.description",
            "imdsguard node agent: eBPF egress enforcement for the cloud metadata service",
        ),
        ("org.opencontainers.image.version", VERSION),
        (
            "org.opencontainers.image.licenses",
            env!("CARGO_PKG_LICENSE"),
        ),
    ]);
    let mut config = platform(arch);
    let fields = serde_json::json!({
        "created": EPOCH,
        "config": {
            "User": "0:0",
            "Entrypoint": [format!("/{BINARY_PATH}")],
            "Cmd": ["--help"],
            "Env": ["PATH=/usr/local/bin"],
            "WorkingDir": "/",
            "Labels": labels,
        },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        "history": [{ "created": EPOCH, "created_by": "cargo xtask image" }],
    });
    for (k, v) in fields.as_object().expect("an object") {
        config[k] = v.clone();
    }
    Ok(serde_json::to_vec(&config)?)
}

/// A content descriptor for `data`.
pub(super) fn descriptor(media_type: &str, data: &[u8]) -> serde_json::Value {
    serde_json::json!({
        "mediaType": media_type,
        "digest": format!("sha256:{}", sha256_hex(data)),
        "size": data.len(),
    })
}

/// The whole OCI image layout as (path, bytes), sorted by path. The index
/// names the image twice: `io.containerd.image.name` (the full reference,
/// which `ctr images import` uses as is) and
/// `org.opencontainers.image.ref.name` (the tag, the layout spec's usage,
/// which skopeo's `oci-archive:FILE:TAG` and podman read).
pub(super) fn layout(
    arch: Arch,
    binary: &[u8],
) -> anyhow::Result<(BTreeMap<String, Vec<u8>>, String)> {
    let layer = layer(binary)?;
    let diff_id = format!("sha256:{}", sha256_hex(&layer));
    let config = config(arch, &diff_id)?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": descriptor(MEDIA_CONFIG, &config),
        "layers": [descriptor(MEDIA_LAYER, &layer)],
    }))?;
    let mut target = descriptor(MEDIA_MANIFEST, &manifest);
    target["platform"] = platform(arch);
    target["annotations"] = serde_json::json!({
        "io.containerd.image.name": image_name(),
        "org.opencontainers.image.ref.name": VERSION,
    });
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [target],
    }))?;
    let manifest_digest = format!("sha256:{}", sha256_hex(&manifest));
    let mut files = BTreeMap::new();
    for blob in [layer, config, manifest] {
        files.insert(format!("blobs/sha256/{}", sha256_hex(&blob)), blob);
    }
    files.insert("index.json".into(), index);
    files.insert(
        "oci-layout".into(),
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
    );
    Ok((files, manifest_digest))
}

/// Writes the OCI archive of `arch` holding `binary` to `path` (through a
/// temporary file, so a cut-short run leaves no half archive). Returns the
/// manifest digest.
pub(super) fn write_archive(arch: Arch, binary: &Path, path: &Path) -> anyhow::Result<String> {
    let bytes = fs::read(binary).with_context(|| format!("read {}", binary.display()))?;
    let (files, manifest_digest) = layout(arch, &bytes)?;
    let dir = path.parent().context("an archive path has a parent")?;
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut tar = tar::Builder::new(Vec::new());
    append(&mut tar, "blobs/", 0o755, &[])?;
    append(&mut tar, "blobs/sha256/", 0o755, &[])?;
    for (name, data) in &files {
        append(&mut tar, name, 0o644, data)?;
    }
    let partial = path.with_extension("tar.partial");
    fs::write(&partial, tar.into_inner()?)
        .with_context(|| format!("write {}", partial.display()))?;
    fs::rename(&partial, path).with_context(|| format!("write {}", path.display()))?;
    Ok(manifest_digest)
}

pub(super) fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
