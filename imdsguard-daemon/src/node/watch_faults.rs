//! The watch paths a live cluster rarely shows on demand (410 Gone in the
//! middle of a watch, a dropped watch connection, an API outage), driven
//! through the real `watcher` + `reflect` + [`drive`] pipeline of the agent
//! over a mocked API server, the way kube-rs tests its own client: a
//! `tower_test` mock service behind `Client::new`. Each test plays the API
//! server one request at a time, so the order of events is fixed; every wait
//! is bounded by a timeout so a broken watcher fails instead of hanging.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::channel::{Channel, Sender};
use k8s_openapi::api::core::v1::{Namespace, Pod, PodSpec, PodStatus};
use kube::{
    Api, Client,
    api::ObjectMeta,
    client::Body,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        utils::Backoff,
        watcher,
    },
};
use serde_json::json;
use tokio::{sync::Notify, task::JoinHandle, time::timeout};
use tower_test::mock;

use crate::{
    bpf::enforcer::AllowTarget,
    cgroup::mount::CgroupDir,
    metrics::{Metrics, WatchLabels},
    node::{pod_cgroups::Cgroupfs, pod_view::PodView, watchers::pod_watch_config},
    vocabulary::Action,
};
use crate::{
    cgroup::pod::KubepodsLayout, node::watchers::drive, policy::desired, policy::file::PolicyFile,
};

/// How long any single step may take before the test fails.
const STEP: Duration = Duration::from_secs(10);
const NODE: &str = "node-a";
const POLICY: &str = "\
defaultMode: enforce
rules:
  - name: prod-reads-imds
    podSelector:
      matchLabels: {app: prod}
    access: allow
";

/// A watch or list response body the test writes to while it is open; an
/// `io::Error` through [`Sender::abort`] is a connection that broke.
type TestBody = Channel<Bytes, std::io::Error>;
type Handle = mock::Handle<Request<Body>, Response<TestBody>>;
type Responder = mock::SendResponse<Response<TestBody>>;

// ---------------------------------------------------------------------------
// Kubernetes JSON

struct TestPod {
    name: &'static str,
    uid: &'static str,
    app: &'static str,
    resource_version: &'static str,
}

const POD_A: TestPod = TestPod {
    name: "a",
    uid: "0a0a0a0a-0000-4000-8000-00000000000a",
    app: "prod",
    resource_version: "1",
};
const POD_B: TestPod = TestPod {
    name: "b",
    uid: "0b0b0b0b-0000-4000-8000-00000000000b",
    app: "prod",
    resource_version: "1",
};
const POD_C: TestPod = TestPod {
    name: "c",
    uid: "0c0c0c0c-0000-4000-8000-00000000000c",
    app: "prod",
    resource_version: "2",
};
const POD_D: TestPod = TestPod {
    name: "d",
    uid: "0d0d0d0d-0000-4000-8000-00000000000d",
    app: "prod",
    resource_version: "8",
};
/// Not allowed by [`POLICY`]: it must get no entry.
const POD_E: TestPod = TestPod {
    name: "e",
    uid: "0e0e0e0e-0000-4000-8000-00000000000e",
    app: "test",
    resource_version: "9",
};

fn pod(p: &TestPod) -> Pod {
    Pod {
        metadata: ObjectMeta {
            namespace: Some("imds".into()),
            name: Some(p.name.into()),
            uid: Some(p.uid.into()),
            resource_version: Some(p.resource_version.into()),
            labels: Some(BTreeMap::from([("app".into(), p.app.into())])),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(NODE.into()),
            ..Default::default()
        }),
        status: Some(PodStatus {
            qos_class: Some("BestEffort".into()),
            ..Default::default()
        }),
    }
}

fn pod_list(resource_version: &str, pods: &[&TestPod]) -> Vec<u8> {
    let items: Vec<Pod> = pods.iter().map(|p| pod(p)).collect();
    serde_json::to_vec(&json!({
        "apiVersion": "v1",
        "kind": "PodList",
        "metadata": {"resourceVersion": resource_version},
        "items": items,
    }))
    .unwrap()
}

/// One line of a watch body.
fn watch_event(kind: &str, object: serde_json::Value) -> Vec<u8> {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
    line.push(b'\n');
    line
}

