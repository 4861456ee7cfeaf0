//! `cargo xtask image`: the agent image for amd64 and arm64, built from the
//! repository with no Docker engine and no registry.
//!
//! For each architecture it:
//!
//! 1. builds the static (musl) `imdsguard` binary in release mode (arm64 is
//!    cross-built with Debian's gcc-aarch64-linux-gnu, as .cargo/config.toml
//!    sets up);
//! 2. checks it: `file` must say the right machine and static linkage, and
//!    `--version` must print this workspace's version, run natively or
//!    under qemu-user (Debian's qemu-user-static) for the other
//!    architecture;
//! 3. writes `target/image/imdsguard-<version>-<arch>.oci.tar`, an OCI
//!    image layout in a tar (what `skopeo copy oci-archive:...` and
//!    `ctr images import` read), named [`REPOSITORY`]`:<version>`.
//!
//! Then it checks that both binaries embed the same eBPF programs: the
//! daemon's build.rs builds them for bpfel-unknown-none whatever the target
//! (only names in the debug info and BTF differ, see [`same_bpf_programs`]).
//!
//! The layout is written here rather than by umoci or buildah: it is one
//! layer, a config, a manifest and an index, and writing them ourselves
//! keeps the archives byte-for-byte reproducible (sorted entries, uid 0,
//! mtime 0, fixed timestamps) with no tool to install.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail, ensure};
use clap::{Args, ValueEnum};
use sha2::{Digest as _, Sha256};

use crate::test::{cargo, ensure_commands, output, status, target_dir};

/// The chart's default `image.repository` (deploy/helm/imdsguard/values.yaml);
/// the archives are named `REPOSITORY:<version>`, the chart's default tag.
pub const REPOSITORY: &str = "ghcr.io/imdsguard/imdsguard";
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Where the binary sits in the image, as the manifests' `command` expects.
const BINARY_PATH: &str = "usr/local/bin/imdsguard";
const EPOCH: &str = "1970-01-01T00:00:00Z";
const EM_BPF: u16 = 247;

const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

#[derive(Args)]
pub struct Options {
    /// Only this architecture (default: both).
    #[arg(long, value_enum)]
    pub arch: Option<Arch>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Arch {
    Amd64,
    Arm64,
}

pub const ALL: [Arch; 2] = [Arch::Amd64, Arch::Arm64];

impl Arch {
    /// The OCI (GOARCH) name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Amd64 => "amd64",
            Self::Arm64 => "arm64",
        }
    }

    pub fn rust_target(self) -> &'static str {
        match self {
            Self::Amd64 => "x86_64-unknown-linux-musl",
            Self::Arm64 => "aarch64-unknown-linux-musl",
        }
    }

    /// The OCI platform variant (arm64 is v8, amd64 has none).
    fn variant(self) -> Option<&'static str> {
        match self {
            Self::Amd64 => None,
            Self::Arm64 => Some("v8"),
        }
    }

    /// What `file` calls the machine.
    fn file_machine(self) -> &'static str {
        match self {
            Self::Amd64 => "x86-64",
            Self::Arm64 => "ARM aarch64",
        }
    }

    /// The host's architecture, whose binaries run natively.
    fn host() -> Option<Self> {
        match std::env::consts::ARCH {
            "x86_64" => Some(Self::Amd64),
            "aarch64" => Some(Self::Arm64),
            _ => None,
        }
    }

    /// The command and Debian package that build C for this target (ring's
    /// C and assembly) and link it. .cargo/config.toml names the cross gcc.
    fn c_toolchain(self) -> (&'static str, &'static str) {
        match self {
            Self::Amd64 => ("musl-gcc", "musl-tools"),
            Self::Arm64 => ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
        }
    }

    /// The Debian packages beyond the compiler: the GNU cross gcc has no
    /// libc headers of its own, and ring's C includes <stdint.h>.
    fn c_headers(self) -> Option<(&'static str, &'static str)> {
        match self {
            Self::Amd64 => None,
            Self::Arm64 => Some((
                "/usr/aarch64-linux-gnu/include/stdint.h",
                "libc6-dev-arm64-cross",
            )),
        }
    }

    /// How to run a binary of this architecture here: natively, or under
    /// qemu-user.
    fn runner(self) -> Option<(&'static str, &'static str)> {
        if Self::host() == Some(self) {
            return None;
        }
        Some(match self {
            Self::Amd64 => ("qemu-x86_64-static", "qemu-user-static"),
            Self::Arm64 => ("qemu-aarch64-static", "qemu-user-static"),
        })
    }
}

