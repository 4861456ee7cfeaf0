//! Hook overhead on traffic to unprotected destinations, imdsguard attached
//! vs not, interleaved in one run. See BENCHMARKS.md; run with
//! `cargo xtask bench` (add `-- --rounds N --iterations N` to change sizes).

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context as _;
use imdsguard::{
    cgroup::CgroupDir,
    destinations,
    enforcer::{self, Attachment, Desired, Enforcer, Mode},
    pins::PinLayout,
};
use imdsguard_testlab::{bench::WorkerReport, lab::Lab, probe};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Arm {
    /// No imdsguard program anywhere on the machine.
    Detached,
    /// connect4/connect6 attached (the default).
    Connect,
    /// connect4/6 plus sendmsg4/6 (`--udp`).
    ConnectUdp,
}

impl Arm {
    const ALL: [Arm; 3] = [Arm::Detached, Arm::Connect, Arm::ConnectUdp];
    fn name(self) -> &'static str {
        match self {
            Arm::Detached => "not attached",
            Arm::Connect => "imdsguard (connect4/6)",
            Arm::ConnectUdp => "imdsguard --udp (+sendmsg4/6)",
        }
    }
}

fn arg(name: &str, default: u32) -> anyhow::Result<u32> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        Some(i) => Ok(args.get(i + 1).context("value missing")?.parse()?),
        None => Ok(default),
    }
}

fn main() -> anyhow::Result<()> {
    probe::run_if_probe();
    let rounds = arg("--rounds", 7)?;
    let iterations = arg("--iterations", 20_000)?;
    let lab = Lab::new("bench")?;
    let pod = lab.cgroup("pod")?;
    let exe = std::env::current_exe()?;
    let pins = PinLayout::new(lab.pin_dir());
    let desired = Desired {
        mode: Mode::Enforce,
        allowed: Some(BTreeMap::new()),
        destinations: destinations::compile(&destinations::defaults())?,
    };
    let root = CgroupDir::open(lab.root().path())?;

    let mut results: BTreeMap<Arm, Vec<WorkerReport>> = BTreeMap::new();
    for round in 0..rounds {
        // Rotate the arm order every round so no arm always runs first.
        let mut order = Arm::ALL.to_vec();
        order.rotate_left(round as usize % Arm::ALL.len());
        for arm in order {
            match arm {
                Arm::Detached => drop(enforcer::uninstall(&pins)?),
                Arm::Connect | Arm::ConnectUdp => {
                    let attachment = Attachment {
                        cgroup_root: root.clone(),
                        pins: pins.clone(),
                        udp: arm == Arm::ConnectUdp,
                    };
                    drop(Enforcer::start(attachment, &desired)?);
                }
            }
            let child = probe::spawn(
                &exe,
                Some(pod.path()),
                lab.netns(),
                &["bench", &iterations.to_string()],
            )?;
            let report: WorkerReport = probe::wait(child, Duration::from_secs(600))?;
            results.entry(arm).or_default().push(report);
        }
        eprintln!("round {}/{rounds} done", round + 1);
    }
    enforcer::uninstall(&pins)?;

    println!(
        "\nhook overhead, unprotected loopback destination, {rounds} interleaved rounds x {iterations} calls"
    );
    println!(
        "(median ns per call; ratio vs not attached: median [min..max] of the per-round ratios)\n"
    );
    println!(
        "{:<32} {:>22} {:>22} {:>22}",
        "ARM", "TCP connect+close", "UDP connect", "UDP sendto"
    );
    let base = &results[&Arm::Detached];
    for arm in Arm::ALL {
        let runs = &results[&arm];
        let cell = |f: fn(&WorkerReport) -> f64| {
            let med = median(runs.iter().map(f).collect());
            if arm == Arm::Detached {
                format!("{med:>8.0} ns")
            } else {
                let ratios: Vec<f64> = runs.iter().zip(base).map(|(r, b)| f(r) / f(b)).collect();
                let (lo, hi) = min_max(&ratios);
                format!(
                    "{med:>6.0} ns {:.3} [{lo:.3}..{hi:.3}]",
                    median(ratios.clone())
                )
            }
        };
        println!(
            "{:<32} {:>22} {:>22} {:>22}",
            arm.name(),
            cell(|r| r.tcp_connect_ns),
            cell(|r| r.udp_connect_ns),
            cell(|r| r.udp_sendto_ns)
        );
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)))
}
