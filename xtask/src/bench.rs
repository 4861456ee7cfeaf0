//! `cargo xtask bench [-- ARGS]`: the hook-overhead benchmark (release build).

use std::process::Command;

use anyhow::bail;
use clap::Args;

use crate::test::{cargo, is_root, status, target_dir};

#[derive(Args)]
pub struct Options {
    /// Passed to imdsguard-bench, e.g. `--rounds 9 --iterations 50000`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

pub fn run(o: Options) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the benchmark attaches BPF programs to its own test cgroups: run as root");
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
    status(Command::new(target_dir().join("release").join("imdsguard-bench")).args(&o.args))
}
