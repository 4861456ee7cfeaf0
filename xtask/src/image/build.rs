//! Cross builds of the static release binary and its checks: `file` for the
//! machine and static linkage, `--version` natively or under qemu-user.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::ensure;

use crate::test::{cargo, ensure_commands, output, status, target_dir};

use super::{Arch, VERSION};

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
