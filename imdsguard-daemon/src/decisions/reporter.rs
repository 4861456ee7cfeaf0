//! Reads the decision ring buffer, counts every decision, and logs (and
//! reports, e.g. as a Kubernetes Event) the first of each key in a window.
//!
//! Two things can make a decision's owner unnameable for a moment, and
//! both are waited out briefly instead of producing a nameless line:
//! - After a restart, the ring buffer's backlog is read before the pod
//!   store has its first full list. Those decisions are held (at most
//!   [`HELD_MAX`], for at most [`SYNC_WAIT`]) and counted and logged once
//!   the store has synced. What overflows the buffer, or outlasts the wait,
//!   is counted at once under the namespace
//!   [`UNATTRIBUTED`](super::UNATTRIBUTED) and logged
//!   with `attribution = "pod store not synced yet"`. Nothing goes
//!   uncounted.
//! - A new pod's first denial can come from a container that the pod's
//!   status does not list yet (kubelet reports it a moment later). The
//!   decision is counted at once (the namespace is known), and its log
//!   line and Event wait up to [`NAME_WAIT`] for the name. After that they
//!   say `container = "(not yet in pod status)"`, with the id in
//!   `container_id`.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tracing::{error, info, warn};

use super::{Attribution, Attributor, Decision, Summarizer, Verdict};
use crate::bpf::hook::Hook;
use crate::metrics::{DecisionLabels, Metrics};

/// How long decisions wait for the attributor's first sync (the node
/// agent's pod store) before they are counted unattributed. A relist takes
/// well under a second on a working API server; this covers a slow one.
pub const SYNC_WAIT: Duration = Duration::from_secs(30);
/// At most this many decisions wait for the first sync; more are counted
/// at once, unattributed. Bounds memory under a flood at start.
pub const HELD_MAX: usize = 4096;
/// How long a log line and Event wait for the pod's status to list the
/// container that made the decision (kubelet reports a started container
/// within a couple of seconds).
pub const NAME_WAIT: Duration = Duration::from_secs(10);
/// At most this many log lines wait for a container name at once.
const NAMING_MAX: usize = 256;
/// How often waiting decisions are looked at again.
const RETRY_EVERY: Duration = Duration::from_millis(200);
/// The summariser's window, and how long an attribution is cached.
const WINDOW: Duration = Duration::from_secs(10);

/// The synchronous core of [`report`]: what to count, log and report for
/// each decision, and when. Time is passed in, so tests drive it.
pub struct Reporter<A> {
    attributor: A,
    metrics: Option<Arc<Metrics>>,
    summarizer: Summarizer,
    /// Attribution is cached for the window: a flood from one cgroup costs
    /// one lookup, not one per event.
    who_cache: HashMap<u64, Attribution>,
    started: Instant,
    /// Decisions read before the first sync, in arrival order.
    held: VecDeque<Decision>,
    /// Log lines waiting for a container name, with when they first tried.
    naming: VecDeque<(Decision, Instant)>,
}

impl<A: Attributor> Reporter<A> {
    pub fn new(attributor: A, metrics: Option<Arc<Metrics>>, now: Instant) -> Self {
        Self {
            attributor,
            metrics,
            summarizer: Summarizer::new(WINDOW, now),
            who_cache: HashMap::new(),
            started: now,
            held: VecDeque::new(),
            naming: VecDeque::new(),
        }
    }

    fn may_hold(&self, now: Instant) -> bool {
        !self.attributor.synced() && now.duration_since(self.started) < SYNC_WAIT
    }

    /// One decision from the ring buffer.
    pub fn on_event(&mut self, d: Decision, now: Instant) {
        if self.may_hold(now) {
            if self.held.len() < HELD_MAX {
                self.held.push_back(d);
                return;
            }
            if let Some(m) = &self.metrics {
                m.decisions_held_overflow.inc_by(d.count());
            }
        }
        self.account(d, now);
    }

