//! Developer tasks. `cargo xtask demo` and `cargo xtask test` are the two
//! commands of the README; both install what a fresh machine lacks first.

mod bench;
mod demo;
mod kube_apiserver;
mod setup;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the eBPF toolchain (nightly rust-src, bpf-linker 0.10.0) and system tools.
    Setup,
    /// Play the seed scenario on this machine's kernel (needs root).
    Demo(demo::Options),
    /// Run every test: unit tests and the root kernel tests.
    Test(test::Options),
    /// Run the hook-overhead benchmark.
    Bench(bench::Options),
    /// Build (once, cached) the kube-apiserver used by the control-plane tests.
    KubeApiserver(kube_apiserver::Options),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::Demo(o) => demo::run(o),
        Command::Test(o) => test::run(o),
        Command::Bench(o) => bench::run(o),
        Command::KubeApiserver(o) => kube_apiserver::run(o),
    }
}
