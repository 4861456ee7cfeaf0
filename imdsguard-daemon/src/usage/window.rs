//! The rolling window behind `/report`: per-minute buckets of per-caller
//! counts, pure and with time passed in (unix seconds), so tests drive it.
//!
//! Memory is bounded twice: buckets older than [`MINUTES`] are expired, and
//! at most `max_entries` (caller, destination, kind) entries live across
//! all buckets. Past that the oldest entry goes (its events are counted as
//! dropped), so a flood of distinct callers can cost old history but never
//! unbounded memory, and the newest activity is what the report shows.

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::{Counts, Key, Report, Row, Seen};

/// How far back the window reaches, in minutes.
pub const MINUTES: u32 = 60;
/// Entries across all buckets (one per key and minute it was seen in).
pub const MAX_ENTRIES: usize = 4096;
/// Distinct paths kept per entry; more are only counted.
pub const MAX_PATHS: usize = 32;
/// A path longer than this is cut (a refused request's raw target can be
/// anything a caller sends).
pub const MAX_PATH_LEN: usize = 200;

#[derive(Debug)]
pub struct Window {
    buckets: VecDeque<Bucket>,
    entries: usize,
    max_entries: usize,
    dropped_events: u64,
}

#[derive(Debug)]
struct Bucket {
    minute: u64,
    rows: HashMap<Key, Entry>,
}

/// What one key did in one minute.
#[derive(Clone, Debug, Default)]
struct Entry {
    counts: Counts,
    first_seen: u64,
    last_seen: u64,
    paths: BTreeMap<String, u64>,
    paths_dropped: u64,
    imds: std::collections::BTreeSet<&'static str>,
}

impl Entry {
    fn events(&self) -> u64 {
        let c = &self.counts;
        c.audited + c.denied + c.filter_allowed + c.filter_denied + c.filter_errors
    }

    fn add(&mut self, now: u64, seen: &Seen<'_>) {
        if self.first_seen == 0 {
            self.first_seen = now;
        }
        self.last_seen = self.last_seen.max(now);
        self.counts.add(seen);
        if let Seen::Filter {
            method, path, imds, ..
        } = seen
        {
            self.imds.insert(imds);
            let mut shown = if *method == "GET" {
                (*path).to_owned()
            } else {
                format!("{method} {path}")
            };
            if shown.len() > MAX_PATH_LEN {
                let mut cut = MAX_PATH_LEN;
                while !shown.is_char_boundary(cut) {
                    cut -= 1;
                }
                shown.truncate(cut);
                shown.push('…');
            }
            self.add_path(shown, 1);
        }
    }

    fn add_path(&mut self, path: String, n: u64) {
        if let Some(c) = self.paths.get_mut(&path) {
            *c += n;
        } else if self.paths.len() < MAX_PATHS {
            self.paths.insert(path, n);
        } else {
            self.paths_dropped += n;
        }
    }

    fn merge(&mut self, other: &Entry) {
        if self.first_seen == 0 || other.first_seen < self.first_seen {
            self.first_seen = other.first_seen;
        }
        self.last_seen = self.last_seen.max(other.last_seen);
        self.counts.merge(&other.counts);
        for (p, n) in &other.paths {
            self.add_path(p.clone(), *n);
        }
        self.paths_dropped += other.paths_dropped;
        self.imds.extend(other.imds.iter().copied());
    }
}

impl Default for Window {
    fn default() -> Self {
        Self::new(MAX_ENTRIES)
    }
}

impl Window {
    pub fn new(max_entries: usize) -> Self {
        Self {
            buckets: VecDeque::new(),
            entries: 0,
            max_entries: max_entries.max(1),
            dropped_events: 0,
        }
    }

    /// Counts one observation of `key` at `now` (unix seconds).
    pub fn record(&mut self, now: u64, key: Key, seen: &Seen<'_>) {
        let minute = now / 60;
        self.expire(minute);
        // A clock stepped back lands in the newest bucket rather than
        // reordering them.
        if self.buckets.back().is_none_or(|b| b.minute < minute) {
            self.buckets.push_back(Bucket {
                minute,
                rows: HashMap::new(),
            });
        }
        let back = self.buckets.len() - 1;
        if let Some(e) = self.buckets[back].rows.get_mut(&key) {
            e.add(now, seen);
            return;
        }
        while self.entries >= self.max_entries {
            self.evict_oldest();
        }
        let mut e = Entry::default();
        e.add(now, seen);
        // Eviction may have emptied and removed buckets, never the newest
        // one while it is the one being written to: find it again.
        match self.buckets.back_mut() {
            Some(b) if b.minute >= minute => {
                b.rows.insert(key, e);
            }
            _ => self.buckets.push_back(Bucket {
                minute,
                rows: HashMap::from([(key, e)]),
            }),
        }
        self.entries += 1;
    }

