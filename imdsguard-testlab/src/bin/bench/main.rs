//! `imdsguard-bench`: the benchmarks of BENCHMARKS.md, one subcommand each.
//! `cargo xtask bench`, `bench-enforce`, `bench-scale`, `bench-proxy` and
//! `bench-tamper` run them on a release build.

mod enforce;
mod overhead;
mod proxy;
mod scale;
mod tamper;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use imdsguard_testlab::probe;

/// The imdsguard benchmarks (BENCHMARKS.md). Run as root: each builds its
/// own cgroups, network namespace and bpffs.
#[derive(Parser, Debug)]
#[command(name = "imdsguard-bench")]
struct Cli {
    /// The `imdsguard` binary the agent runs from (default: the one next to
    /// this binary). `overhead` loads the programs in-process and ignores it.
    #[arg(long, global = true, value_name = "PATH")]
    imdsguard: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Hook overhead per call, per-program run time and revocation sweep
    /// time (`cargo xtask bench`).
    Overhead(overhead::Options),
    /// Time from a Kubernetes change to the allow map, against a real
    /// kube-apiserver and `imdsguard node` (`cargo xtask bench-enforce`).
    Enforce(enforce::Options),
    /// Start-up, footprint, soak, denial flood and the iptables comparison
    /// (`cargo xtask bench-scale`).
    Scale(scale::Options),
    /// Filter mode: a metadata GET through the proxy against direct (p50,
    /// p99), GETs per second, the daemon's memory, and the fast path with
    /// filter mode configured (`cargo xtask bench-proxy`).
    Proxy(proxy::Options),
    /// How long links detached by hand stay detached (attempts through, the
    /// window), and the idle agent's CPU, optionally against the build
    /// before (`cargo xtask bench-tamper`).
    Tamper(tamper::Options),
}

fn main() -> anyhow::Result<()> {
    // Probes and bench workers are this binary re-executed: they never
    // reach the argument parser.
    probe::run_if_probe();
    let cli = Cli::parse();
    let bin = || imdsguard_testlab::imdsguard_bin(cli.imdsguard.clone());
    match cli.command {
        Command::Overhead(o) => overhead::run(&o),
        Command::Enforce(ref o) => enforce::run(o, bin()?),
        Command::Scale(o) => scale::run(o, bin()?),
        Command::Proxy(ref o) => proxy::run(o, bin()?),
        Command::Tamper(ref o) => tamper::run(o, bin()?),
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser as _};

    use super::{Cli, Command};

    #[test]
    fn cli() {
        Cli::command().debug_assert();
        // As `cargo xtask bench-scale` passes them: subcommand first.
        let cli = Cli::try_parse_from([
            "imdsguard-bench",
            "scale",
            "--imdsguard",
            "/bin/imdsguard",
            "--pods",
            "20,10",
        ])
        .unwrap();
        assert_eq!(cli.imdsguard.unwrap().to_str(), Some("/bin/imdsguard"));
        let Command::Scale(o) = cli.command else {
            panic!("not scale");
        };
        assert_eq!(o.pods, [20, 10]);
        assert!(Cli::try_parse_from(["imdsguard-bench", "overhead", "--rounds", "0"]).is_err());
        let cli = Cli::try_parse_from([
            "imdsguard-bench",
            "proxy",
            "--requests",
            "200",
            "--clients",
            "2",
        ])
        .unwrap();
        let Command::Proxy(o) = cli.command else {
            panic!("not proxy");
        };
        assert_eq!((o.requests, o.clients, o.floor_rounds), (200, 2, 7));
        let cli = Cli::try_parse_from([
            "imdsguard-bench",
            "tamper",
            "--before",
            "/old/imdsguard",
            "--idle-secs",
            "0",
        ])
        .unwrap();
        let Command::Tamper(o) = cli.command else {
            panic!("not tamper");
        };
        assert_eq!(o.before.unwrap().to_str(), Some("/old/imdsguard"));
        assert_eq!((o.rounds, o.idle_secs), (5, 0));
    }
}
