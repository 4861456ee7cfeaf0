//! Driving the pod and namespace watchers: every event wakes the
//! reconciler, and errors are counted and retried with backoff while the
//! store keeps its last complete state.

use std::sync::Arc;

use futures::StreamExt as _;
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
