//! Denial flood: probes hammering 169.254.169.254 in the lab namespace
//! while the overhead worker runs from another pod.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    time::{Duration, Instant},
};

use imdsguard_testlab::{
    bench::WorkerReport,
    cgroups::TestCgroup,
    daemon::Daemon,
    probe::{self, LoopReport},
    stats::{median, ratio_cell},
};

use super::{CLOSED_PORT, IMDS, Options, max, node::Node};
use super::{
    node::{cluster_delete, create_pods, wait_for_entries},
    procinfo::{cpu_pct, cpu_ticks},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Load {
    Quiet,
    Control,
    Denial,
}

impl Load {
    const ALL: [Load; 3] = [Load::Quiet, Load::Control, Load::Denial];
    pub(super) fn name(self) -> &'static str {
        match self {
            Load::Quiet => "quiet",
            Load::Control => "control: connect loop to a closed unprotected port",
            Load::Denial => "denial flood: connect loop to 169.254.169.254:80",
        }
    }
}

#[derive(Default)]
pub(super) struct FloodSamples {
    /// Per round: every worker run of the arm.
    pub(super) workers: Vec<Vec<WorkerReport>>,
    pub(super) cpu_pct: Vec<f64>,
    pub(super) loops: LoopReport,
    pub(super) secs: f64,
    pub(super) denied: u64,
    pub(super) dropped: u64,
    pub(super) log_lines: usize,
    pub(super) late: usize,
}

pub(super) fn flood(node: &Node, agent: &Daemon, o: &Options) -> anyhow::Result<String> {
    let denied_uid = create_pods(node.cluster, vec!["flood-denied-1".into()], 1)?;
    let denied = TestCgroup::create(node.pod_dir(&denied_uid[0]))?;
    let other_uid = create_pods(node.cluster, vec!["flood-bystander-0".into()], 1)?;
    let bystander = TestCgroup::create(node.pod_dir(&other_uid[0]))?;
    // The agent has the deny entry before the flood starts.
    wait_for_entries(node, node.pods.len() + 2)?;
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let mut samples: BTreeMap<Load, FloodSamples> = BTreeMap::new();
    for round in 0..o.flood_rounds {
        let mut order = Load::ALL.to_vec();
        order.rotate_left(round as usize % Load::ALL.len());
        for load in order {
            let s = flood_arm(node, agent, load, &denied, &bystander, cpus, o)?;
            let e = samples.entry(load).or_default();
            e.workers.push(s.workers.into_iter().flatten().collect());
            e.cpu_pct.extend(s.cpu_pct);
            e.loops.reached += s.loops.reached;
            e.loops.eperm += s.loops.eperm;
            e.loops.other += s.loops.other;
            e.secs += s.secs;
            e.denied += s.denied;
            e.dropped += s.dropped;
            e.log_lines += s.log_lines;
            e.late += s.late;
        }
        eprintln!("flood round {}/{} done", round + 1, o.flood_rounds);
    }
    cluster_delete(node.cluster, &["flood-denied-1", "flood-bystander-0"]);
    drop(denied);
    drop(bystander);

    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## Denial flood ({} pods on the node)\n\n\
         {cpus} `tcp-loop` probes (one per CPU) in a denied pod, {} s per arm, {} interleaved rounds. \
         Meanwhile the overhead worker ({} calls per operation, run back to back) runs from \
         another pod to its own loopback listener. Worker cells: median ns per call, then the \
         median [min..max] of the per-round ratios against quiet. The control arm runs the same \
         probes against a closed port that imdsguard does not protect: it shows what CPU \
         contention alone costs on this {cpus}-CPU machine.\n",
        o.pods[0], o.flood_secs, o.flood_rounds, o.flood_iterations
    );
    let _ = writeln!(
        out,
        "| load | agent CPU: median (max) | probe connects/s | denied (kernel counter) | events_dropped | agent log lines | TCP connect+close | UDP connect | UDP sendto |\n|---|---|---|---|---|---|---|---|---|"
    );
    let quiet = &samples[&Load::Quiet];
    for (load, s) in &samples {
        let connects = (s.loops.reached + s.loops.eperm + s.loops.other) as f64 / s.secs.max(1e-9);
        let cell = |f: fn(&WorkerReport) -> f64| {
            let per_round: Vec<f64> = s
                .workers
                .iter()
                .map(|runs| median(runs.iter().map(f).collect()))
                .collect();
            let med = median(per_round.clone());
            if *load == Load::Quiet {
                return format!("{med:.0} ns");
            }
            let ratios: Vec<f64> = per_round
                .iter()
                .zip(&quiet.workers)
                .map(|(r, q)| r / median(q.iter().map(f).collect()))
                .collect();
            ratio_cell(med, &ratios)
        };
        let _ = writeln!(
            out,
            "| {} | {:.1}% ({:.1}%) | {} | {} | {} | {} | {} | {} | {} |",
            load.name(),
            median(s.cpu_pct.clone()),
            max(&s.cpu_pct),
            if *load == Load::Quiet {
                "-".into()
            } else {
                format!("{connects:.0} ({} EPERM)", s.loops.eperm)
            },
            s.denied,
            s.dropped,
            s.log_lines,
            cell(|r| r.tcp_connect_ns),
            cell(|r| r.udp_connect_ns),
            cell(|r| r.udp_sendto_ns),
        );
    }
    let late: usize = samples.values().map(|s| s.late).sum();
    if late > 0 {
        let _ = writeln!(
            out,
            "\nnote: {late} worker runs ended after their arm's window: lower --flood-iterations"
        );
    }
    Ok(out)
}

