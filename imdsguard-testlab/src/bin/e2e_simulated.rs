//! The seed scenario end to end against a real kube-apiserver.
//!
//! Namespace `imds` holds Deployments `prod` and `test`, 2 replicas each.
//! The node agent (`imdsguard node`) runs with the daemon's own RBAC from
//! deploy/manifests/rbac.yaml and a policy that lets app=prod reach the
//! metadata service and denies app=test. Relabelling a pod flips its
//! verdict; the time from the label patch to the new verdict is measured.
//!
//! There is no controller-manager, scheduler or kubelet: this program
//! creates what they would (the ReplicaSets, their pods bound to the test
//! node, and each pod's cgroup). Every "pod" probes IMDSv2 from its cgroup,
//! inside an isolated network namespace holding only `lo`, where a fake
//! IMDS answers on 169.254.169.254:80.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use imdsguard_testlab::{
    cgroups::TestCgroup,
    cluster::{Cluster, NODE, pod_cgroup},
    cluster::{SEED_POLICY, start_agent},
    daemon::{self, Daemon},
    fake_imds::INSTANCE_ID,
    kube_apiserver::KubeApiserver,
    lab::Lab,
    probe::{self, Outcome},
};
use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec, ReplicaSet, ReplicaSetSpec},
        core::v1::{Container, Pod, PodSpec, PodTemplateSpec},
        events::v1::Event,
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use kube::{
    Api, Resource as _,
    api::{ListParams, ObjectMeta, PostParams},
};

const NS: &str = "imds";
const IMDS: &str = "169.254.169.254:80";
/// Each probe is a fresh process; this is the pause between two.
const PROBE_GAP: Duration = Duration::from_millis(5);
const FLIP_TIMEOUT: Duration = Duration::from_secs(10);

/// The rule of [`SEED_POLICY`] that decides a pod of namespace `imds` with this
/// `app` label. The agent does not report it, so it is read off the policy.
fn rule_for(app: &str) -> &'static str {
    match app {
        "prod" => "prod-reads-imds",
        "test" => "test-denied",
        _ => "(no rule: default deny)",
    }
}

/// A pod this program created, with the cgroup it made for it as kubelet.
struct LabPod {
    name: String,
    cgroup: TestCgroup,
}

#[derive(clap::Parser, Debug)]
#[command(name = "imdsguard-e2e-simulated")]
struct Cli {
    /// The `imdsguard` binary the agent runs from (default: the one next
    /// to this binary).
    #[arg(long, value_name = "PATH")]
    imdsguard: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    probe::run_if_probe();
    let bin = imdsguard_testlab::imdsguard_bin(<Cli as clap::Parser>::parse().imdsguard)?;

    // Declaration order is the reverse of drop order: the agent dies first,
    // then the cgroups and the lab (pins, netns), then the API server, and
    // the scratch dir last.
    let dir = imdsguard_testlab::scratch::ScratchDir::new("imdsguard-e2e")?;
    let api = KubeApiserver::start()
        .context("start kube-apiserver (`cargo xtask kubernetes` builds it)")?;
    let cluster = Cluster::new(&api, &dir.join("admin.kubeconfig"));
    let lab = Lab::new("e2e").context("set up the lab (run as root)")?;

    println!("imdsguard e2e: the seed scenario against a real kube-apiserver");
    println!(
        "kube-apiserver {} (etcd behind it); node {NODE}\n",
        api.url()
    );

    cluster.apply_rbac();
    cluster.create_namespace(NS);
    println!(
        "applied deploy/manifests/rbac.yaml (ClusterRole + ClusterRoleBinding imdsguard); created namespace {NS}"
    );

    // kubelet's systemd-driver layout: the QoS parents exist before any pod.
    let kubepods = lab.cgroup("kubepods.slice")?;
    let besteffort = lab.cgroup("kubepods.slice/kubepods-besteffort.slice")?;

