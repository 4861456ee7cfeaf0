//! `cargo xtask bench-enforce [-- ARGS]`: the time-to-enforce benchmark
//! (release build) against a real kube-apiserver and the node agent.

use std::process::Command;

use anyhow::bail;
use clap::Args;

use crate::test::{cargo, is_root, status, target_dir};

#[derive(Args)]
pub struct Options {
    /// Passed to imdsguard-enforce-bench, e.g.
    /// `--iterations 100 --background-pods 50 --warmup 3 --settle-ms 200`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

pub fn run(o: Options) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the benchmark attaches BPF programs to its own test cgroups: run as root");
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
        Command::new(bin.join("imdsguard-enforce-bench"))
            .arg("--imdsguard")
            .arg(bin.join("imdsguard"))
            .args(&o.args),
    )
}
