//! The node agent against a real kube-apiserver (built by
//! `cargo xtask kubernetes`), with the daemon's real RBAC from
//! deploy/manifests/rbac.yaml. Pods are placed on the test node with
//! `spec.nodeName`; the test plays kubelet by creating their cgroups.

use std::time::{Duration, Instant};

use imdsguard_testlab::{
    cgroups::TestCgroup,
    cluster::{Cluster, SEED_POLICY, pod_cgroup, spawn_agent, start_agent},
    kube_apiserver::KubeApiserver,
    lab::Lab,
    probe::Outcome,
};
use libtest_mimic::Trial;

use crate::{support::*, trial};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "node_agent_follows_labels_policy_and_outages",
            node_agent_follows_labels_policy_and_outages,
        ),
        trial(
            "node_agent_finds_every_qos_class_under_both_drivers",
            node_agent_finds_every_qos_class_under_both_drivers,
        ),
        trial(
            "node_agent_waits_for_a_kubepods_root_that_does_not_exist_yet",
            node_agent_waits_for_a_kubepods_root_that_does_not_exist_yet,
        ),
    ]
}

/// Probes until the outcome matches or 10 s pass; returns how long it took.
#[track_caller]
fn eventually(lab: &Lab, cg: &TestCgroup, want_reached: bool) -> Duration {
    let start = Instant::now();
    loop {
        let o = probe(lab, Some(cg), "tcp", "169.254.169.254:80");
        let ok = if want_reached {
            o.reached()
        } else {
            o == Outcome::Eperm
        };
        if ok {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?} still {o:?}",
            cg.path()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn node_agent_follows_labels_policy_and_outages() {
    let lab = lab("k8s");
    let mut api =
        KubeApiserver::start().expect("start kube-apiserver (run `cargo xtask kubernetes` once)");
    let dir = imdsguard_testlab::scratch::ScratchDir::new("imdsguard-k8s").unwrap();
    let cluster = Cluster::new(&api, &dir.join("admin.kubeconfig"));
    cluster.apply_rbac();
    cluster.create_namespace("imds");
    cluster.create_namespace("other");
    let kubepods = lab.cgroup("kubepods.slice").unwrap();
    // QoS parents exist before any pod, as on a node.
    let _besteffort = lab
        .cgroup("kubepods.slice/kubepods-besteffort.slice")
        .unwrap();

    let prod_uid = cluster.create_pod("imds", "prod-1", "prod");
    let test_uid = cluster.create_pod("imds", "test-1", "test");
    let prod = pod_cgroup(&lab, &prod_uid);
    let test = pod_cgroup(&lab, &test_uid);

    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, SEED_POLICY).unwrap();
    let mut d = start_agent(
        bin(),
        &api,
        &lab,
        kubepods.path(),
        &policy,
        dir.path(),
        &["--policy-poll-ms", "100", "--metrics-addr", "127.0.0.1:0"],
    )
    .expect("start the node agent");
    let kc = dir.join("daemon.kubeconfig").display().to_string();

    eventually(&lab, &prod, true);
    eventually(&lab, &test, false);

    // Health and metrics.
    let ready = d
        .wait_for(Duration::from_secs(5), |v| v["message"] == "ready")
        .unwrap();
    let addr = ready["metrics_addr"]
        .as_str()
        .expect("metrics_addr in the ready line")
        .to_string();
    assert!(http_get(&addr, "/readyz").starts_with("HTTP/1.1 200"));
    assert!(http_get(&addr, "/healthz").starts_with("HTTP/1.1 200"));
    let m = http_get(&addr, "/metrics");
    for needle in [
        "imdsguard_programs_attached 2",
        "imdsguard_allow_map_entries 2",
        "imdsguard_protected_prefixes 17",
        "imdsguard_reconcile_duration_seconds_count",
        r#"imdsguard_kernel_verdicts_total{verdict="denied"}"#,
        "# TYPE imdsguard_kernel_verdicts counter",
        "imdsguard_ringbuf_dropped_total ",
        r#"imdsguard_decisions_total{verdict="denied",namespace="imds",destination="169.254.169.254:80"}"#,
    ] {
        assert!(m.contains(needle), "{needle:?} not in /metrics:\n{m}");
    }
    // `report` names the denied pod by namespace and name, on this node.
    let r: serde_json::Value = serde_json::from_str(&crate::report::report(
        &format!("http://{addr}"),
        &["-o", "json"],
    ))
    .unwrap();
    let row = r["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["pod"] == "test-1")
        .unwrap_or_else(|| panic!("no row for test-1: {r:#}"));
    assert_eq!(row["namespace"], "imds", "{row}");
    assert!(row["denied"].as_u64() >= Some(1), "{row}");
    assert!(row["node"].is_string(), "{row}");
    assert_eq!(row["node"], r["agents"][0]["node"], "{r:#}");
    crate::report::assert_cluster_report(&cluster, &dir.join("admin.kubeconfig"));

    // `explain --pod` names the rule and reads the verdict from the maps.
    let pins = lab.pin_dir().display().to_string();
    let root_s = kubepods.path().display().to_string();
    let pol = policy.display().to_string();
    let e = cli_json(
        &[
            "explain",
            "--pod",
            "imds/test-1",
            "--policy",
            &pol,
            "--kubepods-root",
            &root_s,
            "--pin-dir",
            &pins,
        ],
        &kc,
    );
    assert_eq!(e["policy_rule"], "rule 1 (test-denied) -> enforce");
    assert_eq!(e["destinations"][0]["verdict"], "EPERM");
    // `status` shows the policy in force and the allowed pods by name.
    let st = cli_json(
        &[
            "status",
            "--policy",
            &pol,
            "--kubernetes",
            "--pin-dir",
            &pins,
        ],
        &kc,
    );
    assert_eq!(
        st["policy"]["rules"],
        serde_json::json!(["prod-reads-imds: allow", "test-denied: deny"])
    );
    // A deny rule writes an explicit enforce entry (it wins over a wider
    // allow entry higher up, and keeps enforcing under a global audit mode).
    let mut pods: Vec<(String, String)> = st["allowed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["pod"].as_str().unwrap_or("?").to_string(),
                a["action"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect();
    pods.sort();
    assert_eq!(
        pods,
        [
            (s("imds/prod-1"), s("allow")),
            (s("imds/test-1"), s("enforce"))
        ],
        "{st}"
    );

    // A pod whose cgroup appears after its API object is allowed as soon as
    // kubelet creates the cgroup (inotify, not polling).
    let late_uid = cluster.create_pod("imds", "prod-2", "prod");
    std::thread::sleep(Duration::from_millis(300));
    let late = pod_cgroup(&lab, &late_uid);
    let waited = eventually(&lab, &late, true);
    eprintln!("cgroup creation -> allowed in {waited:?}");

    // Relabelling flips the verdict both ways, and the pod that lost its
    // allow loses its open connections too (revocation); the other allowed
    // pod keeps its own.
    let held = hold_for(&lab, &prod, "169.254.169.254:8264", 15_000, "tcp");
    let mut kept = hold_for(&lab, &late, "169.254.169.254:8264", 15_000, "tcp");
    cluster.label("imds", "prod-1", "test");
    eventually(&lab, &prod, false);
    assert_revoked(held, "tcp");
    let line = wait_revoked(&mut d, prod.id(), "169.254.169.254:8264");
    assert_eq!(line["pod"], "imds/prod-1", "{line}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cluster
        .events("imds")
        .iter()
        .any(|(reason, _, name)| reason == "MetadataConnectionRevoked" && name == "prod-1")
    {
        assert!(
            Instant::now() < deadline,
            "no MetadataConnectionRevoked event on imds/prod-1"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let m = http_get(&addr, "/metrics");
    assert!(m.contains("imdsguard_connections_revoked_total 1"), "{m}");
    assert_still_holding(&mut kept, "imds/prod-2 is still allowed");
    drop(kept);
    cluster.label("imds", "prod-1", "prod");
    eventually(&lab, &prod, true);

    // Denials are attributed to the pod.
    d.wait_for(Duration::from_secs(10), |v| {
        v["pod"] == "imds/test-1" && v["message"] == "metadata access denied"
    })
    .expect("denial attributed to imds/test-1");

    // ... and reported as a Kubernetes Event on the pod.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = cluster.events("imds");
        if events.iter().any(|(reason, note, name)| {
            reason == "MetadataAccessDenied"
                && name == "test-1"
                && note.contains("metadata access denied to 169.254.169.254:80 by imdsguard")
        }) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no MetadataAccessDenied event on imds/test-1: {events:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A deleted pod's entry goes away (its cgroup may linger a moment).
    cluster.delete_pod("imds", "prod-2");
    eventually(&lab, &late, false);

    // Removing our links by hand: the gauge shows it, and they come back.
    for hook in ["connect4", "connect6"] {
        std::fs::remove_file(lab.pin_dir().join("links").join(hook)).unwrap();
    }
    d.wait_for(Duration::from_secs(10), |v| {
        v["message"] == "programs were detached behind our back; re-attaching"
    })
    .expect("tampering noticed");
    eventually(&lab, &test, false);
    assert!(http_get(&addr, "/metrics").contains("imdsguard_programs_attached 2"));

    // Policy reload: a broken file keeps the last good policy, while both
    // pods probe the metadata service as fast as they can.
    let loops = Loops::start(&lab, &prod, &test, 2500);
    std::fs::write(&policy, "rules: [ {name: x, podSelectr: {}} ]").unwrap();
    d.wait_for(Duration::from_secs(10), |v| {
        v["message"] == "policy reload failed; keeping the last good policy"
    })
    .expect("invalid policy reported");
    loops.check("invalid policy reload");
    assert!(http_get(&addr, "/metrics").contains("imdsguard_policy_reload_failures_total 1"));
    // ... and a good one takes effect: allow test pods too.
    std::fs::write(
        &policy,
        SEED_POLICY.replace("access: deny", "access: allow"),
    )
    .unwrap();
    eventually(&lab, &test, true);
    std::fs::write(&policy, SEED_POLICY).unwrap();
    eventually(&lab, &test, false);

    // API server outage: verdicts stay as they are, nothing is opened. The
    // loops start once the server is down (its stop can take seconds), so
    // all of their probing falls inside the outage.
    api.stop_apiserver().unwrap();
    let loops = Loops::start(&lab, &prod, &test, 3000);
    loops.check("API server outage");
    // Compacting etcd while it is down makes the watches' next resume fail
    // with 410 Gone: the agent must relist and carry on.
    api.compact_etcd().unwrap();
    api.start_apiserver().unwrap();
    cluster.label("imds", "test-1", "prod");
    eventually(&lab, &test, true);
    // The resumed watch really hit 410 Gone (and was relisted).
    d.wait_for(Duration::from_secs(10), |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("watch error"))
            && v["error"]
                .as_str()
                .is_some_and(|e| e.contains("too old resource version"))
    })
    .expect("the resumed watch got 410 Gone and relisted");
    drop(d);
}

/// kubelet's pod cgroup paths, written out here rather than taken from the
/// agent's own resolver so the test checks the agent against kubelet.
fn kubelet_pod_path(driver: &str, qos: &str, uid: &str) -> String {
    let u = uid.replace('-', "_");
    match (driver, qos) {
        ("systemd", "Guaranteed") => format!("kubepods.slice/kubepods-pod{u}.slice"),
        ("systemd", "Burstable") => {
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice")
        }
        ("systemd", _) => {
            format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice")
        }
        (_, "Guaranteed") => format!("kubepods/pod{uid}"),
        (_, "Burstable") => format!("kubepods/burstable/pod{uid}"),
        (_, _) => format!("kubepods/besteffort/pod{uid}"),
    }
}

fn container_dir(driver: &str) -> String {
    let id = "0123456789abcdef".repeat(4);
    if driver == "systemd" {
        format!("cri-containerd-{id}.scope")
    } else {
        id
    }
}

fn node_agent_finds_every_qos_class_under_both_drivers() {
    let lab = lab("k8s-qos");
    let api =
        KubeApiserver::start().expect("start kube-apiserver (run `cargo xtask kubernetes` once)");
    let dir = imdsguard_testlab::scratch::ScratchDir::new("imdsguard-k8s").unwrap();
    let cluster = Cluster::new(&api, &dir.join("admin.kubeconfig"));
    cluster.apply_rbac();
    cluster.grant_startup_taint_rbac();
    cluster.create_tainted_node(&["imdsguard.io/not-ready", "other.example/keep"]);
    cluster.create_namespace("imds");
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, SEED_POLICY).unwrap();

    for (driver, root) in [("systemd", "kubepods.slice"), ("cgroupfs", "kubepods")] {
        let kubepods = lab.cgroup(root).unwrap();
        let mut containers = Vec::new();
        for (qos, app) in [
            ("Guaranteed", "prod"),
            ("Burstable", "prod"),
            ("BestEffort", "prod"),
            ("Burstable", "test"),
        ] {
            let name = format!("{driver}-{}-{app}", qos.to_lowercase());
            let uid = cluster.create_pod_with_qos("imds", &name, app, qos);
            let pod = lab.cgroup(&kubelet_pod_path(driver, qos, &uid)).unwrap();
            // Probe from a container cgroup: the pod-level entry covers it.
            let ctr = lab
                .cgroup(&format!(
                    "{}/{}",
                    kubelet_pod_path(driver, qos, &uid),
                    container_dir(driver)
                ))
                .unwrap();
            containers.push((name, app, ctr, pod));
        }
        // The first round also removes the node's startup taint once ready.
        let taint = ["--remove-startup-taint", "imdsguard.io/not-ready"];
        let extra: &[&str] = if driver == "systemd" { &taint } else { &[] };
        let d = start_agent(
            bin(),
            &api,
            &lab,
            kubepods.path(),
            &policy,
            dir.path(),
            extra,
        )
        .expect("start the node agent");
        if driver == "systemd" {
            let deadline = Instant::now() + Duration::from_secs(10);
            while cluster
                .node_taints()
                .iter()
                .any(|t| t == "imdsguard.io/not-ready")
            {
                assert!(
                    Instant::now() < deadline,
                    "startup taint not removed: {:?}",
                    cluster.node_taints()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            // Other taints (ours to keep, and the API server's own
            // node.kubernetes.io/not-ready) are left alone.
            assert!(
                cluster
                    .node_taints()
                    .iter()
                    .any(|t| t == "other.example/keep")
            );
        }
        for (name, app, ctr, _) in &containers {
            let o = probe(&lab, Some(ctr), "tcp", "169.254.169.254:80");
            match *app {
                "prod" => assert!(o.reached(), "{driver} {name}: {o:?}"),
                _ => assert!(o.eperm(), "{driver} {name}: {o:?}"),
            }
        }
        d.kill();
        let out = imdsguard_testlab::daemon::command(
            bin(),
            &[
                "uninstall",
                "--pin-dir",
                &lab.pin_dir().display().to_string(),
            ],
        )
        .unwrap();
        assert!(out.status.success());
    }
}

/// A hybrid cgroup host where kubelet runs with `--cgroup-root=/node` and
/// the cgroupfs driver: the unified `node/kubepods` directory appears only
/// when runc starts the node's first container, parents and all. A host
/// agent started before that waits (not ready, nothing attached), then
/// attaches and judges the pods below it.
fn node_agent_waits_for_a_kubepods_root_that_does_not_exist_yet() {
    let lab = lab("k8s-wait");
    let api =
        KubeApiserver::start().expect("start kube-apiserver (run `cargo xtask kubernetes` once)");
    let dir = imdsguard_testlab::scratch::ScratchDir::new("imdsguard-k8s").unwrap();
    let cluster = Cluster::new(&api, &dir.join("admin.kubeconfig"));
    cluster.apply_rbac();
    cluster.create_namespace("imds");
    let prod_uid = cluster.create_pod("imds", "prod-1", "prod");
    let test_uid = cluster.create_pod("imds", "test-1", "test");
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, SEED_POLICY).unwrap();

    let kubepods = lab.root().path().join("node/kubepods");
    let mut d = spawn_agent(
        bin(),
        &api,
        &lab,
        &kubepods,
        &policy,
        dir.path(),
        &["--metrics-addr", "127.0.0.1:0"],
    )
    .expect("spawn the node agent");
    let serving = d
        .wait_for(Duration::from_secs(10), |v| {
            v["message"] == "serving /metrics, /healthz and /readyz"
        })
        .unwrap();
    let addr = serving["metrics_addr"].as_str().unwrap().to_string();
    let waiting = d
        .wait_for(Duration::from_secs(10), |v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("the kubepods cgroup does not exist yet"))
        })
        .unwrap();
    assert_eq!(
        waiting["kubepods_root"].as_str(),
        Some(kubepods.display().to_string().as_str()),
        "{waiting}"
    );
    // The nearest existing ancestor is what is watched.
    assert_eq!(
        waiting["watching"].as_str(),
        Some(lab.root().path().display().to_string().as_str()),
        "{waiting}"
    );
    // While it waits: alive, not ready, nothing attached or pinned.
    std::thread::sleep(Duration::from_millis(300));
    assert!(http_get(&addr, "/healthz").starts_with("HTTP/1.1 200"));
    assert!(http_get(&addr, "/readyz").starts_with("HTTP/1.1 503"));
    assert_nothing_attached(&lab);
    assert!(!lab.pin_dir().join("links").exists());
    assert!(!d.logs().iter().any(|v| v["message"] == "ready"));

    // runc starts the first containers: their paths, parents included.
    let ctr = |uid: &str, id: &str| {
        lab.cgroup(&format!(
            "node/kubepods/besteffort/pod{uid}/{}",
            id.repeat(4)
        ))
        .unwrap()
    };
    let test = ctr(&test_uid, "0123456789abcdef");
    let prod = ctr(&prod_uid, "fedcba9876543210");
    d.wait_for(Duration::from_secs(10), |v| v["message"] == "ready")
        .expect("ready once the kubepods cgroup appeared");
    let appeared = d
        .logs()
        .into_iter()
        .find(|v| v["message"] == "the kubepods cgroup appeared; attaching")
        .expect("the wait's end is logged");
    assert_eq!(
        appeared["kubepods_root"].as_str(),
        Some(kubepods.display().to_string().as_str())
    );
    assert!(http_get(&addr, "/readyz").starts_with("HTTP/1.1 200"));
    eventually(&lab, &test, false);
    eventually(&lab, &prod, true);
}

/// `imdsguard ARGS -o json` with the agent's kubeconfig, parsed.
fn cli_json(args: &[&str], kubeconfig: &str) -> serde_json::Value {
    let out = std::process::Command::new(bin())
        .args(args)
        .args(["-o", "json"])
        .env("KUBECONFIG", kubeconfig)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
