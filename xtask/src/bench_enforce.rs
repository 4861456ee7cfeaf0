//! Placeholder: Time-to-enforce benchmark.
use clap::Args;

#[derive(Args)]
pub struct Options {}

pub fn run(_o: Options) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
