//! Prometheus metrics (OpenMetrics text) and the health state behind
//! `/healthz` and `/readyz`.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, AtomicU32, Ordering},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::Histogram,
    },
    registry::Registry,
};

use crate::bpf::enforcer::Counters;

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

/// A filter-mode proxied request: the pod (`namespace/name`, or
/// `(unattributed)`) and the verdict (`allowed`, `denied`, `upstream_error`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FilterLabels {
    pub pod: String,
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
    /// The kernel's own counters, exposed by [`KernelCounters`].
    kernel: Arc<KernelCounters>,
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
    /// Requests through the filter-mode proxy, by pod and verdict.
    pub filter_requests: Family<FilterLabels, Counter>,
    /// Per-caller usage over the last hour, behind `/report` (not in the
    /// registry: its labels would be unbounded). Here because everything
    /// that counts decisions and requests already holds the metrics.
    pub usage: Arc<crate::usage::Usage>,
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
            kernel: Arc::default(),
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
            filter_requests: Family::default(),
            usage: Arc::default(),
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
        registry.register_collector(Box::new(m.kernel.clone()));
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
            "filter_requests",
            "Requests through the filter-mode metadata proxy, by pod and verdict",
            m.filter_requests.clone(),
        );
        registry.register(
            "programs_attached",
            "imdsguard hooks attached to the cgroup root",
            m.programs_attached.clone(),
        );
        Self { registry, ..m }
    }

    /// The kernel's totals as just read; the next render reports them.
    pub fn set_kernel_counters(&self, c: &Counters) {
        self.kernel.set(c);
    }

    /// OpenMetrics text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The kernel's per-CPU counters (summed across CPUs) as OpenMetrics
/// counters: `imdsguard_kernel_verdicts_total{verdict}` and
/// `imdsguard_ringbuf_dropped_total`.
///
/// The totals live in a BPF map, not in a prometheus-client `Counter` that
/// we would have to keep in step: the scrape handler reads them (an async
/// call to the task owning the map, which `Collector::encode` cannot make)
/// and stores them here just before rendering. Until the first read they
/// are left out, rather than reported as made-up zeros.
#[derive(Debug, Default)]
struct KernelCounters {
    last: Mutex<Option<Counters>>,
}

impl KernelCounters {
    fn set(&self, c: &Counters) {
        // A panic elsewhere while holding the lock cannot leave a torn
        // `Counters` (it is `Copy`), so a poisoned lock is still usable.
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(*c);
    }

    fn get(&self) -> Option<Counters> {
        *self.last.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Collector for KernelCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Like an empty `Family`, which the registry leaves out entirely.
        let Some(c) = self.get() else {
            return Ok(());
        };
        // Help texts end with a period, as `Registry::register` writes them.
        let mut verdicts = encoder.encode_descriptor(
            "kernel_verdicts",
            "Kernel verdict counters on protected destinations.",
            None,
            MetricType::Counter,
        )?;
        for (verdict, n) in [
            ("allowed", c.allowed),
            ("denied", c.denied),
            ("audited", c.audited),
        ] {
            let labels = VerdictLabels {
                verdict: verdict.into(),
            };
            ConstCounter::new(n).encode(verdicts.encode_family(&labels)?)?;
        }
        let dropped = encoder.encode_descriptor(
            "ringbuf_dropped",
            "Decision events lost because the ring buffer was full.",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(c.events_dropped).encode(dropped)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_counters_are_counters_read_at_render() {
        let m = Metrics::new();
        let before = m.render();
        assert!(!before.contains("kernel_verdicts"), "{before}");
        assert!(!before.contains("ringbuf_dropped"), "{before}");

        m.set_kernel_counters(&Counters {
            allowed: 5,
            denied: 3,
            audited: 1,
            events_dropped: 2,
        });
        let out = m.render();
        for line in [
            "# HELP imdsguard_kernel_verdicts Kernel verdict counters on protected destinations.\n",
            "# TYPE imdsguard_kernel_verdicts counter\n",
            "imdsguard_kernel_verdicts_total{verdict=\"allowed\"} 5\n",
            "imdsguard_kernel_verdicts_total{verdict=\"denied\"} 3\n",
            "imdsguard_kernel_verdicts_total{verdict=\"audited\"} 1\n",
            "# TYPE imdsguard_ringbuf_dropped counter\n",
            "imdsguard_ringbuf_dropped_total 2\n",
        ] {
            assert!(out.contains(line), "{line:?} not in:\n{out}");
        }
        assert!(out.ends_with("# EOF\n"), "{out}");

        // Each render shows the totals of the last read.
        m.set_kernel_counters(&Counters {
            denied: 4,
            ..Default::default()
        });
        let out = m.render();
        assert!(
            out.contains("imdsguard_kernel_verdicts_total{verdict=\"denied\"} 4\n"),
            "{out}"
        );
        assert!(out.contains("imdsguard_ringbuf_dropped_total 0\n"), "{out}");
    }

    #[test]
    fn other_metric_names_are_unchanged() {
        let m = Metrics::new();
        m.policy_reload_failures.inc();
        m.connections_revoked.inc();
        m.programs_attached.set(2);
        let out = m.render();
        for line in [
            "imdsguard_policy_reload_failures_total 1\n",
            "imdsguard_connections_revoked_total 1\n",
            "# TYPE imdsguard_programs_attached gauge\n",
            "imdsguard_programs_attached 2\n",
            "imdsguard_allow_map_entries 0\n",
            "imdsguard_reconcile_duration_seconds_count 0\n",
        ] {
            assert!(out.contains(line), "{line:?} not in:\n{out}");
        }
    }
}
