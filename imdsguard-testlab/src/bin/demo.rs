//! The seed scenario on this machine's kernel, no cluster needed.
//!
//! Namespace `imds` has two deployments of two replicas each: `prod` is
//! allowed to reach the metadata service, `test` is not. Each "pod" is a
//! cgroup laid out as kubelet's systemd driver does, with a process inside
//! an isolated network namespace that holds a fake IMDS on
//! 169.254.169.254:80 and [fd00:ec2::254]:80.

use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use imdsguard_testlab::{
    cgroups::TestCgroup,
    daemon::{self, Daemon},
    handoff::{Held, hand_off},
    lab::Lab,
    probe::{self, Outcome},
};

struct Pod {
    name: String,
    deployment: &'static str,
    cgroup: TestCgroup,
}

#[derive(clap::Parser, Debug)]
#[command(name = "imdsguard-demo")]
struct Cli {
    /// The `imdsguard` binary the agent runs from (default: the one next
    /// to this binary).
    #[arg(long, value_name = "PATH")]
    imdsguard: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    probe::run_if_probe();
    let bin = imdsguard_testlab::imdsguard_bin(<Cli as clap::Parser>::parse().imdsguard)?;
    let lab = Lab::new("demo").context("set up the demo lab (run as root)")?;

    // kubelet (systemd driver) layout: kubepods.slice/kubepods-besteffort.slice/
    // kubepods-besteffort-pod<uid with _>.slice. We attach at kubepods.slice.
    let kubepods = lab.cgroup("kubepods.slice")?;
    let mut pods = Vec::new();
    for (deployment, hash) in [("prod", "7f9c6d5b8"), ("test", "5d2b4c7f1")] {
        for (i, suffix) in ["x2k4q", "m8z7w"].iter().enumerate() {
            let uid = format!("{hash}-0000-4000-8000-00000000000{i}").replace('-', "_");
            let cgroup = lab.cgroup(&format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice"
            ))?;
            pods.push(Pod {
                name: format!("imds/{deployment}-{hash}-{suffix}"),
                deployment,
                cgroup,
            });
        }
    }

    println!(
        "imdsguard demo: namespace `imds`, deployment `prod` (2 replicas, allowed) and `test` (2 replicas, not allowed)"
    );
    println!("cgroup root (kubepods): {}", kubepods.path().display());
    println!(
        "fake IMDS inside an isolated netns (lo only) on 169.254.169.254:80 and [fd00:ec2::254]:80\n"
    );

    // A `test` pod that was already talking to the metadata service before
    // imdsguard was installed.
    let early = Held::start(&lab, &pods[2].cgroup, "169.254.169.254:8264", 15_000, "tcp")
        .context("open a connection before the install")?;

    let mut args = vec![
        "--cgroup-root".to_string(),
        kubepods.path().display().to_string(),
        "--pin-dir".to_string(),
        lab.pin_dir().display().to_string(),
    ];
    for p in pods.iter().filter(|p| p.deployment == "prod") {
        args.push("--allow-cgroup".into());
        args.push(p.cgroup.path().display().to_string());
    }
    let daemon = Daemon::start(&bin, &args)?;
    println!(
        "imdsguard is running (pid {}), programs attached to kubepods.slice\n",
        daemon.pid()
    );

    let targets = [
        ("IMDSv2 169.254.169.254", "http", "169.254.169.254:80"),
        ("IMDS IPv6 fd00:ec2::254", "http", "[fd00:ec2::254]:80"),
        (
            "::ffff:169.254.169.254",
            "http",
            "[::ffff:169.254.169.254]:80",
        ),
    ];
    let mut failures = Vec::new();
    let header = format!("{:<28} {:<8}", "POD", "ALLOWED");
    let cols: Vec<String> = targets.iter().map(|(t, _, _)| format!("{t:<26}")).collect();
    println!("{header} {}", cols.join(" "));
    println!("{}", "-".repeat(header.len() + 27 * targets.len()));
    for pod in &pods {
        let allowed = pod.deployment == "prod";
        let mut cells = Vec::new();
        for (_, kind, target) in targets {
            let o = lab.probe(Some(&pod.cgroup), kind, target)?;
            if allowed != o.reached() || (!allowed && !o.eperm()) {
                failures.push(format!("{} -> {target}: {o:?}", pod.name));
            }
            cells.push(format!("{:<26}", cell(&o)));
        }
        println!(
            "{:<28} {:<8} {}",
            pod.name,
            if allowed { "yes" } else { "no" },
            cells.join(" ")
        );
    }
    let host = lab.probe(None, "http", "169.254.169.254:80")?;
    println!(
        "{:<28} {:<8} {}",
        "(host process, e.g. kubelet)",
        "n/a",
        cell(&host)
    );
    println!(
        "\nNo NetworkPolicy, CNI or iptables rule is involved: the verdict is made in the kernel at connect().\n"
    );

    // What connect() alone would miss: a connection opened before the
    // install, and a socket handed from an allowed pod to a denied one.
    let early = early.report(Duration::from_secs(10))?;
    let revoked = early.ended == "error" && early.errno == Some(libc::ECONNABORTED);
    println!(
        "{} had a connection open before the install: {}",
        pods[2].name,
        if revoked {
            "closed by imdsguard at start (ECONNABORTED)".to_string()
        } else {
            format!("NOT closed: {early:?}")
        }
    );
    if !revoked {
        failures.push(format!("early connection not revoked: {early:?}"));
    }
    let passed = hand_off(
        &lab,
        Some(&pods[0].cgroup),
        &pods[2].cgroup,
        "169.254.169.254:80",
        "tcp",
    )?;
    println!(
        "{} hands a socket to {} (SCM_RIGHTS), which connects it: {}\n",
        pods[0].name,
        pods[2].name,
        cell(&passed)
    );
    if !passed.eperm() {
        failures.push(format!("passed socket: {passed:?}"));
    }

    // Show the decisions the daemon logged for the denied pods.
    std::thread::sleep(Duration::from_millis(300));
    println!("decisions reported by imdsguard (ring buffer -> structured log):");
    for line in daemon
        .logs()
        .iter()
        .filter(|v| daemon::message(v) == Some("metadata access denied"))
        .take(6)
    {
        println!(
            "  denied  cgroup={}  comm={}  dest={}  hook={}",
            line["cgroup"]
                .as_str()
                .unwrap_or("?")
                .rsplit('/')
                .next()
                .unwrap_or("?"),
            line["comm"].as_str().unwrap_or("?"),
            line["destination"].as_str().unwrap_or("?"),
            line["hook"].as_str().unwrap_or("?"),
        );
    }

    // Fail closed: kill the daemon with SIGKILL; enforcement stays pinned.
    daemon.kill();
    let after_kill = lab.probe(Some(&pods[2].cgroup), "http", "169.254.169.254:80")?;
    let prod_after_kill = lab.probe(Some(&pods[0].cgroup), "http", "169.254.169.254:80")?;
    println!(
        "\nafter SIGKILL of the daemon: {} -> {}, {} -> {}",
        pods[2].name,
        cell(&after_kill),
        pods[0].name,
        cell(&prod_after_kill)
    );
    if !after_kill.eperm() || !prod_after_kill.reached() {
        failures.push(format!(
            "after SIGKILL: test {after_kill:?}, prod {prod_after_kill:?}"
        ));
    }

    println!("\n$ imdsguard status --pin-dir {}", lab.pin_dir().display());
    let status = daemon::command(
        &bin,
        &["status", "--pin-dir", &lab.pin_dir().display().to_string()],
    )?;
    print!("{}", String::from_utf8_lossy(&status.stdout));

    let out = daemon::command(
        &bin,
        &[
            "uninstall",
            "--pin-dir",
            &lab.pin_dir().display().to_string(),
        ],
    )?;
    ensure!(
        out.status.success(),
        "uninstall failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "\n$ imdsguard uninstall\n{}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    let after_uninstall = lab.probe(Some(&pods[2].cgroup), "http", "169.254.169.254:80")?;
    println!(
        "after uninstall: {} -> {}",
        pods[2].name,
        cell(&after_uninstall)
    );
    drop(pods);
    drop(kubepods);
    drop(lab);
    println!("cleaned up: cgroups, network namespace, bpffs pins");

    if !failures.is_empty() {
        bail!(
            "the demo did not behave as expected:\n  {}",
            failures.join("\n  ")
        );
    }
    Ok(())
}

fn cell(o: &Outcome) -> String {
    match o {
        Outcome::Reached { detail } => format!("reached ({detail})"),
        Outcome::Eperm => "EPERM (denied)".into(),
        Outcome::Failed { detail, .. } => format!("failed: {detail}"),
    }
}
