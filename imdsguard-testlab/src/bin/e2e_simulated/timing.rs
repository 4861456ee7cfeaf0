//! Measuring how long a relabelled pod's verdict takes to flip, by
//! probing IMDSv2 from its cgroup until the new verdict shows.

use std::time::{Duration, Instant};

use anyhow::ensure;
use imdsguard_testlab::{cgroups::TestCgroup, lab::Lab, probe::Outcome};

use crate::IMDS;

/// Each probe is a fresh process; this is the pause between two.
pub(super) const PROBE_GAP: Duration = Duration::from_millis(5);
pub(super) const FLIP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a verdict took to change, seen by probes.
pub(super) struct Flip {
    /// From the patch returning to the end of the first probe with the new
    /// verdict: an upper bound.
    pub(super) elapsed: Duration,
    pub(super) probes: u32,
    /// When the last probe that still saw the old verdict started: the
    /// change happened after this (a lower bound, give or take its spawn).
    pub(super) last_old: Option<Duration>,
}

impl Flip {
    pub(super) fn describe(&self, old: &str) -> String {
        let bound = match self.last_old {
            Some(t) => format!("; the probe started at {} was still {old}", ms(t)),
            None => "; the very first probe saw it".into(),
        };
        format!(
            "within {} ({} probe{}{bound})",
            ms(self.elapsed),
            self.probes,
            if self.probes == 1 { "" } else { "s" }
        )
    }
}

/// Probes IMDSv2 from `cg` every [`PROBE_GAP`] until `want` holds, at most
/// [`FLIP_TIMEOUT`] after `since`.
pub(super) fn time_until(
    lab: &Lab,
    cg: &TestCgroup,
    since: Instant,
    want: fn(&Outcome) -> bool,
) -> anyhow::Result<Flip> {
    let mut probes = 0;
    let mut last_old = None;
    loop {
        let started = since.elapsed();
        let o = lab.probe(Some(cg), "http", IMDS)?;
        probes += 1;
        if want(&o) {
            return Ok(Flip {
                elapsed: since.elapsed(),
                probes,
                last_old,
            });
        }
        last_old = Some(started);
        ensure!(
            since.elapsed() < FLIP_TIMEOUT,
            "{} after the label patch the probe still gets {o:?}",
            ms(since.elapsed())
        );
        std::thread::sleep(PROBE_GAP);
    }
}

/// The median run time of a probe that reaches IMDS from `cg`.
pub(super) fn probe_time(lab: &Lab, cg: &TestCgroup) -> anyhow::Result<Duration> {
    let mut times = Vec::new();
    for _ in 0..7 {
        let start = Instant::now();
        let o = lab.probe(Some(cg), "http", IMDS)?;
        ensure!(o.reached(), "a prod pod's probe got {o:?}");
        times.push(start.elapsed());
    }
    times.sort();
    Ok(times[times.len() / 2])
}

pub(super) fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}
