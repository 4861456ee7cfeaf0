//! `cargo xtask bench-tamper [-- ARGS]`: the tamper window (release
//! build): connects let through while the agent's links are detached by
//! hand, the window in ms, and the idle agent's CPU.

use clap::Args;

#[derive(Args)]
pub struct Options {
    /// Passed to `imdsguard-bench tamper`, e.g. `--before
    /// /path/to/old/imdsguard --rounds 9 --idle-secs 30` (`-- --help` lists
    /// them all).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

pub fn run(o: Options) -> anyhow::Result<()> {
    crate::test::run_release_bin("imdsguard-bench", Some("tamper"), &o.args, false)
}
