//! Driving the pod and namespace watchers: every event wakes the
//! reconciler, and errors are counted and retried with backoff while the
//! store keeps its last complete state.

use std::sync::Arc;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Namespace;
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

/// The watch of this node's pods, listed `page_size` pods a page. Pods are
/// decoded as [`PodView`](crate::node::pod_view::PodView): only what the
/// agent reads is built.
pub(crate) fn pod_watch_config(node_name: &str, page_size: u32) -> watcher::Config {
    watcher::Config::default()
        .fields(&format!("spec.nodeName={node_name}"))
        .page_size(page_size)
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
