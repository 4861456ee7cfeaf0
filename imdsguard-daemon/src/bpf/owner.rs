//! The enforcer task: the one task that owns the BPF objects. Everything
//! else sends it commands, so map writes never race. It also watches our
//! links and puts them back if someone detached them or removed their
//! pins: told by the link watch's thread ([`LinkWatch`], a cheap look at
//! the held links every [`WATCH_EVERY`]), and by a full look at the pins
//! every few seconds.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    sync::{mpsc, oneshot},
    time::MissedTickBehavior,
};

use tracing::{error, info, warn};

use crate::{
    Error, Result,
    bpf::{
        enforcer::{AllowTarget, Counters, Enforcer, MapState, Mode},
        hook::Hook,
        sync::SyncReport,
        watch::LinkWatch,
    },
    destinations::Compiled,
    metrics::{Health, Metrics},
    revoke::{sweep::EnforcedState, task::Revoker},
};

pub use super::watch::WATCH_EVERY;

/// How often the owner task looks at our links.
#[derive(Clone, Copy, Debug)]
pub struct LinkChecks {
    /// The link watch's period ([`Enforcer::detached_links`], on a thread):
    /// catches a detach.
    pub watch_every: Duration,
    /// The full check ([`Enforcer::attached_hooks`]): opens every pin, and
    /// so also catches a pin removed or replaced. A held link stays
    /// attached without its pin, so this one can be slow.
    pub check_every: Duration,
}

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
    checks: LinkChecks,
    observers: Option<Observers>,
    revoker: Option<Revoker>,
) -> (EnforcerHandle, tokio::task::JoinHandle<Result<()>>) {
    let (tx, mut rx) = mpsc::channel::<Command>(64);
    if desired.allowed.is_some() {
        revoke_after(revoker.as_ref(), &desired);
    }
    let task = tokio::spawn(async move {
        let (notify, mut noticed) = mpsc::channel::<()>(1);
        let at = enforcer.attachment().attach_point().id;
        // Without the watch (no thread, no fd), the full check still runs.
        let watch = LinkWatch::spawn(checks.watch_every, at, notify)
            .inspect_err(
                |e| error!(error = %e, "no link watch; detached links wait for the full check"),
            )
            .ok();
        // Before a re-attach the watch lets go of the old links (a link
        // whose pin is gone must die with the owner's fd); after, it gets
        // the new ones.
        let unwatch = || {
            if let Some(w) = &watch {
                w.clear();
            }
        };
        let rewatch = |enforcer: &Enforcer| match (&watch, enforcer.held_dups()) {
            (Some(w), Ok(links)) => w.set(links),
            (Some(_), Err(e)) => error!(error = %e, "the link watch has no links"),
            (None, _) => {}
        };
        rewatch(&enforcer);
        let mut check = tokio::time::interval(checks.check_every);
        // After a stall, one check is enough: no burst of missed ones.
        check.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // After a failed watch (a re-attach that failed, or links that
        // cannot be asked), the watch waits for the full check's cadence:
        // a lasting fault (our cgroup removed) is retried and logged every
        // few seconds, not ten times a second.
        let mut quiet_until: Option<Instant> = None;
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
                Some(()) = noticed.recv(), if quiet_until.is_none_or(|t| Instant::now() >= t) => {
                    // The watch saw a detached link: look again, here.
                    let ok = match enforcer.detached_links() {
                        Ok(detached) if detached.is_empty() => true,
                        Ok(detached) => {
                            unwatch();
                            reattach(&mut enforcer, &detached, &desired, observers.as_ref())
                        }
                        Err(e) => {
                            error!(error = %e, "cannot check our links");
                            false
                        }
                    };
                    rewatch(&enforcer);
                    quiet_until = (!ok).then(|| Instant::now() + checks.check_every);
                }
                _ = check.tick() => {
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
                            let missing: Vec<Hook> = wanted.into_iter().filter(|h| !attached.contains(h)).collect();
                            unwatch();
                            if reattach(&mut enforcer, &missing, &desired, observers.as_ref()) {
                                quiet_until = None;
                            }
                            rewatch(&enforcer);
                        }
                        Err(e) => error!(error = %e, "cannot check our links"),
                    }
                }
            }
        }
    });
    (EnforcerHandle { tx }, task)
}

/// Puts `missing` back: a new link for each from the programs already
/// loaded ([`Enforcer::relink`]), which takes a few bpf(2) calls; if that
/// fails, the whole object is loaded again, as at start. False if both
/// failed.
fn reattach(
    enforcer: &mut Enforcer,
    missing: &[Hook],
    desired: &MapState,
    observers: Option<&Observers>,
) -> bool {
    let names: Vec<_> = missing.iter().map(|h| h.name()).collect();
    warn!(missing = ?names, "programs were detached behind our back; re-attaching");
    let started = Instant::now();
    let how = match enforcer.relink(missing, desired) {
        Ok(()) => "relinked",
        Err(e) => {
            warn!(error = %e, "re-attaching the loaded programs failed; loading them again");
            match Enforcer::start(enforcer.attachment().clone(), desired) {
                Ok((e, _)) => {
                    *enforcer = e;
                    "reloaded"
                }
                Err(e) => {
                    error!(error = %e, "re-attach failed");
                    return false;
                }
            }
        }
    };
    info!(
        how,
        micros = started.elapsed().as_micros() as u64,
        "programs re-attached"
    );
    if let Some(o) = observers {
        let n = enforcer.wanted_hooks().len();
        o.metrics.programs_attached.set(n as i64);
        o.health.set_attached(n as u32);
    }
    true
}
