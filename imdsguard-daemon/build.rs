use std::{
    env, fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// Builds `imdsguard-ebpf` for the BPF target with the nightly named in
/// `imdsguard-ebpf/rust-toolchain.toml` and leaves the object in
/// `OUT_DIR/imdsguard-ebpf`, where `src/ebpf_object.rs` embeds it.
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
        .ok_or_else(|| anyhow!("imdsguard-ebpf manifest has no parent"))?;

    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        let out = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR")?);
        fs::write(out.join("imdsguard-ebpf"), []).context("write stub object")?;
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        return Ok(());
    }

    let toolchain_file = root_dir.join("rust-toolchain.toml");
    let toolchain = channel(toolchain_file.as_std_path())?;
    // aya-build passes the nested cargo's stderr on line by line as
    // `cargo:warning`, so each `Compiling ...` line of the eBPF build would
    // show up as a warning of the daemon (74 of them on a fresh machine).
    // Quiet, that cargo prints nothing when the build is clean; compiler
    // errors and warnings (which aya-build forwards from the JSON messages)
    // and cargo's own errors still show.
    // SAFETY: build scripts are single-threaded, and no thread runs yet.
    unsafe { env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf(
        [Package {
            name: "imdsguard-ebpf",
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
    .with_context(|| {
        format!(
            "build imdsguard-ebpf with {toolchain} (named in {toolchain_file}); `cargo xtask setup` installs it and bpf-linker"
        )
    })
}

/// The `channel` of a rust-toolchain.toml, read line by line: the file is
/// ours and keeps it on one line. xtask/src/setup.rs reads it the same way.
fn channel(path: &Path) -> anyhow::Result<String> {
    let text = fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim_start().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .find(|v| !v.is_empty())
        .ok_or_else(|| anyhow!("{}: no `channel = \"...\"` line", path.display()))
}
