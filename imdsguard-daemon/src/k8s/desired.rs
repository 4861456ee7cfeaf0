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

use super::{
    pod_cgroup::{KubepodsLayout, PodUid, QosClass},
    policy::Policy,
};
use crate::{cgroup::CgroupDir, enforcer::AllowTarget};

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

#[derive(Clone, Debug, Default)]
pub struct DesiredAllow {
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
    policy: &Policy,
    pods: &[Arc<Pod>],
    namespaces: &[Arc<Namespace>],
    root: &CgroupDir,
    layout: &KubepodsLayout,
) -> DesiredAllow {
    let ns_labels: HashMap<&str, BTreeMap<String, String>> = namespaces
        .iter()
        .filter_map(|ns| Some((ns.metadata.name.as_deref()?, labels(&ns.metadata))))
        .collect();
    let mut out = DesiredAllow::default();
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
