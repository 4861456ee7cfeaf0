//! What the agent reads of a Pod, and nothing else: the watcher decodes
//! the API's Pods straight into [`PodView`], so the rest of the object is
//! skipped by the JSON parser instead of being built and then stripped.
//!
//! Who reads which field (keep this list and the struct in step):
//! - the policy (`policy::desired`): namespace, name, uid, labels;
//! - the pod cgroup (`policy::desired::pod_cgroup`): uid, QoS class;
//! - attribution (`node::attribution`): namespace, name, uid, the names and
//!   runtime IDs of the containers and init containers, and the
//!   `ObjectReference` of an Event (apiVersion, kind, name, namespace, uid);
//! - the watcher itself: resourceVersion (where a rewatch resumes).
//!
//! A whole Pod is about 11 KiB of JSON, managedFields and the spec most of
//! it. Built as a k8s-openapi `Pod` and then stripped with `.modify()`, the
//! agent still allocated all of it for every pod it listed, and kept an
//! `ObjectMeta`, a `PodStatus` and a `ContainerStatus` per container at
//! their full width.

use std::{borrow::Cow, collections::BTreeMap};

use k8s_openapi::{NamespaceResourceScope, Resource as _, api::core::v1::Pod};
use kube::{Resource, api::ObjectMeta};
use serde::{Deserialize, Deserializer};

use crate::cgroup::pod::QosClass;

/// A Pod as the agent keeps it in its reflector store. The API path and
/// kind are the Pod's, so `Api::<PodView>` lists and watches `pods`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodView {
    #[serde(deserialize_with = "lean_meta")]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "or_default")]
    pub status: PodViewStatus,
}

/// The part of `PodStatus` the agent reads.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodViewStatus {
    /// None while not reported yet, or for a class this build does not
    /// know: then every class's directory is tried.
    #[serde(default, deserialize_with = "qos_class")]
    pub qos_class: Option<QosClass>,
    #[serde(default, deserialize_with = "or_default")]
    pub container_statuses: Vec<ContainerRef>,
    #[serde(default, deserialize_with = "or_default")]
    pub init_container_statuses: Vec<ContainerRef>,
}

/// A container's name and its runtime ID (`containerd://<id>`), from the
/// pod's status.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ContainerRef {
    pub name: String,
    #[serde(rename = "containerID", default)]
    pub container_id: Option<String>,
}

impl PodView {
    /// The pod's labels (empty when it has none).
    pub fn labels(&self) -> Cow<'_, BTreeMap<String, String>> {
        match &self.metadata.labels {
            Some(l) => Cow::Borrowed(l),
            None => Cow::Owned(BTreeMap::new()),
        }
    }

    /// Every container the status lists, init containers included.
    pub fn containers(&self) -> impl Iterator<Item = &ContainerRef> {
        self.status
            .container_statuses
            .iter()
            .chain(&self.status.init_container_statuses)
    }
}

/// The fields of `ObjectMeta` that are read (see the module comment);
/// managedFields, annotations, owner references and the rest are skipped.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanMeta {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    labels: Option<BTreeMap<String, String>>,
}

fn lean_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = LeanMeta::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        labels: m.labels,
        ..ObjectMeta::default()
    })
}

fn qos_class<'de, D: Deserializer<'de>>(d: D) -> Result<Option<QosClass>, D::Error> {
    let s: Option<Cow<'de, str>> = Option::deserialize(d)?;
    Ok(s.and_then(|s| s.parse().ok()))
}

/// `null` reads as the default, as a missing field does.
fn or_default<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(
    d: D,
) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// The Pod's kind, group, version and plural: `Api::<PodView>` talks to
/// `/api/v1/pods` like `Api::<Pod>`.
impl Resource for PodView {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        Pod::KIND.into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        Pod::GROUP.into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        Pod::VERSION.into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        Pod::URL_PATH_SEGMENT.into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Pod as the API server sends it, with what the agent never reads.
    fn api_pod(status: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "p", "namespace": "ns", "uid": "u", "resourceVersion": "42",
                "labels": {"app": "prod"},
                "annotations": {"big": "x".repeat(4096)},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "r", "uid": "o"}],
                "managedFields": [{"manager": "kubectl", "operation": "Update", "fieldsV1": {"f:spec": {}}}],
            },
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "img", "env": [{"name": "A", "value": "b"}]}]},
            "status": status,
        })
    }

    #[test]
    fn keeps_what_the_agent_reads_and_nothing_else() {
        let pod: PodView = serde_json::from_value(api_pod(serde_json::json!({
            "phase": "Running",
            "qosClass": "Burstable",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{
                "name": "c", "containerID": "containerd://abc", "image": "img", "imageID": "",
                "ready": true, "restartCount": 0, "state": {"running": {}}
            }],
            "initContainerStatuses": [{"name": "init", "image": "img", "imageID": "", "ready": false, "restartCount": 0}],
        })))
        .unwrap();
        let m = &pod.metadata;
        assert_eq!(
            (m.name.as_deref(), m.namespace.as_deref(), m.uid.as_deref()),
            (Some("p"), Some("ns"), Some("u"))
        );
        assert_eq!(m.resource_version.as_deref(), Some("42"));
        assert_eq!(pod.labels().get("app").map(String::as_str), Some("prod"));
        assert!(m.annotations.is_none() && m.managed_fields.is_none());
        assert!(m.owner_references.is_none());
        assert_eq!(pod.status.qos_class, Some(QosClass::Burstable));
        let containers: Vec<_> = pod.containers().cloned().collect();
        assert_eq!(
            containers,
            [
                ContainerRef {
                    name: "c".into(),
                    container_id: Some("containerd://abc".into())
                },
                ContainerRef {
                    name: "init".into(),
                    container_id: None
                },
            ]
        );
    }

    #[test]
    fn a_pod_without_status_or_labels_reads_as_empty() {
        for status in [serde_json::Value::Null, serde_json::json!({})] {
            let mut json = api_pod(status);
            json["metadata"]["labels"] = serde_json::Value::Null;
            let pod: PodView = serde_json::from_value(json).unwrap();
            assert!(pod.labels().is_empty());
            assert_eq!(pod.status.qos_class, None);
            assert_eq!(pod.containers().count(), 0);
        }
        // A class this build does not know: every directory is tried.
        let pod: PodView =
            serde_json::from_value(api_pod(serde_json::json!({"qosClass": "Premium"}))).unwrap();
        assert_eq!(pod.status.qos_class, None);
    }

    #[test]
    fn talks_to_the_pods_api() {
        assert_eq!(
            PodView::url_path(&(), Some("imds")),
            "/api/v1/namespaces/imds/pods"
        );
        assert_eq!(PodView::url_path(&(), None), "/api/v1/pods");
        let pod: PodView = serde_json::from_value(api_pod(serde_json::Value::Null)).unwrap();
        let r = pod.object_ref(&());
        assert_eq!(
            (
                r.api_version.as_deref(),
                r.kind.as_deref(),
                r.uid.as_deref()
            ),
            (Some("v1"), Some("Pod"), Some("u"))
        );
    }
}
