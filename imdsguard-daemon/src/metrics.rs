//! Prometheus metrics (OpenMetrics text) and the health state behind
//! `/healthz` and `/readyz`.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU32, Ordering},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::enforcer::Counters;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub verdict: String,
    pub namespace: String,
    pub destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    pub verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchLabels {
    pub watch: String,
}

pub struct Metrics {
    registry: Registry,
    /// Reported decisions (ring-buffer events) by verdict, namespace and
    /// destination. A decision whose pod cannot be named is counted under
    /// the namespace `(unattributed)`. Events dropped by a full ring buffer
    /// are not here; the kernel counters below are exact.
    pub decisions: Family<DecisionLabels, Counter>,
    /// Decisions read before the pod store's first sync that did not fit
    /// the hold buffer, so were counted unattributed at once.
    pub decisions_held_overflow: Counter,
    /// The kernel's per-CPU verdict counters, summed at scrape time.
    pub kernel_verdicts: Family<VerdictLabels, Gauge>,
    pub ringbuf_dropped: Gauge,
    pub allow_map_entries: Gauge,
    pub protected_prefixes: Gauge,
    pub reconcile_duration: Histogram,
    pub watch_errors: Family<WatchLabels, Counter>,
    pub policy_reload_failures: Counter,
    /// Number of our hooks attached; drops below the wanted count (to 0)
    /// when someone detaches our programs.
    pub programs_attached: Gauge,
    /// Open connections to protected destinations closed because their
    /// owner lost its allow (or never had one, at first attach).
    pub connections_revoked: Counter,
    /// Revocation sweeps that hit an error (the rest of the sweep ran).
    pub revocation_errors: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("imdsguard");
        let m = Self {
            decisions: Family::default(),
            decisions_held_overflow: Counter::default(),
            kernel_verdicts: Family::default(),
            ringbuf_dropped: Gauge::default(),
            allow_map_entries: Gauge::default(),
            protected_prefixes: Gauge::default(),
            // 50 µs .. ~0.8 s
            reconcile_duration: Histogram::new([
                0.00005, 0.0002, 0.001, 0.005, 0.02, 0.1, 0.4, 0.8,
            ]),
            watch_errors: Family::default(),
            policy_reload_failures: Counter::default(),
            programs_attached: Gauge::default(),
            connections_revoked: Counter::default(),
            revocation_errors: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "decisions",
            "Reported metadata-access decisions",
            m.decisions.clone(),
        );
        registry.register(
            "decisions_held_overflow",
            "Decisions read before the pod store synced that overflowed the hold buffer and were counted unattributed",
            m.decisions_held_overflow.clone(),
        );
        registry.register(
            "kernel_verdicts",
            "Kernel verdict counters on protected destinations",
            m.kernel_verdicts.clone(),
        );
        registry.register(
            "ringbuf_dropped",
            "Decision events lost because the ring buffer was full",
            m.ringbuf_dropped.clone(),
        );
        registry.register(
            "allow_map_entries",
            "Entries in the allowed-cgroup map",
            m.allow_map_entries.clone(),
        );
        registry.register(
            "protected_prefixes",
            "Protected destination prefixes",
            m.protected_prefixes.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time to recompute and write the allow map",
            m.reconcile_duration.clone(),
        );
        registry.register(
            "watch_errors",
            "Kubernetes watch errors (retried with backoff)",
            m.watch_errors.clone(),
        );
        registry.register(
            "policy_reload_failures",
            "Policy reloads refused (last good policy kept)",
            m.policy_reload_failures.clone(),
        );
        registry.register(
            "connections_revoked",
            "Open connections to protected destinations closed after an allow was lost",
            m.connections_revoked.clone(),
        );
        registry.register(
            "revocation_errors",
            "Revocation sweeps that could not do everything",
            m.revocation_errors.clone(),
        );
        registry.register(
            "programs_attached",
            "imdsguard hooks attached to the cgroup root",
            m.programs_attached.clone(),
        );
        Self { registry, ..m }
    }

    pub fn set_kernel_counters(&self, c: &Counters) {
        for (verdict, n) in [
            ("allowed", c.allowed),
            ("denied", c.denied),
            ("audited", c.audited),
        ] {
            self.kernel_verdicts
                .get_or_create(&VerdictLabels {
                    verdict: verdict.into(),
                })
                .set(n as i64);
        }
        self.ringbuf_dropped.set(c.events_dropped as i64);
    }

    /// OpenMetrics text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// What `/healthz` and `/readyz` report.
#[derive(Debug, Default)]
pub struct Health {
    wanted_hooks: AtomicU32,
    attached_hooks: AtomicU32,
    first_sync_done: AtomicBool,
}

impl Health {
    pub fn new(wanted_hooks: u32) -> Arc<Self> {
        Arc::new(Self {
            wanted_hooks: AtomicU32::new(wanted_hooks),
            ..Default::default()
        })
    }
    pub fn set_attached(&self, n: u32) {
        self.attached_hooks.store(n, Ordering::Relaxed);
    }
    pub fn set_synced(&self) {
        self.first_sync_done.store(true, Ordering::Relaxed);
    }
    /// Ready once every hook is attached and the first full sync is done.
    pub fn ready(&self) -> bool {
        self.first_sync_done.load(Ordering::Relaxed)
            && self.attached_hooks.load(Ordering::Relaxed)
                == self.wanted_hooks.load(Ordering::Relaxed)
    }
}
