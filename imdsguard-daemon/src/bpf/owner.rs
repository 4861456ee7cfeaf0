//! The enforcer task: the one task that owns the BPF objects. Everything
//! else sends it commands, so map writes never race. It also checks every
//! few seconds that our links are still attached and puts them back if
//! someone removed them.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

use crate::{
    Error, Result,
    bpf::{
        enforcer::{AllowTarget, Attachment, Counters, Enforcer, MapState, Mode},
        sync::SyncReport,
    },
    destinations::Compiled,
    metrics::{Health, Metrics},
    revoke::{sweep::EnforcedState, task::Revoker},
};

/// Where the owner task reports what it sees.
#[derive(Clone)]
pub struct Observers {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
}

/// Asks for a revocation sweep after a change that can take an allow away:
/// the first full allow set, any entry removed or changed, a new default,
/// or new protected destinations.
fn revoke_after(revoker: Option<&Revoker>, desired: &MapState) {
    if let (Some(r), Some(policy)) = (revoker, EnforcedState::of(desired)) {
        r.sweep(policy);
    }
}

enum Command {
    SyncAllowed {
        mode: Mode,
        allowed: BTreeMap<u64, AllowTarget>,
        reply: oneshot::Sender<Result<SyncReport>>,
    },
    SetDestinations {
        compiled: Compiled,
        reply: oneshot::Sender<Result<SyncReport>>,
    },
    Counters {
        reply: oneshot::Sender<Result<Counters>>,
    },
}

/// Cheap to clone; every clone talks to the same owner task.
#[derive(Clone)]
pub struct EnforcerHandle {
    tx: mpsc::Sender<Command>,
}

impl EnforcerHandle {
    pub async fn sync_allowed(
        &self,
        mode: Mode,
        allowed: BTreeMap<u64, AllowTarget>,
    ) -> Result<SyncReport> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::SyncAllowed {
                mode,
                allowed,
                reply,
            })
            .await
            .map_err(|_| Error::EnforcerStopped)?;
        rx.await.map_err(|_| Error::EnforcerStopped)?
    }

    pub async fn set_destinations(&self, compiled: Compiled) -> Result<SyncReport> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::SetDestinations { compiled, reply })
            .await
            .map_err(|_| Error::EnforcerStopped)?;
        rx.await.map_err(|_| Error::EnforcerStopped)?
    }

    pub async fn counters(&self) -> Result<Counters> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Counters { reply })
            .await
            .map_err(|_| Error::EnforcerStopped)?;
        rx.await.map_err(|_| Error::EnforcerStopped)?
    }
}

#[cfg(test)]
impl EnforcerHandle {
    /// A handle whose owner task answers `counters` with `counters` and
    /// refuses map writes: for tests of code that only reads through it.
    pub(crate) fn answering_counters(counters: Counters) -> Self {
        let (tx, mut rx) = mpsc::channel::<Command>(8);
        tokio::spawn(async move {
            while let Some(cmd) = rx.recv().await {
                match cmd {
                    Command::Counters { reply } => {
                        let _ = reply.send(Ok(counters));
                    }
                    Command::SyncAllowed { reply, .. } | Command::SetDestinations { reply, .. } => {
                        let _ = reply.send(Err(Error::EnforcerStopped));
                    }
                }
            }
        });
        Self { tx }
    }
}

/// Spawns the owner task. `desired` is what a re-attach after tampering
/// re-installs (an allow set not known yet, `None`, is left as it is in the
/// map). With a `revoker`, a complete `desired` is swept at once, and
/// changes that can take an allow away trigger a sweep.
pub fn spawn(
    mut enforcer: Enforcer,
    mut desired: MapState,
    check_every: Duration,
    observers: Option<Observers>,
    revoker: Option<Revoker>,
) -> (EnforcerHandle, tokio::task::JoinHandle<Result<()>>) {
    let (tx, mut rx) = mpsc::channel::<Command>(64);
    if desired.allowed.is_some() {
        revoke_after(revoker.as_ref(), &desired);
    }
    let task = tokio::spawn(async move {
        let mut check = tokio::time::interval(check_every);
        loop {
            tokio::select! {
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { return Ok(()) };
                    match cmd {
                        Command::SyncAllowed { mode, allowed, reply } => {
                            let mode_changed = desired.mode != mode;
                            desired.mode = mode;
                            let r = enforcer.sync_allowed(mode, &allowed);
                            if let (Some(o), Ok(_)) = (&observers, &r) {
                                o.metrics.allow_map_entries.set(allowed.len() as i64);
                            }
                            if let Ok(report) = &r {
                                // `desired.allowed` is None until the first
                                // full sync, before which nothing is revoked.
                                let first = desired.allowed.is_none();
                                desired.allowed = Some(allowed);
                                if first || mode_changed || report.removed > 0 || report.updated > 0 {
                                    revoke_after(revoker.as_ref(), &desired);
                                }
                            }
                            let _ = reply.send(r);
                        }
                        Command::SetDestinations { compiled, reply } => {
                            let r = enforcer.sync_destinations(&compiled);
                            if let Some(o) = &observers {
                                o.metrics.protected_prefixes.set(compiled.entries.len() as i64);
                            }
                            desired.destinations = compiled;
                            if matches!(&r, Ok(report) if report.inserted > 0 || report.updated > 0) {
                                revoke_after(revoker.as_ref(), &desired);
                            }
                            let _ = reply.send(r);
                        }
                        Command::Counters { reply } => {
                            let _ = reply.send(enforcer.counters());
                        }
                    }
                }
                _ = check.tick() => {
                    let attachment: Attachment = enforcer.attachment().clone();
                    let wanted = enforcer.wanted_hooks();
                    let attached = enforcer.attached_hooks();
                    if let (Some(o), Ok(a)) = (&observers, &attached) {
                        let n = wanted.iter().filter(|h| a.contains(h)).count() as u32;
                        o.metrics.programs_attached.set(i64::from(n));
                        o.health.set_attached(n);
                    }
                    match attached {
                        Ok(attached) if wanted.iter().all(|h| attached.contains(h)) => {}
                        Ok(attached) => {
                            let missing: Vec<_> = wanted.iter().filter(|h| !attached.contains(h)).map(|h| h.name()).collect();
                            warn!(?missing, "programs were detached behind our back; re-attaching");
                            match Enforcer::start(attachment, &desired) {
                                Ok((e, _)) => {
                                    enforcer = e;
                                    if let Some(o) = &observers {
                                        o.metrics.programs_attached.set(wanted.len() as i64);
                                        o.health.set_attached(wanted.len() as u32);
                                    }
                                }
                                Err(e) => error!(error = %e, "re-attach failed"),
                            }
                        }
                        Err(e) => error!(error = %e, "cannot check our links"),
                    }
                }
            }
        }
    });
    (EnforcerHandle { tx }, task)
}
