//! `cargo xtask e2e`: the seed story on a real node. Builds (once, cached)
//! kubelet, containerd's peers and the control plane, the agent images
//! (`cargo xtask image`: both architectures are built and checked, the
//! amd64 OCI archive is imported into the node's containerd), the static
//! probe binary for the workload image, and runs `imdsguard-e2e` as root.
//! It installs the previous release (`cargo xtask previous-release`, built
//! once from this repository's history) and upgrades it to this one from
//! deploy/helm/imdsguard, uninstalls with deploy/uninstall, and installs
//! again with the chart's defaults.
//!
//! `--simulated` runs the older story against a bare kube-apiserver where
//! the test plays kubelet (the systemd driver's layout, which this host
//! cannot show for real).

use std::process::Command;

use anyhow::bail;
use clap::Args;

use crate::test::{cargo, ensure_commands, is_root, status, target_dir, workspace_root};

#[derive(Args)]
pub struct Options {
    /// The older story, against a bare kube-apiserver with simulated pods.
    #[arg(long)]
    pub simulated: bool,
    /// Start-up race rounds of 10 new allowed pods each.
    #[arg(long, default_value_t = DEFAULT_RACE_ROUNDS)]
    pub race_rounds: u32,
}

/// 5 rounds of 10, plus the scaled and seed pods: over 50 allowed starts.
pub const DEFAULT_RACE_ROUNDS: u32 = 5;

/// The real node's Debian packages (shared/real-node.md).
const NODE_COMMANDS: &[(&str, &str)] = &[
    ("containerd", "containerd"),
    ("runc", "runc"),
    ("iptables", "iptables"),
    ("curl", "curl"),
    ("conntrack", "conntrack"),
    ("/usr/lib/cni/bridge", "containernetworking-plugins"),
];

pub fn run(o: Options) -> anyhow::Result<()> {
    if o.simulated {
        return crate::test::run_release_bin("imdsguard-e2e-simulated", None, &[], true);
    }
    run_real_node(o.race_rounds)
}

/// Builds everything the real-node story needs and runs it.
pub fn run_real_node(race_rounds: u32) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the real node runs kubelet and containerd and loads BPF programs: run as root");
    }
    crate::setup::run()?;
    ensure_commands(NODE_COMMANDS)?;
    crate::kubernetes::ensure_built()?;
    let tools = crate::deploy::prepare()?;
    let previous = crate::release::PREVIOUS.ensure_built()?;
    let images = crate::image::build(&crate::image::ALL)?;
    let agent = images
        .iter()
        .find(|b| b.arch == crate::image::Arch::Amd64)
        .expect("image::ALL has amd64");
    let musl = crate::image::Arch::Amd64.rust_target();
    status(cargo().args([
        "build",
        "--release",
        "--locked",
        "--target",
        musl,
        "-p",
        "imdsguard-podprobe",
    ]))?;
    let podprobe = target_dir().join(musl).join("release/imdsguard-podprobe");
    status(cargo().args([
        "build",
        "--release",
        "-p",
        "imdsguard-testlab",
        "--bin",
        "imdsguard-e2e",
    ]))?;
    let root = workspace_root();
    status(
        Command::new(target_dir().join("release/imdsguard-e2e"))
            .arg("--agent-image")
            .arg(&agent.archive)
            .arg("--agent-image-name")
            .arg(&agent.name)
            .arg("--podprobe")
            .arg(&podprobe)
            .arg("--kubectl")
            .arg(&tools.kubectl)
            .arg("--helm")
            .arg(&tools.helm[0])
            .arg("--chart")
            .arg(root.join("deploy/helm/imdsguard"))
            .arg("--previous-chart")
            .arg(&previous.chart)
            .arg("--previous-image")
            .arg(&previous.archive)
            .arg("--previous-image-name")
            .arg(&previous.image_name)
            .arg("--uninstall-manifest")
            .arg(root.join("deploy/uninstall/uninstall.yaml"))
            .arg("--imdsguard")
            .arg(&agent.binary)
            .arg("--seccomp-profile")
            .arg(root.join("deploy/seccomp/imdsguard.json"))
            .arg("--race-rounds")
            .arg(race_rounds.to_string()),
    )
}
