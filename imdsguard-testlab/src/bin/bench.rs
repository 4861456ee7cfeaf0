//! Hook overhead and program cost. See BENCHMARKS.md; run with
//! `cargo xtask bench` (add `-- --rounds N --iterations N` to change sizes).
//!
//! Part 1 interleaves arms round by round (rotating their order) and times
//! TCP connect+close, UDP connect and UDP sendto to an unprotected loopback
//! destination, from a pod below the attach root and from a host process
//! outside it. Part 2 reads the kernel's own per-program run time
//! (BPF_ENABLE_STATS) for the fast path, the deny path and the allowed path
//! with its ancestor walk.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context as _;
use imdsguard::{
    cgroup::CgroupDir,
    destinations,
    enforcer::{self, AllowTarget, Attachment, Desired, Enforcer, Mode},
    pins::{Hook, PinLayout},
};
use imdsguard_common::action;
use imdsguard_testlab::{bench::WorkerReport, cgroups::TestCgroup, lab::Lab, noop, probe};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Arm {
    /// Nothing attached anywhere on the machine.
    Detached,
    /// An allow-all program on connect4/6: the kernel's floor.
    Noop,
    /// imdsguard, default hooks.
    Imdsguard,
    /// An allow-all program on connect4/6 and sendmsg4/6.
    NoopUdp,
    /// imdsguard --udp.
    ImdsguardUdp,
}