/// One built and checked image.
pub struct Built {
    pub arch: Arch,
    pub binary: PathBuf,
    pub archive: PathBuf,
    /// `sha256:<hex>` of the image manifest.
    pub manifest_digest: String,
    /// The image's name in the archive's index.
    pub name: String,
}

pub fn run(o: Options) -> anyhow::Result<()> {
    let arches = o.arch.map_or(ALL.to_vec(), |a| vec![a]);
    let built = build(&arches)?;
    for b in &built {
        println!(
            "{}  {}  {}  {}",
            b.arch.name(),
            b.archive.display(),
            b.name,
            b.manifest_digest
        );
    }
    Ok(())
}

/// Builds, checks and writes the images of `arches`; with both, also checks
/// that they embed the same eBPF object.
pub fn build(arches: &[Arch]) -> anyhow::Result<Vec<Built>> {
    let mut built = Vec::new();
    for &arch in arches {
        let binary = build_binary(arch)?;
        let archive = image_dir().join(archive_name(arch));
        let manifest_digest = write_archive(arch, &binary, &archive)?;
        eprintln!(
            "xtask: wrote {} ({}, manifest {manifest_digest})",
            archive.display(),
            image_name()
        );
        built.push(Built {
            arch,
            binary,
            archive,
            manifest_digest,
            name: image_name(),
        });
    }
    if built.len() > 1 {
        same_bpf_programs(&built)?;
    }
    Ok(built)
}

pub fn image_dir() -> PathBuf {
    target_dir().join("image")
}

/// `imdsguard-<version>-<arch>.oci.tar`.
pub fn archive_name(arch: Arch) -> String {
    format!("imdsguard-{VERSION}-{}.oci.tar", arch.name())
}

/// `REPOSITORY:<version>`.
pub fn image_name() -> String {
    format!("{REPOSITORY}:{VERSION}")
}

/// Builds the static release binary for `arch` and checks it (see the
/// module docs). Returns its path.
pub fn build_binary(arch: Arch) -> anyhow::Result<PathBuf> {
    crate::setup::run()?;
    let target = arch.rust_target();
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !installed.lines().any(|l| l.trim() == target) {
        status(Command::new("rustup").args(["target", "add", target]))?;
    }
    let mut commands = vec![arch.c_toolchain(), ("file", "file")];
    commands.extend(arch.c_headers());
    commands.extend(arch.runner());
    ensure_commands(&commands)?;
    let started = Instant::now();
    status(cargo().args([
        "build",
        "--release",
        "--locked",
        "--target",
        target,
        "-p",
        "imdsguard-daemon",
        "--bin",
        "imdsguard",
    ]))?;
    eprintln!(
        "xtask: built the {} binary in {:.0} s",
        arch.name(),
        started.elapsed().as_secs_f64()
    );
    let binary = target_dir().join(target).join("release/imdsguard");
    check_binary(arch, &binary)?;
    Ok(binary)
}

/// `file` says the machine and static linkage; `--version` runs (under
/// qemu-user for a foreign architecture) and names this version.
fn check_binary(arch: Arch, binary: &Path) -> anyhow::Result<()> {
    let said = output(Command::new("file").arg("--brief").arg(binary))?;
    eprintln!("xtask: file {}: {}", binary.display(), said.trim());
    ensure!(
        said.contains(arch.file_machine()),
        "{} is not an {} binary: {said}",
        binary.display(),
        arch.file_machine()
    );
    // `static-pie linked` or `statically linked`; a dynamic one says
    // `dynamically linked, interpreter ...`.
    ensure!(
        said.contains("static") && !said.contains("dynamically"),
        "{} links dynamically, but the image has no libc: {said}",
        binary.display()
    );
    let mut run = match arch.runner() {
        None => Command::new(binary),
        Some((qemu, _)) => {
            let mut c = Command::new(qemu);
            c.arg(binary);
            c
        }
    };
    let version = output(run.arg("--version"))?;
    let want = format!("imdsguard {VERSION}");
    ensure!(
        version.trim() == want,
        "{} --version says {:?}, want {want:?}",
        binary.display(),
        version.trim()
    );
    eprintln!(
        "xtask: {} --version{}: {}",
        binary.display(),
        arch.runner()
            .map_or(String::new(), |(qemu, _)| format!(" (under {qemu})")),
        version.trim()
    );
    Ok(())
}