fn status(code: u16, reason: &str, message: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn gone(resource_version: &str) -> serde_json::Value {
    status(
        410,
        "Expired",
        &format!("too old resource version: {resource_version} (3)"),
    )
}

fn namespaces() -> Vec<Arc<Namespace>> {
    vec![Arc::new(Namespace {
        metadata: ObjectMeta {
            name: Some("imds".into()),
            ..Default::default()
        },
        ..Default::default()
    })]
}

// ---------------------------------------------------------------------------
// The mocked API server

/// Plays the API server: the test takes each request the watcher makes, in
/// order, and answers it.
struct ApiServer(Handle);

impl ApiServer {
    async fn next(&mut self, expecting: &str) -> (Request<Body>, Responder) {
        timeout(STEP, self.0.next_request())
            .await
            .unwrap_or_else(|_| panic!("no request from the watcher; expected {expecting}"))
            .unwrap_or_else(|| panic!("the client went away; expected {expecting}"))
    }

    /// The next request must be a LIST of this node's pods.
    async fn list(&mut self) -> Responder {
        let (req, send) = self.next("a pod LIST").await;
        let q = query(&req);
        assert_eq!(req.uri().path(), "/api/v1/pods", "{}", req.uri());
        assert!(
            !q.contains_key("watch"),
            "expected a LIST, got {}",
            req.uri()
        );
        assert_eq!(
            q.get("fieldSelector").map(String::as_str),
            Some("spec.nodeName%3Dnode-a"),
            "{}",
            req.uri()
        );
        send
    }

    /// The next request must be a WATCH of this node's pods from
    /// `resource_version`.
    async fn watch(&mut self, resource_version: &str) -> Responder {
        let (req, send) = self
            .next(&format!("a pod WATCH from {resource_version}"))
            .await;
        let q = query(&req);
        assert_eq!(req.uri().path(), "/api/v1/pods", "{}", req.uri());
        assert_eq!(
            q.get("watch").map(String::as_str),
            Some("true"),
            "expected a WATCH, got {}",
            req.uri()
        );
        assert_eq!(
            q.get("resourceVersion").map(String::as_str),
            Some(resource_version),
            "{}",
            req.uri()
        );
        assert_eq!(
            q.get("fieldSelector").map(String::as_str),
            Some("spec.nodeName%3Dnode-a"),
            "{}",
            req.uri()
        );
        send
    }
}

fn query(req: &Request<Body>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// A complete response with this status and body.
async fn respond(send: Responder, code: StatusCode, body: Vec<u8>) {
    let (mut tx, rx) = Channel::new(1);
    tx.send_data(body.into()).await.unwrap();
    drop(tx);
    let mut res = Response::new(rx);
    *res.status_mut() = code;
    send.send_response(res);
}

/// A 200 response whose body stays open until the returned sender is
/// dropped (a clean end) or aborted (a broken connection).
fn respond_open(send: Responder) -> Sender<Bytes, std::io::Error> {
    let (tx, rx) = Channel::new(16);
    send.send_response(Response::new(rx));
    tx
}

async fn write(tx: &mut Sender<Bytes, std::io::Error>, bytes: Vec<u8>) {
    timeout(STEP, tx.send_data(bytes.into()))
        .await
        .expect("watch body write timed out")
        .expect("the watcher dropped the watch body");
}

// ---------------------------------------------------------------------------
// The agent's pipeline

/// A fixed short backoff that records, for every error, how many errors in
/// a row it has seen since the stream last yielded an `Ok` (which resets any
/// `Backoff`, as `StreamBackoff` does). With the agent's exponential
/// `DefaultBackoff` that number is what grows the delay.
#[derive(Clone, Default)]
struct RecordingBackoff {
    attempt: usize,
    attempts: Arc<Mutex<Vec<usize>>>,
}

impl Iterator for RecordingBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        self.attempt += 1;
        self.attempts.lock().unwrap().push(self.attempt);
        Some(Duration::from_millis(5))
    }
}

