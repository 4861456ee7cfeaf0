//! The seed story on a real node: kubelet, containerd, runc, the CNI
//! bridge, kube-proxy and a controller-manager run real Deployments, and
//! imdsguard is installed from its Helm chart, running in-cluster with its
//! ServiceAccount token exactly as on a cloud node.
//!
//! Every workload container is `imdsguard-podprobe`: it does the IMDSv2
//! token PUT and GET against the fake IMDS on 169.254.169.254:80, which
//! lives on `lo` of the node's network namespace (no route out), and prints
//! each verdict; the test reads them with `kubectl logs`.
//!
//! `cargo xtask e2e` builds what this needs and runs it; `.ci/run` too.

mod kube;
mod probes;
mod scenarios;
mod workloads;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context as _;
use imdsguard_testlab::{
    fake_imds::{FakeImds, Listeners},
    image::ImageBuilder,
    netns::NetNs,
    real_node::{self, RealNode, isolation},
};

/// Paths the xtask passes in.
struct Args {
    /// The static (musl) imdsguard binary for the agent image.
    imdsguard: PathBuf,
    /// The static imdsguard-podprobe binary for the workload image.
    podprobe: PathBuf,
    kubectl: PathBuf,
    helm: PathBuf,
    chart: PathBuf,
    seccomp_profile: PathBuf,
    /// Start-up race: rounds of [`scenarios::RACE_BATCH`] new allowed pods.
    race_rounds: u32,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut map = std::collections::HashMap::new();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        map.insert(flag, value);
    }
    let mut take = |flag: &str| {
        map.remove(flag)
            .with_context(|| format!("missing {flag} (run through `cargo xtask e2e`)"))
    };
    let args = Args {
        imdsguard: take("--imdsguard")?.into(),
        podprobe: take("--podprobe")?.into(),
        kubectl: take("--kubectl")?.into(),
        helm: take("--helm")?.into(),
        chart: take("--chart")?.into(),
        seccomp_profile: take("--seccomp-profile")?.into(),
        race_rounds: take("--race-rounds")
            .ok()
            .map(|v| v.parse())
            .transpose()
            .context("--race-rounds")?
            .unwrap_or(5),
    };
    anyhow::ensure!(map.is_empty(), "unknown arguments: {:?}", map.keys());
    Ok(args)
}

pub const IMDS: IpAddr = IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254));
pub const AGENT_IMAGE: &str = "imdsguard.local/imdsguard";

fn main() -> anyhow::Result<()> {
    imdsguard_testlab::require_root()?;
    let args = parse_args()?;
    // First, while this process has one thread: everything below runs in
    // the node's own network and mount namespaces.
    isolation::isolate().context("isolate the real node")?;

    let ns = NetNs::current()?;
    // The fake IMDS on the node's `lo`; `add_local_address` proves the
    // route is local before anything connects.
    ns.add_local_address(IMDS)?;
    let _imds = FakeImds::start(
        &ns,
        Listeners {
            tcp: vec![SocketAddr::new(IMDS, 80)],
            hold: vec![SocketAddr::new(IMDS, 81)],
            ..Listeners::default()
        },
    )?;

    println!("imdsguard e2e: the seed story on a real node (kubelet, containerd, runc, CNI)");
    let started = std::time::Instant::now();
    let mut node = RealNode::start(real_node::Options {
        kubectl: args.kubectl.clone(),
        sync_frequency: Duration::from_secs(5),
    })
    .context("start the real node")?;
    println!(
        "node {} Ready in {:.1} s (cgroup root {})",
        real_node::NODE,
        started.elapsed().as_secs_f64(),
        node.cgroup_root()?.display()
    );

    let images = node.dir().join("images");
    std::fs::create_dir_all(&images)?;
    for tag in ["e2e-1", "e2e-2"] {
        let archive = images.join(format!("imdsguard-{tag}.tar"));
        ImageBuilder::new(format!("{AGENT_IMAGE}:{tag}"))
            .file("/usr/local/bin/imdsguard", args.imdsguard.as_path(), 0o755)
            // Two images that differ, for `helm upgrade` to a new image.
            .file("/usr/share/imdsguard/build", tag.as_bytes(), 0o644)
            .entrypoint(["/usr/local/bin/imdsguard"])
            .write(&archive)?;
        node.import_image(&archive)?;
    }
    let archive = images.join("podprobe.tar");
    ImageBuilder::new(workloads::PROBE_IMAGE)
        .file("/podprobe", args.podprobe.as_path(), 0o755)
        .entrypoint(["/podprobe"])
        .write(&archive)?;
    node.import_image(&archive)?;
    // The node's part of installing the chart: its Localhost seccomp
    // profile, where kubelet looks (deploy/seccomp/README.md).
    let profile = node.seccomp_root().join("imdsguard/imdsguard.json");
    std::fs::create_dir_all(profile.parent().context("profile dir")?)?;
    std::fs::copy(&args.seccomp_profile, &profile).context("install the seccomp profile")?;

    let outcome = scenarios::run(&mut node, &args);
    if outcome.is_err() {
        dump_logs(&node);
    }
    let teardown = node.teardown();
    outcome?;
    teardown?;
    println!("\nreal node torn down: processes, mounts, cgroups, host paths and sysctls");
    Ok(())
}

/// The daemons' and agent's log tails, for a failed run.
fn dump_logs(node: &RealNode) {
    for d in ["kubelet", "containerd", "kube-apiserver", "kube-proxy"] {
        eprintln!(
            "---- {d} log (tail) ----\n{}",
            imdsguard_testlab::process::log_tail(&node.log(d))
        );
    }
    if let Ok(out) = node.kubectl_out(&[
        "-n",
        "imdsguard-system",
        "logs",
        "-l",
        "app.kubernetes.io/name=imdsguard",
        "--tail=-1",
    ]) {
        // Denials repeat by the thousand; the rest tells what happened.
        let rest: Vec<&str> = out
            .lines()
            .filter(|l| {
                !l.contains("metadata access denied") && !l.contains("repeated metadata access")
            })
            .collect();
        eprintln!(
            "---- agent log (without denials, last 60) ----\n{}",
            rest[rest.len().saturating_sub(60)..].join("\n")
        );
    }
}
