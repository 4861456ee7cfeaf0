//! Developer tasks. `cargo xtask demo` and `cargo xtask test` are the two
//! commands of the README; both install what a fresh machine lacks first.

mod bench;
mod bench_enforce;
mod bench_proxy;
mod bench_scale;
mod bench_tamper;
mod demo;
mod deploy;
mod e2e;
mod image;
mod kubernetes;
mod release;
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
    /// Install the eBPF toolchain (the pinned nightly with rust-src, bpf-linker) and system tools.
    Setup,
    /// Play the seed scenario on this machine's kernel (needs root).
    Demo(demo::Options),
    /// Run every test: unit tests and the root kernel tests.
    Test(test::Options),
    /// Run the hook-overhead benchmark.
    Bench(bench::Options),
    /// The seed scenario end to end against a real kube-apiserver (needs root).
    E2e(e2e::Options),
    /// Time to enforce: label patch and pod-cgroup creation to map update.
    BenchEnforce(bench_enforce::Options),
    /// Start-up, footprint, soak, denial flood and an iptables comparison.
    BenchScale(bench_scale::Options),
    /// Filter mode: a metadata GET through the proxy against direct, GETs per second, memory.
    BenchProxy(bench_proxy::Options),
    /// The tamper window: links detached by hand, until the agent puts them back; idle CPU.
    BenchTamper(bench_tamper::Options),
    /// Build (once, cached) the Kubernetes binaries: the control-plane tests and the real node.
    Kubernetes(kubernetes::Options),
    /// Build (once, cached) the previous release's chart and image, which the real node upgrades from.
    PreviousRelease,
    /// Check deploy/ and the image's binary: helm lint, a real apiserver, runc.
    Deploy(deploy::Options),
    /// Build the agent image for amd64 and arm64: one OCI archive each, under target/image/.
    Image(image::Options),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::Demo(o) => demo::run(o),
        Command::Test(o) => test::run(o),
        Command::Bench(o) => bench::run(o),
        Command::Kubernetes(o) => kubernetes::run(o),
        Command::E2e(o) => e2e::run(o),
        Command::BenchEnforce(o) => bench_enforce::run(o),
        Command::BenchScale(o) => bench_scale::run(o),
        Command::BenchProxy(o) => bench_proxy::run(o),
        Command::PreviousRelease => release::PREVIOUS.ensure_built().map(|b| {
            println!(
                "{}  {}  {}",
                b.version,
                b.chart.display(),
                b.archive.display()
            );
        }),
        Command::BenchTamper(o) => bench_tamper::run(o),
        Command::Deploy(o) => deploy::run(o),
        Command::Image(o) => image::run(o),
    }
}
