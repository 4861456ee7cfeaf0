//! The opt-in node startup taint: the node is registered with, e.g.,
//! `imdsguard.io/not-ready:NoSchedule`, so nothing is scheduled before
//! enforcement is on; the agent removes it once it is ready.

use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use tracing::{info, warn};

use crate::{Error, Result};

/// Removes every taint with `key` from `node`. A JSON Patch that tests the
/// resourceVersion makes a concurrent change to the taints a conflict
/// (retried) instead of a lost update.
pub async fn remove(client: Client, node: &str, key: &str) -> Result<bool> {
    let api: Api<Node> = Api::all(client);
    for attempt in 0..5 {
        let current = api.get(node).await.map_err(Error::Kube)?;
        let taints = current
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        if !taints.iter().any(|t| t.key == key) {
            return Ok(false);
        }
        let keep: Vec<_> = taints.into_iter().filter(|t| t.key != key).collect();
        let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": current.metadata.resource_version},
            {"op": "replace", "path": "/spec/taints", "value": keep},
        ]))
        .expect("well-formed JSON patch");
        match api
            .patch(node, &PatchParams::default(), &Patch::<()>::Json(patch))
            .await
        {
            Ok(_) => {
                info!(node, taint = key, "startup taint removed");
                return Ok(true);
            }
            Err(e) => {
                warn!(node, attempt, error = %e, "removing the startup taint failed; retrying")
            }
        }
    }
    Err(Error::Kube(kube::Error::Service(Box::new(
        std::io::Error::other("could not remove the startup taint after 5 attempts"),
    ))))
}