/// One flood arm: the probes for `flood_secs`, the worker back to back
/// inside that window, the agent's CPU time and the counters around it.
pub(super) fn flood_arm(
    node: &Node,
    agent: &Daemon,
    load: Load,
    denied: &TestCgroup,
    bystander: &TestCgroup,
    cpus: usize,
    o: &Options,
) -> anyhow::Result<FloodSamples> {
    let pid = agent.pid();
    let window = Duration::from_secs(o.flood_secs);
    let c_before = node.counters()?;
    let logs_before = agent.logs().len();
    let (cpu0, t0) = (cpu_ticks(pid)?, Instant::now());
    let millis = window.as_millis().to_string();
    let target = match load {
        Load::Quiet => None,
        Load::Control => Some(CLOSED_PORT),
        Load::Denial => Some(IMDS),
    };
    let probes = match target {
        Some(t) => (0..cpus)
            .map(|_| {
                node.lab
                    .spawn_probe(Some(denied), &["tcp-loop", t, &millis])
            })
            .collect::<anyhow::Result<Vec<_>>>()?,
        None => Vec::new(),
    };
    // The probes start looping; the last half second is left for the worker
    // to finish before they stop.
    std::thread::sleep(Duration::from_millis(300));
    let end = t0 + window - Duration::from_millis(500);
    let mut workers = Vec::new();
    let mut last = Duration::ZERO;
    let mut late = 0;
    loop {
        let s = Instant::now();
        if !workers.is_empty() && s + last > end {
            break;
        }
        workers.push(node.worker(bystander, o.flood_iterations)?);
        last = s.elapsed();
        if Instant::now() > t0 + window {
            late += 1;
        }
    }
    if let Some(rest) = (t0 + window).checked_duration_since(Instant::now()) {
        std::thread::sleep(rest);
    }
    let mut loops = LoopReport::default();
    for p in probes {
        let r: LoopReport = probe::wait(p, window + Duration::from_secs(30))?;
        loops.reached += r.reached;
        loops.eperm += r.eperm;
        loops.other += r.other;
    }
    let (cpu1, secs) = (cpu_ticks(pid)?, t0.elapsed());
    let c_after = node.counters()?;
    let delta = |k: &str| {
        c_after[k]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(c_before[k].as_u64().unwrap_or(0))
    };
    Ok(FloodSamples {
        workers: vec![workers],
        cpu_pct: vec![cpu_pct(cpu1 - cpu0, secs)],
        loops,
        secs: secs.as_secs_f64(),
        denied: delta("denied"),
        dropped: delta("events_dropped"),
        log_lines: agent.logs().len() - logs_before,
        late,
    })
}
