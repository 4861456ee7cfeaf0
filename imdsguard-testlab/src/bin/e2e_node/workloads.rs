//! The workloads of the seed story, as manifests: every container is
//! `imdsguard-podprobe`, probing the fake IMDS the way an SDK does.

use serde_json::{Value, json};

use crate::filter::PATHS;

pub const PROBE_IMAGE: &str = "imdsguard.local/podprobe:e2e";
/// Plain probes: one IMDSv2 round trip every this many ms.
pub const INTERVAL_MS: u32 = 300;

pub fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
}

fn container(args: &[&str], resources: Value) -> Value {
    json!({
        "name": "probe",
        "image": PROBE_IMAGE,
        "imagePullPolicy": "Never",
        "args": args,
        "resources": resources,
    })
}

fn probe_args() -> Vec<String> {
    vec![
        "--target".into(),
        "169.254.169.254:80".into(),
        "--interval-ms".into(),
        INTERVAL_MS.to_string(),
    ]
}

/// Path mode: a token PUT, then a GET of each of [`PATHS`], every
/// [`INTERVAL_MS`]; one line per path with its HTTP status.
fn paths_args() -> Vec<String> {
    let mut args = probe_args();
    for p in PATHS {
        args.extend(["--path".into(), p.into()]);
    }
    args
}

/// A Deployment of `app=<app>` pods that probe every [`INTERVAL_MS`].
/// Burstable: requests without limits.
pub fn deployment(ns: &str, app: &str, replicas: u32) -> Value {
    deployment_running(ns, app, replicas, &probe_args())
}

/// [`deployment`], with pods that ask for [`PATHS`] (path mode).
pub fn paths_deployment(ns: &str, app: &str, replicas: u32) -> Value {
    deployment_running(ns, app, replicas, &paths_args())
}

fn deployment_running(ns: &str, app: &str, replicas: u32, args: &[String]) -> Value {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": app, "namespace": ns, "labels": {"app": app}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": app}},
            "template": {
                "metadata": {"labels": {"app": app}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "enableServiceLinks": false,
                    "automountServiceAccountToken": false,
                    "containers": [container(&args, json!({"requests": {"cpu": "10m", "memory": "8Mi"}}))],
                },
            },
        },
    })
}

/// What kind of pod [`pod`] makes.
#[derive(Clone, Copy)]
pub enum Shape {
    /// requests == limits: kubelet puts it directly under `kubepods`.
    Guaranteed,
    /// On the node's network: same IP as the node and every other such pod.
    /// Asks for [`PATHS`] (path mode), so that a filtered and a denied
    /// hostNetwork pod make the same requests from the same address.
    HostNetwork,
    /// No resources: BestEffort.
    Plain,
    /// `--burst`: probes as fast as it can and prints a summary a second.
    Burst,
    /// `--hold`: keeps one connection to the fake IMDS's hold port open.
    Hold,
}

pub fn pod(ns: &str, name: &str, app: &str, shape: Shape) -> Value {
    let mut args = probe_args();
    let mut resources = json!({});
    let mut host_network = false;
    match shape {
        Shape::Guaranteed => {
            let r = json!({"cpu": "50m", "memory": "16Mi"});
            resources = json!({"requests": r, "limits": r});
        }
        Shape::HostNetwork => {
            host_network = true;
            args = paths_args();
        }
        Shape::Plain => {}
        Shape::Burst => {
            args = vec![
                "--target".into(),
                "169.254.169.254:80".into(),
                "--burst".into(),
            ]
        }
        Shape::Hold => {
            args = vec![
                "--target".into(),
                "169.254.169.254:80".into(),
                "--hold".into(),
                "169.254.169.254:81".into(),
                "--interval-ms".into(),
                INTERVAL_MS.to_string(),
            ]
        }
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "enableServiceLinks": false,
            "automountServiceAccountToken": false,
            "hostNetwork": host_network,
            "containers": [container(&args, resources)],
        },
    })
}

/// A node component as its upstream manifest labels it, probing like a
/// plain pod: what a cloud preset must keep reading the metadata service.
pub fn component(ns: &str, name: &str, labels: &[(&str, &str)], host_network: bool) -> Value {
    let mut p = pod(ns, name, name, Shape::Plain);
    p["metadata"]["labels"] = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect::<serde_json::Map<_, _>>()
        .into();
    p["spec"]["hostNetwork"] = json!(host_network);
    p
}
