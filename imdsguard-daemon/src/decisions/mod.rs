//! Decision events from the kernel: decoding, and logging that stays
//! readable under a flood.
//!
//! The first event of each (cgroup, destination, verdict) in a window is
//! logged at once; repeats are counted and summarised when the window
//! closes. Memory is bounded by `MAX_KEYS`; past it, repeats are counted in
//! one overflow bucket. [`reporter`] reads the ring buffer and names the
//! owners.

pub mod reporter;

pub use reporter::{Reporter, report};

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use imdsguard_common::{Event, addr_form, cause, verdict};
use serde::Serialize;

use crate::{
    bpf::hook::Hook,
    destinations::addr_of_words,
    vocabulary::{Protocol, kernel_enum},
};

kernel_enum! {
    /// What the kernel did about a judged operation.
    pub enum Verdict("verdict") {
        Denied = verdict::DENIED => "denied",
        Audited = verdict::AUDITED => "audited",
    }
}

kernel_enum! {
    /// Whose action decided a verdict.
    pub enum Cause("cause") {
        /// The calling task's cgroup, which the event's `cgroup_id` names.
        Caller = cause::CALLER => "caller",
        /// The cgroup that created the socket, judged more strictly (a
        /// socket passed over SCM_RIGHTS, say).
        Creator = cause::CREATOR => "socket-creator",
        /// The caller is filtered, and this operation cannot go through
        /// the proxy (another port, UDP, no proxy for the family).
        NotFilterable = cause::NOT_FILTERABLE => "not-filterable",
    }
}

/// How the caller wrote the destination, when an IPv6 address embeds an
/// IPv4 one. Unlike the other kernel values this one has an `Unknown`
/// variant, not a fallible conversion: a newer kernel object may learn a
/// new form, and its verdict is still worth reporting (the form only keeps
/// summaries apart), where an unknown hook or verdict means an event this
/// build cannot read at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddressForm {
    Plain,
    /// `::ffff:a.b.c.d`
    V4Mapped,
    /// `::a.b.c.d`
    V4Compat,
    /// `64:ff9b::a.b.c.d`
    Nat64,
    Unknown(u32),
}

impl AddressForm {
    pub const fn name(self) -> &'static str {
        match self {
            AddressForm::Plain => "plain",
            AddressForm::V4Mapped => "ipv4-mapped",
            AddressForm::V4Compat => "ipv4-compatible",
            AddressForm::Nat64 => "nat64",
            AddressForm::Unknown(_) => "unknown",
        }
    }
}

impl From<u32> for AddressForm {
    fn from(value: u32) -> Self {
        match value {
            addr_form::PLAIN => AddressForm::Plain,
            addr_form::V4_MAPPED => AddressForm::V4Mapped,
            addr_form::V4_COMPAT => AddressForm::V4Compat,
            addr_form::NAT64 => AddressForm::Nat64,
            other => AddressForm::Unknown(other),
        }
    }
}

impl fmt::Display for AddressForm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

impl Serialize for AddressForm {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// The protocol of an event: TCP or UDP, or neither (`other`) for a
/// socket that is neither, such as a raw socket's socket().
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EventProtocol(pub Option<Protocol>);

impl EventProtocol {
    pub const fn name(self) -> &'static str {
        match self.0 {
            Some(p) => p.name(),
            None => "other",
        }
    }
}

impl fmt::Display for EventProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

impl Serialize for EventProtocol {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// A decoded ring-buffer event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub cgroup_id: u64,
    pub tgid: u32,
    pub pid: u32,
    pub comm: String,
    pub destination: SocketAddr,
    pub protocol: EventProtocol,
    pub hook: Hook,
    pub verdict: Verdict,
    /// How the caller wrote an IPv4 destination on an IPv6 socket, if it did.
    pub address_form: AddressForm,
    /// Whose action decided: the calling task's cgroup, which `cgroup_id`
    /// names, or the socket's creator.
    pub decided_by: Cause,
    /// Identical decisions the kernel counted but did not report since the
    /// last one (its per-CPU event limiter): this one stands for
    /// `1 + suppressed`.
    pub suppressed: u32,
    /// No complete allow set had been written yet: the caller may be a pod
    /// the agent did not know yet (a cold install's first moment).
    pub before_sync: bool,
}

impl Decision {
    /// How many decisions this record stands for.
    pub fn count(&self) -> u64 {
        1 + u64::from(self.suppressed)
    }
}

impl Decision {
    /// Decodes one ring-buffer record; None for a record of the wrong size
    /// or with values this build does not know.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < size_of::<Event>() {
            return None;
        }
        // SAFETY: Event is repr(C) plain integers; any bit pattern is valid,
        // and read_unaligned copes with the ring buffer's 8-byte alignment.
        let e: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let v6 = addr_of_words(e.addr);
        let ip = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
        let comm_len = e.comm.iter().position(|&b| b == 0).unwrap_or(e.comm.len());
        Some(Self {
            cgroup_id: e.cgroup_id,
            tgid: (e.pid_tgid >> 32) as u32,
            pid: e.pid_tgid as u32,
            comm: String::from_utf8_lossy(&e.comm[..comm_len]).into_owned(),
            destination: SocketAddr::new(ip, e.port as u16),
            protocol: EventProtocol(Protocol::try_from(e.proto).ok()),
            hook: Hook::try_from(e.hook).ok()?,
            verdict: Verdict::try_from(e.verdict).ok()?,
            address_form: AddressForm::from(e.addr_form),
            decided_by: Cause::try_from(e.cause).ok()?,
            suppressed: e.suppressed,
            before_sync: e.before_sync != 0,
        })
    }
}

