//! `cargo xtask test`: everything CI runs. Nothing is skipped: the kernel
//! tests need root and a BPF-capable kernel, and fail (not skip) without.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use clap::Args;

#[derive(Args)]
pub struct Options {
    /// Skip `cargo fmt --check` and clippy (for a quick local loop).
    #[arg(long)]
    pub no_lint: bool,
}

pub fn run(o: Options) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "the kernel tests load BPF programs and create cgroups and network namespaces: run as root"
        );
    }
    crate::setup::run()?;
    if !o.no_lint {
        status(cargo().args(["fmt", "--all", "--", "--check"]))?;
        status(cargo().args([
            "clippy",
            "--workspace",
            "--exclude",
            "imdsguard-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    // The control-plane tests run a real kube-apiserver: built once per
    // machine and cached (about 5 minutes the first time).
    crate::kubernetes::ensure_built()?;
    // helm and a kubectl that speaks to the 1.20 test apiserver, for the
    // deploy/ manifests and chart tests.
    crate::deploy::prepare()?;
    // iptables/nft for the scale bench's comparison arms (inside its own
    // network namespace only).
    crate::bench_scale::ensure_netfilter_tools()?;
    // The agent images for amd64 and arm64, each binary checked (arm64
    // under qemu-user); the image_import test imports the amd64 archive,
    // and the real-node e2e below runs it.
    let images = crate::image::build(&crate::image::ALL)?;
    let amd64 = images
        .iter()
        .find(|b| b.arch == crate::image::Arch::Amd64)
        .expect("image::ALL has amd64");
    // Unit tests, the testlab's tests and the root kernel tests (which run
    // one at a time by their own harness).
    status(
        cargo()
            .args(["test", "--workspace", "--exclude", "imdsguard-ebpf"])
            .env("IMDSGUARD_AGENT_OCI", &amd64.archive),
    )?;
    // The demo and the benchmark are programs people run: keep them working.
    status(cargo().args([
        "build",
        "-p",
        "imdsguard-daemon",
        "-p",
        "imdsguard-testlab",
        "--bins",
    ]))?;
    let bin = target_dir().join("debug");
    status(
        Command::new(bin.join("imdsguard-demo"))
            .arg("--imdsguard")
            .arg(bin.join("imdsguard")),
    )?;
    // Short smoke runs of every benchmark so none can rot; no timing is
    // asserted, the figures come from `cargo xtask bench*` runs.
    let imdsguard = bin.join("imdsguard").display().to_string();
    status(Command::new(bin.join("imdsguard-bench")).args([
        "overhead",
        "--rounds",
        "1",
        "--iterations",
        "200",
    ]))?;
    status(Command::new(bin.join("imdsguard-bench")).args([
        "enforce",
        "--imdsguard",
        &imdsguard,
        "--iterations",
        "3",
        "--background-pods",
        "2",
        "--warmup",
        "0",
    ]))?;
    status(Command::new(bin.join("imdsguard-bench")).args([
        "scale",
        "--imdsguard",
        &imdsguard,
        "--pods",
        "20",
        "--repeats",
        "1",
        "--idle-secs",
        "1",
        "--soak-secs",
        "3",
        "--flood-secs",
        "3",
        "--flood-rounds",
        "1",
        "--flood-iterations",
        "200",
        "--rounds",
        "1",
        "--iterations",
        "200",
    ]))?;
    status(Command::new(bin.join("imdsguard-bench")).args([
        "proxy",
        "--imdsguard",
        &imdsguard,
        "--rounds",
        "1",
        "--requests",
        "200",
        "--rps-secs",
        "1",
        "--floor-rounds",
        "1",
        "--floor-iterations",
        "200",
    ]))?;
    status(Command::new(bin.join("imdsguard-bench")).args([
        "tamper",
        "--imdsguard",
        &imdsguard,
        "--rounds",
        "1",
        "--idle-secs",
        "1",
        "--phase-secs",
        "0",
        "--loop-secs",
        "3",
    ]))?;
    // The seed story on a real node: kubelet, containerd, the chart.
    crate::e2e::run_real_node(crate::e2e::DEFAULT_RACE_ROUNDS)?;
    Ok(())
}

/// For the root-only programs (demo, e2e, benchmarks): check root, set up
/// the toolchain (and the kube-apiserver when asked), build the release
/// binaries, and run `target/release/<bin> [SUBCOMMAND] --imdsguard PATH ARGS`.
pub fn run_release_bin(
    bin: &str,
    subcommand: Option<&str>,
    args: &[String],
    needs_apiserver: bool,
) -> anyhow::Result<()> {
    if !is_root() {
        bail!("{bin} attaches BPF programs to its own test cgroups: run as root");
    }
    crate::setup::run()?;
    if needs_apiserver {
        crate::kubernetes::ensure_built()?;
    }
    status(cargo().args([
        "build",
        "--release",
        "-p",
        "imdsguard-daemon",
        "-p",
        "imdsguard-testlab",
        "--bins",
    ]))?;
    let dir = target_dir().join("release");
    status(
        Command::new(dir.join(bin))
            .args(subcommand)
            .arg("--imdsguard")
            .arg(dir.join("imdsguard"))
            .args(args),
    )
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// `$IMDSGUARD_CACHE_DIR`, default `/var/cache/imdsguard`: what the tests
/// build once per machine (Kubernetes, helm and kubectl, the previous
/// release), each keyed by version.
pub fn cache_root() -> PathBuf {
    std::env::var_os("IMDSGUARD_CACHE_DIR")
        .map_or_else(|| PathBuf::from("/var/cache/imdsguard"), PathBuf::from)
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

pub fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let st = cmd.status().with_context(|| format!("run {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs the Debian packages for commands that are missing. A "command"
/// with a `/` is a path, checked for existence (a header file, a plugin).
pub fn ensure_commands(commands: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = commands
        .iter()
        .filter(|(cmd, _)| {
            if cmd.contains('/') {
                return !std::path::Path::new(cmd).exists();
            }
            !Command::new("sh")
                .args(["-c", &format!("command -v {cmd}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "{} missing and we are not root to install them",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    status(Command::new("apt-get").arg("update"))?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    )
}
