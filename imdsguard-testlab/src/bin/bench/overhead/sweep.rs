//! Part 3: time of one revocation sweep (`imdsguard::revoke::sweep`) over
//! pods holding idle TCP connections, with a policy that revokes nothing:
//! what every sweep pays to find out there is nothing to do.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    process::Child,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use imdsguard::{
    bpf::enforcer::Mode,
    destinations,
    revoke::sweep::{EnforcedState, Report, sweep},
};
use imdsguard_testlab::{bench::Holding, cgroups::TestCgroup, netns::NetNs};

use imdsguard_testlab::stats::{median, min_max};

use super::Bench;

/// A connection holder; dropping it kills and reaps the process (its
/// cgroup's guard would kill it too, and it dies with us regardless).
struct Holder(Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Holder {
    /// Waits for the holder's [`Holding`] line.
    fn ready(&mut self, connections: u32) -> anyhow::Result<()> {
        let stdout = self.0.stdout.take().context("holder stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let holding: Holding = serde_json::from_str(line.trim())
            .with_context(|| format!("connection holder printed {line:?}"))?;
        anyhow::ensure!(
            holding.connections == connections,
            "holder reports {holding:?}"
        );
        Ok(())
    }
}

/// One sweep's figures.
struct Timed {
    elapsed: Duration,
    namespaces: usize,
    examined: usize,
}

fn timed_sweeps(bench: &Bench, policy: &EnforcedState, runs: u32) -> anyhow::Result<Vec<Timed>> {
    (0..runs.max(1))
        .map(|_| {
            let t = Instant::now();
            let report: Report = sweep(&bench.root, policy, &[]);
            let elapsed = t.elapsed();
            anyhow::ensure!(
                report.errors.is_empty(),
                "sweep errors: {:?}",
                report.errors
            );
            anyhow::ensure!(
                report.revoked.is_empty(),
                "the sweep revoked {:?}",
                report.revoked
            );
            Ok(Timed {
                elapsed,
                namespaces: report.namespaces,
                examined: report.examined,
            })
        })
        .collect()
}

/// (namespaces, median sockets examined, "min..max" of them): the host's
/// sockets come and go between sweeps.
fn counts(sweeps: &[Timed]) -> (usize, usize, String) {
    let mut n: Vec<usize> = sweeps.iter().map(|s| s.examined).collect();
    n.sort_unstable();
    let (lo, hi) = (n[0], n[n.len() - 1]);
    let range = if lo == hi {
        lo.to_string()
    } else {
        format!("{lo}..{hi}")
    };
    (sweeps[0].namespaces, n[n.len() / 2], range)
}

/// "median [min..max] ms" of the sweeps' times.
fn ms(sweeps: &[Timed]) -> (f64, String) {
    let t: Vec<f64> = sweeps
        .iter()
        .map(|s| s.elapsed.as_secs_f64() * 1e3)
        .collect();
    let (lo, hi) = min_max(&t);
    let med = median(t);
    (med, format!("{med:.2} [{lo:.2}..{hi:.2}]"))
}

/// The pods of the sweep: cgroups, and the extra namespaces of half of them.
struct SweepPods<'a> {
    bench: &'a Bench,
    cgroups: Vec<TestCgroup>,
    extra: Vec<NetNs>,
}

impl SweepPods<'_> {
    /// Starts one holder of `connections` connections per pod and waits
    /// until every one holds them. Odd pods run in a namespace of their
    /// own, even pods in the lab's.
    fn hold(&self, connections: u32) -> anyhow::Result<Vec<Holder>> {
        let k = connections.to_string();
        let mut holders = Vec::with_capacity(self.cgroups.len());
        for (i, cg) in self.cgroups.iter().enumerate() {
            let ns = if i % 2 == 1 {
                &self.extra[i / 2]
            } else {
                self.bench.lab.netns()
            };
            holders.push(Holder(self.bench.spawn(
                Some(cg),
                ns,
                &["hold-connections", &k],
            )?));
        }
        for h in &mut holders {
            h.ready(connections)?;
        }
        Ok(holders)
    }
}

pub fn run(bench: &Bench, pods: u32, connections: u32, runs: u32) -> anyhow::Result<()> {
    // Enforce, nothing allowed, the default protected set: every pod is
    // judged, and none of their connections (all to 127.0.0.1) is to a
    // protected destination.
    let policy = EnforcedState {
        allowed: BTreeMap::new(),
        mode: Mode::Enforce,
        destinations: destinations::compile(&destinations::defaults())?,
    };
    // No process below the root yet: the sweep only looks at our own
    // namespace (the host's), whose sockets it examines and never touches.
    let host = timed_sweeps(bench, &policy, runs)?;

    // Every set of holders is dropped (killed, reaped) before the next one
    // starts and before the pods' namespaces and cgroups go.
    let sweep_pods = SweepPods {
        bench,
        cgroups: (0..pods)
            .map(|i| bench.lab.cgroup(&format!("sweep/pod-{i}/ctr")))
            .collect::<anyhow::Result<_>>()?,
        extra: (0..pods / 2)
            .map(|_| NetNs::new())
            .collect::<anyhow::Result<_>>()?,
    };
    for ns in &sweep_pods.extra {
        ns.assert_isolated()?;
    }
    // One connection per pod first: the namespaces' share of the time.
    let holders = sweep_pods.hold(1)?;
    let one = timed_sweeps(bench, &policy, runs)?;
    drop(holders);
    let holders = sweep_pods.hold(connections)?;
    let full = timed_sweeps(bench, &policy, runs)?;
    drop(holders);
    drop(sweep_pods);

    println!(
        "\n## Revocation sweep ({pods} pods, {} in the lab namespace and {} in a namespace each, holding idle loopback TCP connections; policy revokes nothing; median [min..max] of {} sweeps)\n",
        pods - pods / 2,
        pods / 2,
        runs.max(1)
    );
    println!(
        "Each connection is two sockets (the pod's and the accepted one, both owned by the pod). The sweeper's own (host) namespace is always swept.\n"
    );
    println!("| pods hold | namespaces | sockets examined | ms per sweep |\n|---|---|---|---|");
    let stages = [
        ("nothing (no process below the root)".to_owned(), &host),
        ("1 connection each".to_owned(), &one),
        (format!("{connections} connections each"), &full),
    ];
    for (name, sweeps) in &stages {
        let (namespaces, _, examined) = counts(sweeps);
        println!("| {name} | {namespaces} | {examined} | {} |", ms(sweeps).1);
    }
    let (h, o, f) = (counts(&host), counts(&one), counts(&full));
    let (h_ms, o_ms, f_ms) = (ms(&host).0, ms(&one).0, ms(&full).0);
    println!(
        "\nPer namespace entered: {:.0} us ((1 connection each - nothing) / {} namespaces). Per socket: {:.2} us (({connections} - 1 connections each) / {} more sockets).",
        (o_ms - h_ms) * 1e3 / o.0.saturating_sub(h.0).max(1) as f64,
        o.0.saturating_sub(h.0),
        (f_ms - o_ms) * 1e3 / f.1.saturating_sub(o.1).max(1) as f64,
        f.1.saturating_sub(o.1),
    );
    Ok(())
}
