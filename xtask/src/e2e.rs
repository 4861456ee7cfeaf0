//! `cargo xtask e2e`: builds and plays the seed scenario against a real
//! kube-apiserver, with the node agent (`imdsguard node`) on this kernel.

use std::process::Command;

use anyhow::bail;
use clap::Args;

use crate::test::{cargo, is_root, status, target_dir};

#[derive(Args)]
pub struct Options {}

pub fn run(_o: Options) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the e2e scenario attaches BPF programs to its own test cgroups: run as root");
    }
    crate::setup::run()?;
    // Built once per machine and cached (about 5 minutes the first time).
    crate::kube_apiserver::ensure_built()?;
    status(cargo().args([
        "build",
        "--release",
        "-p",
        "imdsguard-daemon",
        "-p",
        "imdsguard-testlab",
        "--bins",
    ]))?;
    let bin = target_dir().join("release");
    status(
        Command::new(bin.join("imdsguard-e2e"))
            .arg("--imdsguard")
            .arg(bin.join("imdsguard")),
    )
}
