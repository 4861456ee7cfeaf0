//! Who used the metadata service lately: the agent's in-memory usage
//! report, served as `GET /report?minutes=N` and read by `imdsguard report`.
//!
//! Two feeds, in both modes: the decision reporter (each kernel decision,
//! attributed) and the filter proxy (each request, with its path and IMDS
//! version). The kernel only sends events for audit hits and denials;
//! allowed connects are only counted in its totals, which the report
//! carries beside the rows ([`Report::kernel_counters`]).

pub mod window;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::{Mutex, OnceLock},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{
    bpf::enforcer::Counters,
    decisions::{Attribution, Decision, Verdict},
};

pub use window::Window;

/// Said in every report, so that a reader of the JSON alone knows it.
pub const NOTE: &str = "the kernel reports audit hits and denials one by one; allowed connects are only counted (kernel_counters, since the programs were loaded); filter columns count requests through the filter-mode proxy";

/// The kind of a filter-proxy row (the others are hook names).
pub const FILTER_KIND: &str = "filter";

/// What the filter proxy did with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterVerdict {
    Allowed,
    Denied,
    /// Allowed, but the metadata service could not be reached.
    UpstreamError,
}

/// One observation.
#[derive(Clone, Copy, Debug)]
pub enum Seen<'a> {
    /// A ring-buffer decision, standing for this many (the kernel's event
    /// limiter carries what it held back in the next event).
    Kernel(Verdict, u64),
    /// An audit hit from before the agent's first complete allow set: the
    /// caller may be a pod it did not know yet, so it is not evidence of
    /// what enforce would deny (a cold install's first moment).
    AuditedBeforeSync(u64),
    /// A request through the filter proxy.
    Filter {
        verdict: FilterVerdict,
        method: &'a str,
        path: &'a str,
        /// `v1`, `v2`, or `-` for other clouds.
        imds: &'static str,
    },
}

/// What the report aggregates by.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub namespace: String,
    /// The pod's name (without its namespace), when known.
    pub pod: Option<String>,
    pub container: Option<String>,
    /// The cgroup, when no pod is named (standalone mode, or unattributed).
    pub cgroup: Option<String>,
    pub destination: String,
    /// The hook (`connect4`, ...) or [`FILTER_KIND`].
    pub kind: &'static str,
}

impl Key {
    pub fn new(who: &Attribution, destination: String, kind: &'static str) -> Self {
        let pod = who
            .pod
            .as_deref()
            .map(|p| p.split_once('/').map_or(p, |(_, name)| name).to_owned());
        Self {
            namespace: who.namespace().to_owned(),
            cgroup: (pod.is_none() && !who.cgroup.is_empty()).then(|| who.cgroup.clone()),
            pod,
            container: who.container_field().map(str::to_owned),
            destination,
            kind,
        }
    }
}

/// Counts of one row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Kernel: would have been denied under enforce (audit).
    pub audited: u64,
    /// Kernel: denied.
    pub denied: u64,
    /// Kernel: audit hits from before the agent knew the node's pods (its
    /// first sync after a fresh install); not counted in `audited`.
    #[serde(default)]
    pub audited_before_sync: u64,
    pub filter_allowed: u64,
    pub filter_denied: u64,
    /// Allowed by the filter, but the metadata service failed to answer.
    pub filter_errors: u64,
}

impl Counts {
    fn add(&mut self, seen: &Seen<'_>) {
        let (n, by) = match seen {
            Seen::Kernel(Verdict::Audited, by) => (&mut self.audited, *by),
            Seen::Kernel(Verdict::Denied, by) => (&mut self.denied, *by),
            Seen::AuditedBeforeSync(by) => (&mut self.audited_before_sync, *by),
            Seen::Filter { verdict, .. } => match verdict {
                FilterVerdict::Allowed => (&mut self.filter_allowed, 1),
                FilterVerdict::Denied => (&mut self.filter_denied, 1),
                FilterVerdict::UpstreamError => (&mut self.filter_errors, 1),
            },
        };
        *n += by;
    }

    pub fn merge(&mut self, o: &Counts) {
        self.audited += o.audited;
        self.denied += o.denied;
        self.audited_before_sync += o.audited_before_sync;
        self.filter_allowed += o.filter_allowed;
        self.filter_denied += o.filter_denied;
        self.filter_errors += o.filter_errors;
    }
}

/// One caller's use of one destination through one hook (or the filter).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    /// The agent's node; filled by the agent in node mode, or by the CLI
    /// from the pod it asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub namespace: String,
    pub pod: Option<String>,
    pub container: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    pub destination: String,
    pub kind: String,
    #[serde(flatten)]
    pub counts: Counts,
    /// Filter mode: path (prefixed with the method unless GET) → requests.
    #[serde(default)]
    pub paths: BTreeMap<String, u64>,
    /// Requests whose path did not fit the per-row list.
    #[serde(default)]
    pub paths_dropped: u64,
    /// Filter mode: the IMDS versions seen (`v1`, `v2`, `-`).
    #[serde(default)]
    pub imds: BTreeSet<String>,
    /// Unix seconds.
    pub first_seen: u64,
    pub last_seen: u64,
}

