//! From full state to the allow map: every pod on this node, its
//! namespace's labels and the policy give each pod an action; the pods
//! whose cgroup exists become map entries.
//!
//! This is recomputed from the reflectors' complete stores on every change
//! instead of patched per event, so a lost delete or a relist after 410 Gone
//! cannot leave a stale entry behind.
//!
//! Pure: where a pod's cgroup is comes from an injected [`CgroupResolver`]
//! (the node agent's looks on cgroupfs, tests use a map).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use k8s_openapi::api::core::v1::Namespace;

use crate::{
    bpf::enforcer::AllowTarget,
    cgroup::{
        mount::CgroupDir,
        pod::{PodUid, QosClass},
    },
    filter::rules::FilterRules,
    node::pod_view::PodView,
    policy::file::PolicyFile,
};

/// Finds a pod's cgroup, if kubelet has created it yet.
pub trait CgroupResolver {
    /// The pod-level cgroup of pod `uid`. `qos` is the class from the pod's
    /// status; None when not reported yet, and then every class is tried.
    fn pod_cgroup(&self, uid: &PodUid, qos: Option<QosClass>) -> Option<CgroupDir>;
}

/// What the policy file says for this node's pods: the allow-map entries
/// they need, and how each pod was decided. The enforcer's whole desired
/// state is [`MapState`](crate::bpf::enforcer::MapState).
#[derive(Clone, Debug, Default)]
pub struct PodVerdicts {
    pub allowed: BTreeMap<u64, AllowTarget>,
    /// The allow list of every filter entry in `allowed`, by its cgroup id:
    /// what the proxy serves a filtered pod.
    pub filter_rules: HashMap<u64, Arc<FilterRules>>,
    /// Pods the policy judged.
    pub judged: usize,
    /// Judged pods whose cgroup kubelet has not created yet: they have no
    /// entry, and are judged by the global default (denied when enforcing)
    /// until it appears. A count, not a list: this runs on every change,
    /// and at 10,000 pods a list of names was megabytes allocated per run.
    pub waiting_for_cgroup: usize,
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
    pods: &[Arc<PodView>],
    namespaces: &[Arc<Namespace>],
    cgroups: &impl CgroupResolver,
) -> PodVerdicts {
    let ns_labels: HashMap<&str, BTreeMap<String, String>> = namespaces
        .iter()
        .filter_map(|ns| Some((ns.metadata.name.as_deref()?, labels(&ns.metadata))))
        .collect();
    let mut out = PodVerdicts::default();
    for pod in pods {
        let (Some(namespace), Some(_name), Some(uid)) = (
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
        let Some(decision) = policy.evaluate(namespace, ns, &pod.labels()) else {
            continue;
        };
        out.judged += 1;
        let Some(dir) = pod_cgroup(pod.status.qos_class, uid, cgroups) else {
            out.waiting_for_cgroup += 1;
            continue;
        };
        if let Some(rules) = decision.filter {
            out.filter_rules.insert(dir.id, rules.clone());
        }
        out.allowed.insert(
            dir.id,
            AllowTarget {
                level: dir.level,
                action: decision.action,
            },
        );
    }
    out
}

/// The pod-level cgroup: every container, init container and restart of the
/// pod lives below it. The QoS class from the status picks the directory.
pub fn pod_cgroup(
    qos: Option<QosClass>,
    uid: &str,
    cgroups: &impl CgroupResolver,
) -> Option<CgroupDir> {
    let uid: PodUid = uid.parse().ok()?;
    cgroups.pod_cgroup(&uid, qos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocabulary::Action;

    const POLICY: &str = "defaultMode: enforce\nrules:\n  - name: prod\n    podSelector:\n      matchLabels: {app: prod}\n    access: allow\n";

    fn uid(n: u32) -> String {
        format!("3f2a1b4c-5d6e-4f70-8a9b-{n:012x}")
    }

    /// Pod cgroups by uid, all BestEffort; records what was asked.
    struct FakeCgroups {
        dirs: BTreeMap<String, CgroupDir>,
        asked: std::cell::RefCell<Vec<(String, Option<QosClass>)>>,
    }

    impl CgroupResolver for FakeCgroups {
        fn pod_cgroup(&self, uid: &PodUid, qos: Option<QosClass>) -> Option<CgroupDir> {
            self.asked.borrow_mut().push((uid.as_str().into(), qos));
            (qos.is_none() || qos == Some(QosClass::BestEffort))
                .then(|| self.dirs.get(uid.as_str()).cloned())
                .flatten()
        }
    }

    fn pod(n: u32, labels: serde_json::Value, qos: Option<&str>) -> Arc<PodView> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"namespace": "imds", "name": format!("pod-{n}"), "uid": uid(n), "labels": labels},
                "status": {"qosClass": qos},
            }))
            .unwrap(),
        )
    }

    /// Hybrid hosts leave empty `pod<uid>` directories behind in the
    /// unified hierarchy. The desired state comes from the pods in the
    /// store alone: a leftover gets no entry, and is never looked at.
    #[test]
    fn leftover_pod_directories_get_nothing() {
        let cgroups = FakeCgroups {
            dirs: (0..50)
                .map(|n| {
                    let dir = CgroupDir {
                        id: 1000 + u64::from(n),
                        path: format!("/kubepods/besteffort/pod{}", uid(n)).into(),
                        level: 3,
                    };
                    (uid(n), dir)
                })
                .collect(),
            asked: Default::default(),
        };
        let ns: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "imds"}})).unwrap();
        let want = compute(
            &PolicyFile::from_yaml(POLICY).unwrap(),
            &[pod(
                7,
                serde_json::json!({"app": "prod"}),
                Some("BestEffort"),
            )],
            &[Arc::new(ns)],
            &cgroups,
        );
        assert_eq!(
            want.allowed,
            BTreeMap::from([(
                1007,
                AllowTarget {
                    level: 3,
                    action: Action::Allow
                }
            )])
        );
        assert_eq!((want.judged, want.waiting_for_cgroup), (1, 0));
        assert_eq!(
            *cgroups.asked.borrow(),
            [(uid(7), Some(QosClass::BestEffort))]
        );
    }

    /// A pod whose cgroup does not exist yet is decided but has no entry;
    /// one without a QoS class in its status is looked up without one.
    #[test]
    fn pods_without_a_cgroup_wait() {
        let cgroups = FakeCgroups {
            dirs: BTreeMap::new(),
            asked: Default::default(),
        };
        let ns: Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "imds"}})).unwrap();
        let want = compute(
            &PolicyFile::from_yaml(POLICY).unwrap(),
            &[pod(1, serde_json::json!({"app": "prod"}), None)],
            &[Arc::new(ns)],
            &cgroups,
        );
        assert!(want.allowed.is_empty());
        assert_eq!((want.judged, want.waiting_for_cgroup), (1, 1));
        assert_eq!(*cgroups.asked.borrow(), [(uid(1), None)]);
    }
}