impl Backoff for RecordingBackoff {
    fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// The pod side of `agent::run`: the same watcher, config, reflector and
/// [`drive`], over the mocked API server and with [`RecordingBackoff`] in
/// place of the default one so retries take milliseconds. A stand-in
/// reconciler wakes on the trigger like the real one and publishes the
/// names in the store it then sees.
struct Pipeline {
    api: ApiServer,
    store: Store<PodView>,
    metrics: Arc<Metrics>,
    backoff: Arc<Mutex<Vec<usize>>>,
    /// What the stand-in reconciler saw at its latest wake-up.
    seen: tokio::sync::watch::Receiver<BTreeSet<String>>,
    wakeups: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

impl Pipeline {
    fn start() -> Self {
        let (service, handle) = mock::pair::<Request<Body>, Response<TestBody>>();
        let client = Client::new(service, "default");
        let backoff = RecordingBackoff::default();
        let attempts = backoff.attempts.clone();
        let metrics = Arc::new(Metrics::new());
        let trigger = Arc::new(Notify::new());
        let (store, writer) = reflector::store::<PodView>();
        let pods = watcher(Api::<PodView>::all(client), pod_watch_config(NODE, 500))
            .backoff(backoff)
            .reflect(writer);
        let driver = tokio::spawn({
            let (trigger, metrics) = (trigger.clone(), metrics.clone());
            async move {
                drive(pods, trigger, "pods", metrics).await;
            }
        });
        let (seen_tx, seen) = tokio::sync::watch::channel(BTreeSet::new());
        let wakeups = Arc::new(AtomicUsize::new(0));
        let reconciler = tokio::spawn({
            let (store, wakeups) = (store.clone(), wakeups.clone());
            async move {
                loop {
                    trigger.notified().await;
                    wakeups.fetch_add(1, Ordering::SeqCst);
                    seen_tx.send_replace(names(&store));
                }
            }
        });
        Self {
            api: ApiServer(handle),
            store,
            metrics,
            backoff: attempts,
            seen,
            wakeups,
            tasks: vec![driver, reconciler],
        }
    }

    fn watch_errors(&self) -> u64 {
        self.metrics
            .watch_errors
            .get_or_create(&WatchLabels {
                watch: "pods".into(),
            })
            .get()
    }

    fn backoff_attempts(&self) -> Vec<usize> {
        self.backoff.lock().unwrap().clone()
    }

    /// Waits until a wake-up of the stand-in reconciler saw exactly `want`.
    async fn reconciler_sees(&mut self, want: &[&str]) {
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        let reached = matches!(
            timeout(STEP, self.seen.wait_for(|s| *s == want)).await,
            Ok(Ok(_))
        );
        assert!(
            reached,
            "the reconciler was never woken to see {want:?}; it last saw {:?}",
            *self.seen.borrow()
        );
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn names(store: &Store<PodView>) -> BTreeSet<String> {
    store
        .state()
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------------------
// The kubepods tree

/// A systemd kubepods tree in a temp dir with a BestEffort pod directory
/// for every test pod, removed on drop. Not cgroup2: the root `CgroupDir`
/// is built by hand with the directory's inode as its id, which is all
/// `desired::compute` reads.
struct Kubepods {
    base: PathBuf,
    root: CgroupDir,
    layout: KubepodsLayout,
}

impl Kubepods {
    fn new(test: &str, pods: &[&TestPod]) -> Self {
        let base = std::env::temp_dir().join(format!(
            "imdsguard-watch-faults-{test}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&base);
        let root_path = base.join("kubepods.slice");
        for p in pods {
            std::fs::create_dir_all(Self::pod_path(&root_path, p)).unwrap();
        }
        let root = CgroupDir {
            id: std::fs::metadata(&root_path).unwrap().ino(),
            path: root_path.clone(),
            level: 1,
        };
        let layout = KubepodsLayout::at(&root_path).unwrap();
        Self { base, root, layout }
    }

    fn pod_path(root: &Path, p: &TestPod) -> PathBuf {
        root.join("kubepods-besteffort.slice").join(format!(
            "kubepods-besteffort-pod{}.slice",
            p.uid.replace('-', "_")
        ))
    }

    /// The allow map [`POLICY`] gives the pods in `store`.
    fn compute(&self, store: &Store<PodView>) -> BTreeMap<u64, AllowTarget> {
        let policy = PolicyFile::from_yaml(POLICY).unwrap();
        let want = desired::compute(
            &policy,
            &store.state(),
            &namespaces(),
            &Cgroupfs {
                root: &self.root,
                layout: &self.layout,
            },
        );
        assert_eq!(want.unknown_namespace, 0);
        want.allowed
    }

    /// The allow map that lets exactly `pods` through.
    fn entries(&self, pods: &[&TestPod]) -> BTreeMap<u64, AllowTarget> {
        pods.iter()
            .map(|p| {
                let dir = Self::pod_path(&self.root.path, p);
                (
                    std::fs::metadata(&dir).unwrap().ino(),
                    AllowTarget {
                        level: self.root.level + 2,
                        action: Action::Allow,
                    },
                )
            })
            .collect()
    }
}

impl Drop for Kubepods {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

// ---------------------------------------------------------------------------
// The tests

mod tests;
