//! The Kubernetes node agent: watch this node's pods and all namespaces,
//! evaluate the policy, and keep the allow map equal to the result.
//!
//! Tasks and what they own:
//! - the enforcer task owns the BPF objects (see [`crate::bpf::owner`]);
//!   it, the decision reporter, the revoker, the endpoints and the signals
//!   are the runtime both modes share ([`crate::runtime`]);
//! - two watcher+reflector tasks keep the pod and namespace stores, with
//!   backoff on errors; during an API outage the stores keep the last state,
//!   so enforcement continues unchanged and nothing is opened;
//! - the cgroup watcher and the policy reloader only wake the reconciler;
//! - the reconciler recomputes the whole allow map from the full stores.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::{
    Api, Client, Resource as _,
    runtime::{
        WatchStreamExt as _,
        events::{Recorder, Reporter},
        reflector::{self, Store},
        watcher,
    },
};
use tokio::sync::{Notify, watch};
use tracing::{error, info, warn};

use crate::{
    Error, Result,
    bpf::{bpffs, enforcer::MapState, owner},
    cgroup::mount::CgroupDir,
    cli::args::NodeArgs,
    node::pod_cgroups::CgroupListing,
    node::pod_view::PodView,
    node::policy_reload::{PolicyReloader, compile_destinations, load_policy},
    node::watchers::drive,
    runtime::{self, MetricsServer, Signals},
};
use crate::{
    bpf::enforcer::AllowTarget,
    filter::{listen, rules::RulesTable},
    node::filter,
};
use crate::{
    cgroup::kubepods_wait::{self, Kubepods},
    cgroup::pod::KubepodsLayout,
    node::attribution::PodAttributor,
    node::cgroup_watch,
    policy::desired,
    policy::file::PolicyFile,
};

