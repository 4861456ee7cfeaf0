//! One-layer container images written without Docker, as a docker-archive
//! tarball (the `docker save` format), and their import into containerd
//! with `ctr`, which also takes the agent's OCI archives that
//! `cargo xtask image` writes. No registry is reachable from the lab: pods
//! run these images with `imagePullPolicy: Never`.
//!
//! The archive is deterministic: entries are sorted, owned by 0:0 with
//! mtime 0, and the config has fixed timestamps, so the same inputs give the
//! same image id.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail, ensure};
use sha2::{Digest as _, Sha256};

/// The containerd namespace the kubelet's CRI plugin uses.
pub const K8S_NAMESPACE: &str = "k8s.io";
/// `PATH` in every image unless [`ImageBuilder::env`] sets another.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const EPOCH: &str = "1970-01-01T00:00:00Z";

/// A file's contents: read from the host when the archive is written, or
/// given as bytes.
#[derive(Debug, Clone)]
pub enum Contents {
    Host(PathBuf),
    Bytes(Vec<u8>),
}

impl From<PathBuf> for Contents {
    fn from(p: PathBuf) -> Self {
        Self::Host(p)
    }
}

impl From<&Path> for Contents {
    fn from(p: &Path) -> Self {
        Self::Host(p.to_owned())
    }
}

impl From<Vec<u8>> for Contents {
    fn from(b: Vec<u8>) -> Self {
        Self::Bytes(b)
    }
}

impl From<&[u8]> for Contents {
    fn from(b: &[u8]) -> Self {
        Self::Bytes(b.to_vec())
    }
}

impl<const N: usize> From<&[u8; N]> for Contents {
    fn from(b: &[u8; N]) -> Self {
        Self::Bytes(b.to_vec())
    }
}

#[derive(Debug, Clone)]
enum Entry {
    File { contents: Contents, mode: u32 },
    Dir { mode: u32 },
    Symlink { target: String },
}

/// What [`ImageBuilder::write`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// The tag, as given to [`ImageBuilder::new`].
    pub name: String,
    /// `sha256:<hex>` of the config: the image id `crictl images` shows.
    pub id: String,
    /// `sha256:<hex>` of the uncompressed layer tar (also its chain id, as
    /// the only layer).
    pub diff_id: String,
}

/// Builds a one-layer linux image. Paths are absolute paths inside the
/// image; a later entry for the same path replaces the earlier one, and
/// missing parent directories are added with mode 0755.
#[derive(Debug, Clone)]
pub struct ImageBuilder {
    name: String,
    arch: String,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: BTreeMap<String, String>,
    working_dir: String,
    entries: BTreeMap<String, Entry>,
}

impl ImageBuilder {
    /// `name` is `repository:tag`, e.g. `imdsguard.local/podprobe:e2e`; the
    /// tag is required. The architecture defaults to the host's.
    pub fn new(name: impl Into<String>) -> Self {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        Self {
            name: name.into(),
            arch: arch.into(),
            entrypoint: None,
            cmd: None,
            env: BTreeMap::from([("PATH".into(), DEFAULT_PATH.into())]),
            working_dir: "/".into(),
            entries: BTreeMap::new(),
        }
    }

    /// The OCI architecture: `amd64`, `arm64`, ...
    pub fn arch(mut self, arch: impl Into<String>) -> Self {
        self.arch = arch.into();
        self
    }

