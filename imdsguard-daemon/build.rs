use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// Builds `imdsguard-ebpf` for the BPF target with the nightly toolchain and
/// leaves the object in `OUT_DIR/imdsguard-ebpf`, where `src/ebpf_object.rs`
/// embeds it.
///
/// With `AYA_BUILD_SKIP=1` (clippy/check without bpf-linker) aya-build does
/// nothing and we write an empty stub instead; loading it fails at run time
/// with a clear error rather than at compile time.
fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "imdsguard-ebpf")
        .ok_or_else(|| anyhow!("imdsguard-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("imdsguard-ebpf manifest has no parent"))?
        .as_str()
        .to_owned();

    let skip =
        std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR")?);
        std::fs::write(out.join("imdsguard-ebpf"), []).context("write stub object")?;
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        return Ok(());
    }
    aya_build::build_ebpf(
        [Package {
            name: "imdsguard-ebpf",
            root_dir: &root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
