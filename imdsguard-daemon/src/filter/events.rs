//! Denied-path notifications for Kubernetes Events, at most one per pod a
//! minute (a pod retrying in a loop must not flood the API server).

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

/// One denied request, for an Event on the pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeniedPath {
    pub caller_cgroup: u64,
    /// `namespace/name`, when attribution named one.
    pub pod: Option<String>,
    pub method: String,
    pub path: String,
    pub reason: String,
}

/// The default: one Event a minute per pod.
pub const EVENT_INTERVAL: Duration = Duration::from_secs(60);

/// Admits one notification per key per interval.
#[derive(Debug)]
pub struct RateLimit {
    interval: Duration,
    last: HashMap<String, Instant>,
}

impl RateLimit {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: HashMap::new(),
        }
    }

    /// Whether `key` may be notified at `now`; if so, its window restarts.
    pub fn admit(&mut self, key: &str, now: Instant) -> bool {
        // Forget keys whose window is over, so gone pods do not pile up.
        if self.last.len() > 1024 {
            let interval = self.interval;
            self.last.retain(|_, t| now.duration_since(*t) < interval);
        }
        match self.last.get(key) {
            Some(t) if now.duration_since(*t) < self.interval => false,
            _ => {
                self.last.insert(key.to_owned(), now);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_per_interval_per_key() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(Duration::from_secs(60));
        assert!(r.admit("ns/a", t0));
        assert!(!r.admit("ns/a", t0 + Duration::from_secs(59)));
        assert!(r.admit("ns/b", t0 + Duration::from_secs(1)));
        assert!(r.admit("ns/a", t0 + Duration::from_secs(60)));
        assert!(!r.admit("ns/a", t0 + Duration::from_secs(61)));
    }

    #[test]
    fn forgets_old_keys() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(Duration::from_secs(1));
        for i in 0..2000 {
            r.admit(&i.to_string(), t0);
        }
        assert!(r.admit("new", t0 + Duration::from_secs(2)));
        assert!(r.last.len() <= 1025);
    }
}
