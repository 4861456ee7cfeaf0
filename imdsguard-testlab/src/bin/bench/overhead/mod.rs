//! Hook overhead, program cost and revocation sweep time
//! (`imdsguard-bench overhead`). See BENCHMARKS.md; run with `cargo xtask
//! bench` (add `-- --rounds N --iterations N --sweep-pods N
//! --sweep-connections K` to change sizes).
//!
//! Part 1 interleaves arms round by round (rotating their order) and times
//! TCP connect+close, UDP connect, UDP sendto to an unprotected loopback
//! destination and socket()+close() of a UDP socket, from pods below the
//! attach root and from a host process outside it. Part 2 reads the
//! kernel's own per-program run time (BPF_ENABLE_STATS) for the connect4
//! fast path, deny path and allowed path with its ancestor walk, and for
//! sock_create. Part 3 times one revocation sweep over pods holding idle
//! connections.

mod program_cost;
mod sweep;
mod syscalls;

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::Context as _;
use imdsguard::{
    bpf::enforcer::{AllowTarget, Attachment, Enforcer, MapState, Mode},
    bpf::pins::PinLayout,
    cgroup::mount::CgroupDir,
    destinations,
    vocabulary::Action,
};
use imdsguard_testlab::{cgroups::TestCgroup, lab::Lab, netns::NetNs, probe};

/// `imdsguard-bench overhead`: hook overhead, program cost and revocation
/// sweep time.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// Interleaved rounds of the per-call timings.
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Calls per operation in each round (the program cost takes at least
    /// 50000).
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..))]
    iterations: u32,
    /// Pods holding idle connections in the revocation sweep.
    #[arg(long, default_value_t = 20)]
    sweep_pods: u32,
    /// Idle connections per pod in the revocation sweep.
    #[arg(long, default_value_t = 50)]
    sweep_connections: u32,
    /// Timed sweeps.
    #[arg(long, default_value_t = 7)]
    sweep_runs: u32,
}

/// Which optional hooks an installation has (connect4/6 always).
#[derive(Clone, Copy, Debug, Default)]
struct Hooks {
    udp: bool,
    deny_raw_sockets: bool,
    judge_socket_creators: bool,
}

/// The lab cgroups the callers run in. Allow entries sit at two levels, as
/// Guaranteed pods (one level higher) and Burstable pods give on a node, so
/// the walk of a caller without an entry spans both.
struct Pods {
    /// A Burstable pod with an allow entry.
    allowed_pod: TestCgroup,
    /// Its container: an allowed caller whose entry is one level up.
    allowed: TestCgroup,
    /// A Guaranteed pod with an allow entry; callers run in it directly.
    guaranteed: TestCgroup,
    /// A Burstable pod's container without an entry: a denied caller.
    denied: TestCgroup,
}

impl Pods {
    fn new(lab: &Lab) -> anyhow::Result<Self> {
        Ok(Self {
            allowed_pod: lab.cgroup("burstable/allowed-pod")?,
            allowed: lab.cgroup("burstable/allowed-pod/ctr")?,
            guaranteed: lab.cgroup("guaranteed-pod")?,
            denied: lab.cgroup("burstable/pod/ctr")?,
        })
    }

    fn allow_map(&self) -> anyhow::Result<BTreeMap<u64, AllowTarget>> {
        [&self.allowed_pod, &self.guaranteed]
            .into_iter()
            .map(|cg| {
                let dir = CgroupDir::open(cg.path())?;
                Ok((
                    dir.id,
                    AllowTarget {
                        level: dir.level,
                        action: Action::Allow,
                    },
                ))
            })
            .collect()
    }
}

struct Bench {
    lab: Lab,
    pins: PinLayout,
    root: CgroupDir,
    exe: PathBuf,
}

impl Bench {
    fn desired(&self, allowed: BTreeMap<u64, AllowTarget>) -> anyhow::Result<MapState> {
        Ok(MapState {
            mode: Mode::Enforce,
            allowed: Some(allowed),
            destinations: destinations::compile(&destinations::defaults())?,
        })
    }

    fn install(
        &self,
        hooks: Hooks,
        allowed: BTreeMap<u64, AllowTarget>,
    ) -> anyhow::Result<Enforcer> {
        let attachment = Attachment {
            cgroup_root: self.root.clone(),
            attach_at: None,
            pins: self.pins.clone(),
            udp: hooks.udp,
            deny_raw_sockets: hooks.deny_raw_sockets,
            judge_socket_creators: hooks.judge_socket_creators,
            filter: None,
        };
        Ok(Enforcer::start(attachment, &self.desired(allowed)?)?.0)
    }

    /// Runs the bench worker from `cg` (None: the host) in the lab netns.
    fn worker<T: for<'de> serde::Deserialize<'de>>(
        &self,
        cg: Option<&TestCgroup>,
        args: &[&str],
    ) -> anyhow::Result<T> {
        probe::wait(
            self.spawn(cg, self.lab.netns(), args)?,
            Duration::from_secs(600),
        )
    }

    /// Starts the bench worker from `cg` (None: the host) in `ns`.
    fn spawn(
        &self,
        cg: Option<&TestCgroup>,
        ns: &NetNs,
        args: &[&str],
    ) -> anyhow::Result<std::process::Child> {
        let mut full = vec!["bench"];
        full.extend_from_slice(args);
        probe::spawn(&self.exe, cg.map(TestCgroup::path), ns, &full)
    }
}

pub fn run(o: &Options) -> anyhow::Result<()> {
    let lab = Lab::new("bench")?;
    let bench = Bench {
        pins: PinLayout::new(lab.pin_dir()),
        root: CgroupDir::open(lab.root().path())?,
        exe: std::env::current_exe()?,
        lab,
    };
    let pods = Pods::new(&bench.lab)?;
    syscalls::run(&bench, &pods, o.rounds, o.iterations)?;
    program_cost::run(&bench, &pods, o.iterations.max(50_000))?;
    sweep::run(&bench, o.sweep_pods, o.sweep_connections, o.sweep_runs)?;
    Ok(())
}

/// (run time in ns, run count) of a loaded program, from the kernel.
fn prog_stats(id: u32) -> anyhow::Result<(u64, u64)> {
    let info = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .with_context(|| format!("program {id} is not loaded"))?;
    Ok((info.run_time().as_nanos() as u64, info.run_count()))
}
