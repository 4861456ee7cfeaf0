//! Comparison: the overhead worker with no rules, iptables REJECT,
//! iptables DNAT to a proxy, and imdsguard.

use std::{collections::BTreeMap, fmt::Write as _};

use anyhow::ensure;
use imdsguard::{
    bpf::enforcer::{Attachment, Enforcer, MapState, Mode},
    bpf::uninstall::uninstall,
    cgroup::mount::CgroupDir,
    destinations,
};
use imdsguard_testlab::{
    bench::WorkerReport,
    cgroups::TestCgroup,
    probe::Outcome,
    stats::{median, ratio_cell},
};

use super::netfilter::{NetfilterReset, ProxyStub, iptables, netfilter_flush, netfilter_version};
use super::{IMDS, Options, QOS_DIR, node::Node};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Guard {
    NoRules,
    Reject,
    Dnat,
    Imdsguard,
}

impl Guard {
    const ALL: [Guard; 4] = [Guard::NoRules, Guard::Reject, Guard::Dnat, Guard::Imdsguard];
    pub(super) fn name(self) -> &'static str {
        match self {
            Guard::NoRules => "no rules, nothing attached",
            Guard::Reject => "iptables REJECT (filter OUTPUT)",
            Guard::Dnat => "iptables DNAT to a proxy (nat OUTPUT, conntrack)",
            Guard::Imdsguard => "imdsguard (connect4/6)",
        }
    }

    /// The arm's iptables rule, if it has one.
    pub(super) fn rule(self, proxy_port: u16) -> Option<String> {
        match self {
            Guard::Reject => Some("-A OUTPUT -d 169.254.169.254 -p tcp -j REJECT".into()),
            Guard::Dnat => Some(format!(
                "-t nat -A OUTPUT -d 169.254.169.254 -p tcp --dport 80 -j DNAT --to-destination 127.0.0.1:{proxy_port}"
            )),
            Guard::NoRules | Guard::Imdsguard => None,
        }
    }
}

pub(super) fn comparison(node: &Node, o: &Options) -> anyhow::Result<String> {
    let ns = node.lab.netns();
    let version = netfilter_version(ns)?;
    let proxy = ProxyStub::start(ns)?;
    let pod = TestCgroup::create(node.kubepods.path().join(QOS_DIR).join("comparison-pod"))?;
    let _reset = NetfilterReset(ns);
    let pins = node.pins();
    let attachment = Attachment {
        cgroup_root: CgroupDir::open(node.kubepods.path())?,
        attach_at: None,
        pins: pins.clone(),
        udp: false,
        deny_raw_sockets: false,
        judge_socket_creators: false,
        filter: None,
    };
    let desired = MapState {
        mode: Mode::Enforce,
        allowed: Some(BTreeMap::new()),
        destinations: destinations::compile(&destinations::defaults())?,
    };
    let mut results: BTreeMap<Guard, Vec<WorkerReport>> = BTreeMap::new();
    let mut checks = Vec::new();
    for round in 0..o.rounds {
        let mut order = Guard::ALL.to_vec();
        order.rotate_left(round as usize % Guard::ALL.len());
        for guard in order {
            drop(uninstall(&pins)?);
            netfilter_flush(ns)?;
            let _enforcer: Option<Enforcer> = match guard {
                Guard::Imdsguard => Some(Enforcer::start(attachment.clone(), &desired)?.0),
                _ => {
                    if let Some(rule) = guard.rule(proxy.port) {
                        iptables(ns, &rule)?;
                    }
                    None
                }
            };
            if round == 0 {
                checks.push(check_guard(node, &pod, &proxy, guard)?);
            }
            results
                .entry(guard)
                .or_default()
                .push(node.worker(&pod, o.iterations)?);
        }
        eprintln!("comparison round {}/{} done", round + 1, o.rounds);
    }
    drop(uninstall(&pins)?);
    netfilter_flush(ns)?;

    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## Comparison with the iptables approach ({} interleaved rounds x {} calls)\n\n\
         The overhead worker from a pod cgroup below kubepods, in the lab's network namespace, \
         to its own loopback listener and sink (unprotected destinations). The rules are the \
         ones peers install, in that namespace only ({version}); all tables are removed between \
         arms. Cells: median ns per call, then the median [min..max] of the per-round ratios \
         against no rules.\n",
        o.rounds, o.iterations
    );
    let _ = writeln!(
        out,
        "| arm | TCP connect+close | UDP connect | UDP sendto |\n|---|---|---|---|"
    );
    let base = &results[&Guard::NoRules];
    for (guard, runs) in &results {
        let cell = |f: fn(&WorkerReport) -> f64| {
            let med = median(runs.iter().map(f).collect());
            if *guard == Guard::NoRules {
                return format!("{med:.0} ns");
            }
            let ratios: Vec<f64> = runs.iter().zip(base).map(|(r, b)| f(r) / f(b)).collect();
            ratio_cell(med, &ratios)
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            guard.name(),
            cell(|r| r.tcp_connect_ns),
            cell(|r| r.udp_connect_ns),
            cell(|r| r.udp_sendto_ns)
        );
    }
    let _ = writeln!(out, "\nRules (`iptables ...` in the lab namespace):");
    for guard in Guard::ALL {
        if let Some(rule) = guard.rule(proxy.port) {
            let _ = writeln!(out, "- {}: `iptables {rule}`", guard.name());
        }
    }
    let _ = writeln!(
        out,
        "\nEach arm was checked in round 1 with a TCP connect from the pod to {IMDS}:"
    );
    for c in checks {
        let _ = writeln!(out, "- {c}");
    }
    Ok(out)
}

/// Proves the arm does what it claims, from the pod the worker runs in.
pub(super) fn check_guard(
    node: &Node,
    pod: &TestCgroup,
    proxy: &ProxyStub,
    guard: Guard,
) -> anyhow::Result<String> {
    let accepted = proxy.accepts();
    let outcome = node.lab.probe(Some(pod), "tcp", IMDS)?;
    let via_proxy = proxy.accepts() > accepted;
    let ok = match guard {
        Guard::NoRules => outcome.reached() && !via_proxy,
        Guard::Reject => matches!(
            outcome,
            Outcome::Failed {
                errno: Some(libc::ECONNREFUSED),
                ..
            }
        ),
        Guard::Dnat => outcome.reached() && via_proxy,
        Guard::Imdsguard => outcome.eperm(),
    };
    ensure!(
        ok,
        "{}: unexpected outcome {outcome:?} (proxy reached: {via_proxy})",
        guard.name()
    );
    Ok(format!(
        "{}: {}",
        guard.name(),
        match guard {
            Guard::NoRules => "reached the fake metadata server".to_string(),
            Guard::Reject => "ECONNREFUSED".to_string(),
            Guard::Dnat => format!("reached the proxy stub on 127.0.0.1:{}", proxy.port),
            Guard::Imdsguard => "EPERM".to_string(),
        }
    ))
}