/// The one BPF ELF object inside `binary`, which embeds it with
/// `include_bytes_aligned!`: a 64-bit little-endian ELF header with
/// `e_machine` EM_BPF, running to the end of its section headers (where
/// LLVM's objects end).
fn embedded_bpf_object(binary: &[u8]) -> anyhow::Result<&[u8]> {
    let u16_at = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
    let mut found = Vec::new();
    let mut at = 0;
    while let Some(i) = binary[at..].windows(4).position(|w| w == b"\x7fELF") {
        let start = at + i;
        at = start + 4;
        let h = &binary[start..];
        if h.len() < 64 || h[4] != 2 || h[5] != 1 || u16_at(h, 18) != EM_BPF {
            continue;
        }
        let shoff = u64::from_le_bytes(h[0x28..0x30].try_into().expect("8 bytes"));
        let end = usize::try_from(shoff)
            .ok()
            .and_then(|o| {
                o.checked_add(usize::from(u16_at(h, 0x3a)) * usize::from(u16_at(h, 0x3c)))
            })
            .filter(|&e| e >= 64 && e <= h.len());
        if let Some(end) = end {
            found.push(&h[..end]);
        }
    }
    match found[..] {
        [object] => Ok(object),
        [] => bail!("no BPF ELF object found"),
        _ => bail!("{} BPF ELF objects found, want one", found.len()),
    }
}

/// Every binary embeds the same eBPF programs. The objects are not
/// byte-identical: aya-build passes the target's `--cfg bpf_target_arch`,
/// which picks aya-ebpf-bindings' module of that architecture, and the
/// module's name (`x86_64/helpers.rs`, `aarch64/helpers.rs`) shows up in
/// the debug info and in the BTF's strings. Every other section (the
/// programs, their relocations, maps, symbols, license) must be equal.
fn same_bpf_programs(built: &[Built]) -> anyhow::Result<()> {
    let mut seen = Vec::new();
    for b in built {
        let bytes = fs::read(&b.binary).with_context(|| format!("read {}", b.binary.display()))?;
        let object = embedded_bpf_object(&bytes)
            .with_context(|| format!("the eBPF object in {}", b.binary.display()))?;
        let sections = program_sections(object)
            .with_context(|| format!("the eBPF object in {}", b.binary.display()))?;
        eprintln!(
            "xtask: the {} binary embeds a {} byte eBPF object, sha256 {}",
            b.arch.name(),
            object.len(),
            sha256_hex(object)
        );
        seen.push((b.arch, sections));
    }
    let (first, want) = &seen[0];
    for (arch, got) in &seen[1..] {
        let differ: Vec<&str> = want
            .keys()
            .chain(got.keys())
            .filter(|k| want.get(*k) != got.get(*k))
            .map(String::as_str)
            .collect();
        ensure!(
            differ.is_empty(),
            "the {} and {} eBPF objects differ in {}",
            first.name(),
            arch.name(),
            differ.join(", ")
        );
    }
    let digest = sha256_hex(
        want.iter()
            .map(|(name, hash)| format!("{name} {hash}\n"))
            .collect::<String>()
            .as_bytes(),
    );
    eprintln!(
        "xtask: the eBPF programs are the same in every binary: {} sections equal (digest {digest}); \
         only debug info and BTF strings differ, which name the bindings' architecture",
        want.len()
    );
    Ok(())
}

