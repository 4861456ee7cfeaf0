//! `cargo xtask demo`: builds and plays the seed scenario on this kernel.

use std::process::Command;

use anyhow::bail;
use clap::Args;

use crate::test::{cargo, is_root, status, target_dir};

#[derive(Args)]
pub struct Options {}

pub fn run(_o: Options) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the demo attaches BPF programs to its own test cgroups: run as root");
    }
    crate::setup::run()?;
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
        Command::new(bin.join("imdsguard-demo"))
            .arg("--imdsguard")
            .arg(bin.join("imdsguard")),
    )
}
