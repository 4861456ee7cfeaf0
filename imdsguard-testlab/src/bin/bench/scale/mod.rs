//! Scale, footprint, a denial flood and the iptables approach peers use,
//! against a real kube-apiserver and the real `imdsguard node` on this
//! kernel (`imdsguard-bench scale`). Run with `cargo xtask bench-scale`
//! (add `-- --help` for the flags). Nothing is asserted: every figure is
//! printed as a markdown table.
//!
//! - **Start-up:** for each `--pods` size, that many pods exist in the API
//!   (`spec.nodeName` = this node, half app=prod allowed by the seed policy,
//!   half app=test denied) with their kubelet-style cgroups. The agent is
//!   started `--repeats` times from no pins (cold) and over the pins of a
//!   killed agent (restart); the time runs from just before the spawn to
//!   the timestamp of its `ready` log line.
//! - **Footprint:** for each size, the agent's VmRSS and its CPU time over
//!   `--idle-secs` of idleness, and the kernel memory (`memlock` in fdinfo)
//!   of every BPF map and program it holds. At the first size, a pod churn
//!   of `--soak-secs` (create and delete pods and their cgroups, keeping
//!   `--churn-pods` alive) samples the RSS throughout.
//! - **Denial flood:** at the first size, one `tcp-loop` probe per CPU in a
//!   denied pod connects to 169.254.169.254:80 for `--flood-secs`, while the
//!   overhead worker runs from another pod. Arms: quiet, a control loop
//!   (same probes to an unprotected closed port: CPU contention without
//!   denials), and the flood; interleaved over `--flood-rounds`.
//! - **Comparison:** the overhead worker (TCP connect+close, UDP connect,
//!   UDP sendto to loopback) from a pod, with no rules, with one iptables
//!   REJECT rule, with one iptables DNAT-to-proxy rule, and with imdsguard
//!   attached; interleaved over `--rounds`. The rules live only in the
//!   lab's network namespace and are removed (`nft flush ruleset` there)
//!   between arms, so no netfilter hook stays registered.

use std::{
    fmt::Write as _,
    fs,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use imdsguard::bpf::uninstall::uninstall;
use imdsguard_testlab::{
    cluster::{Cluster, SEED_POLICY},
    kube_apiserver::KubeApiserver,
    lab::Lab,
    stats::min_max,
};
use procfs::{Current as _, Meminfo};

mod api_list;
mod comparison;
mod flood;
mod footprint;
mod netfilter;
mod node;
mod procinfo;
mod soak;
mod startup;

use comparison::comparison;
use flood::flood;
use footprint::{footprint, print_footprint};
use node::Node;
use procinfo::loadavg;
use soak::soak;
use startup::{print_startup, startup};

pub(super) const NS: &str = "imds";
pub(super) const QOS_DIR: &str = "kubepods-besteffort.slice";
pub(super) const IMDS: &str = "169.254.169.254:80";
/// Nothing listens there in the lab namespace: connects are refused.
pub(super) const CLOSED_PORT: &str = "127.0.0.1:9";
pub(super) const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// `imdsguard-bench scale`: start-up, footprint, soak, denial flood and
/// the iptables comparison.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// Pod counts on the node, ascending.
    #[arg(long, value_delimiter = ',', default_value = "110,1000,10000")]
    pub(super) pods: Vec<u32>,
    /// Agent starts per size and kind.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub(super) repeats: u32,
    /// Idle interval for the CPU figure, in seconds.
    #[arg(long, default_value_t = 10)]
    pub(super) idle_secs: u64,
    /// Pod churn at the first size, in seconds; 0 skips it.
    #[arg(long, default_value_t = 60)]
    pub(super) soak_secs: u64,
    /// Churn pods alive at once during the soak.
    #[arg(long, default_value_t = 20)]
    pub(super) churn_pods: usize,
    /// Pods created (and as many deleted) per minute during the soak; 0
    /// creates them as fast as the API server takes them (about 7,500 a
    /// minute here), a stress far above what a kubelet produces.
    #[arg(long, default_value_t = 0)]
    pub(super) churn_per_min: u32,
    /// Another `imdsguard` binary (e.g. built from an older commit): the
    /// start-up and footprint phases run it too, alternating with this
    /// one, so that both are measured side by side under the same load.
    #[arg(long, value_name = "PATH")]
    pub(super) baseline: Option<PathBuf>,
    /// An argument for this build's `imdsguard node` (repeatable), e.g.
    /// `--agent-arg=--pod-list-page-size=2000`; the baseline gets none.
    #[arg(long = "agent-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub(super) agent_args: Vec<String>,
    /// Phases not to run (start-up and footprint always run).
    #[arg(long, value_delimiter = ',', value_enum)]
    pub(super) skip: Vec<Phase>,
    /// Length of each flood arm, in seconds (at least 3: ramp and drain).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(3..))]
    pub(super) flood_secs: u64,
    /// Interleaved rounds of the flood arms.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub(super) flood_rounds: u32,
    /// Calls per operation of each worker run in a flood arm.
    #[arg(long, default_value_t = 5000)]
    pub(super) flood_iterations: u32,
    /// Interleaved rounds of the iptables comparison.
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..))]
    pub(super) rounds: u32,
    /// Calls per operation in the comparison.
    #[arg(long, default_value_t = 20_000)]
    pub(super) iterations: u32,
    /// Parallel pod creations against the API server.
    #[arg(long, default_value_t = 16)]
    pub(super) create_concurrency: usize,
}

