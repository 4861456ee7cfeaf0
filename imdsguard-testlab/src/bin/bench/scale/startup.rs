//! Start-up: the agent started cold and over the pins of a killed agent.

use std::{
    fmt::Write as _,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use super::{Build, max, ms, node::Node};
use imdsguard::bpf::uninstall::uninstall;
use imdsguard_testlab::stats::median;

/// One agent start.
#[derive(Clone, Copy, Debug)]
pub(super) struct Startup {
    pub(super) attached: Option<Duration>,
    pub(super) ready: Duration,
    /// From the ready line, when the build logs them: the wait for the
    /// lists, the policy and cgroup lookups, the map writes (ms).
    pub(super) phases: [Option<u64>; 3],
    /// From the ready line: pods in the store, map entries, pods whose
    /// cgroup was missing.
    pub(super) pods: u64,
    pub(super) entries: u64,
    pub(super) waiting: u64,
}

pub(super) struct StartupRow {
    pub(super) build: &'static str,
    pub(super) pods: u32,
    pub(super) kind: &'static str,
    pub(super) runs: Vec<Startup>,
}

/// Cold starts and restarts of each build, the builds alternating within
/// each repeat so that a change in the machine's load hits them alike.
pub(super) fn startup(
    node: &Node,
    size: u32,
    repeats: u32,
    builds: &[Build],
) -> anyhow::Result<Vec<StartupRow>> {
    let mut runs = vec![(Vec::new(), Vec::new()); builds.len()];
    for _ in 0..repeats {
        for (b, (cold, restart)) in builds.iter().zip(&mut runs) {
            // Cold: nothing pinned, as on a fresh node.
            drop(uninstall(&node.pins())?);
            let (agent, s) = node.start_agent(b)?;
            cold.push(s);
            // SIGKILL: the pins stay, as after a crash or a rolling update.
            agent.kill();
            let (agent, s) = node.start_agent(b)?;
            restart.push(s);
            agent.kill();
        }
    }
    let mut rows = Vec::new();
    for (b, (cold, restart)) in builds.iter().zip(runs) {
        for (kind, runs) in [
            ("cold (no pins)", cold),
            ("restart (pins adopted)", restart),
        ] {
            rows.push(StartupRow {
                build: b.label,
                pods: size,
                kind,
                runs,
            });
        }
    }
    Ok(rows)
}

pub(super) fn print_startup(
    out: &mut String,
    rows: &[StartupRow],
    creation: &[(u32, Duration)],
    concurrency: usize,
) {
    let _ = writeln!(
        out,
        "\n## Start-up: process start to the `ready` log line\n\n\
         `ready` comes after the programs are attached, both watches have listed, and \
         the allow map holds every pod. Times run from just before the spawn to the \
         timestamp of the log line; median (max) of the runs. Issue target: under 1 s at 110 pods.\n"
    );
    let _ = writeln!(
        out,
        "| pods on the node | build | start | runs | programs in place | ready: median | ready: max | lists / compute / map writes (median ms) | pods seen / map entries / waiting for cgroup |\n|---|---|---|---|---|---|---|---|---|"
    );
    for r in rows {
        let ready: Vec<f64> = r.runs.iter().map(|s| ms(s.ready)).collect();
        let attached: Vec<f64> = r.runs.iter().filter_map(|s| s.attached.map(ms)).collect();
        let last = r.runs.last().copied();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:.0} ms | {:.0} ms | {} | {} |",
            r.pods,
            r.build,
            r.kind,
            r.runs.len(),
            if attached.is_empty() {
                "-".into()
            } else {
                format!("{:.0} ms ({:.0})", median(attached.clone()), max(&attached))
            },
            median(ready.clone()),
            max(&ready),
            phases(&r.runs),
            last.map_or_else(
                || "-".into(),
                |s| format!("{} / {} / {}", s.pods, s.entries, s.waiting)
            )
        );
    }
    let _ = writeln!(
        out,
        "\nSetting the node up (pods created through the API, {concurrency} at a time, then their cgroups): {}",
        creation
            .iter()
            .map(|(n, d)| format!("{n} pods in {:.1} s", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join("; ")
    );
}

/// The median of each phase the ready lines carry, `a / b / c` ms; `-`
/// for a build that does not log them.
fn phases(runs: &[Startup]) -> String {
    let each: Vec<String> = (0..3)
        .map(|i| {
            let v: Vec<f64> = runs
                .iter()
                .filter_map(|s| s.phases[i])
                .map(|ms| ms as f64)
                .collect();
            if v.is_empty() {
                "-".into()
            } else {
                format!("{:.0}", median(v))
            }
        })
        .collect();
    each.join(" / ")
}

/// Parses tracing-subscriber's JSON timestamps, e.g.
/// `2026-11-27T04:49:40.123456Z` (UTC).
pub(super) fn parse_timestamp(s: &str) -> Option<SystemTime> {
    let (date, time) = s.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<i64>().ok());
    let (h, mi, sec) = (t.next()??, t.next()??, t.next()??);
    let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
    let nanos: u32 = digits.parse().ok()?;
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
    // days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let secs = u64::try_from(days * 86_400 + h * 3600 + mi * 60 + sec).ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        let t = parse_timestamp("1970-01-02T00:00:01.5Z").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap(),
            Duration::from_millis(86_401_500)
        );
        let t = parse_timestamp("2024-03-01T12:00:00.000001Z").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap(),
            Duration::new(1_709_294_400, 1000)
        );
        assert!(parse_timestamp("2024-03-01 12:00:00").is_none());
    }
}
