//! The revoker task: sweeps after every change that can take an allow
//! away, and again periodically as a backstop (a connect() judged allowed
//! just before a change can finish its handshake just after the sweep).
//!
//! Sweeps run on a blocking thread and never overlap; changes that arrive
//! during one are coalesced into the next.

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::sweep::{self, EnforcedState};
use crate::{cgroup::mount::CgroupDir, decisions::Attributor, metrics::Metrics};

/// Cheap to clone; sends the latest policy to the revoker.
#[derive(Clone)]
pub struct Revoker {
    tx: Arc<watch::Sender<Option<Arc<EnforcedState>>>>,
}

impl Revoker {
    /// Asks for a sweep against `enforced`.
    pub fn sweep(&self, enforced: EnforcedState) {
        self.tx.send_replace(Some(Arc::new(enforced)));
    }
}

/// Where to look and how often to look again.
#[derive(Clone, Debug)]
pub struct Settings {
    pub root: CgroupDir,
    pub netns_dirs: Vec<PathBuf>,
    pub resweep: Duration,
}

/// `attributor` names the pod (and puts an Event on it, in Kubernetes mode)
/// for each revoked connection.
pub fn spawn(
    settings: Settings,
    metrics: Option<Arc<Metrics>>,
    mut attributor: Option<Box<dyn Attributor>>,
) -> (Revoker, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = watch::channel::<Option<Arc<EnforcedState>>>(None);
    let task = tokio::spawn(async move {
        let mut backstop = tokio::time::interval(settings.resweep);
        backstop.tick().await;
        loop {
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                _ = backstop.tick() => {}
            }
            let Some(enforced) = rx.borrow_and_update().clone() else {
                continue;
            };
            let s = settings.clone();
            let report = tokio::task::spawn_blocking(move || {
                sweep::sweep(&s.root, &enforced, &s.netns_dirs)
            })
            .await;
            let report = match report {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "revocation sweep panicked");
                    continue;
                }
            };
            for r in &report.revoked {
                let who = attributor
                    .as_mut()
                    .map(|a| {
                        let who = a.attribute(r.cgroup_id);
                        a.revoked(r, &who);
                        who
                    })
                    .unwrap_or_default();
                info!(
                    cgroup_id = r.cgroup_id,
                    cgroup = %who.cgroup,
                    pod = who.pod.as_deref(),
                    container = who.container_field(),
                    container_id = who.container_id.as_deref(),
                    transport = %r.transport,
                    source = %r.source,
                    destination = %r.destination,
                    "revoked a connection to a protected destination"
                );
            }
            if !report.errors.is_empty() {
                warn!(errors = ?report.errors, "revocation sweep could not do everything");
            }
            if let Some(m) = &metrics {
                m.connections_revoked.inc_by(report.revoked.len() as u64);
                if !report.errors.is_empty() {
                    m.revocation_errors.inc();
                }
            }
            // The periodic backstop usually finds nothing: keep it quiet.
            if report.revoked.is_empty() && report.errors.is_empty() {
                debug!(
                    namespaces = report.namespaces,
                    examined = report.examined,
                    "revocation sweep done"
                );
            } else {
                info!(
                    namespaces = report.namespaces,
                    examined = report.examined,
                    revoked = report.revoked.len(),
                    errors = report.errors.len(),
                    "revocation sweep done"
                );
            }
        }
    });
    (Revoker { tx: Arc::new(tx) }, task)
}
