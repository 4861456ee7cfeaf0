//! Who a denied cgroup belongs to: namespace/pod/container, from the cgroup
//! path (kubelet's naming) and the pod store. Denials become structured log
//! lines and, at most once a minute per pod and destination, a Kubernetes
//! Event on the pod; so do revoked connections.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use futures::FutureExt as _;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Resource as _,
    runtime::{
        events::{Event, EventType, Recorder},
        reflector::{ObjectRef, Store},
    },
};
use tracing::debug;

use crate::cgroup::pod::{container_id_of, parse_pod_dir};
use crate::node::pod_view::PodView;
use crate::{
    bpf::hook::Hook,
    cgroup::subtree::paths_of_ids,
    decisions::{Attribution, Attributor, CONTAINER_NOT_IN_STATUS, Cause, Decision, Verdict},
    revoke::sweep::Revoked,
};

const EVENT_EVERY: Duration = Duration::from_secs(60);

pub struct PodAttributor {
    root: PathBuf,
    pods: Store<PodView>,
    recorder: Option<Recorder>,
    paths: HashMap<u64, PathBuf>,
    last_event: HashMap<(String, String), Instant>,
}

impl PodAttributor {
    pub fn new(root: PathBuf, pods: Store<PodView>, recorder: Option<Recorder>) -> Self {
        Self {
            root,
            pods,
            recorder,
            paths: HashMap::new(),
            last_event: HashMap::new(),
        }
    }

    fn path_of(&mut self, id: u64) -> Option<PathBuf> {
        if let Some(p) = self.paths.get(&id) {
            return Some(p.clone());
        }
        let p = paths_of_ids(&self.root, &[id]).remove(&id)?;
        if self.paths.len() > 10_000 {
            self.paths.clear();
        }
        self.paths.insert(id, p.clone());
        Some(p)
    }

    fn pod_by_uid(&self, uid: &str) -> Option<std::sync::Arc<PodView>> {
        // A scan under the store's read lock, without copying the store:
        // attribution is rare (denials, throttled), reconciles are not.
        self.pods.find(|p| p.metadata.uid.as_deref() == Some(uid))
    }
}

/// The name of the container with runtime id `id` in the pod's status
/// (`containerd://<id>`, `cri-o://<id>`, ...), init containers included.
fn container_name(pod: &PodView, id: &str) -> Option<String> {
    pod.containers()
        .find(|c| {
            c.container_id
                .as_deref()
                .is_some_and(|cid| cid.rsplit_once("://").map_or(cid, |(_, c)| c) == id)
        })
        .map(|c| c.name.clone())
}

/// The pod directory among `path`'s ancestors, and the container directory
/// just below it, if any.
fn split_pod_path(path: &Path) -> Option<(PathBuf, Option<String>)> {
    let mut child: Option<&Path> = None;
    for dir in path.ancestors() {
        if parse_pod_dir(dir).is_some() {
            let container = child
                .and_then(|c| c.file_name())
                .and_then(|n| n.to_str())
                .and_then(container_id_of)
                .map(str::to_string);
            return Some((dir.to_path_buf(), container));
        }
        child = Some(dir);
    }
    None
}

/// Why a decision's pod is not named.
pub const NOT_SYNCED: &str = "pod store not synced yet";
const NO_CGROUP: &str = "cgroup not found below the kubepods root (removed)";
const NOT_A_POD: &str = "not a pod cgroup";
const NOT_IN_STORE: &str = "pod not in the pod store";

impl Attributor for PodAttributor {
    fn attribute(&mut self, cgroup_id: u64) -> Attribution {
        let Some(path) = self.path_of(cgroup_id) else {
            return Attribution {
                cgroup: format!("(cgroup id {cgroup_id})"),
                unattributed: Some(NO_CGROUP),
                ..Default::default()
            };
        };
        let mut who = Attribution {
            cgroup: path.display().to_string(),
            unattributed: Some(NOT_A_POD),
            ..Default::default()
        };
        let Some((pod_dir, container_id)) = split_pod_path(&path) else {
            return who;
        };
        let Some((uid, _)) = parse_pod_dir(&pod_dir) else {
            return who;
        };
        who.container_id = container_id;
        if !self.synced() {
            who.unattributed = Some(NOT_SYNCED);
            return who;
        }
        let Some(pod) = self.pod_by_uid(uid.as_str()) else {
            who.unattributed = Some(NOT_IN_STORE);
            return who;
        };
        who.unattributed = None;
        who.pod = Some(format!(
            "{}/{}",
            pod.metadata.namespace.as_deref().unwrap_or(""),
            pod.metadata.name.as_deref().unwrap_or("")
        ));
        // The id is kept either way: a container the status does not list
        // yet is named by a later look (see decisions::reporter).
        who.container = who
            .container_id
            .as_deref()
            .and_then(|id| container_name(&pod, id));
        who
    }

