//! The filter-mode HTTP proxy: a hyper 1.x server for the connections the
//! kernel redirected, which forwards only what the caller's rules allow.
//!
//! Per connection it asks [`ConnIdentity`] who made it (no entry: every
//! request gets 403, nothing is forwarded). Per request it runs the strict
//! checks of [`request`](super::request), looks up the caller's entry in the
//! [`RulesTable`] (on every request, so policy changes reach kept-alive
//! connections), and forwards what is allowed to the original destination
//! over a fresh connection ([`forward`]). Denials are 403 with a short
//! plain-text reason; an unreachable upstream is 502.
//!
//! Every request is logged with the caller, the normalised path, the
//! verdict and the IMDS version, counted per pod and verdict, and a denied
//! one may be sent (at most once a minute per pod) to the agent for a
//! Kubernetes Event.

mod forward;
mod serve;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::metrics::{counter::Counter, family::Family};
use tokio::sync::mpsc;

pub use self::forward::ForwardError;
use super::{events::DeniedPath, identity::ConnIdentity, rules::RulesTable};
use crate::{
    decisions::{Attribution, Attributor},
    metrics::FilterLabels,
    usage::Usage,
};

/// Limits and timeouts.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// How long a client may take to send a request head (and how long an
    /// idle kept-alive connection stays open).
    pub header_read_timeout: Duration,
    /// Connecting to the metadata service.
    pub connect_timeout: Duration,
    /// Waiting for the response head.
    pub response_timeout: Duration,
    /// Waiting for the response head of a GCP `wait_for_change=true`
    /// request, which the server holds until something changes.
    pub wait_timeout: Duration,
    /// The largest response body passed on; a longer one is cut off (the
    /// client sees the connection end early).
    pub max_response_bytes: usize,
    /// The interval of denied-path notifications per pod.
    pub event_interval: Duration,
    /// Connections served at once; one more is closed at accept, so a pod
    /// opening connections in a loop cannot exhaust the agent.
    pub max_connections: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(10),
            wait_timeout: Duration::from_secs(330),
            max_response_bytes: 1 << 20,
            event_interval: super::events::EVENT_INTERVAL,
            max_connections: 1024,
        }
    }
}

/// Names the owner of a cgroup id (the agent passes its pod attributor).
pub type AttributeFn = dyn Fn(u64) -> Attribution + Send + Sync;

/// Whether an upstream is one the proxy may forward to.
pub type UpstreamFn = dyn Fn(std::net::SocketAddr) -> bool + Send + Sync;

/// The proxy; build it, then [`Proxy::serve`] it.
pub struct Proxy {
    identity: Arc<dyn ConnIdentity>,
    rules: RulesTable,
    config: ProxyConfig,
    attribute: Option<Arc<AttributeFn>>,
    requests: Option<Family<FilterLabels, Counter>>,
    denied: Option<mpsc::Sender<DeniedPath>>,
    upstreams: Option<Arc<UpstreamFn>>,
    usage: Option<Arc<Usage>>,
}

impl Proxy {
    pub fn new(identity: Arc<dyn ConnIdentity>, rules: RulesTable) -> Self {
        Self {
            identity,
            rules,
            config: ProxyConfig::default(),
            attribute: None,
            requests: None,
            denied: None,
            upstreams: None,
            usage: None,
        }
    }

    pub fn with_config(mut self, config: ProxyConfig) -> Self {
        self.config = config;
        self
    }

    /// Logs and metrics name the caller's pod and container.
    pub fn with_attribution(
        mut self,
        attribute: impl Fn(u64) -> Attribution + Send + Sync + 'static,
    ) -> Self {
        self.attribute = Some(Arc::new(attribute));
        self
    }

    /// [`with_attribution`](Self::with_attribution) through an
    /// [`Attributor`] (the agent's pod attributor), shared behind a lock.
    pub fn with_attributor<A: Attributor>(self, attributor: Arc<Mutex<A>>) -> Self {
        self.with_attribution(move |cgroup| {
            attributor
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .attribute(cgroup)
        })
    }

    /// Forwards only to upstreams `allowed` accepts (the agent passes "is a
    /// protected metadata destination"): should the kernel's record ever be
    /// wrong, the proxy, on the host network, must not become a relay to
    /// anywhere else. Without it, any recorded upstream is used (tests).
    pub fn with_upstreams(
        mut self,
        allowed: impl Fn(std::net::SocketAddr) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.upstreams = Some(Arc::new(allowed));
        self
    }

    /// Records every request, with its path and IMDS version, for the
    /// usage report (`Metrics::usage`).
    pub fn with_usage(mut self, usage: Arc<Usage>) -> Self {
        self.usage = Some(usage);
        self
    }

    /// Counts every request by pod and verdict (e.g. `Metrics::filter_requests`).
    pub fn with_metrics(mut self, requests: Family<FilterLabels, Counter>) -> Self {
        self.requests = Some(requests);
        self
    }

    /// Sends denied requests to `events`, at most one per pod per
    /// `ProxyConfig::event_interval`; a full channel drops the notice.
    pub fn with_denied_events(mut self, events: mpsc::Sender<DeniedPath>) -> Self {
        self.denied = Some(events);
        self
    }
}
