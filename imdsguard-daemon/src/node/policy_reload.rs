//! Loading the policy file, and reloading it when it changes: an invalid
//! file keeps the last good policy in force and is reported.

use std::{sync::Arc, time::Duration};

use kube::runtime::events::{Event, EventType, Recorder};
use tokio::sync::{Notify, watch};
use tracing::{error, info, warn};

use crate::{
    Result,
    bpf::owner,
    cli::args::NodeArgs,
    destinations::{self, Compiled},
    metrics::Metrics,
    policy::file::PolicyFile,
};

pub(super) fn load_policy(args: &NodeArgs) -> Result<(String, PolicyFile)> {
    PolicyFile::load(&args.policy)
}

pub(super) fn compile_destinations(policy: &PolicyFile) -> Result<Compiled> {
    match policy.destinations() {
        Some(d) => destinations::compile(d),
        None => destinations::compile(&destinations::defaults()),
    }
}

/// Re-reads the policy file when it changes. An invalid file keeps the last
/// good policy in force and is reported (log and a Node event).
pub(super) struct PolicyReloader {
    pub(super) args: NodeArgs,
    pub(super) last_text: String,
    pub(super) tx: watch::Sender<Arc<PolicyFile>>,
    pub(super) handle: owner::EnforcerHandle,
    pub(super) trigger: Arc<Notify>,
    pub(super) recorder: Recorder,
    pub(super) node: k8s_openapi::api::core::v1::ObjectReference,
    pub(super) metrics: Arc<Metrics>,
}

impl PolicyReloader {
    pub(super) async fn run(self) -> &'static str {
        let Self {
            args,
            mut last_text,
            tx,
            handle,
            trigger,
            recorder,
            node,
            metrics,
        } = self;
        let mut tick = tokio::time::interval(Duration::from_millis(args.policy_poll_ms.max(50)));
        loop {
            tick.tick().await;
            let Ok(text) = std::fs::read_to_string(&args.policy) else {
                continue;
            };
            if text == last_text {
                continue;
            }
            last_text = text.clone();
            let filtering = !args.enforcement.proxy_listen.is_empty();
            let checked = PolicyFile::from_yaml(&text).map_err(|e| crate::Error::Policy {
                path: args.policy.clone(),
                source: Box::new(e),
            });
            match checked.and_then(|p| super::filter::check_policy(&p, filtering).map(|()| p)) {
                Ok(policy) => {
                    let destinations = match compile_destinations(&policy) {
                        Ok(d) => d,
                        Err(e) => {
                            metrics.policy_reload_failures.inc();
                            error!(error = %e, "policy reload failed; keeping the last good policy");
                            continue;
                        }
                    };
                    if let Err(e) = handle.set_destinations(destinations).await {
                        error!(error = %e, "could not apply the reloaded destinations");
                    }
                    info!(rules = policy.rules().len(), "policy reloaded");
                    let _ = tx.send(Arc::new(policy));
                    trigger.notify_one();
                }
                Err(e) => {
                    let detail =
                        std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(": ");
                    metrics.policy_reload_failures.inc();
                    error!(policy = %args.policy.display(), error = %detail, "policy reload failed; keeping the last good policy");
                    let event = Event {
                        type_: EventType::Warning,
                        reason: "PolicyInvalid".into(),
                        note: Some(
                            format!("imdsguard kept the last good policy: {detail}")
                                .chars()
                                .take(1000)
                                .collect(),
                        ),
                        action: "ReloadPolicy".into(),
                        secondary: None,
                    };
                    if let Err(e) = recorder.publish(&event, &node).await {
                        warn!(error = %e, "could not publish the policy event");
                    }
                }
            }
        }
    }
}
