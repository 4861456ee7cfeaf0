//! Installs what a fresh machine lacks. Idempotent and quick when done.
//!
//! The toolchains are pinned in files: `rust-toolchain.toml` (the stable
//! toolchain everything but the eBPF crate builds with; `.ci/run` and the
//! README install it before the first cargo call, so it is running us) and
//! `imdsguard-ebpf/rust-toolchain.toml` (the nightly the daemon's build.rs
//! builds the eBPF crate with). bpf-linker is pinned here.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow, bail};

use crate::test::{output, status, workspace_root};

/// The bpf-linker release built for the LLVM of the eBPF nightly: 0.10.0
/// loads rustc's own libLLVM 22 (its default features, `rust-llvm-22`).
/// Newer releases want LLVM 23. nightly-2026-08-05 is the last nightly with
/// LLVM 22, so a later nightly means a newer bpf-linker.
pub const BPF_LINKER_VERSION: &str = "0.10.0";
/// The LLVM major [`BPF_LINKER_VERSION`] loads; the eBPF nightly must have it.
const BPF_LINKER_LLVM: &str = "22";

pub fn run() -> anyhow::Result<()> {
    ensure_ebpf_toolchain()?;
    ensure_bpf_linker()?;
    ensure_tools()?;
    Ok(())
}

/// The eBPF crate's directory, whose rust-toolchain.toml names its nightly.
fn ebpf_dir() -> PathBuf {
    workspace_root().join("imdsguard-ebpf")
}

/// The `channel` of a rust-toolchain.toml, read line by line: the files are
/// ours and keep it on one line. imdsguard-daemon/build.rs reads it the
/// same way.
pub fn channel(path: &Path) -> anyhow::Result<String> {
    let text = fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim_start().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .find(|v| !v.is_empty())
        .ok_or_else(|| anyhow!("{}: no `channel = \"...\"` line", path.display()))
}

fn ensure_ebpf_toolchain() -> anyhow::Result<()> {
    let nightly = channel(&ebpf_dir().join("rust-toolchain.toml"))?;
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", &nightly])
        .output()
        .context("run rustup")?;
    let has_rust_src = installed.status.success()
        && String::from_utf8_lossy(&installed.stdout)
            .lines()
            .any(|l| l.starts_with("rust-src"));
    if !has_rust_src {
        eprintln!("xtask: installing {nightly} and its rust-src for the eBPF crate");
        // With no argument, rustup installs what the directory's toolchain
        // file names, components and profile included. RUSTUP_TOOLCHAIN,
        // which rustup's cargo proxy sets for `cargo xtask`, would override
        // the file.
        status(
            Command::new("rustup")
                .args(["toolchain", "install"])
                .current_dir(ebpf_dir())
                .env_remove("RUSTUP_TOOLCHAIN"),
        )?;
    }
    // A nightly with another LLVM builds, but bpf-linker cannot load its
    // libLLVM ("unable to open LLVM shared lib ... dlopen failed").
    let llvm = llvm_major(&nightly)?;
    if llvm != BPF_LINKER_LLVM {
        bail!(
            "{nightly} has LLVM {llvm}, but bpf-linker {BPF_LINKER_VERSION} loads LLVM {BPF_LINKER_LLVM}: \
             move imdsguard-ebpf/rust-toolchain.toml and BPF_LINKER_VERSION together"
        );
    }
    Ok(())
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    let want = format!("bpf-linker {BPF_LINKER_VERSION}");
    if let Ok(out) = Command::new("bpf-linker").arg("--version").output() {
        let have = String::from_utf8_lossy(&out.stdout);
        if have.trim() == want {
            return Ok(());
        }
        eprintln!("xtask: bpf-linker is {}, want {want}", have.trim());
    }
    eprintln!("xtask: installing {want} (about a minute)");
    status(Command::new("cargo").args([
        "install",
        &format!("bpf-linker@{BPF_LINKER_VERSION}"),
        "--locked",
        "--force",
    ]))
}

/// iproute2 for the test network namespaces.
fn ensure_tools() -> anyhow::Result<()> {
    crate::test::ensure_commands(&[("ip", "iproute2")])
}

/// The installed rustc's `LLVM version:` major, for a toolchain name.
fn llvm_major(toolchain: &str) -> anyhow::Result<String> {
    let vv = output(
        Command::new("rustc")
            .arg(format!("+{toolchain}"))
            .arg("-vV"),
    )?;
    vv.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("rustc +{toolchain} -vV names no LLVM version"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ebpf_toolchain_is_a_dated_nightly() {
        let nightly = channel(&ebpf_dir().join("rust-toolchain.toml")).unwrap();
        let date = nightly.strip_prefix("nightly-").unwrap_or_default();
        assert!(
            date.len() == 10 && date.split('-').all(|p| p.parse::<u32>().is_ok()),
            "{nightly}: the moving nightly changes LLVM under bpf-linker; pin nightly-YYYY-MM-DD"
        );
    }

    #[test]
    fn channel_reads_the_pinned_line() {
        let dir = std::env::temp_dir().join(format!("xtask-channel-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("rust-toolchain.toml");
        fs::write(
            &file,
            "# channel = \"a comment\"\n[toolchain]\nchannel  =  \"nightly-2026-05-20\"\ncomponents = [\"rust-src\"]\n",
        )
        .unwrap();
        let read = channel(&file);
        fs::write(&file, "[toolchain]\nprofile = \"minimal\"\n").unwrap();
        let missing = channel(&file);
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(read.unwrap(), "nightly-2026-05-20");
        assert!(missing.is_err());
    }
}
