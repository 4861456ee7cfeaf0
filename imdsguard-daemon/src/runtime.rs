//! What both modes run: the enforcer task ([`crate::bpf::owner`]) with its
//! link check, the decision reporter, the revoker, the `/metrics` endpoints
//! and the signals that end it all.
//!
//! A mode is only a source of desired state. Standalone hands [`start`] a
//! complete, fixed one; the node agent starts with the pinned allow set
//! kept and then keeps it equal to the API server's view through the
//! [`EnforcerHandle`]. On exit the programs stay attached and pinned, in
//! both modes: enforcement must not depend on this process being alive
//! (fail-closed). Removing it is the explicit `uninstall` command.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, OnceLock},
    time::Duration,
};

use futures::future::BoxFuture;
use imdsguard_common::PROTO_TCP;
use tokio::{
    net::TcpListener,
    signal::unix::{Signal, SignalKind, signal},
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tracing::{error, info};

use crate::{
    Error, Result,
    bpf::{
        enforcer::{Attachment, Enforcer, MapState},
        filter_conns::FilterConns,
        hook::Hook,
        owner::{self, EnforcerHandle},
        pins::PinLayout,
    },
    cgroup::mount::CgroupDir,
    cli::args::{EnforcementArgs, RevokeArgs},
    decisions::{self, Attribution, Attributor},
    destinations::Compiled,
    filter::{events::DeniedPath, proxy::Proxy, rules::RulesTable},
    http,
    metrics::{Health, Metrics},
    revoke::{self, task::Revoker},
};

/// SIGINT and SIGTERM, both installed up front so that neither kills the
/// process between two waits.
pub struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    pub fn install() -> Result<Self> {
        let install = |kind, call| signal(kind).map_err(|source| Error::Syscall { call, source });
        Ok(Self {
            interrupt: install(SignalKind::interrupt(), "sigaction(SIGINT)")?,
            terminate: install(SignalKind::terminate(), "sigaction(SIGTERM)")?,
        })
    }

    /// Waits for the next SIGINT or SIGTERM.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// The hooks an enforcer with these flags keeps attached; `filter` when
/// the filtering proxy runs.
pub fn wanted_hooks(args: &EnforcementArgs, filter: bool) -> Vec<Hook> {
    Hook::wanted(
        args.udp,
        args.deny_raw_sockets || args.judge_socket_creators,
        filter,
    )
}

/// Where and how the programs are attached, for the judged `root`.
pub fn attachment(args: &EnforcementArgs, root: CgroupDir) -> Result<Attachment> {
    Ok(Attachment {
        cgroup_root: root,
        attach_at: args.attach_at.as_ref().map(CgroupDir::open).transpose()?,
        pins: PinLayout::new(&args.pin_dir),
        udp: args.udp,
        deny_raw_sockets: args.deny_raw_sockets,
        judge_socket_creators: args.judge_socket_creators,
        filter: None,
    })
}

/// The revoker's settings, or `None` with `--no-revoke`.
pub fn revoke_settings(
    args: &RevokeArgs,
    root: &CgroupDir,
    netns_dirs: &[PathBuf],
) -> Option<revoke::task::Settings> {
    (!args.no_revoke).then(|| revoke::task::Settings {
        root: root.clone(),
        netns_dirs: netns_dirs.to_vec(),
        resweep: Duration::from_secs(args.revoke_interval_secs.max(1)),
    })
}

/// What the endpoints and the enforcer task report to: made before
/// anything is loaded, so that the endpoints can serve (not ready) while a
/// node agent waits for its cgroup.
pub fn endpoints(wanted_hooks: usize) -> http::Endpoints {
    http::Endpoints {
        metrics: Arc::new(Metrics::new()),
        health: Health::new(wanted_hooks as u32),
        enforcer: Arc::new(OnceLock::new()),
    }
}

/// The `/metrics`, `/healthz` and `/readyz` server. Dropping it stops it.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// Binds `--metrics-addr` and serves `endpoints` from now on.
    pub async fn bind(addr: SocketAddr, endpoints: http::Endpoints) -> Result<Self> {
        let failed = || Error::io("listen on --metrics-addr", addr.to_string());
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(failed())?;
        let bound = listener.local_addr().map_err(failed())?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(http::serve(listener, endpoints, async {
            let _ = stopped.await;
        }));
        info!(metrics_addr = %bound, "serving /metrics, /healthz and /readyz");
        Ok(Self {
            addr: bound,
            stop,
            task,
        })
    }

    /// The bound address (the real port when asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and lets responses in flight finish, so that a
    /// scrape racing the exit still gets its answer; `serve` bounds the wait.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Filter mode's proxy, serving while enforcement runs. Started after the
/// enforcer, whose pinned connection map it reads; its listeners are bound
/// before, so that no filtered connect is ever sent to a port nobody
/// listens on because of us.
pub struct FilterProxy {
    /// The rules per filter entry; the mode replaces them as its desired
    /// state changes.
    pub rules: RulesTable,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl FilterProxy {
    /// Serves `listeners`. Only protected destinations (`destinations`, over
    /// TCP) are forwarded to: should a record ever name anything else, the
    /// proxy must not become a relay. `attribute` names callers in logs and
    /// metrics; denied paths go to `denied` (at most once a minute per pod).
    pub fn start(
        listeners: Vec<TcpListener>,
        pins: &PinLayout,
        destinations: Compiled,
        metrics: &Metrics,
        attribute: impl Fn(u64) -> Attribution + Send + Sync + 'static,
        denied: Option<mpsc::Sender<DeniedPath>>,
    ) -> Result<Self> {
        let identity = Arc::new(FilterConns::open(pins)?);
        let rules = RulesTable::new();
        let mut proxy = Proxy::new(identity, rules.clone())
            .with_attribution(attribute)
            .with_metrics(metrics.filter_requests.clone())
            .with_usage(metrics.usage.clone())
            .with_upstreams(move |a| destinations.protects(a.ip(), a.port(), PROTO_TCP));
        if let Some(tx) = denied {
            proxy = proxy.with_denied_events(tx);
        }
        let addrs: Vec<String> = listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .map(|a| a.to_string())
            .collect();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(proxy.serve(listeners, async {
            let _ = stopped.await;
        }));
        info!(proxy_listen = ?addrs, "filter proxy serving");
        Ok(Self { rules, stop, task })
    }

    /// Stops accepting and waits for the server to wind down.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// How the running enforcement is kept.
pub struct Settings {
    /// How often our links are checked.
    pub checks: owner::LinkChecks,
    /// `None` with `--no-revoke`.
    pub revoke: Option<revoke::task::Settings>,
}

/// The enforcer task and the tasks around it.
pub struct Running {
    handle: EnforcerHandle,
    owner: JoinHandle<Result<()>>,
    reporter: JoinHandle<()>,
    /// Kept so that the revoker runs as long as enforcement does.
    _revoker: Option<(Revoker, JoinHandle<()>)>,
    pin_dir: PathBuf,
}

/// Loads (or re-adopts) the installation with `desired`, then hands the
/// BPF objects to the enforcer task. With a complete allow set in
/// `desired`, what the denied cgroups already had open is closed at once;
/// with none (the pinned one is kept), at the first full
/// [`EnforcerHandle::sync_allowed`].
///
/// `names` names the owners of decisions, `revoked_names` those of revoked
/// connections.
pub fn start(
    attachment: Attachment,
    desired: MapState,
    settings: Settings,
    endpoints: &http::Endpoints,
    names: impl Attributor,
    revoked_names: Box<dyn Attributor>,
) -> Result<Running> {
    let pin_dir = attachment.pins.dir.clone();
    let (mut enforcer, _) = Enforcer::start(attachment, &desired)?;
    let ring = enforcer.take_events()?;
    let metrics = &endpoints.metrics;
    metrics
        .protected_prefixes
        .set(desired.destinations.entries.len() as i64);
    if let Some(allowed) = &desired.allowed {
        metrics.allow_map_entries.set(allowed.len() as i64);
    }
    let reporter = tokio::spawn(decisions::report(ring, names, Some(metrics.clone())));
    let revoker = settings
        .revoke
        .map(|s| revoke::task::spawn(s, Some(metrics.clone()), Some(revoked_names)));
    let (handle, owner) = owner::spawn(
        enforcer,
        desired,
        settings.checks,
        Some(owner::Observers {
            metrics: metrics.clone(),
            health: endpoints.health.clone(),
        }),
        revoker.as_ref().map(|(r, _)| r.clone()),
    );
    // Set once, here; nothing else sets it.
    let _ = endpoints.enforcer.set(handle.clone());
    Ok(Running {
        handle,
        owner,
        reporter,
        _revoker: revoker,
        pin_dir,
    })
}

impl Running {
    /// Talks to the enforcer task.
    pub fn handle(&self) -> &EnforcerHandle {
        &self.handle
    }

    /// Runs until a signal, or until the enforcer task or one of the mode's
    /// `tasks` ends (each names itself). The programs stay attached and
    /// pinned.
    pub async fn until_stopped(
        self,
        mut tasks: Vec<BoxFuture<'static, &'static str>>,
        signals: &mut Signals,
    ) {
        // The handle and the revoker live until the end: the owner task
        // stops when its last handle is dropped.
        let Self {
            handle,
            owner,
            reporter,
            _revoker: revoker,
            pin_dir,
        } = self;
        tasks.push(Box::pin(async move {
            match owner.await {
                Ok(Err(e)) => error!(error = %e, "enforcer task failed"),
                Err(e) => error!(error = %e, "enforcer task panicked"),
                Ok(Ok(())) => {}
            }
            "enforcer"
        }));
        let stopped = tokio::select! {
            (stopped, _, _) = futures::future::select_all(tasks) => stopped,
            () = signals.recv() => "signal",
        };
        reporter.abort();
        drop((handle, revoker));
        info!(
            stopped,
            pin_dir = %pin_dir.display(),
            "exiting; enforcement stays attached and pinned (remove it with `imdsguard uninstall --pin-dir {}`)",
            pin_dir.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enforcement(udp: bool, deny_raw_sockets: bool, judge: bool) -> EnforcementArgs {
        EnforcementArgs {
            attach_at: None,
            pin_dir: PathBuf::from("/p"),
            udp,
            deny_raw_sockets,
            judge_socket_creators: judge,
            proxy_listen: Vec::new(),
        }
    }

    #[test]
    fn wanted_hooks_follow_the_flags() {
        let names = |a| {
            wanted_hooks(&a, false)
                .iter()
                .map(|h| h.name())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(enforcement(false, false, false)),
            ["connect4", "connect6"]
        );
        assert_eq!(names(enforcement(true, false, false)).len(), 4);
        assert!(names(enforcement(false, true, false)).contains(&"sock_create"));
        assert!(names(enforcement(false, false, true)).contains(&"sock_create"));
    }

    #[test]
    fn no_revoke_means_no_revoker_and_the_interval_is_at_least_a_second() {
        let root = CgroupDir {
            path: PathBuf::from("/sys/fs/cgroup/pods"),
            id: 7,
            level: 1,
        };
        let off = RevokeArgs {
            no_revoke: true,
            revoke_interval_secs: 60,
        };
        assert!(revoke_settings(&off, &root, &[]).is_none());
        let zero = RevokeArgs {
            no_revoke: false,
            revoke_interval_secs: 0,
        };
        let s = revoke_settings(&zero, &root, &[PathBuf::from("/n")]).unwrap();
        assert_eq!(s.resweep, Duration::from_secs(1));
        assert_eq!(s.netns_dirs, [PathBuf::from("/n")]);
    }
}