    /// Counts `d` and logs it if it is the first of its key in the window.
    fn account(&mut self, d: Decision, now: Instant) {
        let who = self.who(d.cgroup_id);
        if let Some(m) = &self.metrics {
            m.decisions
                .get_or_create(&DecisionLabels {
                    verdict: d.verdict.to_string(),
                    namespace: who.namespace().into(),
                    destination: d.destination.to_string(),
                })
                .inc_by(d.count());
            m.usage.decision(&d, &who);
        }
        if self.summarizer.observe(&d) {
            if who.awaits_container_name() && self.naming.len() < NAMING_MAX {
                self.naming.push_back((d, now));
            } else {
                self.emit(&d, &who);
            }
        }
    }

    fn who(&mut self, cgroup_id: u64) -> Attribution {
        if let Some(who) = self.who_cache.get(&cgroup_id) {
            return who.clone();
        }
        let who = self.attributor.attribute(cgroup_id);
        // What may change within moments is looked up again next time.
        if self.attributor.synced() && !who.awaits_container_name() {
            self.who_cache.insert(cgroup_id, who.clone());
        }
        who
    }

    fn emit(&mut self, d: &Decision, who: &Attribution) {
        log_decision(d, who);
        self.attributor.reported(d, who);
    }

    /// Whether anything waits for [`Self::retry`]: an idle agent then does
    /// not wake up for it.
    pub fn waiting(&self) -> bool {
        !self.held.is_empty() || !self.naming.is_empty()
    }

    /// Releases what waited: held decisions once the store has synced (or
    /// the wait is over), log lines once the container has a name (or the
    /// wait is over).
    pub fn retry(&mut self, now: Instant) {
        if !self.held.is_empty() && !self.may_hold(now) {
            for d in std::mem::take(&mut self.held) {
                self.account(d, now);
            }
        }
        for (d, since) in std::mem::take(&mut self.naming) {
            let who = self.attributor.attribute(d.cgroup_id);
            if !who.awaits_container_name() || now.duration_since(since) >= NAME_WAIT {
                self.emit(&d, &who);
            } else {
                self.naming.push_back((d, since));
            }
        }
    }

    /// Closes the summariser's window when it is over and logs the repeats.
    pub fn flush(&mut self, now: Instant) {
        self.who_cache.clear();
        for s in self.summarizer.flush(now) {
            match s.key {
                Some(k) => {
                    let who = self.attributor.attribute(k.cgroup_id);
                    info!(
                        cgroup_id = k.cgroup_id,
                        cgroup = %who.cgroup,
                        pod = who.pod.as_deref(),
                        attribution = who.unattributed,
                        destination = %k.destination,
                        verdict = %k.verdict,
                        hook = k.hook.name(),
                        address_form = k.address_form.name(),
                        repeats = s.suppressed,
                        "repeated metadata access (summarised)"
                    );
                }
                None => warn!(
                    repeats = s.suppressed,
                    "metadata access from too many distinct sources to list (summarised)"
                ),
            }
        }
    }
}

/// Reads decision events until the task is dropped and logs them,
/// summarising repeats.
pub async fn report(
    ring: RingBuf<MapData>,
    attributor: impl Attributor,
    metrics: Option<Arc<Metrics>>,
) {
    // SAFETY: the RingBuf owns its map fd for its whole life and always
    // returns that same fd from as_raw_fd().
    let mut fd = match unsafe { AsyncFd::register(ring) } {
        Ok(fd) => fd,
        Err(e) => {
            error!(error = %e, "cannot poll the event ring buffer; decisions will only be counted");
            return;
        }
    };
    let mut reporter = Reporter::new(attributor, metrics, Instant::now());
    let mut flush = tokio::time::interval(WINDOW);
    let mut retry = tokio::time::interval(RETRY_EVERY);
    // The retry tick runs only while something waits (an idle agent would
    // otherwise wake five times a second for nothing); after a pause it
    // fires once, not once per missed period.
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            guard = fd.readable_mut() => {
                let Ok(mut guard) = guard else { return };
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    if let Some(d) = Decision::decode(&item) {
                        reporter.on_event(d, Instant::now());
                    }
                }
                guard.clear_ready();
            }
            _ = retry.tick(), if reporter.waiting() => reporter.retry(Instant::now()),
            _ = flush.tick() => reporter.flush(Instant::now()),
        }
    }
}

