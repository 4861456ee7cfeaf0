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
//! (only names in the debug info and BTF differ, see [`bpf::same_bpf_programs`]).
//!
//! The layout is written here rather than by umoci or buildah: it is one
//! layer, a config, a manifest and an index, and writing them ourselves
//! keeps the archives byte-for-byte reproducible (sorted entries, uid 0,
//! mtime 0, fixed timestamps) with no tool to install.

mod arch;
mod bpf;
mod build;
mod oci;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

use clap::Args;

use crate::test::target_dir;

pub use arch::{ALL, Arch};
use bpf::same_bpf_programs;
pub use build::build_binary;
use oci::write_archive;

/// The chart's default `image.repository` (deploy/helm/imdsguard/values.yaml);
/// the archives are named `REPOSITORY:<version>`, the chart's default tag.
pub const REPOSITORY: &str = "ghcr.io/imdsguard/imdsguard";
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Args)]
pub struct Options {
    /// Only this architecture (default: both).
    #[arg(long, value_enum)]
    pub arch: Option<Arch>,
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
