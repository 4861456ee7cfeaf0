//! `cargo xtask bench-enforce [-- ARGS]`: the time-to-enforce benchmark
//! (release build) against a real kube-apiserver and the node agent.

use clap::Args;

#[derive(Args)]
pub struct Options {
    /// Passed to `imdsguard-bench enforce`, e.g.
    /// `--iterations 100 --background-pods 50 --warmup 3 --settle-ms 200`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

pub fn run(o: Options) -> anyhow::Result<()> {
    // The kube-apiserver is built once per machine and cached.
    crate::test::run_release_bin("imdsguard-bench", Some("enforce"), &o.args, true)
}
