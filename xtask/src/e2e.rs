//! Placeholder: The seed scenario against a real kube-apiserver.
use clap::Args;

#[derive(Args)]
pub struct Options {}

pub fn run(_o: Options) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
