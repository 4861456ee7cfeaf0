//! `cargo xtask bench [-- ARGS]`: the hook-overhead benchmark (release build).

use clap::Args;

#[derive(Args)]
pub struct Options {
    /// Passed to `imdsguard-bench overhead`, e.g. `--rounds 9 --iterations 50000`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

pub fn run(o: Options) -> anyhow::Result<()> {
    crate::test::run_release_bin("imdsguard-bench", Some("overhead"), &o.args, false)
}