impl Arm {
    const ALL: [Arm; 5] = [
        Arm::Detached,
        Arm::Noop,
        Arm::Imdsguard,
        Arm::NoopUdp,
        Arm::ImdsguardUdp,
    ];
    fn name(self) -> &'static str {
        match self {
            Arm::Detached => "not attached",
            Arm::Noop => "allow-all program (connect4/6)",
            Arm::Imdsguard => "imdsguard (connect4/6)",
            Arm::NoopUdp => "allow-all program (+sendmsg4/6)",
            Arm::ImdsguardUdp => "imdsguard --udp (+sendmsg4/6)",
        }
    }
    /// What each arm is compared with.
    fn floor(self) -> Arm {
        match self {
            Arm::Imdsguard => Arm::Noop,
            Arm::ImdsguardUdp => Arm::NoopUdp,
            _ => Arm::Detached,
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

struct Bench {
    lab: Lab,
    pins: PinLayout,
    root: CgroupDir,
    exe: std::path::PathBuf,
}

impl Bench {
    fn desired(&self, allowed: BTreeMap<u64, AllowTarget>) -> anyhow::Result<Desired> {
        Ok(Desired {
            mode: Mode::Enforce,
            allowed: Some(allowed),
            destinations: destinations::compile(&destinations::defaults())?,
        })
    }

    fn install(&self, udp: bool, allowed: BTreeMap<u64, AllowTarget>) -> anyhow::Result<Enforcer> {
        let attachment = Attachment {
            cgroup_root: self.root.clone(),
            attach_at: None,
            pins: self.pins.clone(),
            udp,
            deny_raw_sockets: false,
            judge_socket_creators: false,
        };
        Ok(Enforcer::start(attachment, &self.desired(allowed)?)?.0)
    }

    fn worker<T: for<'de> serde::Deserialize<'de>>(
        &self,
        cg: Option<&TestCgroup>,
        args: &[&str],
    ) -> anyhow::Result<T> {
        let mut full = vec!["bench"];
        full.extend_from_slice(args);
        let child = probe::spawn(&self.exe, cg.map(TestCgroup::path), self.lab.netns(), &full)?;
        probe::wait(child, Duration::from_secs(600))
    }
}

fn main() -> anyhow::Result<()> {
    probe::run_if_probe();
    let rounds = arg("--rounds", 7)?;
    let iterations = arg("--iterations", 20_000)?;
    let lab = Lab::new("bench")?;
    let bench = Bench {
        pins: PinLayout::new(lab.pin_dir()),
        root: CgroupDir::open(lab.root().path())?,
        exe: std::env::current_exe()?,
        lab,
    };
    // A Burstable-like pod two levels below the root, with a container.
    let pod = bench.lab.cgroup("burstable/pod")?;
    let ctr = bench.lab.cgroup("burstable/pod/ctr")?;
    overhead(&bench, &ctr, rounds, iterations)?;
    program_cost(&bench, &pod, &ctr, iterations.max(50_000))?;
    Ok(())
}

fn overhead(bench: &Bench, pod: &TestCgroup, rounds: u32, iterations: u32) -> anyhow::Result<()> {
    let mut results: BTreeMap<(Arm, bool), Vec<WorkerReport>> = BTreeMap::new();
    let it = iterations.to_string();
    for round in 0..rounds {
        let mut order = Arm::ALL.to_vec();
        order.rotate_left(round as usize % Arm::ALL.len());
        for arm in order {
            drop(enforcer::uninstall(&bench.pins)?);
            let _noop;
            let _enforcer;
            match arm {
                Arm::Detached => {}
                Arm::Noop => {
                    _noop =
                        noop::attach(bench.lab.root().path(), &[noop::CONNECT4, noop::CONNECT6])?
                }
                Arm::NoopUdp => {
                    _noop = noop::attach(
                        bench.lab.root().path(),
                        &[
                            noop::CONNECT4,
                            noop::CONNECT6,
                            noop::SENDMSG4,
                            noop::SENDMSG6,
                        ],
                    )?
                }
                Arm::Imdsguard => _enforcer = bench.install(false, BTreeMap::new())?,
                Arm::ImdsguardUdp => _enforcer = bench.install(true, BTreeMap::new())?,
            }
            for in_pod in [true, false] {
                let r: WorkerReport = bench.worker(in_pod.then_some(pod), &[&it])?;
                results.entry((arm, in_pod)).or_default().push(r);
            }
        }
        eprintln!("round {}/{rounds} done", round + 1);
    }
    drop(enforcer::uninstall(&bench.pins)?);

    println!(
        "\n## Hook overhead, unprotected loopback destination ({rounds} interleaved rounds x {iterations} calls)"
    );
    println!(
        "median ns per call; ratio = median [min..max] of per-round ratios against the arm in brackets\n"
    );
    for in_pod in [true, false] {
        println!(
            "{}",
            if in_pod {
                "### From a pod (below the attach root)"
            } else {
                "### From a host process (outside the attach root)"
            }
        );
        println!(
            "| arm | vs | TCP connect+close | UDP connect | UDP sendto |\n|---|---|---|---|---|"
        );
        for arm in Arm::ALL {
            let runs = &results[&(arm, in_pod)];
            let floor = &results[&(arm.floor(), in_pod)];
            let cell = |f: fn(&WorkerReport) -> f64| {
                let med = median(runs.iter().map(f).collect());
                if arm == Arm::Detached {
                    return format!("{med:.0} ns");
                }
                let ratios: Vec<f64> = runs.iter().zip(floor).map(|(r, b)| f(r) / f(b)).collect();
                let (lo, hi) = min_max(&ratios);
                format!(
                    "{med:.0} ns, {:.3} [{lo:.3}..{hi:.3}]",
                    median(ratios.clone())
                )
            };
            println!(
                "| {} | {} | {} | {} | {} |",
                arm.name(),
                if arm == Arm::Detached {
                    "-"
                } else {
                    arm.floor().name()
                },
                cell(|r| r.tcp_connect_ns),
                cell(|r| r.udp_connect_ns),
                cell(|r| r.udp_sendto_ns)
            );
        }
        println!();
    }
    Ok(())
}

/// Per-run cost of imdsguard's connect4 program from the kernel's own
/// accounting (run_time_ns / run_cnt), for each path through it.
fn program_cost(
    bench: &Bench,
    pod: &TestCgroup,
    ctr: &TestCgroup,
    iterations: u32,
) -> anyhow::Result<()> {
    let guaranteed = bench.lab.cgroup("guaranteed-pod")?;
    let other = bench.lab.cgroup("burstable/other-pod/ctr")?;
    let pod_dir = CgroupDir::open(pod.path())?;
    let g_dir = CgroupDir::open(guaranteed.path())?;
    // Entries at two levels, as Guaranteed (one level higher) and Burstable
    // pods give on a node: the walk spans both.
    let allowed = BTreeMap::from([
        (
            pod_dir.id,
            AllowTarget {
                level: pod_dir.level,
                action: action::ALLOW,
            },
        ),
        (
            g_dir.id,
            AllowTarget {
                level: g_dir.level,
                action: action::ALLOW,
            },
        ),
    ]);
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?;
    let it = iterations.to_string();
    println!(
        "## Program cost per run (kernel bpf_stats, {iterations} runs each; entries span 2 levels)\n"
    );
    println!("| path | ns per run |\n|---|---|");
    // The accounting itself costs something per run: measure it on the
    // allow-all program, attached alone, as the zero line.
    let noop = noop::attach(bench.lab.root().path(), &[noop::CONNECT4])?;
    let noop_id = noop::program_id(&noop[0])?;
    let (t0, c0) = prog_stats(noop_id)?;
    let _: u32 = bench.worker(Some(ctr), &["udp-connect", "127.0.0.1:9", &it])?;
    let (t1, c1) = prog_stats(noop_id)?;
    println!(
        "| allow-all program (the accounting floor) | {:.1} |",
        (t1 - t0) as f64 / (c1 - c0).max(1) as f64
    );
    drop(noop);

    let mut enforcer = bench.install(false, allowed)?;
    // Drain the ring buffer as the daemon would, so the deny path's event
    // output is measured succeeding, not failing on a full buffer.
    let mut ring = enforcer.take_events()?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let drain = std::thread::spawn(move || {
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            while ring.next().is_some() {}
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    let link = imdsguard::sys::obj_get(&bench.pins.link(Hook::Connect4))?;
    let prog_id = imdsguard::sys::link_info(std::os::fd::AsFd::as_fd(&link))?.prog_id;
    let cases: [(&str, Option<&TestCgroup>, &str); 4] = [
        (
            "fast path: unprotected destination (127.0.0.1)",
            Some(ctr),
            "127.0.0.1:9",
        ),
        (
            "deny path: protected, no entry (EPERM + event)",
            Some(&other),
            "169.254.169.254:80",
        ),
        (
            "allowed path: entry on the pod, caller in its container",
            Some(ctr),
            "169.254.169.254:80",
        ),
        (
            "allowed path: entry on a Guaranteed pod, caller in it",
            Some(&guaranteed),
            "169.254.169.254:80",
        ),
    ];
    for (name, cg, target) in cases {
        let (t0, c0) = prog_stats(prog_id)?;
        let _eperm: u32 = bench.worker(cg, &["udp-connect", target, &it])?;
        let (t1, c1) = prog_stats(prog_id)?;
        anyhow::ensure!(c1 > c0, "the program did not run for {name}");
        println!("| {name} | {:.1} |", (t1 - t0) as f64 / (c1 - c0) as f64);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = drain.join();
    drop(enforcer);
    drop(enforcer::uninstall(&bench.pins)?);
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)))
}
