//! `cargo xtask bench-scale [-- ARGS]`: start-up, footprint, soak, denial
//! flood and the iptables comparison (release build), against a real
//! kube-apiserver and the node agent.

use clap::Args;

#[derive(Args)]
pub struct Options {
    /// Passed to `imdsguard-bench scale`, e.g. `--pods 110,1000,10000
    /// --repeats 5 --soak-secs 3600` (`-- --help` lists them all).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

pub fn run(o: Options) -> anyhow::Result<()> {
    ensure_netfilter_tools()?;
    // The kube-apiserver is built once per machine and cached.
    crate::test::run_release_bin("imdsguard-bench", Some("scale"), &o.args, true)
}

/// iptables (the rules peers install) and nft (to delete the tables again
/// between arms). The bench runs both only inside its own network
/// namespace; installing them changes no rule on this machine.
pub fn ensure_netfilter_tools() -> anyhow::Result<()> {
    crate::test::ensure_commands(&[("iptables", "iptables"), ("nft", "nftables")])
}
