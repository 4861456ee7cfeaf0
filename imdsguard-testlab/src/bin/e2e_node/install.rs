//! The chart's life around the story: `helm uninstall` and the shipped
//! uninstall DaemonSet, then a first install with the defaults on EKS and
//! the values change that enforces.

use std::{
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use imdsguard_testlab::{noop, raw_bpf, real_node::PAUSE_IMAGE};
use serde_json::Value;

use crate::{
    AGENT_IMAGE, Args,
    kube::Kube,
    scenarios::{
        AGENT, CONFIGMAP_TIMEOUT, FLIP_TIMEOUT, NS, POD_TIMEOUT, SYSTEM, helm_upgrade, policy_file,
    },
    workloads,
};

/// The node's pin directory (the chart's default), on the node's own bpffs.
const PINS: &str = "/sys/fs/bpf/imdsguard";
const UNINSTALLER: &str = "app.kubernetes.io/name=imdsguard-uninstall";
const KUBE_SYSTEM: &str = "kube-system";

/// A node component: its name, its upstream labels, whether it runs on the
/// host network.
type Component = (&'static str, &'static [(&'static str, &'static str)], bool);

/// The EKS preset's components, labelled as their upstream manifests
/// label them (`imdsguard presets` cites each), on the host network where
/// upstream puts them.
const EKS_COMPONENTS: &[Component] = &[
    ("aws-node", &[("k8s-app", "aws-node")], true),
    (
        "eks-pod-identity-agent",
        &[("app.kubernetes.io/name", "eks-pod-identity-agent")],
        true,
    ),
    (
        "ebs-csi-node",
        &[
            ("app", "ebs-csi-node"),
            ("app.kubernetes.io/name", "aws-ebs-csi-driver"),
        ],
        false,
    ),
    (
        "efs-csi-node",
        &[
            ("app", "efs-csi-node"),
            ("app.kubernetes.io/name", "aws-efs-csi-driver"),
        ],
        true,
    ),
    (
        "aws-node-termination-handler",
        &[("app.kubernetes.io/name", "aws-node-termination-handler")],
        true,
    ),
];

/// `helm uninstall` keeps enforcement (fail closed); the uninstall
/// DaemonSet then removes every pin and link. `denied` is a pod the
/// story's policy denies.
pub fn uninstall(k: &Kube, args: &Args, kubepods: &str, denied: &str) -> anyhow::Result<()> {
    println!("\n== helm uninstall, then the shipped uninstall DaemonSet");
    k.helm(&[
        "uninstall",
        "imdsguard",
        "-n",
        SYSTEM,
        "--wait",
        "--timeout",
        "120s",
    ])?;
    wait_gone(k, SYSTEM, AGENT)?;
    let links = pinned(&Path::new(PINS).join("links"))?;
    ensure!(
        !links.is_empty(),
        "helm uninstall removed the pinned links: enforcement must outlive the release"
    );
    k.wait_verdict(NS, denied, "denied", FLIP_TIMEOUT)?;
    println!(
        "  agent gone; links {} still pinned and {denied} still denied (fail closed)",
        links.join(", ")
    );

    let manifest = uninstall_manifest(&std::fs::read_to_string(&args.uninstall_manifest)?);
    let file = k.node.dir().join("uninstall.yaml");
    std::fs::write(&file, manifest)?;
    let file = file.to_string_lossy().into_owned();
    k.kubectl(&["apply", "-f", &file])?;
    k.wait_ready(SYSTEM, UNINSTALLER, 1, POD_TIMEOUT)?;
    ensure!(
        !Path::new(PINS).exists(),
        "{PINS} is still there after the uninstall DaemonSet: {:?}",
        pinned(Path::new(PINS))
    );
    let kubepods = Path::new(kubepods);
    for (hook, attach_type) in [("connect4", noop::CONNECT4), ("connect6", noop::CONNECT6)] {
        let n = raw_bpf::programs_attached(kubepods, attach_type)?;
        ensure!(
            n == 0,
            "{n} {hook} programs still on {}",
            kubepods.display()
        );
    }
    k.wait_verdict(NS, denied, "ok", FLIP_TIMEOUT)?;
    k.kubectl(&["delete", "-f", &file, "--wait=true"])?;
    wait_gone(k, SYSTEM, UNINSTALLER)?;
    println!(
        "  uninstall DaemonSet done: no pin under {PINS}, no program on kubepods, {denied} reaches IMDS"
    );
    Ok(())
}

/// `helm install` with the defaults and `cloud=eks`: the EKS components
/// keep the metadata service, every other pod is audited and shows in
/// `imdsguard report`; `--set defaultMode=enforce` then denies them.
/// `other` is a pod no preset names.
pub fn first_install(
    k: &Kube,
    args: &Args,
    chart: &str,
    kubepods: &str,
    other: &str,
) -> anyhow::Result<()> {
    println!("\n== first install: chart defaults with cloud=eks (audit)");
    for (name, labels, host_network) in EKS_COMPONENTS {
        k.apply(&workloads::component(
            KUBE_SYSTEM,
            name,
            labels,
            *host_network,
        ))?;
    }
    for (name, labels, _) in EKS_COMPONENTS {
        let (key, value) = labels[0];
        k.wait_ready(KUBE_SYSTEM, &format!("{key}={value}"), 1, POD_TIMEOUT)
            .with_context(|| format!("component {name}"))?;
    }
    k.helm(&[
        "install",
        "imdsguard",
        chart,
        "-n",
        SYSTEM,
        "--create-namespace",
        "--set",
        &format!("image.repository={AGENT_IMAGE}"),
        "--set",
        "image.tag=e2e-2",
        "--set",
        "image.pullPolicy=Never",
        "--set",
        &format!("kubepodsRoot={kubepods}"),
        "--set",
        "cloud=eks",
        "--wait",
        "--timeout",
        "180s",
    ])?;
    k.wait_ready(SYSTEM, AGENT, 1, POD_TIMEOUT)?;
    let policy = policy_file(k)?;
    ensure!(
        policy.contains("include: [eks]") && policy.contains("defaultMode: audit"),
        "the chart's default policy is not the EKS preset in audit:\n{policy}"
    );
    components_read(k)?;
    k.wait_verdict(NS, other, "ok", FLIP_TIMEOUT)?;
    let audited = wait_report(k, args, other, "audited")?;
    println!("  {other}: ok (audited), {audited} audit hits in `imdsguard report`");

    println!("\n== values change: --set defaultMode=enforce");
    helm_upgrade(k, chart, "defaultMode=enforce")?;
    let took = k.wait_verdict(NS, other, "denied", CONFIGMAP_TIMEOUT)?;
    components_read(k)?;
    let denied = wait_report(k, args, other, "denied")?;
    println!(
        "  {other}: denied {} s after the upgrade (kubelet's ConfigMap sync), {denied} denials in the report; the components still read",
        took.as_secs()
    );
    Ok(())
}

/// Every EKS component's next probe reads the metadata service.
fn components_read(k: &Kube) -> anyhow::Result<()> {
    for (name, _, _) in EKS_COMPONENTS {
        k.wait_verdict(KUBE_SYSTEM, name, "ok", FLIP_TIMEOUT)
            .with_context(|| format!("component {name}"))?;
    }
    println!(
        "  {} EKS components read the metadata service: {}",
        EKS_COMPONENTS.len(),
        EKS_COMPONENTS
            .iter()
            .map(|c| c.0)
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// `imdsguard report --kubernetes -o json` (through the API server's pod
/// proxy, as a user with kubectl access runs it) until the pod `pod` has
/// `count` hits; checks that no EKS component is listed. Returns the hits.
fn wait_report(k: &Kube, args: &Args, pod: &str, count: &str) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = imdsguard_testlab::process::run(
            Command::new(&args.imdsguard)
                .args(["report", "--kubernetes", "-o", "json", "--minutes", "10"])
                .env("KUBECONFIG", k.node.admin_kubeconfig()),
        )?;
        let report: Value = serde_json::from_str(&out).context("parse the report")?;
        let rows = report["rows"].as_array().context("report rows")?;
        // Their audit hits from before the agent's first sync (it attaches
        // before it knows the pods) are counted apart, and are all they
        // may have: the preset allows them.
        let listed: Vec<&Value> = rows
            .iter()
            .filter(|r| r["namespace"] == KUBE_SYSTEM)
            .filter(|r| r["audited"].as_u64() != Some(0) || r["denied"].as_u64() != Some(0))
            .collect();
        ensure!(
            listed.is_empty(),
            "node components with audit hits or denials in the report: {listed:?}"
        );
        let hits: u64 = rows
            .iter()
            .filter(|r| r["namespace"] == NS && r["pod"] == pod)
            .filter_map(|r| r[count].as_u64())
            .sum();
        if hits > 0 {
            return Ok(hits);
        }
        if Instant::now() > deadline {
            bail!("no {count} hits for {NS}/{pod} in the report after 30 s:\n{out}");
        }
        thread::sleep(Duration::from_secs(1));
    }
}

/// The shipped manifest with this node's images: the agent's, and the
/// node's own pause image for the `done` container.
fn uninstall_manifest(shipped: &str) -> String {
    shipped
        .lines()
        .map(|l| match l.split_once("image: ") {
            Some((indent, image)) if image.contains("imdsguard/imdsguard:") => {
                format!("{indent}image: {AGENT_IMAGE}:e2e-2")
            }
            Some((indent, image)) if image.contains("pause:") => {
                format!("{indent}image: {PAUSE_IMAGE}")
            }
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// The names in a pin directory (empty when it is gone).
fn pinned(dir: &Path) -> anyhow::Result<Vec<String>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        names.push(e?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Waits until no pod matches `selector` in `ns`.
fn wait_gone(k: &Kube, ns: &str, selector: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + POD_TIMEOUT;
    while !k.pods(ns, selector)?.is_empty() {
        ensure!(
            Instant::now() < deadline,
            "pods {selector} still in {ns} after {POD_TIMEOUT:?}"
        );
        thread::sleep(Duration::from_millis(300));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_uninstall_manifest_gets_this_nodes_images() {
        let shipped = "      initContainers:\n        - name: uninstall\n          image: ghcr.io/imdsguard/imdsguard:9.9.9\n      containers:\n        - name: done\n          image: registry.k8s.io/pause:3.9\n";
        let m = super::uninstall_manifest(shipped);
        assert!(
            m.contains("          image: imdsguard.local/imdsguard:e2e-2\n"),
            "{m}"
        );
        assert!(
            m.contains("          image: imdsguard.local/pause:1.20.2\n"),
            "{m}"
        );
        assert!(
            !m.contains("ghcr.io") && !m.contains("registry.k8s.io"),
            "{m}"
        );
    }
}