    fn synced(&self) -> bool {
        // Ready once the first full list is in; polling the readiness future
        // once does not wait.
        self.pods
            .wait_until_ready()
            .now_or_never()
            .is_some_and(|r| r.is_ok())
    }

    fn reported(&mut self, d: &Decision, who: &Attribution) {
        let Some((recorder, reference)) = self.event_target(who, &d.destination.to_string()) else {
            return;
        };
        let what = if d.hook == Hook::SockCreate {
            "raw socket".to_string()
        } else {
            format!("metadata access to {}", d.destination)
        };
        let (reason, note) = match d.verdict {
            Verdict::Denied if d.hook == Hook::SockCreate => (
                "RawSocketDenied",
                "raw socket denied by imdsguard".to_string(),
            ),
            Verdict::Audited if d.hook == Hook::SockCreate => (
                "RawSocketAudited",
                format!("{what} would be denied by imdsguard (audit mode)"),
            ),
            Verdict::Denied if d.decided_by == Cause::Creator => (
                "MetadataAccessDenied",
                format!(
                    "metadata access denied to {} by imdsguard: the socket was created by a cgroup that is not allowed",
                    d.destination
                ),
            ),
            Verdict::Denied if d.decided_by == Cause::NotFilterable => (
                "MetadataAccessDenied",
                format!(
                    "metadata access denied to {} by imdsguard: the pod is filtered, and only TCP port 80 through the filter is open to it",
                    d.destination
                ),
            ),
            Verdict::Denied => (
                "MetadataAccessDenied",
                format!("metadata access denied to {} by imdsguard", d.destination),
            ),
            Verdict::Audited => (
                "MetadataAccessAudited",
                format!(
                    "metadata access to {} would be denied by imdsguard (audit mode)",
                    d.destination
                ),
            ),
        };
        let event = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(format!(
                "{note} ({}comm {}, {} {})",
                container_note(who),
                d.comm,
                d.protocol,
                d.hook
            )),
            action: "Connect".into(),
            secondary: None,
        };
        publish(recorder, event, reference);
    }

    fn revoked(&mut self, r: &Revoked, who: &Attribution) {
        let key = format!("revoked {}", r.destination);
        let Some((recorder, reference)) = self.event_target(who, &key) else {
            return;
        };
        let event = Event {
            type_: EventType::Warning,
            reason: "MetadataConnectionRevoked".into(),
            note: Some(format!(
                "open {} connection to {} closed by imdsguard: the pod is no longer allowed",
                r.transport, r.destination
            )),
            action: "Revoke".into(),
            secondary: None,
        };
        publish(recorder, event, reference);
    }
}

impl PodAttributor {
    /// An Event on a filtered pod whose request the proxy refused.
    pub fn denied_path(&mut self, d: &crate::filter::events::DeniedPath) {
        let who = Attribution {
            pod: d.pod.clone(),
            ..Default::default()
        };
        let Some((recorder, reference)) = self.event_target(&who, "filter") else {
            return;
        };
        let event = Event {
            type_: EventType::Warning,
            reason: "MetadataPathDenied".into(),
            note: Some(
                format!(
                    "{} {} refused by imdsguard's metadata filter: {}",
                    d.method, d.path, d.reason
                )
                .chars()
                .take(1000)
                .collect(),
            ),
            action: "Filter".into(),
            secondary: None,
        };
        publish(recorder, event, reference);
    }