pub async fn run(args: NodeArgs) -> Result<()> {
    // Everything that can be wrong with the input is checked before any
    // program is loaded: a bad policy refuses to start.
    let (policy_text, policy) = load_policy(&args)?;
    let proxy_listen = args.enforcement.proxy_listen.clone();
    let filtering = !proxy_listen.is_empty();
    filter::check_policy(&policy, filtering)?;
    let proxy_target = filtering
        .then(|| listen::target(&proxy_listen))
        .transpose()?;
    bpffs::check_pin_mount(&args.enforcement.pin_dir)?;
    let source = Kubepods::of(args.kubepods_root.as_deref())?;
    let client = Client::try_default().await.map_err(Error::Kube)?;
    let mut signals = Signals::install()?;

    // The endpoints serve from the start: an agent that waits for its
    // cgroup is alive (/healthz) but not ready (/readyz).
    let endpoints = runtime::endpoints(runtime::wanted_hooks(&args.enforcement, filtering).len());
    endpoints.metrics.usage.set_node(args.node_name.clone());
    // Bound before anything is attached (see `FilterProxy`), and before the
    // wait for kubepods, so that a port in use fails the start at once.
    let listeners = match filtering {
        true => Some(listen::bind(&proxy_listen).await?),
        false => None,
    };
    // Dropping the server (any return from here on) also stops it.
    let server = MetricsServer::bind(args.metrics_addr, endpoints.clone()).await?;
    let metrics_addr = server.addr();

    let waited = Instant::now();
    let mut announced = false;
    let found = kubepods_wait::find(&source, |dirs| {
        announced = true;
        warn!(
            kubepods_root = %source.describe(),
            watching = %dirs[0].display(),
            watched_dirs = dirs.len(),
            "the kubepods cgroup does not exist yet in the cgroup v2 hierarchy (on hybrid cgroup hosts runc creates it with the node's first container); waiting for it: nothing is attached and /readyz answers 503 until it appears"
        );
    });
    let layout = tokio::select! {
        r = found => r.map_err(Error::PodCgroup)?,
        () = signals.recv() => return exit_while_waiting(&source),
    };
    if announced {
        info!(
            kubepods_root = %layout.root().display(),
            waited_ms = waited.elapsed().as_millis() as u64,
            "the kubepods cgroup appeared; attaching"
        );
    }
    let root = CgroupDir::open(layout.root())?;

    // Pinned allow entries are kept until the first full sync: a restarted
    // agent must not revoke pods it has not seen yet.
    let desired = MapState {
        mode: policy.default_mode(),
        allowed: None,
        destinations: compile_destinations(&policy)?,
    };
    let metrics = endpoints.metrics.clone();
    let observers = owner::Observers {
        metrics: metrics.clone(),
        health: endpoints.health.clone(),
    };
    // The pod store and the recorder exist before the enforcement starts,
    // so that the revoker can name pods from its first sweep on.
    let (pod_store, pod_writer) = reflector::store::<PodView>();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "imdsguard".into(),
            instance: Some(args.node_name.clone()),
        },
    );
    let trigger = Arc::new(Notify::new());
    let (ns_store, ns_writer) = reflector::store::<Namespace>();
    let pods = watcher(
        Api::<PodView>::all(client.clone()),
        crate::node::watchers::pod_watch_config(&args.node_name, args.pod_list_page_size),
    )
    .default_backoff()
    .reflect(pod_writer);
    let namespaces = watcher(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(crate::node::watchers::strip_namespace)
    .reflect(ns_writer);
    // The watches start now and list while `runtime::start` loads and
    // attaches the programs: at 10,000 pods the pod list is most of the
    // start-up. They only fill the stores; the reconciler writes once both
    // lists are complete and the enforcer runs.
    let watches = [
        spawned(
            tokio::spawn(drive(pods, trigger.clone(), "pods", metrics.clone())),
            "pods",
        ),
        spawned(
            tokio::spawn(drive(
                namespaces,
                trigger.clone(),
                "namespaces",
                metrics.clone(),
            )),
            "namespaces",
        ),
    ];
    let destinations = desired.destinations.clone();
    let mut attachment = runtime::attachment(&args.enforcement, root.clone())?;
    attachment.filter = proxy_target;
    let pins = attachment.pins.clone();
    // Loading is blocking work (the verifier, bpf(2)): off the runtime's
    // workers, so that the watches go on even with a single worker (a CPU
    // limit under one core).
    let running = tokio::task::block_in_place(|| {
        runtime::start(
            attachment,
            desired,
            runtime::Settings {
                checks: owner::LinkChecks {
                    watch_every: owner::WATCH_EVERY,
                    check_every: Duration::from_secs(2),
                },
                revoke: runtime::revoke_settings(&args.revoke, &root, &args.netns_dirs),
            },
            &endpoints,
            PodAttributor::new(root.path.clone(), pod_store.clone(), Some(recorder.clone())),
            Box::new(PodAttributor::new(
                root.path.clone(),
                pod_store.clone(),
                Some(recorder.clone()),
            )),
        )
    })?;
    let handle = running.handle().clone();
    let proxy = match listeners {
        Some(listeners) => Some(filter::start(
            listeners,
            &pins,
            destinations,
            &metrics,
            PodAttributor::new(root.path.clone(), pod_store.clone(), Some(recorder.clone())),
        )?),
        None => None,
    };
    let filtered = match &proxy {
        Some(p) => Some(Filtered {
            rules: p.rules.clone(),
            own: filter::own_entry(&root)?,
        }),
        None => None,
    };

    let node_ref = Node {
        metadata: kube::api::ObjectMeta {
            name: Some(args.node_name.clone()),
            ..Default::default()
        },
        ..Default::default()
    }
    .object_ref(&());

    let (policy_tx, policy_rx) = watch::channel(Arc::new(policy));
    let [pod_watch, namespace_watch] = watches;
    let tasks: Vec<BoxFuture<'static, &'static str>> = vec![
        pod_watch,
        namespace_watch,
        Box::pin({
            let (layout, trigger) = (layout.clone(), trigger.clone());
            async move {
                if let Err(e) = cgroup_watch::watch(layout, trigger).await {
                    error!(error = %e, "cgroup watch failed; new pod cgroups are only seen on API events");
                }
                "cgroup watch"
            }
        }),
        Box::pin(
            PolicyReloader {
                args: args.clone(),
                last_text: policy_text,
                tx: policy_tx,
                handle: handle.clone(),
                trigger: trigger.clone(),
                recorder: recorder.clone(),
                node: node_ref,
                metrics: metrics.clone(),
            }
            .run(),
        ),
        Box::pin(
            Reconciler {
                handle: handle.clone(),
                pods: pod_store.clone(),
                namespaces: ns_store,
                policy: policy_rx,
                root: root.clone(),
                layout: layout.clone(),
                trigger: trigger.clone(),
                observers,
                metrics_addr,
                filtered,
                startup_taint: args
                    .remove_startup_taint
                    .clone()
                    .map(|key| (client.clone(), args.node_name.clone(), key)),
            }
            .run(),
        ),
    ];
    running.until_stopped(tasks, &mut signals).await;
    if let Some(proxy) = proxy {
        proxy.stop().await;
    }
    server.stop().await;
    Ok(())
}