    pub fn entrypoint<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.entrypoint = Some(args.into_iter().map(Into::into).collect());
        self
    }

    pub fn cmd<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.cmd = Some(args.into_iter().map(Into::into).collect());
        self
    }

    /// Sets one environment variable (replacing one of the same name).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    pub fn working_dir(mut self, dir: impl Into<String>) -> Self {
        self.working_dir = dir.into();
        self
    }

    /// A regular file with `mode` (permission bits, e.g. `0o755`).
    pub fn file(mut self, path: &str, contents: impl Into<Contents>, mode: u32) -> Self {
        let contents = contents.into();
        self.entries
            .insert(key(path), Entry::File { contents, mode });
        self
    }

    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        self.entries.insert(key(path), Entry::Dir { mode });
        self
    }

    /// A symlink at `path` pointing to `target` (taken as is).
    pub fn symlink(mut self, path: &str, target: impl Into<String>) -> Self {
        let target = target.into();
        self.entries.insert(key(path), Entry::Symlink { target });
        self
    }

    /// The uncompressed layer tar.
    pub fn layer(&self) -> anyhow::Result<Vec<u8>> {
        let mut entries = self.entries.clone();
        for path in self.entries.keys() {
            ensure!(
                !path.is_empty() && path.split('/').all(|c| !matches!(c, "" | "." | "..")),
                "bad image path {path:?}: give an absolute path without empty, `.` or `..` components"
            );
            let mut parent = path.as_str();
            while let Some((p, _)) = parent.rsplit_once('/') {
                match entries.get(p) {
                    None => {
                        entries.insert(p.to_owned(), Entry::Dir { mode: 0o755 });
                    }
                    Some(Entry::Dir { .. }) => {}
                    Some(_) => {
                        bail!("image path {path:?} is under {p:?}, which is not a directory")
                    }
                }
                parent = p;
            }
        }
        // A BTreeMap sorts every directory before what it holds.
        let mut tar = tar::Builder::new(Vec::new());
        for (path, entry) in &entries {
            let mut header = tar::Header::new_gnu();
            header.set_mtime(0);
            header.set_uid(0);
            header.set_gid(0);
            header.set_size(0);
            let appended = match entry {
                Entry::Dir { mode } => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_mode(mode & 0o7777);
                    tar.append_data(&mut header, format!("{path}/"), std::io::empty())
                }
                Entry::Symlink { target } => {
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_mode(0o777);
                    tar.append_link(&mut header, path, target)
                }
                Entry::File { contents, mode } => {
                    let data = match contents {
                        Contents::Bytes(b) => b.clone(),
                        Contents::Host(p) => std::fs::read(p)
                            .with_context(|| format!("read {} for {path}", p.display()))?,
                    };
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_mode(mode & 0o7777);
                    header.set_size(data.len() as u64);
                    tar.append_data(&mut header, path, data.as_slice())
                }
            };
            appended.with_context(|| format!("add {path} to the layer"))?;
        }
        Ok(tar.into_inner()?)
    }

    /// The image config JSON for a layer with `diff_id`.
    fn config(&self, diff_id: &str) -> anyhow::Result<Vec<u8>> {
        let env: Vec<String> = self.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let config = serde_json::json!({
            "architecture": self.arch,
            "os": "linux",
            "created": EPOCH,
            "config": {
                "Entrypoint": self.entrypoint,
                "Cmd": self.cmd,
                "Env": env,
                "WorkingDir": self.working_dir,
            },
            "rootfs": { "type": "layers", "diff_ids": [diff_id] },
            "history": [{ "created": EPOCH, "created_by": "imdsguard_testlab::image" }],
        });
        Ok(serde_json::to_vec(&config)?)
    }

    /// Writes the docker-archive tarball to `path`.
    pub fn write(&self, path: impl AsRef<Path>) -> anyhow::Result<Image> {
        let path = path.as_ref();
        let (_, tag) = self.name.rsplit_once('/').unwrap_or(("", &self.name));
        ensure!(
            matches!(tag.split_once(':'), Some((repo, tag)) if !repo.is_empty() && !tag.is_empty())
                && !self.name.contains('@'),
            "image name {:?} needs a tag: repository:tag",
            self.name
        );
        let layer = self.layer()?;
        let layer_hex = sha256_hex(&layer);
        let diff_id = format!("sha256:{layer_hex}");
        let config = self.config(&diff_id)?;
        let config_hex = sha256_hex(&config);
        let manifest = serde_json::to_vec(&serde_json::json!([{
            "Config": format!("{config_hex}.json"),
            "RepoTags": [self.name],
            "Layers": [format!("{layer_hex}/layer.tar")],
        }]))?;

        let file = File::create(path).with_context(|| format!("create {}", path.display()))?;
        let mut tar = tar::Builder::new(BufWriter::new(file));
        let mut add = |name: String, mode: u32, data: &[u8]| {
            let mut header = tar::Header::new_gnu();
            header.set_mtime(0);
            header.set_mode(mode);
            header.set_size(data.len() as u64);
            header.set_entry_type(if name.ends_with('/') {
                tar::EntryType::Directory
            } else {
                tar::EntryType::Regular
            });
            tar.append_data(&mut header, &name, data)
                .with_context(|| format!("add {name} to {}", path.display()))
        };
        add(format!("{layer_hex}/"), 0o755, &[])?;
        add(format!("{layer_hex}/layer.tar"), 0o644, &layer)?;
        add(format!("{config_hex}.json"), 0o644, &config)?;
        add("manifest.json".into(), 0o644, &manifest)?;
        tar.into_inner()?
            .into_inner()
            .map_err(|e| e.into_error())?
            .sync_all()
            .with_context(|| format!("write {}", path.display()))?;
        Ok(Image {
            name: self.name.clone(),
            id: format!("sha256:{config_hex}"),
            diff_id,
        })
    }
}