    /// Drops buckets that fell out of the window.
    fn expire(&mut self, minute: u64) {
        while let Some(front) = self.buckets.front() {
            if front.minute + u64::from(MINUTES) > minute {
                break;
            }
            self.entries -= front.rows.len();
            self.buckets.pop_front();
        }
    }

    /// Removes the least recently seen entry of the oldest bucket.
    fn evict_oldest(&mut self) {
        let Some(front) = self.buckets.front_mut() else {
            return;
        };
        let oldest = front
            .rows
            .iter()
            .min_by_key(|(_, e)| e.last_seen)
            .map(|(k, _)| k.clone());
        if let Some(e) = oldest.and_then(|k| front.rows.remove(&k)) {
            self.dropped_events += e.events();
            self.entries -= 1;
        }
        if front.rows.is_empty() {
            self.buckets.pop_front();
        }
    }

    /// Events lost to the entry cap, over the window's whole life.
    pub fn dropped_events(&self) -> u64 {
        self.dropped_events
    }

    /// The last `minutes` (1..=[`MINUTES`], the current one included) at
    /// `now`, one row per key, sorted by namespace, pod, container,
    /// destination and kind.
    pub fn report(&self, now: u64, minutes: u32) -> Report {
        let minutes = minutes.clamp(1, MINUTES);
        let first = (now / 60).saturating_sub(u64::from(minutes) - 1);
        let mut merged: BTreeMap<&Key, Entry> = BTreeMap::new();
        for b in self.buckets.iter().filter(|b| b.minute >= first) {
            for (k, e) in &b.rows {
                merged.entry(k).or_default().merge(e);
            }
        }
        Report {
            node: None,
            generated_at: now,
            minutes,
            since: first * 60,
            rows: merged
                .into_iter()
                .map(|(k, e)| Row {
                    node: None,
                    namespace: k.namespace.clone(),
                    pod: k.pod.clone(),
                    container: k.container.clone(),
                    cgroup: k.cgroup.clone(),
                    destination: k.destination.clone(),
                    kind: k.kind.to_owned(),
                    counts: e.counts,
                    paths: e.paths,
                    paths_dropped: e.paths_dropped,
                    imds: e.imds.into_iter().map(str::to_owned).collect(),
                    first_seen: e.first_seen,
                    last_seen: e.last_seen,
                })
                .collect(),
            dropped_events: self.dropped_events,
            kernel_counters: None,
            note: super::NOTE.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decisions::Verdict, usage::FilterVerdict};

    fn key(pod: &str, kind: &'static str) -> Key {
        Key {
            namespace: "imds".into(),
            pod: Some(pod.into()),
            container: Some("app".into()),
            cgroup: None,
            destination: "169.254.169.254:80".into(),
            kind,
        }
    }

    const DENIED: Seen<'static> = Seen::Kernel(Verdict::Denied, 1);
    const AUDITED: Seen<'static> = Seen::Kernel(Verdict::Audited, 1);

    fn get(path: &'static str, imds: &'static str, verdict: FilterVerdict) -> Seen<'static> {
        Seen::Filter {
            verdict,
            method: "GET",
            path,
            imds,
        }
    }

    /// A whole minute (1_800_000_000 is one).
    const T0: u64 = 1_800_000_000;

    #[test]
    fn counts_per_key_with_first_and_last_seen() {
        let mut w = Window::default();
        w.record(T0 + 1, key("a", "connect4"), &DENIED);
        w.record(T0 + 5, key("a", "connect4"), &DENIED);
        w.record(T0 + 70, key("a", "connect4"), &AUDITED);
        w.record(T0 + 80, key("b", "connect6"), &AUDITED);
        let r = w.report(T0 + 90, 5);
        assert_eq!(r.rows.len(), 2);
        let a = &r.rows[0];
        assert_eq!(a.pod.as_deref(), Some("a"));
        assert_eq!((a.counts.denied, a.counts.audited), (2, 1));
        assert_eq!((a.first_seen, a.last_seen), (T0 + 1, T0 + 70));
        assert_eq!(r.rows[1].kind, "connect6");
        // Now is T0 + 90: the current minute and the four before it.
        assert_eq!(r.since, T0 - 3 * 60);
    }

