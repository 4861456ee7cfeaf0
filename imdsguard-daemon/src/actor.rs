//! One task owns the BPF objects; everything else sends it commands, so
//! map writes never race. The owner also checks every few seconds that our
//! links are still attached and puts them back if someone removed them.

use std::{collections::BTreeMap, time::Duration};

use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

use crate::{
    Error, Result,
    destinations::Compiled,
    enforcer::{AllowTarget, Attachment, Counters, Desired, Enforcer, Mode, SyncReport},
    pins::Hook,
};

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

fn gone() -> Error {
    Error::Syscall {
        call: "enforcer task",
        source: std::io::Error::other("the enforcer task has stopped"),
    }
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
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    pub async fn set_destinations(&self, compiled: Compiled) -> Result<SyncReport> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::SetDestinations { compiled, reply })
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    pub async fn counters(&self) -> Result<Counters> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Counters { reply })
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

/// Spawns the owner task. `desired` is what a re-attach after tampering
/// re-installs (its allow set is left as it is in the map).
pub fn spawn(
    mut enforcer: Enforcer,
    mut desired: Desired,
    check_every: Duration,
) -> (EnforcerHandle, tokio::task::JoinHandle<Result<()>>) {
    let (tx, mut rx) = mpsc::channel::<Command>(64);
    let task = tokio::spawn(async move {
        let mut check = tokio::time::interval(check_every);
        loop {
            tokio::select! {
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { return Ok(()) };
                    match cmd {
                        Command::SyncAllowed { mode, allowed, reply } => {
                            desired.mode = mode;
                            let _ = reply.send(enforcer.sync_allowed(mode, &allowed));
                        }
                        Command::SetDestinations { compiled, reply } => {
                            let r = enforcer.sync_destinations(&compiled);
                            desired.destinations = compiled;
                            let _ = reply.send(r);
                        }
                        Command::Counters { reply } => {
                            let _ = reply.send(enforcer.counters());
                        }
                    }
                }
                _ = check.tick() => {
                    let attachment: Attachment = enforcer.attachment().clone();
                    let wanted = Hook::wanted(attachment.udp);
                    match enforcer.attached_hooks() {
                        Ok(attached) if wanted.iter().all(|h| attached.contains(h)) => {}
                        Ok(attached) => {
                            let missing: Vec<_> = wanted.iter().filter(|h| !attached.contains(h)).map(|h| h.name()).collect();
                            warn!(?missing, "programs were detached behind our back; re-attaching");
                            let keep = Desired { allowed: None, ..desired.clone() };
                            match Enforcer::start(attachment, &keep) {
                                Ok((e, _)) => enforcer = e,
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