/// The sha256 of each section of a BPF object by name, without the debug
/// and BTF sections (see [`same_bpf_programs`]).
fn program_sections(object: &[u8]) -> anyhow::Result<BTreeMap<String, String>> {
    let bytes = |at: usize, len: usize| {
        at.checked_add(len)
            .and_then(|end| object.get(at..end))
            .context("a truncated ELF object")
    };
    let uint = |at: usize, len: usize| -> anyhow::Result<usize> {
        let mut buf = [0u8; 8];
        buf[..len].copy_from_slice(bytes(at, len)?);
        usize::try_from(u64::from_le_bytes(buf)).context("an ELF field out of range")
    };
    let (shoff, shentsize, shnum, shstrndx) = (
        uint(0x28, 8)?,
        uint(0x3a, 2)?,
        uint(0x3c, 2)?,
        uint(0x3e, 2)?,
    );
    // (name offset, type, offset, size) of each section header.
    let header = |i: usize| -> anyhow::Result<(usize, usize, usize, usize)> {
        let at = shoff + i * shentsize;
        Ok((
            uint(at, 4)?,
            uint(at + 4, 4)?,
            uint(at + 0x18, 8)?,
            uint(at + 0x20, 8)?,
        ))
    };
    let (_, _, names_at, names_len) = header(shstrndx)?;
    let names = bytes(names_at, names_len)?;
    let mut sections = BTreeMap::new();
    for i in 1..shnum {
        let (name_at, kind, at, len) = header(i)?;
        let name = names
            .get(name_at..)
            .and_then(|n| n.split(|&b| b == 0).next())
            .context("a section name out of range")?;
        let name = String::from_utf8_lossy(name).into_owned();
        let named_by_arch = [".debug", ".rel.debug", ".BTF", ".rel.BTF"]
            .iter()
            .any(|p| name.starts_with(p));
        if named_by_arch {
            continue;
        }
        // SHT_NOBITS has a size but no bytes in the file.
        let data = if kind == 8 { &[][..] } else { bytes(at, len)? };
        sections.insert(name, format!("{kind} {}", sha256_hex(data)));
    }
    Ok(sections)
}