    #[test]
    fn the_window_answers_the_last_n_minutes_and_forgets_the_hour_before() {
        let mut w = Window::default();
        w.record(T0, key("old", "connect4"), &DENIED);
        w.record(T0 + 10 * 60, key("new", "connect4"), &DENIED);
        let now = T0 + 10 * 60 + 30;
        let pods = |r: Report| {
            r.rows
                .into_iter()
                .map(|r| r.pod.unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(pods(w.report(now, 1)), ["new"]);
        assert_eq!(pods(w.report(now, 10)), ["new"]);
        assert_eq!(pods(w.report(now, 11)), ["new", "old"]);
        // Asking for more than the window gets the window.
        assert_eq!(w.report(now, 1000).minutes, MINUTES);
        // An hour later the old bucket is gone once something is recorded.
        w.record(T0 + 60 * 60, key("later", "connect4"), &DENIED);
        assert_eq!(pods(w.report(T0 + 60 * 60, 60)), ["later", "new"]);
        assert_eq!(w.entries, 2);
        assert_eq!(w.dropped_events(), 0, "expiry is not a drop");
    }

    #[test]
    fn the_entry_cap_drops_the_oldest_and_counts_it() {
        let mut w = Window::new(3);
        w.record(T0, key("a", "connect4"), &DENIED);
        w.record(T0 + 1, key("a", "connect4"), &DENIED);
        w.record(T0 + 2, key("b", "connect4"), &DENIED);
        w.record(T0 + 61, key("c", "connect4"), &DENIED);
        w.record(T0 + 62, key("d", "connect4"), &DENIED);
        assert_eq!(w.entries, 3);
        assert_eq!(w.dropped_events(), 2, "a's two events");
        let r = w.report(T0 + 62, 60);
        let pods: Vec<_> = r.rows.iter().map(|r| r.pod.clone().unwrap()).collect();
        assert_eq!(pods, ["b", "c", "d"]);
        assert_eq!(r.dropped_events, 2);
        // A single bucket over the cap loses its least recent entry.
        for (i, p) in ["e", "f", "g", "h"].iter().enumerate() {
            w.record(T0 + 120 + i as u64, key(p, "connect4"), &DENIED);
        }
        let r = w.report(T0 + 130, 1);
        let pods: Vec<_> = r.rows.iter().map(|r| r.pod.clone().unwrap()).collect();
        assert_eq!(pods, ["f", "g", "h"]);
    }

    #[test]
    fn filter_requests_keep_paths_and_imds_versions_bounded() {
        let mut w = Window::default();
        let k = key("a", "filter");
        w.record(
            T0,
            k.clone(),
            &get(
                "/latest/meta-data/placement/region",
                "v2",
                FilterVerdict::Allowed,
            ),
        );
        w.record(
            T0 + 1,
            k.clone(),
            &get(
                "/latest/meta-data/placement/region",
                "v2",
                FilterVerdict::Allowed,
            ),
        );
        w.record(
            T0 + 61,
            k.clone(),
            &get("/latest/user-data", "v1", FilterVerdict::Denied),
        );
        w.record(
            T0 + 62,
            k.clone(),
            &Seen::Filter {
                verdict: FilterVerdict::Allowed,
                method: "PUT",
                path: "/latest/api/token",
                imds: "v2",
            },
        );
        let long = "/x".repeat(MAX_PATH_LEN);
        w.record(
            T0 + 63,
            k.clone(),
            &get(
                Box::leak(long.into_boxed_str()),
                "v1",
                FilterVerdict::Denied,
            ),
        );
        let r = w.report(T0 + 63, 2);
        let row = &r.rows[0];
        assert_eq!(
            (row.counts.filter_allowed, row.counts.filter_denied),
            (3, 2)
        );
        assert_eq!(row.paths["/latest/meta-data/placement/region"], 2);
        assert_eq!(row.paths["PUT /latest/api/token"], 1);
        assert_eq!(row.paths["/latest/user-data"], 1);
        assert!(
            row.paths
                .keys()
                .all(|p| p.chars().count() <= MAX_PATH_LEN + 1)
        );
        assert_eq!(row.imds.iter().collect::<Vec<_>>(), ["v1", "v2"]);
        for i in 0..MAX_PATHS + 5 {
            let p: &'static str = Box::leak(format!("/p{i}").into_boxed_str());
            w.record(T0 + 64, k.clone(), &get(p, "v1", FilterVerdict::Denied));
        }
        let row = &w.report(T0 + 64, 1).rows[0];
        assert_eq!(row.paths.len(), MAX_PATHS);
        assert!(row.paths_dropped > 0);
    }

    #[test]
    fn a_clock_stepped_back_lands_in_the_newest_bucket() {
        let mut w = Window::default();
        w.record(T0 + 120, key("a", "connect4"), &DENIED);
        w.record(T0, key("a", "connect4"), &DENIED);
        assert_eq!(w.buckets.len(), 1);
        assert_eq!(w.report(T0 + 120, 1).rows[0].counts.denied, 2);
    }
}
