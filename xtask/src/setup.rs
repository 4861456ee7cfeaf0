//! Installs what a fresh machine lacks. Idempotent and quick when done.

use std::process::Command;

use anyhow::Context as _;

pub const BPF_LINKER_VERSION: &str = "0.10.0";

pub fn run() -> anyhow::Result<()> {
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    ensure_tools()?;
    Ok(())
}

fn ensure_rust_src() -> anyhow::Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .context("run rustup")?;
    let installed = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("xtask: installing the nightly toolchain's rust-src");
    crate::test::status(Command::new("rustup").args([
        "toolchain",
        "install",
        "nightly",
        "--profile",
        "minimal",
    ]))?;
    crate::test::status(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    let current = Command::new("bpf-linker").arg("--version").output();
    if let Ok(out) = current {
        let v = String::from_utf8_lossy(&out.stdout);
        if v.contains(BPF_LINKER_VERSION) {
            return Ok(());
        }
        eprintln!(
            "xtask: bpf-linker is {}, want {BPF_LINKER_VERSION}",
            v.trim()
        );
    }
    // 0.10.0 links with rustc's own LLVM 22 (no system LLVM needed); newer
    // releases want an external LLVM 23.
    eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION} (about a minute)");
    crate::test::status(Command::new("cargo").args([
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
