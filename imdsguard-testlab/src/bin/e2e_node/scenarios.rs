//! The steps of the story, in order, each checked against what the real
//! pods saw.

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use imdsguard_testlab::{fake_imds::FakeImds, real_node::RealNode};
use serde_json::json;

use crate::{
    AGENT_IMAGE, Args, filter, install,
    kube::{Kube, PodInfo},
    probes::{self, Burst},
    workloads::{self, Shape},
};

mod steps;

use steps::*;
pub(crate) use steps::{deny_to_allow, helm_upgrade, policy_file};

/// New allowed pods per start-up race round.
pub const RACE_BATCH: u32 = 10;
pub(crate) const NS: &str = "imds";
const OTHER: &str = "other";
pub(crate) const SYSTEM: &str = "imdsguard-system";
pub(crate) const AGENT: &str = "app.kubernetes.io/name=imdsguard";
pub(crate) const POD_TIMEOUT: Duration = Duration::from_secs(120);
pub(crate) const FLIP_TIMEOUT: Duration = Duration::from_secs(10);
/// kubelet's sync period (5 s here) plus its ConfigMap cache.
pub(crate) const CONFIGMAP_TIMEOUT: Duration = Duration::from_secs(120);

/// The allowed pods' first verdicts: the start-up race.
#[derive(Default)]
struct Race {
    starts: u32,
    denied_first: u32,
}

impl Race {
    fn count(&mut self, pod: &str, first: Option<&str>) {
        self.starts += 1;
        if first != Some("ok") {
            self.denied_first += 1;
            println!("  start-up race: {pod}'s first probe was {first:?}");
        }
    }
}