    let mut pods = Vec::new();
    for (app, hash) in [("prod", "7f9c6d5b8"), ("test", "5d2b4c7f1")] {
        for (name, uid) in create_deployment(&cluster, app, hash)? {
            // As kubelet would once the pod is bound to this node.
            let cgroup = pod_cgroup(&lab, &uid);
            println!(
                "  pod/{name}  uid {uid}\n    cgroup {}",
                cgroup.path().display()
            );
            pods.push(LabPod { name, cgroup });
        }
    }

    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, SEED_POLICY).context("write the policy")?;
    println!("\npolicy {}:", policy.display());
    for line in SEED_POLICY.lines() {
        println!("  {line}");
    }

    // The agent authenticates as its service account: it can only do what
    // rbac.yaml grants (read pods and namespaces, write events).
    let mut daemon = start_agent(
        &bin,
        &api,
        &lab,
        kubepods.path(),
        &policy,
        dir.path(),
        &["--policy-poll-ms", "100"],
    )
    .context("start the node agent")?;
    println!(
        "\nimdsguard node is running (pid {}) as {}, programs attached to kubepods.slice\n",
        daemon.pid(),
        imdsguard_testlab::kube_apiserver::DAEMON_USER
    );

    let mut failures = Vec::new();
    println!("verdicts once the agent is ready:");
    print_table(&cluster, &lab, &pods, &mut failures)?;

    // Relabel one test pod to app=prod and back; time each flip from the
    // patch returning to the first probe that sees the new verdict. A probe
    // is a fresh process doing the IMDSv2 PUT and GET, so one probe's own
    // run time is the resolution of these numbers.
    let flipped = &pods[2];
    let resolution = probe_time(&lab, &pods[0].cgroup)?;
    println!(
        "\none probe (spawn + IMDSv2 PUT/GET) takes about {}: the resolution of the times below",
        ms(resolution)
    );
    println!(
        "\n$ kubectl -n {NS} label pod {} app=prod --overwrite   (merge patch)",
        flipped.name
    );
    cluster.label(NS, &flipped.name, "prod");
    let to_prod = time_until(&lab, &flipped.cgroup, Instant::now(), Outcome::reached)?;
    println!("  -> reaches IMDS {}", to_prod.describe("denied"));

    println!("\nverdicts after the flip:");
    print_table(&cluster, &lab, &pods, &mut failures)?;

    println!(
        "\n$ kubectl -n {NS} label pod {} app=test --overwrite   (merge patch)",
        flipped.name
    );
    cluster.label(NS, &flipped.name, "test");
    let to_test = time_until(&lab, &flipped.cgroup, Instant::now(), Outcome::eperm)?;
    println!("  -> EPERM {}", to_test.describe("allowed"));

    println!("\nverdicts after relabelling it back:");
    print_table(&cluster, &lab, &pods, &mut failures)?;

    print_denials(&mut daemon, &cluster, &pods)?;

    // The claim below is checked, not just stated.
    let links = lab.netns().ip(&["-o", "link", "show"])?;
    let links: Vec<&str> = links.lines().filter_map(|l| l.split(": ").nth(1)).collect();
    ensure!(links == ["lo"], "the pods' netns has links {links:?}");
    let netpols = cluster
        .rt
        .block_on(Api::<NetworkPolicy>::all(cluster.admin.clone()).list(&ListParams::default()))?;
    ensure!(
        netpols.items.is_empty(),
        "a NetworkPolicy exists in the cluster"
    );
    println!(
        "\nNo NetworkPolicy, CNI or iptables rule is involved: the cluster has 0 NetworkPolicies, \
         the pods' network namespace holds only `{}` (no CNI interface, no route out), and the \
         verdict is made in the kernel at connect() by imdsguard's cgroup programs.",
        links.join(", ")
    );

    println!(
        "\ntime to enforce a label change (patch returned -> first probe with the new verdict):"
    );
    println!(
        "  app=test -> app=prod (allow): within {}",
        ms(to_prod.elapsed)
    );
    println!(
        "  app=prod -> app=test (deny):  within {}",
        ms(to_test.elapsed)
    );
    println!("  (probe resolution about {})", ms(resolution));

    drop(daemon);
    drop(pods);
    drop(besteffort);
    drop(kubepods);
    drop(lab);
    drop(cluster);
    drop(api);
    drop(dir);
    println!(
        "\ncleaned up: node agent, pod cgroups, network namespace, bpffs pins, kube-apiserver and etcd, scratch dir"
    );

    if !failures.is_empty() {
        bail!(
            "the e2e scenario did not behave as expected:\n  {}",
            failures.join("\n  ")
        );
    }
    Ok(())
}

