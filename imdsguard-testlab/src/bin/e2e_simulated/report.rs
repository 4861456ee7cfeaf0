//! The printed results: the POD | LABEL | VERDICT | RULE table and the
//! denial Events the agent recorded.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use imdsguard_testlab::{
    cluster::Cluster,
    daemon::{self, Daemon},
    fake_imds::INSTANCE_ID,
    lab::Lab,
    probe::Outcome,
};
use k8s_openapi::api::{core::v1::Pod, events::v1::Event};
use kube::{Api, api::ListParams};

use crate::{IMDS, LabPod, NS};

/// The rule of [`SEED_POLICY`] that decides a pod of namespace `imds` with this
/// `app` label. The agent does not report it, so it is read off the policy.
pub(super) fn rule_for(app: &str) -> &'static str {
    match app {
        "prod" => "prod-reads-imds",
        "test" => "test-denied",
        _ => "(no rule: default deny)",
    }
}

/// Probes IMDSv2 from every pod and prints POD | LABEL app | VERDICT | RULE.
/// The label is read back from the API server. app=prod must reach the
/// fake IMDS (its instance id proves it), anything else must get EPERM.
pub(super) fn print_table(
    cluster: &Cluster,
    lab: &Lab,
    pods: &[LabPod],
    failures: &mut Vec<String>,
) -> anyhow::Result<()> {
    println!(
        "  {:<32} {:<10} {:<38} RULE",
        "POD", "LABEL app", "VERDICT (IMDSv2 169.254.169.254:80)"
    );
    println!("  {}", "-".repeat(32 + 10 + 38 + 3 + 20));
    let api = Api::<Pod>::namespaced(cluster.admin.clone(), NS);
    for pod in pods {
        let object = cluster.rt.block_on(api.get(&pod.name))?;
        let app = object
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("app"))
            .cloned()
            .unwrap_or_default();
        let o = lab.probe(Some(&pod.cgroup), "http", IMDS)?;
        let ok = match app.as_str() {
            "prod" => matches!(&o, Outcome::Reached { detail } if detail == INSTANCE_ID),
            _ => o.eperm(),
        };
        if !ok {
            failures.push(format!("{NS}/{} (app={app}) -> {o:?}", pod.name));
        }
        println!(
            "  {:<32} {:<10} {:<38} {}{}",
            format!("{NS}/{}", pod.name),
            app,
            cell(&o),
            rule_for(&app),
            if ok { "" } else { "   <-- UNEXPECTED" }
        );
    }
    // kubelet and other host daemons live outside kubepods: not judged.
    let host = lab.probe(None, "http", IMDS)?;
    if !host.reached() {
        failures.push(format!("host process -> {host:?}"));
    }
    println!(
        "  {:<32} {:<10} {:<38} (outside kubepods.slice)",
        "(host process, e.g. kubelet)",
        "n/a",
        cell(&host)
    );
    Ok(())
}

/// Shows that the agent attributed the denials to pods by name, in its
/// log and as Events on the pods in the API server.
pub(super) fn print_denials(
    daemon: &mut Daemon,
    cluster: &Cluster,
    pods: &[LabPod],
) -> anyhow::Result<()> {
    let test_pods: Vec<String> = pods
        .iter()
        .filter(|p| p.name.starts_with("test-"))
        .map(|p| format!("{NS}/{}", p.name))
        .collect();
    // Decisions reach the log through a ring buffer, asynchronously.
    for pod in &test_pods {
        daemon
            .wait_for(Duration::from_secs(10), |v| {
                v["pod"] == pod.as_str() && daemon::message(v) == Some("metadata access denied")
            })
            .with_context(|| format!("no denial attributed to {pod}"))?;
    }
    println!("\ndenials in the agent's log (ring buffer -> pod attribution via the API server):");
    let logs = daemon.logs();
    for pod in &test_pods {
        let lines: Vec<_> = logs
            .iter()
            .filter(|v| v["pod"] == pod.as_str())
            .filter(|v| daemon::message(v) == Some("metadata access denied"))
            .collect();
        let first = lines[0];
        println!(
            "  denied  pod={pod}  comm={}  dest={}  hook={}  ({} logged)",
            first["comm"].as_str().unwrap_or("?"),
            first["destination"].as_str().unwrap_or("?"),
            first["hook"].as_str().unwrap_or("?"),
            lines.len()
        );
    }

    // The agent publishes events.k8s.io Events with its own token; they
    // are informative only, so a slow one does not fail the run.
    let events_api = Api::<Event>::namespaced(cluster.admin.clone(), NS);
    let deadline = Instant::now() + Duration::from_secs(5);
    let events = loop {
        let events = cluster
            .rt
            .block_on(events_api.list(&ListParams::default()))?
            .items;
        let covered = test_pods.iter().all(|pod| {
            events.iter().any(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref())
                    == pod.strip_prefix(&format!("{NS}/"))
            })
        });
        if covered || Instant::now() > deadline {
            break events;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("\n$ kubectl -n {NS} get events   (published by the agent)");
    if events.is_empty() {
        println!("  (none yet)");
    }
    for e in &events {
        println!(
            "  {:<8} {:<22} pod/{:<24} {}",
            e.type_.as_deref().unwrap_or("?"),
            e.reason.as_deref().unwrap_or("?"),
            e.regarding
                .as_ref()
                .and_then(|r| r.name.as_deref())
                .unwrap_or("?"),
            e.note.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

pub(super) fn cell(o: &Outcome) -> String {
    match o {
        Outcome::Reached { detail } => format!("reached (instance id {detail})"),
        Outcome::Eperm => "EPERM (denied)".into(),
        Outcome::Failed { detail, .. } => format!("failed: {detail}"),
    }
}
