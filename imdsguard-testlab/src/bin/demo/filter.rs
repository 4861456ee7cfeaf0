//! The demo's filter-mode part: what each deployment reads through
//! imdsguard (allowed, denied, filtered side by side) and the proxy's log
//! of what it judged.

use anyhow::Context as _;
use imdsguard_testlab::{
    daemon::{self, Daemon},
    lab::Lab,
    probe::Outcome,
};

use crate::{Pod, REGION, access, cell};

/// Prints the read table: IMDSv2 (token PUT, then GET) of the region, the
/// instance id and credentials from the first replica of each deployment.
/// Returns the wrong verdicts.
pub(crate) fn read_table(lab: &Lab, pods: &[Pod]) -> anyhow::Result<Vec<String>> {
    let mut failures = Vec::new();
    let paths = [
        ("region", REGION),
        ("instance-id", "/latest/meta-data/instance-id"),
        (
            "credentials",
            "/latest/meta-data/iam/security-credentials/lab-role",
        ),
    ];
    println!("\nwhat each deployment reads from 169.254.169.254 (IMDSv2: token PUT, then GET):\n");
    let header = format!("{:<28} {:<8}", "POD", "ACCESS");
    let cols: Vec<String> = paths.iter().map(|(p, _)| format!("{p:<34}")).collect();
    println!("{header} {}", cols.join(" "));
    println!("{}", "-".repeat(header.len() + 35 * paths.len()));
    for deployment in ["prod", "test", "report"] {
        let pod = pods
            .iter()
            .find(|p| p.deployment == deployment)
            .context("a pod of each deployment")?;
        let mut cells = Vec::new();
        for (what, path) in paths {
            let o = lab.imds_get(Some(&pod.cgroup), "169.254.169.254:80", path)?;
            if !expected_read(deployment, what, &o) {
                failures.push(format!("{} reads {path}: {o:?}", pod.name));
            }
            cells.push(format!("{:<34}", cell_short(&o)));
        }
        println!(
            "{:<28} {:<8} {}",
            pod.name,
            access(deployment),
            cells.join(" ")
        );
    }
    Ok(failures)
}

/// Prints one line per distinct verdict and request the proxy logged: the
/// tables asked the same paths many times.
pub(crate) fn print_proxy_log(daemon: &Daemon) {
    println!("requests judged by the filter proxy (structured log, one per distinct request):");
    let mut shown = std::collections::BTreeSet::new();
    for line in daemon
        .logs()
        .iter()
        .filter(|v| daemon::message(v) == Some("filter proxy request"))
    {
        let (verdict, method, path) = (
            line["verdict"].as_str().unwrap_or("?"),
            line["method"].as_str().unwrap_or("?"),
            line["path"].as_str().unwrap_or("?"),
        );
        if shown.insert((verdict.to_owned(), method.to_owned(), path.to_owned())) {
            println!(
                "  {verdict:<8} caller_cgroup={}  {method} {path}",
                line["caller_cgroup"]
            );
        }
    }
}

/// The verdict each deployment must get for each path of the read table:
/// `prod` reads everything, `test` connects nowhere, `report` reads the
/// region, gets 403 for what its profile lacks and 403 "never allowed"
/// for credentials.
fn expected_read(deployment: &str, what: &str, o: &Outcome) -> bool {
    let Outcome::Reached { detail } = o else {
        return deployment == "test" && o.eperm();
    };
    match (deployment, what) {
        ("prod", _) => detail.starts_with("200 "),
        ("report", "region") => detail == "200 us-east-1",
        ("report", "credentials") => detail.starts_with("403 ") && detail.contains("never"),
        ("report", _) => detail.starts_with("403 "),
        _ => false,
    }
}

/// An `imds-get` outcome in a table cell: `"<status> <body>"`, the body cut
/// short.
pub(crate) fn cell_short(o: &Outcome) -> String {
    match o {
        Outcome::Reached { detail } if detail.chars().count() > 32 => {
            format!("{}...", detail.chars().take(29).collect::<String>())
        }
        Outcome::Reached { detail } => detail.clone(),
        other => cell(other),
    }
}