/// The image's one layer: the binary at /usr/local/bin/imdsguard and its
/// parent directories, sorted, owned by 0:0, mtime 0.
fn layer(binary: &[u8]) -> anyhow::Result<Vec<u8>> {
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
fn append<W: std::io::Write>(
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
fn platform(arch: Arch) -> serde_json::Value {
    let mut p = serde_json::json!({ "architecture": arch.name(), "os": "linux" });
    if let Some(v) = arch.variant() {
        p["variant"] = v.into();
    }
    p
}

/// The image config: the entrypoint, command and user the chart expects (root,
/// on purpose: Kubernetes puts the added capabilities into the effective
/// set only for uid 0; deploy/README.md, "The image").
fn config(arch: Arch, diff_id: &str) -> anyhow::Result<Vec<u8>> {
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
fn descriptor(media_type: &str, data: &[u8]) -> serde_json::Value {
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
fn layout(arch: Arch, binary: &[u8]) -> anyhow::Result<(BTreeMap<String, Vec<u8>>, String)> {
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
fn write_archive(arch: Arch, binary: &Path, path: &Path) -> anyhow::Result<String> {
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

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;
    use crate::test::workspace_root;

    fn members(tar: &[u8]) -> Vec<(String, tar::Header, Vec<u8>)> {
        tar::Archive::new(tar)
            .entries()
            .expect("a tar")
            .map(|e| {
                let mut e = e.expect("an entry");
                let name = e.path().expect("a path").to_string_lossy().into_owned();
                let mut data = Vec::new();
                e.read_to_end(&mut data).expect("entry data");
                (name, e.header().clone(), data)
            })
            .collect()
    }

    /// The chart's default image, from values.yaml's `repository:` and `tag:`.
    fn chart_image() -> anyhow::Result<(String, String)> {
        let path = workspace_root().join("deploy/helm/imdsguard/values.yaml");
        let text = fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(name))
                .map(|v| v.trim().trim_matches('"').to_owned())
                .with_context(|| format!("{}: no `{name}` line", path.display()))
        };
        Ok((field("repository:")?, field("tag:")?))
    }

    fn json(bytes: &[u8]) -> serde_json::Value {
        serde_json::from_slice(bytes).expect("JSON")
    }

    #[test]
    fn image_is_the_charts_default() {
        let (repository, tag) = chart_image().unwrap();
        assert_eq!((repository.as_str(), tag.as_str()), (REPOSITORY, VERSION));
    }

    #[test]
    fn layout_blobs_agree_with_their_digests() {
        let (files, manifest_digest) = layout(Arch::Arm64, b"\x7fELF not really").unwrap();
        for (name, data) in &files {
            if let Some(hex) = name.strip_prefix("blobs/sha256/") {
                assert_eq!(hex, sha256_hex(data), "{name}");
            }
        }
        let index = json(&files["index.json"]);
        let m = &index["manifests"][0];
        assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
        assert_eq!(m["digest"], manifest_digest.as_str());
        assert_eq!(
            m["platform"],
            serde_json::json!({"architecture": "arm64", "os": "linux", "variant": "v8"})
        );
        assert_eq!(
            m["annotations"]["io.containerd.image.name"],
            format!("{REPOSITORY}:{VERSION}").as_str()
        );
        assert_eq!(
            m["annotations"]["org.opencontainers.image.ref.name"],
            VERSION
        );
        let blob = |d: &serde_json::Value| {
            let hex = d["digest"]
                .as_str()
                .unwrap()
                .strip_prefix("sha256:")
                .unwrap();
            let data = &files[&format!("blobs/sha256/{hex}")];
            assert_eq!(d["size"], data.len());
            data.clone()
        };
        let manifest = json(&blob(m));
        assert_eq!(manifest["mediaType"], MEDIA_MANIFEST);
        let config = json(&blob(&manifest["config"]));
        let layer = blob(&manifest["layers"][0]);
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            format!("sha256:{}", sha256_hex(&layer)).as_str()
        );
        assert_eq!(
            (&config["architecture"], &config["variant"], &config["os"]),
            (
                &serde_json::json!("arm64"),
                &serde_json::json!("v8"),
                &serde_json::json!("linux")
            )
        );
        let c = &config["config"];
        assert_eq!(c["User"], "0:0");
        assert_eq!(
            c["Entrypoint"],
            serde_json::json!(["/usr/local/bin/imdsguard"])
        );
        assert_eq!(c["Cmd"], serde_json::json!(["--help"]));
        assert_eq!(c["Labels"]["org.opencontainers.image.version"], VERSION);

        let got: Vec<(String, u32, Vec<u8>)> = members(&layer)
            .into_iter()
            .map(|(n, h, d)| {
                assert_eq!((h.mtime().unwrap(), h.uid().unwrap()), (0, 0), "{n}");
                (n, h.mode().unwrap(), d)
            })
            .collect();
        let want: Vec<(String, u32, Vec<u8>)> = [
            ("usr/", 0o755, &b""[..]),
            ("usr/local/", 0o755, b""),
            ("usr/local/bin/", 0o755, b""),
            ("usr/local/bin/imdsguard", 0o755, b"\x7fELF not really"),
        ]
        .into_iter()
        .map(|(n, m, d)| (n.to_owned(), m, d.to_vec()))
        .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn amd64_has_no_variant_and_another_manifest() {
        let (a, da) = layout(Arch::Amd64, b"x").unwrap();
        let (b, db) = layout(Arch::Arm64, b"x").unwrap();
        assert_ne!(da, db);
        assert_eq!(
            json(&a["index.json"])["manifests"][0]["platform"],
            serde_json::json!({"architecture": "amd64", "os": "linux"})
        );
        assert_ne!(a["index.json"], b["index.json"]);
    }

    #[test]
    fn archive_is_reproducible() {
        let dir = std::env::temp_dir().join(format!("xtask-image-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let bin = dir.join("imdsguard");
        fs::write(&bin, b"same bytes").unwrap();
        let one = write_archive(Arch::Amd64, &bin, &dir.join("a.oci.tar"));
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&bin, b"same bytes").unwrap();
        let two = write_archive(Arch::Amd64, &bin, &dir.join("b.oci.tar"));
        let (a, b) = (
            fs::read(dir.join("a.oci.tar")).unwrap(),
            fs::read(dir.join("b.oci.tar")).unwrap(),
        );
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(one.unwrap(), two.unwrap());
        assert!(a == b, "the archives differ");
        let names: Vec<String> = members(&a).into_iter().map(|(n, _, _)| n).collect();
        assert_eq!(&names[..2], ["blobs/", "blobs/sha256/"]);
        assert_eq!(&names[names.len() - 2..], ["index.json", "oci-layout"]);
    }

    /// A minimal BPF ELF header with no sections past the header.
    fn bpf_elf(extra: u8) -> Vec<u8> {
        let mut h = vec![0u8; 64 + 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        h[18..20].copy_from_slice(&EM_BPF.to_le_bytes());
        // Section headers at 64: one of 64 bytes.
        h[0x28..0x30].copy_from_slice(&64u64.to_le_bytes());
        h[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        h[0x3c..0x3e].copy_from_slice(&1u16.to_le_bytes());
        h[100] = extra;
        h
    }

    /// A BPF object with the sections (name, type, data), after a null
    /// section and the section-name table, which comes first.
    fn bpf_object(sections: &[(&str, u32, &[u8])]) -> Vec<u8> {
        let mut names = b"\0.shstrtab\0".to_vec();
        let mut all = vec![(0usize, 0u32, Vec::new()), (1, 3, Vec::new())];
        for (name, kind, data) in sections {
            all.push((names.len(), *kind, data.to_vec()));
            names.extend(name.as_bytes());
            names.push(0);
        }
        all[1].2 = names;
        let mut object = bpf_elf(0)[..64].to_vec();
        let mut headers = Vec::new();
        for (name, kind, data) in &all {
            let mut h = [0u8; 64];
            h[..4].copy_from_slice(&(*name as u32).to_le_bytes());
            h[4..8].copy_from_slice(&kind.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(object.len() as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(data.len() as u64).to_le_bytes());
            if *kind != 8 {
                object.extend(data);
            }
            headers.extend(h);
        }
        let shoff = object.len() as u64;
        object[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        object[0x3c..0x3e].copy_from_slice(&(all.len() as u16).to_le_bytes());
        object[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        object.extend(headers);
        object
    }

    #[test]
    fn program_sections_leave_out_debug_info_and_btf() {
        let x86 = bpf_object(&[
            ("cgroup/connect4", 1, b"code"),
            (".debug_str", 1, b"x86_64/helpers.rs"),
            (".BTF", 1, b"x86_64"),
            (".bss", 8, b"12345678"),
        ]);
        let arm = bpf_object(&[
            ("cgroup/connect4", 1, b"code"),
            (".debug_str", 1, b"aarch64/helpers.rs"),
            (".BTF", 1, b"aarch64"),
            (".bss", 8, b"12345678"),
        ]);
        let other = bpf_object(&[("cgroup/connect4", 1, b"Code"), (".bss", 8, b"")]);
        let sections = program_sections(&x86).unwrap();
        assert_eq!(
            sections.keys().collect::<Vec<_>>(),
            [".bss", ".shstrtab", "cgroup/connect4"]
        );
        assert_eq!(
            embedded_bpf_object(&[b"prefix".as_slice(), &x86].concat()).unwrap(),
            &x86[..]
        );
        assert_eq!(
            sections["cgroup/connect4"],
            program_sections(&arm).unwrap()["cgroup/connect4"]
        );
        assert_ne!(
            sections["cgroup/connect4"],
            program_sections(&other).unwrap()["cgroup/connect4"]
        );
        // Cut inside the last section header.
        assert!(program_sections(&x86[..x86.len() - 40]).is_err());
    }

    #[test]
    fn finds_the_embedded_bpf_object() {
        let object = bpf_elf(7);
        let mut host = b"\x7fELF\x02\x01 a host ELF, machine not BPF........".to_vec();
        host.extend([0u8; 64]);
        host.extend(&object);
        host.extend(b"trailing");
        assert_eq!(embedded_bpf_object(&host).unwrap(), &object[..]);
        host.extend(bpf_elf(8));
        assert!(embedded_bpf_object(&host).is_err(), "two objects");
        assert!(embedded_bpf_object(b"no elf here").is_err());
    }
}
