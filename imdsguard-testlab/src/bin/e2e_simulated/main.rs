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

mod deployments;
mod report;
mod timing;

use std::time::Instant;

use anyhow::{Context as _, bail, ensure};
use imdsguard_testlab::{
    cgroups::TestCgroup,
    cluster::{Cluster, NODE, pod_cgroup},
    cluster::{SEED_POLICY, start_agent},
    kube_apiserver::KubeApiserver,
    lab::Lab,
    probe::{self, Outcome},
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::{Api, api::ListParams};

use deployments::create_deployment;
use report::{print_denials, print_table};
use timing::{ms, probe_time, time_until};

const NS: &str = "imds";
const IMDS: &str = "169.254.169.254:80";

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