/// Rate limiter for decision logs.
#[derive(Debug)]
pub struct Summarizer {
    window: Duration,
    window_start: Instant,
    repeats: HashMap<SummaryKey, u64>,
    overflow: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SummaryKey {
    pub cgroup_id: u64,
    pub destination: SocketAddr,
    pub verdict: Verdict,
    /// Kept apart so that a new way of writing the same destination (a
    /// bypass attempt through an IPv6 socket, say) is logged, not folded.
    pub hook: Hook,
    pub address_form: AddressForm,
}

/// A closed window's repeats for one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub key: Option<SummaryKey>,
    pub suppressed: u64,
}

const MAX_KEYS: usize = 4096;

impl Summarizer {
    pub fn new(window: Duration, now: Instant) -> Self {
        Self {
            window,
            window_start: now,
            repeats: HashMap::new(),
            overflow: 0,
        }
    }

    /// Whether to log this decision now (the first of its key in the window).
    pub fn observe(&mut self, d: &Decision) -> bool {
        let key = SummaryKey {
            cgroup_id: d.cgroup_id,
            destination: d.destination,
            verdict: d.verdict,
            hook: d.hook,
            address_form: d.address_form,
        };
        // What the kernel's limiter held back counts as repeats too.
        let held_back = u64::from(d.suppressed);
        if let Some(n) = self.repeats.get_mut(&key) {
            *n += 1 + held_back;
            return false;
        }
        if self.repeats.len() >= MAX_KEYS {
            self.overflow += 1 + held_back;
            return false;
        }
        self.repeats.insert(key, held_back);
        true
    }

    /// Closes the window if it has elapsed and returns the suppressed counts.
    pub fn flush(&mut self, now: Instant) -> Vec<Summary> {
        if now.duration_since(self.window_start) < self.window {
            return Vec::new();
        }
        self.window_start = now;
        let mut out: Vec<Summary> = self
            .repeats
            .drain()
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| Summary {
                key: Some(k),
                suppressed: n,
            })
            .collect();
        if self.overflow > 0 {
            out.push(Summary {
                key: None,
                suppressed: std::mem::take(&mut self.overflow),
            });
        }
        out
    }
}

/// Who a cgroup id belongs to, for logs and Kubernetes Events.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attribution {
    pub cgroup: String,
    /// `namespace/name`, in Kubernetes mode.
    pub pod: Option<String>,
    /// The container's name, once the pod's status lists it.
    pub container: Option<String>,
    /// The container id from the cgroup's name (64 hex digits).
    pub container_id: Option<String>,
    /// Why no pod is named, in Kubernetes mode (e.g. the pod store has not
    /// synced yet); goes into the log line's `attribution` field.
    pub unattributed: Option<&'static str>,
}

/// The namespace label of a decision whose pod could not be named: explicit,
/// so that such decisions are counted under a name nobody mistakes for a
/// namespace (Kubernetes names cannot hold parentheses).
pub const UNATTRIBUTED: &str = "(unattributed)";

/// What the `container` field says of a container that the pod's status
/// does not list (yet); `container_id` then carries the id.
pub const CONTAINER_NOT_IN_STATUS: &str = "(not yet in pod status)";

impl Attribution {
    /// The namespace for metrics: the pod's, or [`UNATTRIBUTED`].
    pub fn namespace(&self) -> &str {
        self.pod
            .as_deref()
            .and_then(|p| p.split_once('/'))
            .map_or(UNATTRIBUTED, |(ns, _)| ns)
    }

    /// The pod is known and its container id too, but the pod's status
    /// does not name that container yet: a look a moment later may.
    pub fn awaits_container_name(&self) -> bool {
        self.pod.is_some() && self.container_id.is_some() && self.container.is_none()
    }

    /// The `container` field of a log line.
    pub fn container_field(&self) -> Option<&str> {
        self.container.as_deref().or(self
            .container_id
            .is_some()
            .then_some(CONTAINER_NOT_IN_STATUS))
    }
}

/// Maps cgroup ids to owners, and hears about each decision that is logged.
pub trait Attributor: Send + 'static {
    fn attribute(&mut self, cgroup_id: u64) -> Attribution;
    /// Whether owners can be named yet. A node agent cannot before its pod
    /// store has its first full list; decisions wait for that (a while).
    fn synced(&self) -> bool {
        true
    }
    /// Called for the first decision of a key in each window (the ones
    /// that are logged), e.g. to emit a Kubernetes Event.
    fn reported(&mut self, _decision: &Decision, _who: &Attribution) {}
    /// Called for each connection a revocation sweep closed.
    fn revoked(&mut self, _revoked: &crate::revoke::sweep::Revoked, _who: &Attribution) {}
}