/// A phase that `--skip` can leave out.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// The iptables comparison.
    Comparison,
    /// The denial flood.
    Flood,
    /// The pod churn soak (as `--soak-secs 0`).
    Soak,
}

/// An agent binary and its label in the tables.
#[derive(Clone, Debug)]
pub(super) struct Build {
    pub(super) label: &'static str,
    pub(super) bin: PathBuf,
    /// More `imdsguard node` arguments.
    pub(super) args: Vec<String>,
}

/// Runs the bench against the `imdsguard` binary `bin`.
pub fn run(mut o: Options, bin: PathBuf) -> anyhow::Result<()> {
    o.pods.sort_unstable();
    o.pods.dedup();
    ensure!(
        o.pods.first().is_some_and(|&n| n > 0),
        "--pods needs at least one count above 0"
    );
    ensure!(
        o.create_concurrency > 0,
        "--create-concurrency must be at least 1"
    );
    let started = Instant::now();
    let load_at_start = loadavg();

    // Declaration order is the reverse of drop order: pod cgroups go first
    // (after the agent, which lives inside the phases), then the apiserver
    // and etcd, then the lab with its namespace and bpffs.
    let lab = Lab::new("scale-bench").context("set up the lab (run as root)")?;
    let api = KubeApiserver::start()
        .context("start kube-apiserver (run `cargo xtask kubernetes` once)")?;
    let dir = imdsguard_testlab::scratch::ScratchDir::new("imdsguard-bench-scale")?;
    let cluster = Cluster::new(&api, &dir.join("admin.kubeconfig"));
    cluster.apply_rbac();
    cluster.create_namespace(NS);
    let kubepods = lab.cgroup("kubepods.slice")?;
    let _besteffort = lab.cgroup(&format!("kubepods.slice/{QOS_DIR}"))?;
    let policy = dir.join("policy.yaml");
    fs::write(&policy, SEED_POLICY)?;
    let mut node = Node {
        bin,
        lab: &lab,
        cluster: &cluster,
        api: &api,
        kubepods: &kubepods,
        policy,
        scratch: dir.path().to_path_buf(),
        pods: Vec::new(),
    };

    let mut out = String::new();
    header(&mut out, &o, &node, &load_at_start)?;

    let mut builds = Vec::new();
    if let Some(b) = &o.baseline {
        builds.push(Build {
            label: "baseline",
            bin: b.clone(),
            args: Vec::new(),
        });
    }
    builds.push(Build {
        label: "this build",
        bin: node.bin.clone(),
        args: o.agent_args.clone(),
    });
    let cmp = match o.skip.contains(&Phase::Comparison) {
        true => String::new(),
        false => {
            eprintln!("comparison: {} rounds", o.rounds);
            comparison(&node, &o)?
        }
    };

    let mut startups = Vec::new();
    let mut footprints = Vec::new();
    let mut flood_out = None;
    let mut soak_out = None;
    let mut creation = Vec::new();
    let mut floors = Vec::new();
    for (i, &size) in o.pods.iter().enumerate() {
        eprintln!("pods: growing to {size}");
        let took = node.grow_to(size, o.create_concurrency)?;
        creation.push((size, took));
        eprintln!("pods: {size} in the API with cgroups ({took:.1?}); start-up runs");
        startups.extend(startup(&node, size, o.repeats, &builds)?);
        let (took, pages) = api_list::api_list(&node, 500, o.repeats)?;
        floors.push((size, took, pages));
        let mut agent = None;
        for b in &builds {
            eprintln!("footprint at {size} pods: {}", b.label);
            // Cold, as on a fresh node; another build's pins may not be
            // adoptable.
            drop(uninstall(&node.pins())?);
            let (a, start) = node.start_agent(b)?;
            footprints.push(footprint(&a, b.label, size, start.entries, o.idle_secs)?);
            agent = Some(a);
        }
        // The last is this build's agent: the flood and the soak run on it.
        let agent = agent.context("no build to run")?;
        if i == 0 {
            if !o.skip.contains(&Phase::Flood) {
                eprintln!("denial flood: {} rounds", o.flood_rounds);
                flood_out = Some(flood(&node, &agent, &o)?);
            }
            if o.soak_secs > 0 && !o.skip.contains(&Phase::Soak) {
                eprintln!("soak: {} s of pod churn", o.soak_secs);
                soak_out = Some(soak(&node, &agent, &o)?);
            }
        }
        drop(agent);
    }

    print_startup(&mut out, &startups, &creation, o.create_concurrency);
    writeln!(
        out,
        "\nThe API server alone, sending the node's pods 500 a page as the agent lists them \
         (received, nothing decoded; median of {}): {}",
        o.repeats,
        floors
            .iter()
            .map(|(n, d, pages)| format!("{n} pods: {:.0} ms ({pages} pages)", ms(*d)))
            .collect::<Vec<_>>()
            .join("; ")
    )?;
    print_footprint(&mut out, &footprints, o.idle_secs);
    if let Some(f) = &flood_out {
        out.push_str(f);
    }
    if let Some(s) = &soak_out {
        out.push_str(s);
    }
    out.push_str(&cmp);
    writeln!(
        out,
        "\nload average at the end: {}; whole run {:.0} s",
        loadavg(),
        started.elapsed().as_secs_f64()
    )?;
    print!("{out}");

    drop(node);
    drop(_besteffort);
    drop(kubepods);
    drop(cluster);
    drop(dir);
    drop(api);
    drop(lab);
    println!(
        "\ncleaned up: node agent, pod cgroups, kube-apiserver and etcd, lab namespace (with its netfilter rules), bpffs pins, temp files"
    );
    Ok(())
}

