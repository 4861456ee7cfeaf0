//! Who a denied cgroup belongs to: namespace/pod/container, from the cgroup
//! path (kubelet's naming) and the pod store. Denials become structured log
//! lines and, at most once a minute per pod and destination, a Kubernetes
//! Event on the pod; so do revoked connections.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::{
    Resource as _,
    runtime::{
        events::{Event, EventType, Recorder},
        reflector::Store,
    },
};
use tracing::debug;

use super::pod_cgroup::{container_id_of, parse_pod_dir};
use crate::{
    cgroup::paths_of_ids,
    events::{Attribution, Attributor, Decision, Verdict},
    revoke::sweep::Revoked,
};

const EVENT_EVERY: Duration = Duration::from_secs(60);

pub struct PodAttributor {
    root: PathBuf,
    pods: Store<Pod>,
    recorder: Option<Recorder>,
    paths: HashMap<u64, PathBuf>,
    last_event: HashMap<(String, String), Instant>,
}

impl PodAttributor {
    pub fn new(root: PathBuf, pods: Store<Pod>, recorder: Option<Recorder>) -> Self {
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

    fn pod_by_uid(&self, uid: &str) -> Option<std::sync::Arc<Pod>> {
        self.pods
            .state()
            .into_iter()
            .find(|p| p.metadata.uid.as_deref() == Some(uid))
    }
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

impl Attributor for PodAttributor {
    fn attribute(&mut self, cgroup_id: u64) -> Attribution {
        let Some(path) = self.path_of(cgroup_id) else {
            return Attribution {
                cgroup: format!("(cgroup id {cgroup_id})"),
                ..Default::default()
            };
        };
        let mut who = Attribution {
            cgroup: path.display().to_string(),
            ..Default::default()
        };
        let Some((pod_dir, container_id)) = split_pod_path(&path) else {
            return who;
        };
        let Some((uid, _)) = parse_pod_dir(&pod_dir) else {
            return who;
        };
        if let Some(pod) = self.pod_by_uid(uid.as_str()) {
            who.pod = Some(format!(
                "{}/{}",
                pod.metadata.namespace.as_deref().unwrap_or(""),
                pod.metadata.name.as_deref().unwrap_or("")
            ));
            who.container = container_id.as_deref().and_then(|id| {
                let status = pod.status.as_ref()?;
                let all = status
                    .container_statuses
                    .iter()
                    .flatten()
                    .chain(status.init_container_statuses.iter().flatten());
                all.into_iter()
                    .find(|c| {
                        c.container_id
                            .as_deref()
                            .is_some_and(|cid| cid.ends_with(id))
                    })
                    .map(|c| c.name.clone())
            });
            if who.container.is_none() {
                who.container = container_id;
            }
        }
        who
    }

    fn reported(&mut self, d: &Decision, who: &Attribution) {
        let Some((recorder, reference)) = self.event_target(who, &d.destination.to_string()) else {
            return;
        };
        let what = if d.hook == "sock_create" {
            "raw socket".to_string()
        } else {
            format!("metadata access to {}", d.destination)
        };
        let (reason, note) = match d.verdict {
            Verdict::Denied if d.hook == "sock_create" => (
                "RawSocketDenied",
                "raw socket denied by imdsguard".to_string(),
            ),
            Verdict::Audited if d.hook == "sock_create" => (
                "RawSocketAudited",
                format!("{what} would be denied by imdsguard (audit mode)"),
            ),
            Verdict::Denied if d.decided_by == "socket-creator" => (
                "MetadataAccessDenied",
                format!(
                    "metadata access denied to {} by imdsguard: the socket was created by a cgroup that is not allowed",
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
                "{note} (comm {}, {} {})",
                d.comm, d.protocol, d.hook
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
        let pod = self.pods.state().into_iter().find(|p| {
            p.metadata.namespace.as_deref() == Some(ns) && p.metadata.name.as_deref() == Some(name)
        })?;
        Some((recorder, pod.object_ref(&())))
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
}
