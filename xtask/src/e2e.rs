//! `cargo xtask e2e`: builds and plays the seed scenario against a real
//! kube-apiserver, with the node agent (`imdsguard node`) on this kernel.

use clap::Args;

#[derive(Args)]
pub struct Options {}

pub fn run(_o: Options) -> anyhow::Result<()> {
    crate::test::run_release_bin("imdsguard-e2e", &[], true)
}
