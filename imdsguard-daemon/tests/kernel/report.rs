//! `imdsguard report` against a real daemon: standalone `run` in audit mode
//! with its endpoint on loopback, an audited and a denied caller, and the
//! report read back through the CLI, as JSON and as a table.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use imdsguard_testlab::{
    cgroups::TestCgroup,
    cluster::{Cluster, pod_manifest},
    daemon,
    lab::Lab,
};
use libtest_mimic::Trial;
use serde_json::Value;

use crate::{support::*, trial};

pub fn trials() -> Vec<Trial> {
    vec![trial(
        "report_lists_audit_hits_and_denials_by_caller",
        report_lists_audit_hits_and_denials_by_caller,
    )]
}

const IMDS: &str = "169.254.169.254:80";

/// `imdsguard report --agent URL ARGS`; its stdout, after checking it
/// succeeded.
pub fn report(agent: &str, extra: &[&str]) -> String {
    let mut a = vec!["report", "--agent", agent];
    a.extend_from_slice(extra);
    let out = daemon::command(bin(), &a).unwrap();
    assert!(
        out.status.success(),
        "report failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The report's row for `cg` (standalone rows name the cgroup).
fn row_of<'v>(report: &'v Value, cg: &TestCgroup) -> Option<&'v Value> {
    let path = cg.path().display().to_string();
    report["rows"]
        .as_array()?
        .iter()
        .find(|r| r["cgroup"].as_str() == Some(&path))
}

