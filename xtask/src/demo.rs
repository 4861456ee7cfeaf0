//! `cargo xtask demo`: builds and plays the seed scenario on this kernel.

use clap::Args;

#[derive(Args)]
pub struct Options {}

pub fn run(_o: Options) -> anyhow::Result<()> {
    crate::test::run_release_bin("imdsguard-demo", None, &[], false)
}
