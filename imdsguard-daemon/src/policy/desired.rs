//! From full state to the allow map: every pod on this node, its
//! namespace's labels and the policy give each pod an action; the pods
//! whose cgroup exists become map entries.
//!
//! This is recomputed from the reflectors' complete stores on every change
//! instead of patched per event, so a lost delete or a relist after 410 Gone
//! cannot leave a stale entry behind.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use k8s_openapi::api::core::v1::{Namespace, Pod};

use crate::{bpf::enforcer::AllowTarget, cgroup::mount::CgroupDir};
use crate::{
    cgroup::pod::{KubepodsLayout, PodUid, QosClass},
    policy::file::PolicyFile,
};

/// How the policy decided one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodDecision {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `imdsguard_common::action` value.
    pub action: u32,
    pub rule: String,
    /// None while kubelet has not created the pod's cgroup yet (the pod is
    /// then judged by the global default, i.e. denied when enforcing).
    pub cgroup: Option<CgroupDir>,
}

/// What the policy file says for this node's pods: the allow-map entries
/// they need, and how each pod was decided. The enforcer's whole desired
/// state is [`MapState`](crate::bpf::enforcer::MapState).
#[derive(Clone, Debug, Default)]
pub struct PodVerdicts {
    pub allowed: BTreeMap<u64, AllowTarget>,
    pub decisions: Vec<PodDecision>,
    /// Pods skipped because their namespace is not in the store yet: a
    /// namespace selector cannot be judged without its labels.
    pub unknown_namespace: usize,
}

fn labels(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> BTreeMap<String, String> {
    meta.labels.clone().unwrap_or_default()
}

/// Computes the allow map for `pods` (already filtered to this node).
pub fn compute(
    policy: &PolicyFile,
    pods: &[Arc<Pod>],
    namespaces: &[Arc<Namespace>],
    root: &CgroupDir,
    layout: &KubepodsLayout,
) -> PodVerdicts {
    let ns_labels: HashMap<&str, BTreeMap<String, String>> = namespaces
        .iter()
        .filter_map(|ns| Some((ns.metadata.name.as_deref()?, labels(&ns.metadata))))
        .collect();
    let mut out = PodVerdicts::default();
    for pod in pods {
        let (Some(namespace), Some(name), Some(uid)) = (
            pod.metadata.namespace.as_deref(),
            pod.metadata.name.as_deref(),
            pod.metadata.uid.as_deref(),
        ) else {
            continue;
        };
        let Some(ns) = ns_labels.get(namespace) else {
            out.unknown_namespace += 1;
            continue;
        };
        let Some(decision) = policy.evaluate(namespace, ns, &labels(&pod.metadata)) else {
            continue;
        };
        let cgroup = pod_cgroup(pod, uid, root, layout);
        if let Some(dir) = &cgroup {
            out.allowed.insert(
                dir.id,
                AllowTarget {
                    level: dir.level,
                    action: decision.action,
                },
            );
        }
        out.decisions.push(PodDecision {
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.into(),
            action: decision.action,
            rule: decision.rule_name.into(),
            cgroup,
        });
    }
    out
}

/// The pod-level cgroup: every container, init container and restart of the
/// pod lives below it. The QoS class from the status picks the directory;
/// without one, every class is tried.
pub fn pod_cgroup(
    pod: &Pod,
    uid: &str,
    root: &CgroupDir,
    layout: &KubepodsLayout,
) -> Option<CgroupDir> {
    let uid: PodUid = uid.parse().ok()?;
    let qos = pod
        .status
        .as_ref()
        .and_then(|s| s.qos_class.as_deref())
        .and_then(|q| q.parse::<QosClass>().ok());
    match qos {
        Some(q) => root.descendant(&layout.pod_dir(&uid, q)),
        None => layout
            .candidates(&uid)
            .iter()
            .find_map(|p| root.descendant(p)),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use imdsguard_common::action;

    use super::*;

    const POLICY: &str = "defaultMode: enforce\nrules:\n  - name: prod\n    podSelector:\n      matchLabels: {app: prod}\n    access: allow\n";

    fn uid(n: u32) -> String {
        format!("3f2a1b4c-5d6e-4f70-8a9b-{n:012x}")
    }

    /// Hybrid hosts leave empty `pod<uid>` directories behind in the
    /// unified hierarchy. The desired state comes from the pods in the
    /// store alone: a leftover gets no entry, and is never looked at.
    #[test]
    fn leftover_pod_directories_get_nothing() {
        let base = std::env::temp_dir().join(format!("imdsguard-desired-{}", std::process::id()));
        let root_path = base.join("kubepods");
        for n in 0..50 {
            std::fs::create_dir_all(root_path.join(format!("besteffort/pod{}", uid(n)))).unwrap();
        }
        let root = CgroupDir {
            id: std::fs::metadata(&root_path).unwrap().ino(),
            path: root_path.clone(),
            level: 1,
        };
        let layout = KubepodsLayout::at(&root_path).unwrap();
        let live: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "imds", "name": "prod-1", "uid": uid(7), "labels": {"app": "prod"}},
            "status": {"qosClass": "BestEffort"},
        }))
        .unwrap();
        let ns: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "imds"}})).unwrap();
        let want = compute(
            &PolicyFile::from_yaml(POLICY).unwrap(),
            &[Arc::new(live)],
            &[Arc::new(ns)],
            &root,
            &layout,
        );
        let live_dir = root_path.join(format!("besteffort/pod{}", uid(7)));
        assert_eq!(
            want.allowed,
            BTreeMap::from([(
                std::fs::metadata(&live_dir).unwrap().ino(),
                AllowTarget {
                    level: 3,
                    action: action::ALLOW
                }
            )])
        );
        assert_eq!(want.decisions.len(), 1);
        let _ = std::fs::remove_dir_all(&base);
    }
}
