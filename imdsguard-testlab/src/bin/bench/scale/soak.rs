//! Soak: pod churn at the first size, sampling the agent's RSS.

use std::{
    collections::VecDeque,
    fmt::Write as _,
    time::{Duration, Instant},
};

use imdsguard_testlab::{
    cgroups::TestCgroup,
    daemon::{self, Daemon},
};

use super::{NS, Options, node::Node};
use super::{
    node::{app_of, wait_for_entries},
    procinfo::{cpu_pct, cpu_ticks, hwm_kib, rss_kib},
};

pub(super) fn soak(node: &Node, agent: &Daemon, o: &Options) -> anyhow::Result<String> {
    let pid = agent.pid();
    // Every pod of the node has an entry (allow or deny); the flood's pods
    // are gone again.
    let base = node.pods.len();
    wait_for_entries(node, base)?;
    let rss0 = rss_kib(pid)?;
    // About 60 samples (every minute of a one-hour soak), at least 5 s apart.
    let interval = Duration::from_secs((o.soak_secs / 60).max(5));
    // With a churn rate, the n-th pod is created n / rate after the start.
    let pace = (o.churn_per_min > 0).then(|| Duration::from_secs(60) / o.churn_per_min);
    let (cpu0, t0) = (cpu_ticks(pid)?, Instant::now());
    let end = t0 + Duration::from_secs(o.soak_secs);
    let mut alive: VecDeque<(String, TestCgroup)> = VecDeque::new();
    let mut samples = vec![(Duration::ZERO, rss0)];
    let mut next_sample = t0 + interval;
    let (mut created, mut deleted) = (0u64, 0u64);
    let reconciles = |a: &Daemon| {
        a.logs()
            .iter()
            .filter(|v| daemon::message(v) == Some("allow map reconciled"))
            .count()
    };
    let reconciles0 = reconciles(agent);
    while Instant::now() < end {
        if let Some(pace) = pace {
            let due = (t0 + pace.mul_f64(created as f64)).min(end);
            while let Some(wait) = due.checked_duration_since(Instant::now()) {
                // Sampling goes on while waiting.
                std::thread::sleep(wait.min(next_sample.saturating_duration_since(Instant::now())));
                if Instant::now() >= next_sample {
                    samples.push(sample(pid, t0, created, deleted)?);
                    next_sample += interval;
                }
            }
            if Instant::now() >= end {
                break;
            }
        }
        let name = format!("churn-{created}");
        let uid = node.cluster.create_pod(NS, &name, app_of(&name));
        alive.push_back((name, TestCgroup::create(node.pod_dir(&uid))?));
        created += 1;
        if alive.len() > o.churn_pods
            && let Some((name, cg)) = alive.pop_front()
        {
            node.cluster.delete_pod(NS, &name);
            drop(cg);
            deleted += 1;
        }
        if Instant::now() >= next_sample {
            samples.push(sample(pid, t0, created, deleted)?);
            next_sample += interval;
        }
    }
    let churn_secs = t0.elapsed();
    while let Some((name, cg)) = alive.pop_front() {
        node.cluster.delete_pod(NS, &name);
        drop(cg);
        deleted += 1;
    }
    // Converged: the map is back to the pods that stayed.
    let entries = wait_for_entries(node, base)?;
    std::thread::sleep(Duration::from_secs(2));
    let cpu1 = cpu_ticks(pid)?;
    let rss1 = rss_kib(pid)?;
    samples.push((t0.elapsed(), rss1));
    let hwm = hwm_kib(pid)?;

    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## Soak: pod churn at {} pods\n\n\
         For {:.0} s, pods are created (API object, then cgroup) {} and the oldest deleted \
         (API object, then cgroup) so that {} churn pods stay alive; then the rest are deleted \
         and the agent converges. Issue target: no RSS growth.\n",
        o.pods[0],
        churn_secs.as_secs_f64(),
        match o.churn_per_min {
            0 => "as fast as the API server takes them".to_string(),
            n => format!("at {n} a minute"),
        },
        o.churn_pods
    );
    let _ = writeln!(
        out,
        "| churn | pods created / deleted | map reconciles | agent CPU | VmRSS before | VmRSS after | VmHWM | allow-map entries before / after |\n|---|---|---|---|---|---|---|---|"
    );
    let _ = writeln!(
        out,
        "| {:.0} s | {created} / {deleted} ({:.0}/s) | {} | {:.1}% | {:.1} MiB | {:.1} MiB | {:.1} MiB | {base} / {entries} |",
        churn_secs.as_secs_f64(),
        created as f64 / churn_secs.as_secs_f64(),
        reconciles(agent) - reconciles0,
        cpu_pct(cpu1 - cpu0, t0.elapsed()),
        rss0 as f64 / 1024.0,
        rss1 as f64 / 1024.0,
        hwm as f64 / 1024.0,
    );
    let _ = writeln!(
        out,
        "\nVmRSS over time (s: MiB): {}",
        samples
            .iter()
            .map(|(t, kib)| format!("{:.0}: {:.1}", t.as_secs_f64(), *kib as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(out)
}

/// One point of the RSS curve, also printed as it is taken so that a long
/// soak can be followed (and its curve read) while it runs.
fn sample(pid: u32, t0: Instant, created: u64, deleted: u64) -> anyhow::Result<(Duration, u64)> {
    let (t, kib) = (t0.elapsed(), rss_kib(pid)?);
    eprintln!(
        "soak: {:.0} s, VmRSS {:.1} MiB, {created} pods created, {deleted} deleted",
        t.as_secs_f64(),
        kib as f64 / 1024.0
    );
    Ok((t, kib))
}