pub fn run(node: &mut RealNode, args: &Args, imds: &FakeImds) -> anyhow::Result<()> {
    let mut race = Race::default();
    let kubepods = node.cgroup_root()?.join("kubepods");
    let kubepods = kubepods.to_string_lossy().into_owned();
    let chart = args.chart.to_string_lossy().into_owned();
    let policy = node.dir().join("policy.yaml");
    std::fs::write(&policy, filter::POLICY).context("write the policy")?;
    let policy = policy.to_string_lossy().into_owned();

    // 1. Install the previous release from its chart, with only the image,
    //    node-specific values, filter mode and the seed policy plus its
    //    filter rule set. Step 2a upgrades it to this release.
    let previous = args.previous_chart.to_string_lossy().into_owned();
    {
        let k = kube(node, args);
        println!(
            "\n== helm install of the previous release ({previous}, image {AGENT_IMAGE}:previous, kubepodsRoot {kubepods}, filter.enabled)"
        );
        k.helm(&[
            "install",
            "imdsguard",
            &previous,
            "-n",
            SYSTEM,
            "--create-namespace",
            "--set",
            &format!("image.repository={AGENT_IMAGE}"),
            "--set",
            "image.tag=previous",
            "--set",
            "image.pullPolicy=Never",
            "--set",
            &format!("kubepodsRoot={kubepods}"),
            "--set",
            "filter.enabled=true",
            "--set-file",
            &format!("policy={policy}"),
            "--wait",
            "--timeout",
            "180s",
        ])?;
        let agent = k.wait_ready(SYSTEM, AGENT, 1, POD_TIMEOUT)?;
        println!(
            "agent pod {} Ready (in-cluster config, ServiceAccount token)",
            agent[0].name
        );
    }

    // 2. The seed workloads.
    let k = kube(node, args);
    k.apply(&workloads::namespace(NS))?;
    k.apply(&workloads::namespace(OTHER))?;
    k.apply(&workloads::deployment(NS, "prod", 2))?;
    k.apply(&workloads::deployment(NS, "test", 2))?;
    k.apply(&workloads::pod(
        NS,
        "prod-guaranteed",
        "prod",
        Shape::Guaranteed,
    ))?;
    k.apply(&workloads::pod(
        NS,
        "test-hostnet",
        "test",
        Shape::HostNetwork,
    ))?;
    k.apply(&workloads::pod(
        OTHER,
        "prod-elsewhere",
        "prod",
        Shape::Plain,
    ))?;
    let prod = k.wait_ready(NS, "app=prod", 3, POD_TIMEOUT)?;
    let test = k.wait_ready(NS, "app=test", 3, POD_TIMEOUT)?;
    k.wait_ready(OTHER, "app=prod", 1, POD_TIMEOUT)?;

    println!("\n== verdicts of the real pods (IMDSv2 token PUT, then GET, to 169.254.169.254:80)");
    println!(
        "{:<10} {:<32} {:<5} {:<12} {:<8} {:<8} {:<8}",
        "NAMESPACE", "POD", "APP", "KIND", "EXPECT", "FIRST", "LATEST"
    );
    let mut table = Vec::new();
    for p in &prod {
        table.push((NS, p.name.clone(), "prod", kind_of(&p.name), "ok"));
    }
    for p in &test {
        table.push((NS, p.name.clone(), "test", kind_of(&p.name), "denied"));
    }
    table.push((OTHER, "prod-elsewhere".into(), "prod", "other ns", "denied"));
    let mut failures = Vec::new();
    for (ns, pod, app, kind, expect) in &table {
        let first = k.wait_first_probe(ns, pod)?;
        if *expect == "ok" {
            race.count(pod, first.first.as_deref());
        }
        // Two probes at least, so LATEST is not just FIRST again.
        let v = wait_probes(&k, ns, pod, first.probes + 1)?;
        println!(
            "{ns:<10} {pod:<32} {app:<5} {kind:<12} {expect:<8} {:<8} {:<8}",
            v.first.as_deref().unwrap_or("-"),
            v.latest.as_deref().unwrap_or("-")
        );
        if v.latest.as_deref() != Some(*expect) || v.first.as_deref() != Some(*expect) {
            failures.push(format!("{ns}/{pod}: want {expect}, got {v:?}"));
        }
    }
    ensure!(failures.is_empty(), "wrong verdicts: {failures:?}");

    // 2a. The upgrade from the previous release, while a denied pod probes
    //     at full rate and the allowed ones every 300 ms.
    k.apply(&workloads::pod(NS, "burst", "test", Shape::Burst))?;
    k.wait_ready(NS, "app=test", 4, POD_TIMEOUT)?;
    k.burst_after_next_summary(NS, "burst")?;
    drop(k);
    let mut faults = vec![under_burst(
        node,
        args,
        "helm upgrade from the previous release",
        |node| {
            upgrade(
                &kube(node, args),
                &chart,
                "image.tag=e2e-1",
                Some(&format!("{AGENT_IMAGE}:e2e-1")),
            )
        },
    )?];
    let k = kube(node, args);
    for p in &prod {
        let denied = k.denied_probes(NS, &p.name)?;
        ensure!(
            denied == 0,
            "{}: {denied} probes denied across the upgrade",
            p.name
        );
    }
    println!("  the {} prod pods were never denied across it", prod.len());
    // Step 7 brings it back; until then the story counts 3 test pods.
    k.kubectl(&["-n", NS, "delete", "pod", "burst", "--wait=true"])?;

    // 2b. Filter mode: pods of app=report read the region only.
    filter::run(&k, NS, imds)?;

    // 3. Relabel flips, timed from the patch to the first new verdict.
    println!("\n== relabel flips (prod-guaranteed)");
    relabel(&k, "prod-guaranteed", "test")?;
    let to_denied = k.wait_verdict(NS, "prod-guaranteed", "denied", FLIP_TIMEOUT)?;
    relabel(&k, "prod-guaranteed", "prod")?;
    let to_ok = k.wait_verdict(NS, "prod-guaranteed", "ok", FLIP_TIMEOUT)?;
    println!(
        "app=prod -> app=test: denied after {} ms; back: ok after {} ms",
        to_denied.as_millis(),
        to_ok.as_millis()
    );

    // 4. Scale up and down.
    println!("\n== scale prod 2 -> 4 -> 2");
    let before: Vec<String> = k
        .pods(NS, "app=prod")?
        .into_iter()
        .map(|p| p.name)
        .collect();
    k.kubectl(&["-n", NS, "scale", "deployment", "prod", "--replicas=4"])?;
    let scaled = k.wait_ready(NS, "app=prod", 5, POD_TIMEOUT)?;
    for p in scaled.iter().filter(|p| !before.contains(&p.name)) {
        let v = k.wait_first_probe(NS, &p.name)?;
        race.count(&p.name, v.first.as_deref());
        println!("  new pod {}: first probe {:?}", p.name, v.first);
    }
    k.kubectl(&["-n", NS, "scale", "deployment", "prod", "--replicas=2"])?;
    let kept = k.wait_ready(NS, "app=prod", 3, POD_TIMEOUT)?;
    for p in &kept {
        k.wait_verdict(NS, &p.name, "ok", FLIP_TIMEOUT)?;
    }
    println!(
        "  scaled down; the {} remaining prod pods still read IMDS",
        kept.len()
    );

    // 5. Pod deletion: the ReplicaSet's replacement is denied from its
    //    first probe.
    println!("\n== delete a test pod");
    let victim = first_of_deployment(&k.pods(NS, "app=test")?, "test-")?;
    k.kubectl(&["-n", NS, "delete", "pod", &victim, "--wait=false"])?;
    let test_now = wait_replaced(&k, "app=test", 3, &victim)?;
    let fresh = test_now
        .iter()
        .find(|p| {
            p.name.starts_with("test-")
                && p.name != "test-hostnet"
                && !test.iter().any(|t| t.name == p.name)
        })
        .context("no replacement test pod")?;
    let v = k.wait_first_probe(NS, &fresh.name)?;
    ensure!(
        v.first.as_deref() == Some("denied"),
        "replacement {} first probe {:?}",
        fresh.name,
        v.first
    );
    println!(
        "  {} replaced by {}: first probe denied",
        victim, fresh.name
    );

    // 6. A policy ConfigMap edit reaches the agent through kubelet's
    //    symlink swap.
    println!("\n== policy ConfigMap edit: test-denied -> allow, and back");
    let policy = policy_file(&k)?;
    let allowing = deny_to_allow(&policy);
    ensure!(
        allowing != policy,
        "the chart's policy has no `access: deny` rule:\n{policy}"
    );
    let started = Instant::now();
    patch_policy(&k, &allowing)?;
    k.wait_verdict(NS, &fresh.name, "ok", CONFIGMAP_TIMEOUT)?;
    println!(
        "  test pods allowed {} s after the edit",
        started.elapsed().as_secs()
    );
    let started = Instant::now();
    patch_policy(&k, &policy)?;
    k.wait_verdict(NS, &fresh.name, "denied", CONFIGMAP_TIMEOUT)?;
    println!(
        "  denied again {} s after the revert",
        started.elapsed().as_secs()
    );

    // 7-10. Faults while a denied pod probes as fast as it can.
    k.apply(&workloads::pod(NS, "burst", "test", Shape::Burst))?;
    k.wait_ready(NS, "app=test", 4, POD_TIMEOUT)?;
    k.burst_after_next_summary(NS, "burst")?;
    drop(k);

    faults.push(under_burst(
        node,
        args,
        "agent pod deleted, DaemonSet recreates it",
        |node| {
            let k = kube(node, args);
            let old = k.wait_ready(SYSTEM, AGENT, 1, POD_TIMEOUT)?;
            k.kubectl(&["-n", SYSTEM, "delete", "pod", &old[0].name, "--wait=false"])?;
            wait_agent_replaced(&k, &old[0].name, None)
        },
    )?);

    faults.push(under_burst(
        node,
        args,
        "helm upgrade to a new image (e2e-2)",
        |node| {
            upgrade(
                &kube(node, args),
                &chart,
                "image.tag=e2e-2",
                Some(&format!("{AGENT_IMAGE}:e2e-2")),
            )
        },
    )?);

    faults.push(under_burst(node, args, "kubelet restart", |node| {
        node.restart("kubelet")
    })?);
    faults.push(under_burst(node, args, "containerd restart", |node| {
        node.restart("containerd")?;
        // The containers ran on through the restart; kubelet reconnects.
        kube(node, args)
            .wait_ready(NS, "app=test", 4, POD_TIMEOUT)
            .map(drop)
    })?);

    let k = kube(node, args);
    // Enforcement as before, after all of it.
    let prod_pod = k
        .pods(NS, "app=prod")?
        .into_iter()
        .next()
        .context("no prod pod")?;
    k.wait_verdict(NS, &prod_pod.name, "ok", FLIP_TIMEOUT)?;
    k.wait_verdict(NS, &fresh.name, "denied", FLIP_TIMEOUT)?;

    // 11. Revocation, once, with the chart's revocation.enabled=true: a
    //     relabel closes the pod's open connection.
    println!("\n== revocation (helm upgrade --set revocation.enabled=true)");
    upgrade(&k, &chart, "revocation.enabled=true", None)?;
    k.apply(&workloads::pod(NS, "holder", "prod", Shape::Hold))?;
    k.wait_ready(NS, "app=prod", 4, POD_TIMEOUT)?;
    wait_hold(&k, "open")?;
    let started = Instant::now();
    relabel(&k, "holder", "test")?;
    let closed = wait_hold(&k, "closed")?;
    println!(
        "  holder's connection closed {} ms after the relabel ({closed})",
        started.elapsed().as_millis()
    );
    let agent = k.wait_ready(SYSTEM, AGENT, 1, POD_TIMEOUT)?;
    let log = k.kubectl(&["-n", SYSTEM, "logs", &agent[0].name])?;
    // One line: the revocation, attributed to the pod.
    ensure!(
        log.lines()
            .any(|l| l.contains("revoked a connection") && l.contains("imds/holder")),
        "no revocation of imds/holder in the agent's log:\n{log}"
    );
    ensure!(
        !log.contains('\u{1b}'),
        "the agent's log holds ANSI escapes"
    );

    // 12. The start-up race over many allowed pod starts.
    println!(
        "\n== start-up race: {} rounds of {RACE_BATCH} new app=prod pods",
        args.race_rounds
    );
    let base = k.pods(NS, "app=prod")?.len();
    for round in 0..args.race_rounds {
        let before: Vec<String> = k
            .pods(NS, "app=prod")?
            .into_iter()
            .map(|p| p.name)
            .collect();
        let replicas = 2 + RACE_BATCH;
        k.kubectl(&[
            "-n",
            NS,
            "scale",
            "deployment",
            "prod",
            &format!("--replicas={replicas}"),
        ])?;
        let up = k.wait_ready(NS, "app=prod", base + RACE_BATCH as usize, POD_TIMEOUT * 2)?;
        for p in up.iter().filter(|p| !before.contains(&p.name)) {
            let v = k.wait_first_probe(NS, &p.name)?;
            race.count(&p.name, v.first.as_deref());
        }
        k.kubectl(&["-n", NS, "scale", "deployment", "prod", "--replicas=2"])?;
        k.wait_ready(NS, "app=prod", base, POD_TIMEOUT)?;
        println!(
            "  round {}: {} allowed pod starts so far, {} denied first",
            round + 1,
            race.starts,
            race.denied_first
        );
    }

    println!("\n== summary");
    println!(
        "{:<46} {:>10} {:>8} {:>8}",
        "fault (denied pod probing at full rate)", "attempts", "denied", "got through"
    );
    for (name, b) in &faults {
        println!("{name:<46} {:>10} {:>8} {:>8}", b.attempts, b.denied, b.ok);
    }
    println!(
        "start-up race: {} of {} allowed pod starts had their first metadata request denied",
        race.denied_first, race.starts
    );
    let filtered = filter::totals(&k, NS)?;
    println!("filtered pods (app=report) over the whole run: {filtered}");
    ensure!(
        filtered.leaks.is_empty(),
        "a filtered pod read a path its profile does not list: {:?}",
        filtered.leaks
    );
    let leaks: Vec<&str> = faults
        .iter()
        .filter(|(_, b)| b.ok > 0)
        .map(|(n, _)| n.as_str())
        .collect();
    ensure!(
        leaks.is_empty(),
        "the denied pod got through during: {leaks:?}"
    );
    ensure!(
        race.denied_first == 0,
        "start-up race: {} of {} allowed pods were denied at their first request",
        race.denied_first,
        race.starts
    );

    // 13. Uninstall: helm uninstall leaves enforcement in place (fail
    //     closed); the shipped uninstall DaemonSet removes it.
    install::uninstall(&k, args, &kubepods, &fresh.name)?;

    // 14. A first install with the defaults on EKS: the node components
    //     keep the metadata service, the other pods are reported, and a
    //     values change enforces.
    install::first_install(&k, args, &chart, &kubepods, &fresh.name)?;
    Ok(())
}