fn log_decision(d: &Decision, who: &Attribution) {
    let (pod, container, container_id, attribution) = (
        who.pod.as_deref(),
        who.container_field(),
        who.container_id.as_deref(),
        who.unattributed,
    );
    match d.verdict {
        Verdict::Denied if d.hook == Hook::SockCreate => warn!(
            verdict = %d.verdict, cgroup_id = d.cgroup_id, cgroup = %who.cgroup, pod, container, container_id, attribution,
            pid = d.tgid, tid = d.pid, comm = %d.comm, hook = d.hook.name(),
            "raw socket denied"
        ),
        Verdict::Audited if d.hook == Hook::SockCreate => info!(
            verdict = %d.verdict, cgroup_id = d.cgroup_id, cgroup = %who.cgroup, pod, container, container_id, attribution,
            pid = d.tgid, tid = d.pid, comm = %d.comm, hook = d.hook.name(),
            "raw socket would be denied (audit)"
        ),
        Verdict::Denied => warn!(
            verdict = %d.verdict, cgroup_id = d.cgroup_id, cgroup = %who.cgroup, pod, container, container_id, attribution,
            pid = d.tgid, tid = d.pid, comm = %d.comm, destination = %d.destination, protocol = d.protocol.name(),
            hook = d.hook.name(), address_form = d.address_form.name(), decided_by = d.decided_by.name(),
            "metadata access denied"
        ),
        Verdict::Audited => info!(
            verdict = %d.verdict, cgroup_id = d.cgroup_id, cgroup = %who.cgroup, pod, container, container_id, attribution,
            pid = d.tgid, tid = d.pid, comm = %d.comm, destination = %d.destination, protocol = d.protocol.name(),
            hook = d.hook.name(), address_form = d.address_form.name(), decided_by = d.decided_by.name(),
            "metadata access would be denied (audit)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::decisions::{
        UNATTRIBUTED,
        tests::{bytes, event},
    };

    const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// A pod store that syncs, and a pod status that names its container,
    /// when the test says so.
    #[derive(Clone, Default)]
    struct Fake(Arc<Mutex<FakeState>>);

    #[derive(Default)]
    struct FakeState {
        synced: bool,
        container_listed: bool,
        reported: Vec<(u64, Attribution)>,
    }

    impl Attributor for Fake {
        fn attribute(&mut self, cgroup_id: u64) -> Attribution {
            let s = self.0.lock().unwrap();
            let mut who = Attribution {
                cgroup: format!("/kubepods/pod{cgroup_id}/{CID}"),
                container_id: Some(CID.into()),
                ..Default::default()
            };
            if !s.synced {
                who.unattributed = Some("pod store not synced yet");
                return who;
            }
            who.pod = Some("imds/test-1".into());
            who.container = s.container_listed.then(|| "app".into());
            who
        }
        fn synced(&self) -> bool {
            self.0.lock().unwrap().synced
        }
        fn reported(&mut self, d: &Decision, who: &Attribution) {
            self.0
                .lock()
                .unwrap()
                .reported
                .push((d.cgroup_id, who.clone()));
        }
    }

    impl Fake {
        fn set(&self, f: impl FnOnce(&mut FakeState)) {
            f(&mut self.0.lock().unwrap());
        }
        fn reported(&self) -> Vec<(u64, Attribution)> {
            self.0.lock().unwrap().reported.clone()
        }
    }

    fn decision(cgroup_id: u64, port: u32) -> Decision {
        let mut e = event(port);
        e.cgroup_id = cgroup_id;
        Decision::decode(&bytes(&e)).unwrap()
    }

    /// `imdsguard_decisions_total` by namespace, for 169.254.169.254.
    fn counted(m: &Metrics, namespace: &str) -> u64 {
        m.decisions
            .get_or_create(&DecisionLabels {
                verdict: "denied".into(),
                namespace: namespace.into(),
                destination: "169.254.169.254:80".into(),
            })
            .get()
    }

    fn setup(synced: bool) -> (Fake, Arc<Metrics>, Reporter<Fake>, Instant) {
        let fake = Fake::default();
        fake.set(|s| {
            s.synced = synced;
            s.container_listed = true;
        });
        let metrics = Arc::new(Metrics::new());
        let t0 = Instant::now();
        let r = Reporter::new(fake.clone(), Some(metrics.clone()), t0);
        (fake, metrics, r, t0)
    }

    #[test]
    fn the_backlog_before_the_first_sync_is_attributed_after_it() {
        let (fake, m, mut r, t0) = setup(false);
        assert!(!r.waiting(), "nothing to retry: no wake-ups");
        for _ in 0..3 {
            r.on_event(decision(7, 80), t0);
        }
        assert!(r.waiting());
        r.retry(t0 + Duration::from_secs(1));
        assert!(fake.reported().is_empty(), "nothing before the sync");
        assert_eq!(counted(&m, ""), 0);
        assert_eq!(counted(&m, UNATTRIBUTED), 0);
        fake.set(|s| s.synced = true);
        r.retry(t0 + Duration::from_secs(2));
        assert!(!r.waiting(), "released");
        assert_eq!(counted(&m, "imds"), 3);
        assert_eq!(counted(&m, UNATTRIBUTED), 0);
        let reported = fake.reported();
        assert_eq!(reported.len(), 1, "first of the window only");
        assert_eq!(reported[0].1.pod.as_deref(), Some("imds/test-1"));
        assert_eq!(reported[0].1.unattributed, None);
    }

    #[test]
    fn what_overflows_or_outwaits_the_hold_is_counted_unattributed() {
        let (fake, m, mut r, t0) = setup(false);
        for _ in 0..HELD_MAX + 5 {
            r.on_event(decision(7, 80), t0);
        }
        // The overflow is counted at once, with an explicit label.
        assert_eq!(counted(&m, UNATTRIBUTED), 5);
        assert_eq!(m.decisions_held_overflow.get(), 5);
        assert_eq!(fake.reported().len(), 1);
        assert_eq!(
            fake.reported()[0].1.unattributed,
            Some("pod store not synced yet")
        );
        // The store never syncs: after SYNC_WAIT the held ones count too.
        r.retry(t0 + SYNC_WAIT);
        assert_eq!(counted(&m, UNATTRIBUTED), HELD_MAX as u64 + 5);
        assert_eq!(counted(&m, ""), 0);
        // Later decisions are not held any more.
        r.on_event(decision(8, 80), t0 + SYNC_WAIT);
        assert_eq!(counted(&m, UNATTRIBUTED), HELD_MAX as u64 + 6);
        // Once synced, the same cgroup is named (nothing stale was cached).
        fake.set(|s| s.synced = true);
        r.on_event(decision(8, 80), t0 + SYNC_WAIT);
        assert_eq!(counted(&m, "imds"), 1);
    }

    #[test]
    fn a_container_not_yet_in_the_pod_status_is_named_when_it_is() {
        let (fake, m, mut r, t0) = setup(true);
        fake.set(|s| s.container_listed = false);
        r.on_event(decision(7, 80), t0);
        // Counted at once: the namespace is known.
        assert_eq!(counted(&m, "imds"), 1);
        r.retry(t0 + Duration::from_secs(1));
        assert!(fake.reported().is_empty(), "the line waits for the name");
        assert!(r.waiting());
        fake.set(|s| s.container_listed = true);
        r.retry(t0 + Duration::from_secs(2));
        assert!(!r.waiting());
        let reported = fake.reported();
        assert_eq!(reported.len(), 1);
        assert_eq!(reported[0].1.container.as_deref(), Some("app"));
        assert_eq!(reported[0].1.container_id.as_deref(), Some(CID));
    }

    #[test]
    fn a_container_never_listed_is_reported_by_id_after_the_wait() {
        let (fake, _m, mut r, t0) = setup(true);
        fake.set(|s| s.container_listed = false);
        r.on_event(decision(7, 80), t0);
        r.retry(t0 + NAME_WAIT - Duration::from_millis(1));
        assert!(fake.reported().is_empty());
        r.retry(t0 + NAME_WAIT);
        let reported = fake.reported();
        assert_eq!(reported.len(), 1);
        let who = &reported[0].1;
        assert_eq!(who.container, None);
        assert_eq!(who.container_field(), Some("(not yet in pod status)"));
        assert_eq!(who.container_id.as_deref(), Some(CID));
    }
}