fn header(out: &mut String, o: &Options, node: &Node, load: &str) -> anyhow::Result<()> {
    // The whole string: procfs's KernelVersion keeps only major.minor.patch.
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem = Meminfo::current().map_or_else(
        |_| "?".into(),
        |m| format!("{:.0} GiB", m.mem_total as f64 / GIB),
    );
    let args: Vec<String> = std::env::args().skip(1).collect();
    writeln!(out, "# imdsguard scale bench\n")?;
    writeln!(
        out,
        "kernel {}, {} CPUs, {mem} RAM; load average at the start: {load}",
        kernel.trim(),
        std::thread::available_parallelism().map_or(0, usize::from)
    )?;
    writeln!(
        out,
        "agent: {} node (real kube-apiserver on 127.0.0.1, seed policy); pods in namespace {NS}, \
         half app=prod (allowed), half app=test (denied)",
        node.bin.display()
    )?;
    writeln!(out, "arguments: {}", args.join(" "))?;
    writeln!(
        out,
        "sizes: {:?} pods; {} start-ups per size and kind; idle {} s; soak {} s; flood {} x {} s",
        o.pods, o.repeats, o.idle_secs, o.soak_secs, o.flood_rounds, o.flood_secs
    )?;
    if let Some(b) = &o.baseline {
        writeln!(out, "baseline: {}", b.display())?;
    }
    Ok(())
}

pub(super) fn max(v: &[f64]) -> f64 {
    min_max(v).1
}

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
