//! A client for the test kube-apiserver, with the steps tests and the e2e
//! scenario share: RBAC from deploy/, namespaces, pods on the test node,
//! and the cgroup kubelet would create for a pod.

use std::{collections::BTreeMap, path::Path};

use anyhow::Context as _;

use k8s_openapi::{
    api::{
        core::v1::{Container, Namespace, Node, Pod, PodSpec, ResourceRequirements},
        events::v1::Event as K8sEvent,
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::api::resource::Quantity,
};
use kube::{
    Api, Client, Config,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
};

use crate::{cgroups::TestCgroup, kube_apiserver::KubeApiserver, lab::Lab};

/// The node name test pods are placed on.
pub const NODE: &str = "imdsguard-test-node";

/// The seed story: in namespace `imds`, pods labelled app=prod may reach
/// the metadata service and pods labelled app=test may not.
pub const SEED_POLICY: &str = r#"defaultMode: enforce
rules:
  - name: prod-reads-imds
    namespaces: [imds]
    podSelector:
      matchLabels: {app: prod}
    access: allow
  - name: test-denied
    namespaces: [imds]
    podSelector:
      matchLabels: {app: test}
    access: deny
"#;

/// Starts `imdsguard node` on the lab as the daemon's ServiceAccount (so
/// with exactly the RBAC of deploy/manifests/rbac.yaml), attached at
/// `kubepods`, with the policy file at `policy`. Writes the kubeconfig into
/// `scratch`. Waits for the agent's `ready` line.
pub fn start_agent(
    bin: &Path,
    api: &KubeApiserver,
    lab: &Lab,
    kubepods: &Path,
    policy: &Path,
    scratch: &Path,
    extra: &[&str],
) -> anyhow::Result<crate::daemon::Daemon> {
    let mut d = spawn_agent(bin, api, lab, kubepods, policy, scratch, extra)?;
    d.wait_for(std::time::Duration::from_secs(30), |v| {
        crate::daemon::message(v) == Some("ready")
    })
    .context("the node agent did not become ready")?;
    Ok(d)
}

/// [`start_agent`] without waiting for the `ready` line.
pub fn spawn_agent(
    bin: &Path,
    api: &KubeApiserver,
    lab: &Lab,
    kubepods: &Path,
    policy: &Path,
    scratch: &Path,
    extra: &[&str],
) -> anyhow::Result<crate::daemon::Daemon> {
    let kubeconfig = scratch.join("daemon.kubeconfig");
    api.write_kubeconfig(&kubeconfig, api.daemon_token())?;
    let mut args: Vec<String> = [
        "--node-name",
        NODE,
        "--policy",
        &policy.display().to_string(),
        "--kubepods-root",
        &kubepods.display().to_string(),
        "--pin-dir",
        &lab.pin_dir().display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    let kc = kubeconfig.display().to_string();
    crate::daemon::Daemon::spawn_subcommand(bin, "node", &args, &[("KUBECONFIG", kc.as_str())])
}

pub struct Cluster {
    pub rt: tokio::runtime::Runtime,
    pub admin: Client,
}

impl Cluster {
    pub fn new(api: &KubeApiserver, kubeconfig: &Path) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        api.write_kubeconfig(kubeconfig, api.admin_token()).unwrap();
        let admin = rt.block_on(async {
            let kc = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
            let cfg = Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .unwrap();
            Client::try_from(cfg).unwrap()
        });
        Self { rt, admin }
    }

    pub fn apply_rbac(&self) {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/manifests/rbac.yaml"),
        )
        .unwrap();
        let mut docs = text.split("\n---\n");
        let role: ClusterRole = serde_saphyr::from_str(docs.next().unwrap()).unwrap();
        let binding: ClusterRoleBinding = serde_saphyr::from_str(docs.next().unwrap()).unwrap();
        self.rt.block_on(async {
            Api::<ClusterRole>::all(self.admin.clone())
                .create(&PostParams::default(), &role)
                .await
                .unwrap();
            Api::<ClusterRoleBinding>::all(self.admin.clone())
                .create(&PostParams::default(), &binding)
                .await
                .unwrap();
        });
    }

    /// What the chart adds with `startupTaint.enabled`: get/patch on nodes.
    pub fn grant_startup_taint_rbac(&self) {
        let patch = serde_json::json!([{"op": "add", "path": "/rules/-", "value": {
            "apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]
        }}]);
        let patch: json_patch::Patch = serde_json::from_value(patch).unwrap();
        self.rt
            .block_on(Api::<ClusterRole>::all(self.admin.clone()).patch(
                "imdsguard",
                &PatchParams::default(),
                &Patch::<()>::Json(patch),
            ))
            .unwrap();
    }

    /// Registers the test node with NoSchedule taints, as a kubelet
    /// started with `--register-with-taints` would.
    pub fn create_tainted_node(&self, taints: &[&str]) {
        let taints: Vec<_> = taints
            .iter()
            .map(|t| serde_json::json!({"key": t, "effect": "NoSchedule"}))
            .collect();
        let node: Node = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": NODE},
            "spec": {"taints": taints}
        }))
        .unwrap();
        self.rt
            .block_on(Api::<Node>::all(self.admin.clone()).create(&PostParams::default(), &node))
            .unwrap();
    }

    /// The test node's taint keys.
    pub fn node_taints(&self) -> Vec<String> {
        let node = self
            .rt
            .block_on(Api::<Node>::all(self.admin.clone()).get(NODE))
            .unwrap();
        node.spec
            .and_then(|s| s.taints)
            .unwrap_or_default()
            .into_iter()
            .map(|t| t.key)
            .collect()
    }

    pub fn create_namespace(&self, name: &str) {
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        self.rt
            .block_on(Api::<Namespace>::all(self.admin.clone()).create(&PostParams::default(), &ns))
            .unwrap();
    }

    /// Creates a BestEffort pod on the test node and returns its UID.
    pub fn create_pod(&self, ns: &str, name: &str, app: &str) -> String {
        self.create_pod_with_qos(ns, name, app, "BestEffort")
    }

    /// Creates a pod of the given QoS class ("Guaranteed", "Burstable" or
    /// "BestEffort", by its resources) on the test node; returns its UID.
    pub fn create_pod_with_qos(&self, ns: &str, name: &str, app: &str, qos: &str) -> String {
        let quantity = |cpu: &str, mem: &str| {
            BTreeMap::from([
                ("cpu".to_string(), Quantity(cpu.into())),
                ("memory".to_string(), Quantity(mem.into())),
            ])
        };
        let resources = match qos {
            "Guaranteed" => Some(ResourceRequirements {
                requests: Some(quantity("100m", "64Mi")),
                limits: Some(quantity("100m", "64Mi")),
                ..Default::default()
            }),
            "Burstable" => Some(ResourceRequirements {
                requests: Some(quantity("50m", "32Mi")),
                ..Default::default()
            }),
            _ => None,
        };
        let pod = pod_manifest(name, app, resources);
        let created = self
            .rt
            .block_on(
                Api::<Pod>::namespaced(self.admin.clone(), ns).create(&PostParams::default(), &pod),
            )
            .unwrap();
        // The API server computes the class at creation, as kubelet will.
        assert_eq!(
            created.status.and_then(|s| s.qos_class).as_deref(),
            Some(qos)
        );
        created.metadata.uid.unwrap()
    }

    /// (reason, note, regarding object name) of the events.k8s.io events in `ns`.
    pub fn events(&self, ns: &str) -> Vec<(String, String, String)> {
        let list = self
            .rt
            .block_on(Api::<K8sEvent>::namespaced(self.admin.clone(), ns).list(&Default::default()))
            .unwrap();
        list.items
            .into_iter()
            .map(|e| {
                (
                    e.reason.unwrap_or_default(),
                    e.note.unwrap_or_default(),
                    e.regarding.and_then(|r| r.name).unwrap_or_default(),
                )
            })
            .collect()
    }

    pub fn label(&self, ns: &str, name: &str, app: &str) {
        let patch = serde_json::json!({"metadata": {"labels": {"app": app}}});
        self.rt
            .block_on(Api::<Pod>::namespaced(self.admin.clone(), ns).patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            ))
            .unwrap();
    }

    pub fn delete_pod(&self, ns: &str, name: &str) {
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        };
        self.rt
            .block_on(Api::<Pod>::namespaced(self.admin.clone(), ns).delete(name, &dp))
            .unwrap();
    }
}

/// A one-container pod labelled `app=<app>`, placed on the test node
/// (`spec.nodeName`), with the given resources (None: BestEffort).
pub fn pod_manifest(name: &str, app: &str, resources: Option<ResourceRequirements>) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([("app".to_string(), app.to_string())])),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(NODE.into()),
            containers: vec![Container {
                name: "app".into(),
                image: Some("registry.invalid/app:1".into()),
                resources,
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// kubelet's systemd-driver cgroup for a BestEffort pod.
pub fn pod_cgroup(lab: &Lab, uid: &str) -> TestCgroup {
    lab.cgroup(&format!(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
        uid.replace('-', "_")
    ))
    .unwrap()
}
