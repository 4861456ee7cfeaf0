//! The seed story on a real node: kubelet, containerd, runc, the CNI
//! bridge, kube-proxy and a controller-manager run real Deployments, and
//! imdsguard is installed from its Helm chart, running in-cluster with its
//! ServiceAccount token exactly as on a cloud node.
//!
//! Every workload container is `imdsguard-podprobe`: it does the IMDSv2
//! token PUT and GET against the fake IMDS on 169.254.169.254:80, which
//! lives on `lo` of the node's network namespace (no route out), and prints
//! each verdict; the test reads them with `kubectl logs`. The filtered pods
//! (and `test-hostnet`) ask for a few paths each and print each status
//! (`filter`).
//!
//! `cargo xtask e2e` builds what this needs and runs it; `.ci/run` too.

mod filter;
mod install;
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

/// Paths the xtask passes in (`cargo xtask e2e` runs this).
#[derive(clap::Parser, Debug)]
#[command(name = "imdsguard-e2e")]
struct Args {
    /// The agent image: the amd64 OCI archive `cargo xtask image` writes.
    #[arg(long)]
    agent_image: PathBuf,
    /// The name the archive gives the image (its index's
    /// `io.containerd.image.name`), which the test tags as
    /// [`AGENT_IMAGE`]`:e2e-1` and `:e2e-2`.
    #[arg(long)]
    agent_image_name: String,
    /// The static imdsguard-podprobe binary for the workload image.
    #[arg(long)]
    podprobe: PathBuf,
    #[arg(long)]
    kubectl: PathBuf,
    #[arg(long)]
    helm: PathBuf,
    #[arg(long)]
    chart: PathBuf,
    /// The previous release's chart, which the story installs first and
    /// upgrades from (`cargo xtask previous-release`).
    #[arg(long)]
    previous_chart: PathBuf,
    /// The previous release's amd64 OCI archive.
    #[arg(long)]
    previous_image: PathBuf,
    /// The name in its index, tagged as [`AGENT_IMAGE`]`:previous`.
    #[arg(long)]
    previous_image_name: String,
    /// The shipped uninstall DaemonSet (deploy/uninstall/uninstall.yaml).
    #[arg(long)]
    uninstall_manifest: PathBuf,
    /// This release's `imdsguard` binary, for `imdsguard report`.
    #[arg(long)]
    imdsguard: PathBuf,
    #[arg(long)]
    seccomp_profile: PathBuf,
    /// Start-up race: rounds of [`scenarios::RACE_BATCH`] new allowed pods.
    #[arg(long, default_value_t = 5)]
    race_rounds: u32,
}

pub const IMDS: IpAddr = IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254));
pub const AGENT_IMAGE: &str = "imdsguard.local/imdsguard";

fn main() -> anyhow::Result<()> {
    imdsguard_testlab::require_root()?;
    let args = <Args as clap::Parser>::parse();
    // First, while this process has one thread: everything below runs in
    // the node's own network and mount namespaces.
    isolation::isolate().context("isolate the real node")?;

    let ns = NetNs::current()?;
    // The fake IMDS on the node's `lo`; `add_local_address` proves the
    // route is local before anything connects.
    ns.add_local_address(IMDS)?;
    let imds = FakeImds::start(
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
    // The release image, under two names: `helm upgrade` to a new image
    // changes the tag, which is what replaces the agent's pods.
    node.import_oci_image(
        &args.agent_image,
        "linux/amd64",
        &args.agent_image_name,
        &[
            &format!("{AGENT_IMAGE}:e2e-1"),
            &format!("{AGENT_IMAGE}:e2e-2"),
        ],
    )
    .with_context(|| format!("import {}", args.agent_image.display()))?;
    node.import_oci_image(
        &args.previous_image,
        "linux/amd64",
        &args.previous_image_name,
        &[&format!("{AGENT_IMAGE}:previous")],
    )
    .with_context(|| format!("import {}", args.previous_image.display()))?;
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

    let outcome = scenarios::run(&mut node, &args, &imds);
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

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::Args;

    #[test]
    fn takes_the_flags_xtask_passes() {
        let flags = [
            "--agent-image",
            "--agent-image-name",
            "--podprobe",
            "--kubectl",
            "--helm",
            "--chart",
            "--previous-chart",
            "--previous-image",
            "--previous-image-name",
            "--uninstall-manifest",
            "--imdsguard",
            "--seccomp-profile",
        ];
        let mut argv = vec!["imdsguard-e2e".to_owned()];
        for f in flags {
            argv.extend([f.to_owned(), format!("/x{f}")]);
        }
        let args = Args::try_parse_from(&argv).unwrap();
        assert_eq!(args.seccomp_profile.to_str(), Some("/x--seccomp-profile"));
        assert_eq!(args.race_rounds, 5);
        argv.extend(["--race-rounds".into(), "2".into()]);
        assert_eq!(Args::try_parse_from(&argv).unwrap().race_rounds, 2);
        assert!(Args::try_parse_from(&argv[..3]).is_err(), "a path missing");
    }
}
