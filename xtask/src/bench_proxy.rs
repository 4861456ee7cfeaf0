//! `cargo xtask bench-proxy [-- ARGS]`: filter mode's cost (release build):
//! a metadata GET through the proxy against direct, GETs per second, the
//! daemon's memory, and the fast path with filter mode configured.

use clap::Args;

#[derive(Args)]
pub struct Options {
    /// Passed to `imdsguard-bench proxy`, e.g. `--rounds 9 --requests 5000
    /// --clients 4 --rps-secs 10` (`-- --help` lists them all).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

pub fn run(o: Options) -> anyhow::Result<()> {
    crate::test::run_release_bin("imdsguard-bench", Some("proxy"), &o.args, false)
}