fn report_lists_audit_hits_and_denials_by_caller() {
    let lab = lab("report");
    let (prod, test) = pods(&lab);
    let stray = lab.cgroup("stray").unwrap();
    let mut d = start(
        &lab,
        &args([
            &flag("allow-cgroup", &prod),
            &flag("enforce-cgroup", &test),
            &[
                s("--mode"),
                s("audit"),
                s("--metrics-addr"),
                s("127.0.0.1:0"),
            ],
        ]),
    );
    let ready = d
        .wait_for(Duration::from_secs(5), |v| {
            daemon::message(v) == Some("ready")
        })
        .unwrap();
    let addr = ready["metrics_addr"].as_str().unwrap().to_string();
    let agent = format!("http://{addr}");

    // Denied twice (enforced even in audit mode), audited once (no entry),
    // allowed once (only the kernel's totals know).
    assert_eperm(&lab, Some(&test), "tcp", IMDS);
    assert_eperm(&lab, Some(&test), "tcp", IMDS);
    assert_reached(&lab, Some(&stray), "tcp", IMDS);
    assert_reached(&lab, Some(&prod), "tcp", IMDS);
    wait_decision(&mut d, test.id(), IMDS, "denied");
    wait_decision(&mut d, stray.id(), IMDS, "audited");

    // The second denial is summarised in the logs, not logged: wait for
    // the report to count it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let json = loop {
        let json: Value =
            serde_json::from_str(&report(&agent, &["-o", "json", "--minutes", "5"])).unwrap();
        if row_of(&json, &test).is_some_and(|r| r["denied"] == 2) {
            break json;
        }
        assert!(Instant::now() < deadline, "{json:#}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let denied = row_of(&json, &test).unwrap();
    assert_eq!(denied["destination"], IMDS, "{denied}");
    assert_eq!(denied["kind"], "connect4", "{denied}");
    assert_eq!(denied["audited"], 0, "{denied}");
    assert_eq!(denied["namespace"], "(unattributed)", "{denied}");
    let audited = row_of(&json, &stray).unwrap_or_else(|| panic!("{json:#}"));
    assert_eq!(
        (&audited["audited"], &audited["denied"], &audited["kind"]),
        (&Value::from(1), &Value::from(0), &Value::from("connect4")),
        "{audited}"
    );
    assert!(row_of(&json, &prod).is_none(), "allowed uses are no rows");
    assert_eq!(json["minutes"], 5);
    let kernel = &json["agents"][0]["kernel_counters"];
    assert!(kernel["allowed"].as_u64().unwrap() >= 1, "{json:#}");
    assert!(kernel["denied"].as_u64().unwrap() >= 2, "{json:#}");
    assert!(json["unreachable"].as_array().unwrap().is_empty());

    let table = report(&agent, &[]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[1].starts_with("NAMESPACE"), "{table}");
    let stray_line = lines
        .iter()
        .find(|l| l.contains(&*stray.path().display().to_string()))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(stray_line.contains("connect4"), "{table}");
    assert!(
        table.contains("Allowed connects are not reported one by one"),
        "{table}"
    );

    let exit = d.terminate().unwrap();
    assert!(exit.success(), "{exit}");
}

/// Filter mode (the daemon in the lab's namespace, `report` run there
/// too): the filtered cgroup's requests are listed with their paths and
/// IMDS version, a request without the kernel's record under no
/// destination, and the kernel's not-filterable denial as its own row.
pub fn assert_filter_report(lab: &Lab, d: &daemon::Daemon, filtered: &TestCgroup) {
    let ready = d
        .logs()
        .into_iter()
        .find(|v| daemon::message(v) == Some("ready"))
        .unwrap();
    let agent = format!("http://{}", ready["metrics_addr"].as_str().unwrap());
    let out = lab
        .netns()
        .command(bin().to_str().unwrap())
        .args(["report", "--agent", &agent, "-o", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    let path = filtered.path().display().to_string();
    let rows = json["rows"].as_array().unwrap();
    let row = |kind: &str, destination: &str| {
        rows.iter()
            .find(|r| {
                r["cgroup"].as_str() == Some(&path)
                    && r["kind"] == kind
                    && r["destination"] == destination
            })
            .unwrap_or_else(|| panic!("no {kind} row to {destination}: {json:#}"))
    };
    let v4 = row("filter", "169.254.169.254:80");
    for p in [
        "/latest/meta-data/placement/region",
        "/latest/user-data",
        "PUT /latest/api/token",
    ] {
        assert!(v4["paths"][p].as_u64().unwrap_or(0) >= 1, "{p}: {v4:#}");
    }
    assert_eq!(v4["filter_denied"], 5, "{v4:#}");
    assert!(v4["filter_allowed"].as_u64().unwrap() >= 2, "{v4:#}");
    assert_eq!(v4["imds"], serde_json::json!(["v2"]), "{v4:#}");
    assert!(row("filter", "[fd00:ec2::254]:80")["filter_allowed"].as_u64() >= Some(2));
    assert_eq!(row("connect4", "169.254.169.254:8080")["denied"], 1);
    let direct = rows
        .iter()
        .find(|r| r["destination"] == "-")
        .unwrap_or_else(|| panic!("no row for the request without a record: {json:#}"));
    assert_eq!(direct["kind"], "filter");
    assert!(direct["filter_denied"].as_u64() >= Some(1), "{direct:#}");
}

/// `report` through a real API server: the agent pods are found by the
/// chart's label and asked through the pod proxy. The one here has no
/// kubelet behind it (no pod IP), so it is listed as unreachable with its
/// node, and the command still succeeds; a node without agents is an
/// error. Nothing is ever proxied: the pod has no address.
pub fn assert_cluster_report(cluster: &Cluster, admin_kubeconfig: &Path) {
    use k8s_openapi::api::core::v1::{ContainerPort, Pod};
    use kube::api::{Api, PostParams};

    cluster.create_namespace("imdsguard-system");
    let mut pod = pod_manifest("imdsguard-abcde", "agent", None);
    pod.metadata.labels = Some(BTreeMap::from([(
        "app.kubernetes.io/name".to_string(),
        "imdsguard".to_string(),
    )]));
    let spec = pod.spec.as_mut().unwrap();
    // Another node: the agent under test watches only its own.
    spec.node_name = Some("other-node".into());
    spec.containers[0].ports = Some(vec![ContainerPort {
        name: Some("metrics".into()),
        container_port: 9191,
        ..Default::default()
    }]);
    cluster
        .rt
        .block_on(
            Api::<Pod>::namespaced(cluster.admin.clone(), "imdsguard-system")
                .create(&PostParams::default(), &pod),
        )
        .unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(bin())
            .arg("report")
            .args(args)
            .env("KUBECONFIG", admin_kubeconfig)
            .output()
            .unwrap()
    };
    let out = run(&["-o", "json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["agents"], serde_json::json!([]), "{json:#}");
    let u = &json["unreachable"][0];
    assert_eq!(u["source"], "imdsguard-system/imdsguard-abcde", "{json:#}");
    assert_eq!(u["node"], "other-node", "{json:#}");
    assert!(!u["error"].as_str().unwrap().is_empty(), "{json:#}");
    let table = String::from_utf8(run(&[]).stdout).unwrap();
    assert!(
        table.contains("could not ask imdsguard-system/imdsguard-abcde (node other-node)"),
        "{table}"
    );
    let out = run(&["--node", "elsewhere"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no imdsguard agent pods") && stderr.contains("on node elsewhere"),
        "{stderr}"
    );
}