    /// The recorder and the pod to put an Event on, at most once per
    /// `EVENT_EVERY` for each (pod, key).
    fn event_target(
        &mut self,
        who: &Attribution,
        key: &str,
    ) -> Option<(Recorder, ObjectReference)> {
        let (recorder, pod_name) = (self.recorder.clone()?, who.pod.clone()?);
        let key = (pod_name.clone(), key.to_string());
        let now = Instant::now();
        if self
            .last_event
            .get(&key)
            .is_some_and(|t| now.duration_since(*t) < EVENT_EVERY)
        {
            return None;
        }
        if self.last_event.len() > 10_000 {
            self.last_event
                .retain(|_, t| now.duration_since(*t) < EVENT_EVERY);
        }
        self.last_event.insert(key, now);
        let (ns, name) = pod_name.split_once('/')?;
        let pod = self.pods.get(&ObjectRef::new(name).within(ns))?;
        Some((recorder, pod.object_ref(&())))
    }
}

/// `container NAME, `; or the id, when the pod's status did not list it
/// in time; or nothing for a pod-level cgroup.
fn container_note(who: &Attribution) -> String {
    match (&who.container, &who.container_id) {
        (Some(name), _) => format!("container {name}, "),
        (None, Some(id)) => format!("container id {id} {CONTAINER_NOT_IN_STATUS}, "),
        (None, None) => String::new(),
    }
}

fn publish(recorder: Recorder, event: Event, reference: ObjectReference) {
    tokio::spawn(async move {
        if let Err(e) = recorder.publish(&event, &reference).await {
            debug!(error = %e, "could not publish the pod event");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_pod_and_container_in_a_systemd_path() {
        let p = Path::new(
            "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f1e2d3c_4b5a_4978_8695_a4b3c2d1e0f9.slice/cri-containerd-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope",
        );
        let (pod, container) = split_pod_path(p).unwrap();
        assert!(pod.ends_with("kubepods-burstable-pod0f1e2d3c_4b5a_4978_8695_a4b3c2d1e0f9.slice"));
        assert_eq!(
            container.as_deref(),
            Some("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
        );
        assert!(split_pod_path(Path::new("/sys/fs/cgroup/kubepods.slice")).is_none());
    }

    const UID: &str = "3f2a1b4c-5d6e-4f70-8a9b-0c1d2e3f4a5b";
    const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn pod(container_listed: bool) -> PodView {
        let status = if container_listed {
            serde_json::json!({"containerStatuses": [{
                "name": "app", "containerID": format!("containerd://{CID}"),
                "image": "i", "imageID": "", "ready": true, "restartCount": 0
            }]})
        } else {
            serde_json::json!({})
        };
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "imds", "name": "test-1", "uid": UID},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn names_the_pod_once_synced_and_the_container_once_listed() {
        use kube::runtime::{reflector, watcher};
        use std::os::unix::fs::MetadataExt as _;

        let root = std::env::temp_dir().join(format!(
            "imdsguard-attribution-{}/kubepods",
            std::process::id()
        ));
        let ctr = root.join(format!("besteffort/pod{UID}/{CID}"));
        std::fs::create_dir_all(&ctr).unwrap();
        let id = std::fs::metadata(&ctr).unwrap().ino();

        let (store, mut writer) = reflector::store::<PodView>();
        let mut a = PodAttributor::new(root.clone(), store, None);
        // Before the first full list: the pod is not named, and says why.
        assert!(!a.synced());
        let who = a.attribute(id);
        assert_eq!(
            (who.pod.as_deref(), who.unattributed),
            (None, Some(NOT_SYNCED))
        );
        assert_eq!(who.namespace(), crate::decisions::UNATTRIBUTED);
        assert_eq!(who.container_id.as_deref(), Some(CID));

        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitApply(pod(false)));
        writer.apply_watcher_event(&watcher::Event::InitDone);
        assert!(a.synced());
        // The status does not list the container yet: the id is kept, and
        // the name is awaited.
        let who = a.attribute(id);
        assert_eq!(who.pod.as_deref(), Some("imds/test-1"));
        assert_eq!(who.namespace(), "imds");
        assert_eq!(
            (who.container.as_deref(), who.container_id.as_deref()),
            (None, Some(CID))
        );
        assert!(who.awaits_container_name());
        assert_eq!(
            container_note(&who),
            format!("container id {CID} (not yet in pod status), ")
        );

        writer.apply_watcher_event(&watcher::Event::Apply(pod(true)));
        let who = a.attribute(id);
        assert_eq!(who.container.as_deref(), Some("app"));
        assert!(!who.awaits_container_name());
        assert_eq!(container_note(&who), "container app, ");

        let _ = std::fs::remove_dir_all(root.parent().unwrap());
    }
}