/// A spawned task as one of the agent's tasks: it ends as the task does,
/// and dropping it (on every return, an early one included) aborts the
/// task.
fn spawned(
    task: tokio::task::JoinHandle<&'static str>,
    what: &'static str,
) -> BoxFuture<'static, &'static str> {
    struct AbortOnDrop(tokio::task::AbortHandle);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let guard = AbortOnDrop(task.abort_handle());
    Box::pin(async move {
        let _guard = guard;
        task.await.unwrap_or(what)
    })
}

fn exit_while_waiting(source: &Kubepods) -> Result<()> {
    info!(
        kubepods_root = %source.describe(),
        "exiting while waiting for the kubepods cgroup; nothing was attached"
    );
    Ok(())
}

/// Recomputes the allow map from the full stores whenever something changed.
struct Reconciler {
    handle: owner::EnforcerHandle,
    pods: Store<PodView>,
    namespaces: Store<Namespace>,
    policy: watch::Receiver<Arc<PolicyFile>>,
    root: CgroupDir,
    layout: KubepodsLayout,
    trigger: Arc<Notify>,
    observers: owner::Observers,
    metrics_addr: std::net::SocketAddr,
    filtered: Option<Filtered>,
    startup_taint: Option<(Client, String, String)>,
}

/// Filter mode's part of the desired state: the rules table the proxy
/// reads, and the agent's own allow entry.
struct Filtered {
    rules: RulesTable,
    own: Option<(u64, AllowTarget)>,
}

impl Reconciler {
    async fn run(self) -> &'static str {
        let Self {
            handle,
            pods,
            namespaces,
            policy,
            root,
            layout,
            trigger,
            observers,
            metrics_addr,
            filtered,
            startup_taint,
        } = self;
        // Nothing is written before both stores hold a complete list.
        let listing = Instant::now();
        if pods.wait_until_ready().await.is_err() || namespaces.wait_until_ready().await.is_err() {
            return "reconciler";
        }
        let listed = listing.elapsed();
        let mut first = true;
        loop {
            let started = Instant::now();
            let policy = policy.borrow().clone();
            let want = desired::compute(
                &policy,
                &pods.state(),
                &namespaces.state(),
                &CgroupListing::new(&root, &layout),
            );
            let computed = started.elapsed();
            let waiting = want.waiting_for_cgroup;
            let mut want = want;
            if let Some(f) = &filtered {
                // Rules first: the kernel sends a pod to the proxy only once
                // its entry says filter, and by then the proxy knows it.
                f.rules.replace(want.filter_rules.clone());
                if let Some((id, entry)) = f.own {
                    want.allowed.insert(id, entry);
                }
            }
            let entries = want.allowed.len();
            match handle
                .sync_allowed(policy.default_mode(), std::mem::take(&mut want.allowed))
                .await
            {
                Ok(report) => {
                    observers
                        .metrics
                        .reconcile_duration
                        .observe(started.elapsed().as_secs_f64());
                    if first {
                        observers.health.set_synced();
                        // Where the start-up went: the wait for both lists
                        // (from when this task started), the policy and
                        // cgroup lookups, and the map writes.
                        info!(
                            pods = pods.len(),
                            entries,
                            waiting_for_cgroup = waiting,
                            list_ms = listed.as_millis() as u64,
                            compute_ms = computed.as_millis() as u64,
                            write_ms = (started.elapsed() - computed).as_millis() as u64,
                            cgroup_root = %root.path.display(),
                            metrics_addr = %metrics_addr,
                            "ready"
                        );
                        first = false;
                        // Only now may pods be scheduled here: enforcement is on.
                        if let Some((client, node, key)) = startup_taint.clone() {
                            tokio::spawn(async move {
                                if let Err(e) =
                                    crate::node::taint::remove(client, &node, &key).await
                                {
                                    error!(error = %e, "could not remove the startup taint; the node stays unschedulable");
                                }
                            });
                        }
                    } else if report.inserted + report.updated + report.removed > 0 {
                        info!(
                            inserted = report.inserted,
                            updated = report.updated,
                            removed = report.removed,
                            entries,
                            waiting_for_cgroup = waiting,
                            micros = started.elapsed().as_micros() as u64,
                            "allow map reconciled"
                        );
                    }
                }
                Err(e) => {
                    error!(error = %e, "reconcile failed; the map keeps its previous entries")
                }
            }
            trigger.notified().await;
        }
    }
}