/// The map key of an image path: without the leading and trailing `/`.
fn key(path: &str) -> String {
    path.trim_matches('/').to_owned()
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The name containerd stores for `name`, as the docker reference
/// normalisation gives it: `podprobe:e2e` is
/// `docker.io/library/podprobe:e2e`, a name whose first component holds a
/// `.` or `:` (or is `localhost`) keeps its registry.
pub fn normalize(name: &str) -> String {
    let (first, rest) = name.split_once('/').unwrap_or(("", name));
    let mut full = if first == "docker.io" && !rest.contains('/') {
        format!("docker.io/library/{rest}")
    } else if first.contains(['.', ':']) || first == "localhost" {
        name.to_owned()
    } else if first.is_empty() || first == "library" {
        format!("docker.io/library/{rest}")
    } else {
        format!("docker.io/{name}")
    };
    let last = full.rsplit('/').next().unwrap_or_default();
    if !last.contains([':', '@']) {
        full.push_str(":latest");
    }
    full
}

fn ctr(socket: &Path) -> Command {
    let mut cmd = Command::new("ctr");
    cmd.arg("--address").arg(socket).args([
        "--namespace",
        K8S_NAMESPACE,
        "--connect-timeout",
        "10s",
    ]);
    cmd
}

fn run_ctr(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Imports a docker-archive into the `k8s.io` namespace of the containerd
/// at `containerd_socket` and unpacks it into the default snapshotter
/// (overlayfs, as the CRI plugin uses), so that kubelet can run it with
/// `imagePullPolicy: Never`.
pub fn import(
    archive: impl AsRef<Path>,
    containerd_socket: impl AsRef<Path>,
) -> anyhow::Result<()> {
    run_ctr(
        ctr(containerd_socket.as_ref())
            .args(["images", "import", "--no-unpack=false"])
            .arg(archive.as_ref()),
    )
    .map(drop)
}

/// Imports an OCI archive (or a docker-archive) for one `platform`, e.g.
/// `linux/amd64`, and unpacks it as [`import`] does. ctr names an OCI
/// archive's image by its index's `io.containerd.image.name` annotation.
pub fn import_platform(
    archive: impl AsRef<Path>,
    platform: &str,
    containerd_socket: impl AsRef<Path>,
) -> anyhow::Result<()> {
    run_ctr(
        ctr(containerd_socket.as_ref())
            .args([
                "images",
                "import",
                "--no-unpack=false",
                "--platform",
                platform,
            ])
            .arg(archive.as_ref()),
    )
    .map(drop)
}

/// Gives the image `source` (a name containerd holds) the further names
/// `targets`, replacing images of those names.
pub fn tag(
    source: &str,
    targets: &[&str],
    containerd_socket: impl AsRef<Path>,
) -> anyhow::Result<()> {
    run_ctr(
        ctr(containerd_socket.as_ref())
            .args(["images", "tag", "--force", source])
            .args(targets),
    )
    .map(drop)
}

/// The image names in the `k8s.io` namespace (`ctr images ls -q`).
pub fn list(containerd_socket: impl AsRef<Path>) -> anyhow::Result<Vec<String>> {
    let out = run_ctr(ctr(containerd_socket.as_ref()).args(["images", "ls", "-q"]))?;
    Ok(out.lines().map(str::to_owned).collect())
}

/// Whether `name` (normalised as containerd does) is in the `k8s.io`
/// namespace.
pub fn is_listed(name: &str, containerd_socket: impl AsRef<Path>) -> anyhow::Result<bool> {
    let name = normalize(name);
    Ok(list(containerd_socket)?.contains(&name))
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;
    use crate::scratch::ScratchDir;

    fn podprobe() -> ImageBuilder {
        ImageBuilder::new("imdsguard.local/podprobe:e2e")
            .arch("amd64")
            .entrypoint(["/podprobe"])
            .cmd(["--interval-ms", "500"])
            .env("PROBE", "1")
            .file("/podprobe", b"\x7fELF not really", 0o755)
            .file("/etc/hosts", b"127.0.0.1 localhost\n".as_slice(), 0o644)
            .dir("/tmp", 0o1777)
            .file("/usr/local/bin/tool", b"#!/bin/sh\n", 0o700)
            .symlink("/bin", "usr/local/bin")
    }

    /// The members of a tar, by name, with their headers and data.
    fn members(tar: &[u8]) -> Vec<(String, tar::Header, Vec<u8>)> {
        tar::Archive::new(tar)
            .entries()
            .expect("a tar")
            .map(|e| {
                let mut e = e.expect("an entry");
                let name = e.path().expect("a path").to_string_lossy().into_owned();
                let dir = e.header().entry_type().is_dir();
                let mut data = Vec::new();
                e.read_to_end(&mut data).expect("entry data");
                let name = if dir && !name.ends_with('/') {
                    name + "/"
                } else {
                    name
                };
                (name, e.header().clone(), data)
            })
            .collect()
    }

    fn written(builder: &ImageBuilder) -> (Image, Vec<u8>) {
        let dir = ScratchDir::new("imdsguard-image").expect("scratch dir");
        let path = dir.join("podprobe.tar");
        let image = builder.write(&path).expect("write the archive");
        (image, std::fs::read(&path).expect("read the archive"))
    }

    #[test]
    fn image_manifest_config_and_diff_id_agree() {
        let (image, archive) = written(&podprobe());
        let files: BTreeMap<String, Vec<u8>> = members(&archive)
            .into_iter()
            .map(|(n, _, d)| (n, d))
            .collect();
        let manifest: serde_json::Value =
            serde_json::from_slice(&files["manifest.json"]).expect("manifest.json");
        let m = &manifest.as_array().expect("a list")[..];
        assert_eq!(m.len(), 1, "{manifest}");
        assert_eq!(
            m[0]["RepoTags"],
            serde_json::json!(["imdsguard.local/podprobe:e2e"])
        );
        let config_name = m[0]["Config"].as_str().expect("Config");
        let config_bytes = &files[config_name];
        assert_eq!(format!("sha256:{}", sha256_hex(config_bytes)), image.id);
        assert_eq!(config_name, format!("{}.json", sha256_hex(config_bytes)));
        let layers = m[0]["Layers"].as_array().expect("Layers");
        assert_eq!(layers.len(), 1);
        let layer_name = layers[0].as_str().expect("a layer");
        let layer = &files[layer_name];
        let layer_hex = sha256_hex(layer);
        assert_eq!(layer_name, format!("{layer_hex}/layer.tar"));
        assert_eq!(image.diff_id, format!("sha256:{layer_hex}"));

        let config: serde_json::Value = serde_json::from_slice(config_bytes).expect("config");
        assert_eq!(
            config["rootfs"]["diff_ids"],
            serde_json::json!([image.diff_id])
        );
        assert_eq!(config["rootfs"]["type"], "layers");
        assert_eq!(
            (config["architecture"].as_str(), config["os"].as_str()),
            (Some("amd64"), Some("linux"))
        );
        let c = &config["config"];
        assert_eq!(c["Entrypoint"], serde_json::json!(["/podprobe"]));
        assert_eq!(c["Cmd"], serde_json::json!(["--interval-ms", "500"]));
        assert_eq!(
            c["Env"],
            serde_json::json!([format!("PATH={DEFAULT_PATH}"), "PROBE=1"])
        );
        assert_eq!(c["WorkingDir"], "/");
    }

    #[test]
    fn image_layer_entries_modes_and_parents() {
        let layer = podprobe().layer().expect("the layer");
        let got: Vec<(String, tar::EntryType, u32, Vec<u8>)> = members(&layer)
            .into_iter()
            .map(|(name, h, data)| {
                assert_eq!(
                    (h.mtime().unwrap(), h.uid().unwrap(), h.gid().unwrap()),
                    (0, 0, 0),
                    "{name}"
                );
                let data = match h.link_name().unwrap() {
                    Some(target) => target.to_string_lossy().as_bytes().to_vec(),
                    None => data,
                };
                (name, h.entry_type(), h.mode().unwrap(), data)
            })
            .collect();
        use tar::EntryType::{Directory as D, Regular as F, Symlink as L};
        let want: Vec<(String, tar::EntryType, u32, Vec<u8>)> = [
            ("bin", L, 0o777, &b"usr/local/bin"[..]),
            ("etc/", D, 0o755, b""),
            ("etc/hosts", F, 0o644, b"127.0.0.1 localhost\n"),
            ("podprobe", F, 0o755, b"\x7fELF not really"),
            ("tmp/", D, 0o1777, b""),
            ("usr/", D, 0o755, b""),
            ("usr/local/", D, 0o755, b""),
            ("usr/local/bin/", D, 0o755, b""),
            ("usr/local/bin/tool", F, 0o700, b"#!/bin/sh\n"),
        ]
        .into_iter()
        .map(|(n, t, m, d)| (n.to_owned(), t, m, d.to_vec()))
        .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn image_digest_is_deterministic() {
        let dir = ScratchDir::new("imdsguard-image-src").expect("scratch dir");
        let host = dir.join("probe");
        std::fs::write(&host, b"same bytes").expect("write a host file");
        let build = || podprobe().file("/probe", host.as_path(), 0o755);
        let (a, archive_a) = written(&build());
        // A later mtime and other permissions on the host change nothing.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&host, b"same bytes").expect("rewrite the host file");
        let (b, archive_b) = written(&build());
        assert_eq!(a, b);
        assert!(archive_a == archive_b, "the archives differ");
        // Only the inputs do.
        let (c, _) = written(&build().file("/probe", host.as_path(), 0o750));
        assert_ne!(c.diff_id, a.diff_id);
        assert_ne!(c.id, a.id);
    }

    #[test]
    fn image_refuses_bad_names_and_paths() {
        let dir = ScratchDir::new("imdsguard-image-bad").expect("scratch dir");
        let out = dir.join("x.tar");
        for name in [
            "podprobe",
            "localhost:5000/podprobe",
            "podprobe:",
            "p@sha256:00",
        ] {
            let e = ImageBuilder::new(name).write(&out).unwrap_err();
            assert!(e.to_string().contains("needs a tag"), "{name}: {e}");
        }
        for path in ["/", "/a/../b", "/a//b", "/./a"] {
            let e = ImageBuilder::new("p:1")
                .file(path, b"", 0o644)
                .layer()
                .unwrap_err();
            assert!(e.to_string().contains("bad image path"), "{path}: {e}");
        }
        let e = ImageBuilder::new("p:1")
            .file("/a", b"", 0o644)
            .file("/a/b", b"", 0o644)
            .layer()
            .unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        let missing = ImageBuilder::new("p:1").file("/x", dir.join("missing").as_path(), 0o644);
        assert!(missing.layer().is_err());
    }

    #[test]
    fn image_names_normalize_as_containerd_does() {
        for (name, want) in [
            (
                "imdsguard.local/podprobe:e2e",
                "imdsguard.local/podprobe:e2e",
            ),
            ("podprobe:e2e", "docker.io/library/podprobe:e2e"),
            ("library/podprobe:e2e", "docker.io/library/podprobe:e2e"),
            ("docker.io/podprobe:e2e", "docker.io/library/podprobe:e2e"),
            ("me/podprobe:e2e", "docker.io/me/podprobe:e2e"),
            ("localhost/podprobe:1", "localhost/podprobe:1"),
            ("localhost:5000/podprobe", "localhost:5000/podprobe:latest"),
        ] {
            assert_eq!(normalize(name), want, "{name}");
        }
    }
}