/// Creates Deployment `app` with 2 replicas, plus what the controllers and
/// the scheduler would add: ReplicaSet `app-hash` and its two pods, bound to
/// [`NODE`]. Returns the pods' names and UIDs.
fn create_deployment(
    cluster: &Cluster,
    app: &str,
    hash: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    let pp = PostParams::default();
    let app_labels = BTreeMap::from([("app".to_string(), app.to_string())]);
    let template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(app_labels.clone()),
            ..Default::default()
        }),
        // No resources: BestEffort, the QoS class whose cgroup we create.
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "app".into(),
                image: Some("registry.invalid/app:1".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
    };
    let deployment = Deployment {
        metadata: ObjectMeta {
            name: Some(app.into()),
            ..Default::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(2),
            selector: LabelSelector {
                match_labels: Some(app_labels.clone()),
                ..Default::default()
            },
            template: template.clone(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let deployment = cluster
        .rt
        .block_on(Api::<Deployment>::namespaced(cluster.admin.clone(), NS).create(&pp, &deployment))
        .with_context(|| format!("create deployment {app}"))?;
    println!("created deployment.apps/{app} (2 replicas, selector app={app})");

    // The deployment controller's ReplicaSet. It hashes the template for
    // the name; a fixed hash does here.
    let mut rs_labels = app_labels;
    rs_labels.insert("pod-template-hash".into(), hash.into());
    let mut rs_template = template;
    if let Some(meta) = rs_template.metadata.as_mut() {
        meta.labels = Some(rs_labels.clone());
    }
    let rs_name = format!("{app}-{hash}");
    let rs = ReplicaSet {
        metadata: ObjectMeta {
            name: Some(rs_name.clone()),
            labels: Some(rs_labels.clone()),
            owner_references: deployment.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(ReplicaSetSpec {
            replicas: Some(2),
            selector: LabelSelector {
                match_labels: Some(rs_labels.clone()),
                ..Default::default()
            },
            template: Some(rs_template.clone()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let rs = cluster
        .rt
        .block_on(Api::<ReplicaSet>::namespaced(cluster.admin.clone(), NS).create(&pp, &rs))
        .with_context(|| format!("create replicaset {rs_name}"))?;
    println!("created replicaset.apps/{rs_name} (as the deployment controller would)");

    // The ReplicaSet controller's pods: the API server appends the random
    // suffix to generateName, exactly as for real replicas. nodeName is
    // what the scheduler would bind.
    let mut created = Vec::new();
    for _ in 0..2 {
        let pod = Pod {
            metadata: ObjectMeta {
                generate_name: Some(format!("{rs_name}-")),
                labels: Some(rs_labels.clone()),
                owner_references: rs.controller_owner_ref(&()).map(|o| vec![o]),
                ..Default::default()
            },
            spec: rs_template.spec.clone().map(|spec| PodSpec {
                node_name: Some(NODE.into()),
                ..spec
            }),
            ..Default::default()
        };
        let pod = cluster
            .rt
            .block_on(Api::<Pod>::namespaced(cluster.admin.clone(), NS).create(&pp, &pod))
            .with_context(|| format!("create a pod of {rs_name}"))?;
        let qos = pod.status.as_ref().and_then(|s| s.qos_class.as_deref());
        ensure!(
            qos == Some("BestEffort"),
            "pod QoS class {qos:?}: the cgroup path assumes BestEffort"
        );
        let name = pod.metadata.name.context("created pod has no name")?;
        let uid = pod.metadata.uid.context("created pod has no uid")?;
        created.push((name, uid));
    }
    Ok(created)
}

/// Probes IMDSv2 from every pod and prints POD | LABEL app | VERDICT | RULE.
/// The label is read back from the API server. app=prod must reach the
/// fake IMDS (its instance id proves it), anything else must get EPERM.
fn print_table(
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
fn print_denials(daemon: &mut Daemon, cluster: &Cluster, pods: &[LabPod]) -> anyhow::Result<()> {
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

/// How long a verdict took to change, seen by probes.
struct Flip {
    /// From the patch returning to the end of the first probe with the new
    /// verdict: an upper bound.
    elapsed: Duration,
    probes: u32,
    /// When the last probe that still saw the old verdict started: the
    /// change happened after this (a lower bound, give or take its spawn).
    last_old: Option<Duration>,
}

impl Flip {
    fn describe(&self, old: &str) -> String {
        let bound = match self.last_old {
            Some(t) => format!("; the probe started at {} was still {old}", ms(t)),
            None => "; the very first probe saw it".into(),
        };
        format!(
            "within {} ({} probe{}{bound})",
            ms(self.elapsed),
            self.probes,
            if self.probes == 1 { "" } else { "s" }
        )
    }
}

/// Probes IMDSv2 from `cg` every [`PROBE_GAP`] until `want` holds, at most
/// [`FLIP_TIMEOUT`] after `since`.
fn time_until(
    lab: &Lab,
    cg: &TestCgroup,
    since: Instant,
    want: fn(&Outcome) -> bool,
) -> anyhow::Result<Flip> {
    let mut probes = 0;
    let mut last_old = None;
    loop {
        let started = since.elapsed();
        let o = lab.probe(Some(cg), "http", IMDS)?;
        probes += 1;
        if want(&o) {
            return Ok(Flip {
                elapsed: since.elapsed(),
                probes,
                last_old,
            });
        }
        last_old = Some(started);
        ensure!(
            since.elapsed() < FLIP_TIMEOUT,
            "{} after the label patch the probe still gets {o:?}",
            ms(since.elapsed())
        );
        std::thread::sleep(PROBE_GAP);
    }
}

/// The median run time of a probe that reaches IMDS from `cg`.
fn probe_time(lab: &Lab, cg: &TestCgroup) -> anyhow::Result<Duration> {
    let mut times = Vec::new();
    for _ in 0..7 {
        let start = Instant::now();
        let o = lab.probe(Some(cg), "http", IMDS)?;
        ensure!(o.reached(), "a prod pod's probe got {o:?}");
        times.push(start.elapsed());
    }
    times.sort();
    Ok(times[times.len() / 2])
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn cell(o: &Outcome) -> String {
    match o {
        Outcome::Reached { detail } => format!("reached (instance id {detail})"),
        Outcome::Eperm => "EPERM (denied)".into(),
        Outcome::Failed { detail, .. } => format!("failed: {detail}"),
    }
}
