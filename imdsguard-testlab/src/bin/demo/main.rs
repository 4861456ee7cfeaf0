//! The seed scenario on this machine's kernel, no cluster needed.
//!
//! Namespace `imds` has three deployments of two replicas each: `prod` is
//! allowed to reach the metadata service, `test` is not, and `report` may
//! read only the region (filter mode, profile `region`: its connects go to
//! imdsguard's proxy, which forwards only the profile's paths). Each "pod" is a
//! cgroup laid out as kubelet's systemd driver does, with a process inside
//! an isolated network namespace that holds a fake IMDS on
//! 169.254.169.254:80 and [fd00:ec2::254]:80.

mod filter;

use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use imdsguard_testlab::{
    cgroups::TestCgroup,
    daemon::{self, Daemon},
    handoff::{Held, hand_off},
    lab::Lab,
    probe::{self, Outcome},
};

pub(crate) struct Pod {
    pub(crate) name: String,
    pub(crate) deployment: &'static str,
    pub(crate) cgroup: TestCgroup,
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
    for (deployment, hash) in [
        ("prod", "7f9c6d5b8"),
        ("test", "5d2b4c7f1"),
        ("report", "3c8e9a6d2"),
    ] {
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
        "imdsguard demo: namespace `imds`, deployment `prod` (2 replicas, allowed), `test` (2 replicas, not allowed) and `report` (2 replicas, app=report, filtered: profile `region`)"
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
    for p in &pods {
        let flag = match p.deployment {
            "prod" => "--allow-cgroup",
            "report" => "--filter-cgroup",
            _ => continue,
        };
        args.push(flag.into());
        args.push(p.cgroup.path().display().to_string());
    }
    // The proxy listens on loopback, one port for both families.
    for a in [
        "--filter-profile",
        "region",
        "--proxy-listen",
        "127.0.0.1:8169",
        "--proxy-listen",
        "[::1]:8169",
    ] {
        args.push(a.into());
    }
    // In the lab's namespace: the proxy's loopback must be the pods'
    // loopback, where the kernel sends their filtered connects.
    let daemon = Daemon::start_in(lab.netns(), &bin, &args)?;
    println!(
        "imdsguard is running (pid {}), programs attached to kubepods.slice, filter proxy on 127.0.0.1:8169 and [::1]:8169\n",
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
    let header = format!("{:<28} {:<8}", "POD", "ACCESS");
    let cols: Vec<String> = targets.iter().map(|(t, _, _)| format!("{t:<26}")).collect();
    println!("{header} {}", cols.join(" "));
    println!("{}", "-".repeat(header.len() + 27 * targets.len()));
    for pod in &pods {
        let mut cells = Vec::new();
        for (_, kind, target) in targets {
            let (ok, shown) = match pod.deployment {
                "prod" => {
                    let o = lab.probe(Some(&pod.cgroup), kind, target)?;
                    (o.reached(), cell(&o))
                }
                // A filtered pod reaches the service only through the
                // proxy, and only for its profile's paths.
                "report" => {
                    let o = lab.imds_get(Some(&pod.cgroup), target, REGION)?;
                    let ok = o == reached("200 us-east-1");
                    (ok, format!("proxy: {}", filter::cell_short(&o)))
                }
                _ => {
                    let o = lab.probe(Some(&pod.cgroup), kind, target)?;
                    (o.eperm(), cell(&o))
                }
            };
            if !ok {
                failures.push(format!("{} -> {target}: {shown}", pod.name));
            }
            cells.push(format!("{shown:<26}"));
        }
        println!(
            "{:<28} {:<8} {}",
            pod.name,
            access(pod.deployment),
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

    failures.extend(filter::read_table(&lab, &pods)?);
    println!(
        "\nNo NetworkPolicy, CNI or iptables rule is involved: the verdict is made in the kernel at connect(), and a filtered pod is identified by the kernel's record of its connection, never by its IP.\n"
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

    filter::print_proxy_log(&daemon);

    // Fail closed: kill the daemon with SIGKILL; enforcement stays pinned.
    daemon.kill();
    let after_kill = lab.probe(Some(&pods[2].cgroup), "http", "169.254.169.254:80")?;
    let prod_after_kill = lab.probe(Some(&pods[0].cgroup), "http", "169.254.169.254:80")?;
    // The proxy died with the daemon: a filtered connect is refused at once
    // and never falls through to the real service.
    let report_after_kill = lab.imds_get(Some(&pods[4].cgroup), "169.254.169.254:80", REGION)?;
    println!(
        "\nafter SIGKILL of the daemon: {} -> {}, {} -> {}, {} -> {}",
        pods[2].name,
        cell(&after_kill),
        pods[0].name,
        cell(&prod_after_kill),
        pods[4].name,
        cell(&report_after_kill)
    );
    let refused = matches!(
        report_after_kill,
        Outcome::Failed {
            errno: Some(libc::ECONNREFUSED),
            ..
        }
    );
    if !after_kill.eperm() || !prod_after_kill.reached() || !refused {
        failures.push(format!(
            "after SIGKILL: test {after_kill:?}, prod {prod_after_kill:?}, report {report_after_kill:?}"
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

pub(crate) const REGION: &str = "/latest/meta-data/placement/region";

pub(crate) fn reached(detail: &str) -> Outcome {
    Outcome::Reached {
        detail: detail.into(),
    }
}

pub(crate) fn access(deployment: &str) -> &'static str {
    match deployment {
        "prod" => "allow",
        "report" => "filter",
        _ => "deny",
    }
}

pub(crate) fn cell(o: &Outcome) -> String {
    match o {
        Outcome::Reached { detail } => format!("reached ({detail})"),
        Outcome::Eperm => "EPERM (denied)".into(),
        Outcome::Failed { detail, .. } => format!("failed: {detail}"),
    }
}
