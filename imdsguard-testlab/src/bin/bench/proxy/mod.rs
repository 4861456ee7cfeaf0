//! Filter mode's cost (`imdsguard-bench proxy`, `cargo xtask bench-proxy`).
//! See BENCHMARKS.md, "Filter mode".
//!
//! Part 1 runs the real daemon in the lab's network namespace with one
//! allowed and one filtered cgroup (profile `region`) and times one
//! metadata GET as SDKs make it (a fresh TCP connection, one IMDSv2
//! request) straight to the lab's fake service from the allowed cgroup and
//! through the proxy from the filtered one, the two arms interleaved round
//! by round; then counts GETs per second from a few concurrent clients,
//! each way, and reads the daemon's memory before and after the load.
//! Part 2 is the allow-all-floor ratio of `overhead` again, with filter
//! mode configured (sock_ops attached, the proxy running) as a third arm.

mod floor;
mod latency;

use std::{path::PathBuf, time::Duration};

use imdsguard_testlab::{
    cgroups::TestCgroup,
    daemon::Daemon,
    lab::Lab,
    probe::{self},
};

/// `imdsguard-bench proxy`: latency, throughput and memory of the filter
/// proxy, and the fast path with filter mode configured.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// Interleaved rounds of the latency arms.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
    /// GETs per arm in each round.
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub requests: u32,
    /// Concurrent clients of the throughput runs.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub clients: u32,
    /// Seconds each throughput run lasts.
    #[arg(long, default_value_t = 5.0)]
    pub rps_secs: f64,
    /// Interleaved rounds of the fast-path ratio (0: skip it).
    #[arg(long, default_value_t = 7)]
    pub floor_rounds: u32,
    /// Calls per operation in each fast-path round.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub floor_iterations: u32,
}

/// Where the metadata GETs go, and what they ask for: a path of the
/// `region` profile, so the proxy forwards it.
const TARGET: &str = "169.254.169.254:80";
const PATH: &str = "/latest/meta-data/placement/region";
/// The proxy's address inside the lab's namespace.
const PROXY_LISTEN: &str = "127.0.0.1:8169";

/// The lab and its three callers: an allowed cgroup (straight to the
/// service), a filtered one (through the proxy) and one without an entry
/// (the fast-path callers of `overhead`).
pub struct Bench {
    lab: Lab,
    bin: PathBuf,
    exe: PathBuf,
    allowed: TestCgroup,
    filtered: TestCgroup,
    plain: TestCgroup,
}

impl Bench {
    /// `imdsguard run` in the lab's namespace; with `filter`, the filtered
    /// cgroup's entry and the proxy (which attaches sock_ops too).
    fn daemon(&self, filter: bool) -> anyhow::Result<Daemon> {
        let mut args: Vec<String> = [
            "--cgroup-root",
            &self.lab.root().path().display().to_string(),
            "--pin-dir",
            &self.lab.pin_dir().display().to_string(),
            "--allow-cgroup",
            &self.allowed.path().display().to_string(),
        ]
        .map(String::from)
        .to_vec();
        if filter {
            args.extend(
                [
                    "--filter-cgroup",
                    &self.filtered.path().display().to_string(),
                    "--filter-profile",
                    "region",
                    "--proxy-listen",
                    PROXY_LISTEN,
                ]
                .map(String::from),
            );
        }
        Daemon::start_in(self.lab.netns(), &self.bin, &args)
    }

    /// Runs the bench worker from `cg` in the lab's namespace.
    fn worker<T: for<'de> serde::Deserialize<'de>>(
        &self,
        cg: &TestCgroup,
        args: &[&str],
    ) -> anyhow::Result<T> {
        let mut full = vec!["bench"];
        full.extend_from_slice(args);
        let child = probe::spawn(&self.exe, Some(cg.path()), self.lab.netns(), &full)?;
        probe::wait(child, Duration::from_secs(600))
    }
}

pub fn run(o: &Options, bin: PathBuf) -> anyhow::Result<()> {
    let lab = Lab::new("bench-proxy")?;
    let bench = Bench {
        allowed: lab.cgroup("pods/prod")?,
        filtered: lab.cgroup("pods/report")?,
        plain: lab.cgroup("pods/plain")?,
        exe: std::env::current_exe()?,
        bin,
        lab,
    };
    latency::run(&bench, o)?;
    if o.floor_rounds > 0 {
        floor::run(&bench, o.floor_rounds, o.floor_iterations)?;
    }
    Ok(())
}