/// `GET /report`'s answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub node: Option<String>,
    /// Unix seconds.
    pub generated_at: u64,
    pub minutes: u32,
    /// The window's start, unix seconds (a whole minute).
    pub since: u64,
    pub rows: Vec<Row>,
    /// Events lost to the store's entry cap since the agent started.
    pub dropped_events: u64,
    /// The kernel's totals since the programs were loaded (allowed
    /// connects are only here).
    pub kernel_counters: Option<Counters>,
    pub note: String,
}

/// The agent's usage store, shared by the reporter, the proxy and the
/// HTTP endpoint. A short lock per event: the reporter already caps how
/// fast events arrive (the ring buffer), the proxy does per request.
#[derive(Debug, Default)]
pub struct Usage {
    window: Mutex<Window>,
    node: OnceLock<String>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Usage {
    /// Names the node in every report (the node agent).
    pub fn set_node(&self, node: String) {
        let _ = self.node.set(node);
    }

    fn record(&self, key: Key, seen: &Seen<'_>) {
        self.window
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(unix_now(), key, seen);
    }

    /// A kernel decision and its owner.
    pub fn decision(&self, d: &Decision, who: &Attribution) {
        let key = Key::new(who, d.destination.to_string(), d.hook.name());
        // A denial is a denial whenever it happened; an audit hit before
        // the first sync only says the agent did not know the pod yet.
        let seen = match d.verdict {
            Verdict::Audited if d.before_sync => Seen::AuditedBeforeSync(d.count()),
            v => Seen::Kernel(v, d.count()),
        };
        self.record(key, &seen);
    }

    /// A filter-proxy request; `destination` is the service it was for
    /// (none when the caller could not be identified).
    pub fn request(
        &self,
        who: &Attribution,
        destination: Option<SocketAddr>,
        verdict: FilterVerdict,
        method: &str,
        path: &str,
        imds: &'static str,
    ) {
        let destination = destination.map_or_else(|| "-".to_owned(), |d| d.to_string());
        let key = Key::new(who, destination, FILTER_KIND);
        let seen = Seen::Filter {
            verdict,
            method,
            path,
            imds,
        };
        self.record(key, &seen);
    }

    /// The last `minutes`, with the kernel's totals when known.
    pub fn report(&self, minutes: u32, kernel_counters: Option<Counters>) -> Report {
        let mut r = self
            .window
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .report(unix_now(), minutes);
        r.node = self.node.get().cloned();
        for row in &mut r.rows {
            row.node.clone_from(&r.node);
        }
        r.kernel_counters = kernel_counters;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_the_pod_and_name_the_cgroup_only_without_one() {
        let who = Attribution {
            cgroup: "/kubepods/x".into(),
            pod: Some("imds/test-1".into()),
            container: Some("app".into()),
            ..Default::default()
        };
        let k = Key::new(&who, "169.254.169.254:80".into(), "connect4");
        assert_eq!(
            (k.namespace.as_str(), k.pod.as_deref(), k.cgroup.as_deref()),
            ("imds", Some("test-1"), None)
        );
        let standalone = Attribution {
            cgroup: "/sys/fs/cgroup/lab/test".into(),
            ..Default::default()
        };
        let k = Key::new(&standalone, "x".into(), "connect6");
        assert_eq!(k.namespace, crate::decisions::UNATTRIBUTED);
        assert_eq!(k.cgroup.as_deref(), Some("/sys/fs/cgroup/lab/test"));
        assert_eq!(k.pod, None);
    }

    #[test]
    fn audit_hits_before_the_first_sync_are_counted_apart_and_denials_are_not() {
        use crate::decisions::tests::event;
        let u = Usage::default();
        let who = Attribution {
            cgroup: "/c".into(),
            pod: Some("ns/p".into()),
            ..Default::default()
        };
        for (verdict, before_sync) in [
            (imdsguard_common::verdict::AUDITED, 1),
            (imdsguard_common::verdict::AUDITED, 0),
            (imdsguard_common::verdict::DENIED, 1),
        ] {
            let mut e = event(80);
            e.verdict = verdict;
            e.before_sync = before_sync;
            e.suppressed = 1;
            let d = Decision::decode(&crate::decisions::tests::bytes(&e)).unwrap();
            u.decision(&d, &who);
        }
        let r = u.report(5, None);
        assert_eq!(r.rows.len(), 1);
        let c = r.rows[0].counts;
        assert_eq!(
            (c.audited, c.audited_before_sync, c.denied),
            (2, 2, 2),
            "each event stands for 1 + suppressed"
        );
    }

    #[test]
    fn the_report_names_the_node_and_round_trips_as_json() {
        let u = Usage::default();
        u.set_node("node-a".into());
        let who = Attribution {
            cgroup: "/c".into(),
            pod: Some("ns/p".into()),
            ..Default::default()
        };
        u.request(
            &who,
            None,
            FilterVerdict::Denied,
            "GET",
            "/latest/user-data",
            "v1",
        );
        let r = u.report(5, Some(Counters::default()));
        assert_eq!(r.rows[0].node.as_deref(), Some("node-a"));
        assert_eq!(r.rows[0].destination, "-");
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"filter_denied\":1"), "{json}");
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
    }
}
