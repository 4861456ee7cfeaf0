//! Driving the pod and namespace watchers: every event wakes the
//! reconciler, and errors are counted and retried with backoff while the
//! store keeps its last complete state.

use std::sync::Arc;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{ContainerStatus, Namespace, Pod, PodStatus};
use kube::runtime::watcher;
use tokio::sync::Notify;
use tracing::warn;

use crate::metrics::{Metrics, WatchLabels};

/// Polls a watcher stream; every event (and every relist) wakes the
/// reconciler. Errors are retried by the stream's backoff, and the store
/// keeps its last complete state meanwhile.
pub(crate) async fn drive<S, K>(
    stream: S,
    trigger: Arc<Notify>,
    what: &'static str,
    metrics: Arc<Metrics>,
) -> &'static str
where
    S: futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(_) => trigger.notify_one(),
            Err(e) => {
                metrics
                    .watch_errors
                    .get_or_create(&WatchLabels { watch: what.into() })
                    .inc();
                warn!(watch = what, error = %e, "watch error; retrying with backoff, enforcement keeps the last state")
            }
        }
    }
    what
}

/// Keeps only what the agent reads of a Pod: its name, namespace, UID and
/// labels (the policy), its QoS class (the cgroup path) and its containers'
/// names and IDs (attribution). A whole Pod is about 11 KiB, managedFields
/// and the spec most of it; at 10,000 pods that is the agent's memory.
pub(crate) fn strip_pod(pod: &mut Pod) {
    strip_meta(&mut pod.metadata);
    pod.spec = None;
    let status = pod.status.take().unwrap_or_default();
    let keep = |statuses: Option<Vec<ContainerStatus>>| {
        statuses.map(|v| {
            v.into_iter()
                .map(|c| ContainerStatus {
                    name: c.name,
                    container_id: c.container_id,
                    ..ContainerStatus::default()
                })
                .collect()
        })
    };
    pod.status = Some(PodStatus {
        qos_class: status.qos_class,
        container_statuses: keep(status.container_statuses),
        init_container_statuses: keep(status.init_container_statuses),
        ephemeral_container_statuses: keep(status.ephemeral_container_statuses),
        ..PodStatus::default()
    });
}

/// Keeps a Namespace's name and labels (namespace selectors).
pub(crate) fn strip_namespace(ns: &mut Namespace) {
    strip_meta(&mut ns.metadata);
    ns.spec = None;
    ns.status = None;
}

fn strip_meta(meta: &mut kube::api::ObjectMeta) {
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
    meta.finalizers = None;
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::{Container, PodSpec};
    use kube::api::ObjectMeta;

    use super::*;

    #[test]
    fn a_stripped_pod_keeps_what_the_agent_reads() {
        let mut pod = Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("ns".into()),
                uid: Some("u".into()),
                labels: Some(BTreeMap::from([("app".into(), "prod".into())])),
                annotations: Some(BTreeMap::from([("big".into(), "x".repeat(4096))])),
                managed_fields: Some(vec![Default::default()]),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "c".into(),
                    image: Some("img".into()),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                qos_class: Some("Burstable".into()),
                phase: Some("Running".into()),
                container_statuses: Some(vec![ContainerStatus {
                    name: "c".into(),
                    container_id: Some("containerd://abc".into()),
                    image: "img".into(),
                    ..ContainerStatus::default()
                }]),
                ..PodStatus::default()
            }),
        };
        strip_pod(&mut pod);
        assert_eq!(pod.metadata.name.as_deref(), Some("p"));
        assert_eq!(pod.metadata.namespace.as_deref(), Some("ns"));
        assert_eq!(pod.metadata.uid.as_deref(), Some("u"));
        assert_eq!(pod.metadata.labels.as_ref().map(BTreeMap::len), Some(1));
        assert!(pod.metadata.annotations.is_none() && pod.metadata.managed_fields.is_none());
        assert!(pod.spec.is_none());
        let status = pod.status.expect("status kept");
        assert_eq!(status.qos_class.as_deref(), Some("Burstable"));
        assert!(status.phase.is_none());
        let c = &status.container_statuses.expect("container statuses kept")[0];
        assert_eq!(c.name, "c");
        assert_eq!(c.container_id.as_deref(), Some("containerd://abc"));
        assert!(c.image.is_empty());
    }
}