#[cfg(test)]
pub(crate) mod tests {
    use imdsguard_common::{PROTO_ANY, PROTO_TCP, hook};

    use super::*;
    use crate::destinations::words_of;

    pub(crate) fn event(port: u32) -> Event {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        Event {
            cgroup_id: 42,
            pid_tgid: (7u64 << 32) | 8,
            addr: words_of(
                &"169.254.169.254"
                    .parse::<std::net::Ipv4Addr>()
                    .unwrap()
                    .to_ipv6_mapped(),
            ),
            comm,
            port,
            proto: PROTO_TCP as u32,
            hook: hook::CONNECT6,
            verdict: verdict::DENIED,
            addr_form: addr_form::V4_MAPPED,
            cause: cause::CALLER,
            suppressed: 0,
            before_sync: 0,
        }
    }

    pub(crate) fn bytes(e: &Event) -> Vec<u8> {
        // SAFETY: Event is repr(C) plain data.
        unsafe { std::slice::from_raw_parts((e as *const Event).cast::<u8>(), size_of::<Event>()) }
            .to_vec()
    }

    #[test]
    fn decodes_every_field() {
        let d = Decision::decode(&bytes(&Event {
            suppressed: 3,
            ..event(80)
        }))
        .unwrap();
        assert_eq!(d.cgroup_id, 42);
        assert_eq!((d.tgid, d.pid), (7, 8));
        assert_eq!(d.comm, "curl");
        assert_eq!(d.destination, "169.254.169.254:80".parse().unwrap());
        // The kernel's limiter held back 3: this record stands for 4.
        assert_eq!((d.suppressed, d.count()), (3, 4));
        assert_eq!(
            (d.protocol, d.hook, d.verdict, d.address_form, d.decided_by),
            (
                EventProtocol(Some(Protocol::Tcp)),
                Hook::Connect6,
                Verdict::Denied,
                AddressForm::V4Mapped,
                Cause::Caller
            )
        );
        // The names logs and metrics labels carry.
        assert_eq!(
            [d.protocol.name(), d.hook.name(), d.verdict.name()],
            ["tcp", "connect6", "denied"]
        );
        assert_eq!(
            [d.address_form.name(), d.decided_by.name()],
            ["ipv4-mapped", "caller"]
        );
        assert!(Decision::decode(&bytes(&event(80))[..10]).is_none());
    }

    #[test]
    fn unknown_values_fail_or_are_named_unknown() {
        let mut e = event(80);
        e.proto = PROTO_ANY as u32;
        e.addr_form = 99;
        let d = Decision::decode(&bytes(&e)).unwrap();
        assert_eq!(d.protocol.to_string(), "other");
        assert_eq!(d.address_form, AddressForm::Unknown(99));
        assert_eq!(d.address_form.to_string(), "unknown");
        for field in [
            |e: &mut Event| e.hook = 99,
            |e: &mut Event| e.verdict = 99,
            |e: &mut Event| e.cause = 99,
        ] {
            let mut e = event(80);
            field(&mut e);
            assert!(Decision::decode(&bytes(&e)).is_none());
        }
    }

    #[test]
    fn what_the_kernel_held_back_counts_as_repeats() {
        let mut s = Summarizer::new(Duration::from_secs(10), Instant::now());
        let held = |n| {
            Decision::decode(&bytes(&Event {
                suppressed: n,
                ..event(80)
            }))
            .unwrap()
        };
        assert!(s.observe(&held(2)), "the first of its key is logged");
        assert!(!s.observe(&held(5)));
        let out = s.flush(Instant::now() + Duration::from_secs(11));
        // 2 held back before the first, then the second and its 5.
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].suppressed, 2 + 1 + 5);
    }

    #[test]
    fn repeats_are_summarised_per_window() {
        let t0 = Instant::now();
        let mut s = Summarizer::new(Duration::from_secs(10), t0);
        let a = Decision::decode(&bytes(&event(80))).unwrap();
        let b = Decision::decode(&bytes(&event(81))).unwrap();
        assert!(s.observe(&a));
        for _ in 0..1000 {
            assert!(!s.observe(&a));
        }
        assert!(s.observe(&b));
        assert!(
            s.flush(t0 + Duration::from_secs(1)).is_empty(),
            "window not over yet"
        );
        let out = s.flush(t0 + Duration::from_secs(10));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].suppressed, 1000);
        // A new window logs the first event again.
        assert!(s.observe(&a));
    }

    #[test]
    fn distinct_keys_are_bounded() {
        let t0 = Instant::now();
        let mut s = Summarizer::new(Duration::from_secs(1), t0);
        let mut logged = 0;
        for port in 0..(MAX_KEYS as u32 + 100) {
            if s.observe(&Decision::decode(&bytes(&event(port))).unwrap()) {
                logged += 1;
            }
        }
        assert_eq!(logged, MAX_KEYS);
        let out = s.flush(t0 + Duration::from_secs(1));
        assert_eq!(
            out,
            vec![Summary {
                key: None,
                suppressed: 100
            }]
        );
    }
}
