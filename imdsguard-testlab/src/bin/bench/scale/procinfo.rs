//! What /proc and fdinfo say about the agent.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context as _;
use procfs::{
    Current as _, LoadAverage,
    process::{FDTarget, Process},
};

pub(super) fn process(pid: u32) -> anyhow::Result<Process> {
    Process::new(i32::try_from(pid)?).with_context(|| format!("open /proc/{pid}"))
}

/// Resident set size, in KiB.
pub(super) fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = process(pid)?.status();
    let status = status.with_context(|| format!("read /proc/{pid}/status"))?;
    status
        .vmrss
        .with_context(|| format!("VmRSS missing from /proc/{pid}/status"))
}

/// Peak resident set size ("high water mark"), in KiB.
pub(super) fn hwm_kib(pid: u32) -> anyhow::Result<u64> {
    let status = process(pid)?.status();
    let status = status.with_context(|| format!("read /proc/{pid}/status"))?;
    status
        .vmhwm
        .with_context(|| format!("VmHWM missing from /proc/{pid}/status"))
}

/// utime + stime of the whole process, in clock ticks.
pub(super) fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = process(pid)?
        .stat()
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    Ok(stat.utime + stat.stime)
}

/// CPU time as a percentage of one CPU over `wall`.
pub(super) fn cpu_pct(ticks: u64, wall: Duration) -> f64 {
    let hz = procfs::ticks_per_second().max(1) as f64;
    ticks as f64 / hz / wall.as_secs_f64() * 100.0
}

/// A BPF map or program held by a process, from its fdinfo.
#[derive(Clone, Debug)]
pub(super) struct BpfObject {
    pub(super) kind: &'static str,
    pub(super) name: String,
    pub(super) map_type: u32,
    pub(super) max_entries: u32,
    pub(super) memlock: u64,
}

pub(super) fn bpf_objects(pid: u32) -> anyhow::Result<Vec<BpfObject>> {
    let mut seen: BTreeMap<(&'static str, u32), BpfObject> = BTreeMap::new();
    let process = process(pid)?;
    let fds = process
        .fd()
        .with_context(|| format!("list /proc/{pid}/fd"))?;
    // procfs skips an fd closed since the listing.
    for fd in fds {
        let fd = fd.with_context(|| format!("list /proc/{pid}/fd"))?;
        let kind = match &fd.target {
            FDTarget::AnonInode(k) if k == "bpf-map" => "map",
            FDTarget::AnonInode(k) if k == "bpf-prog" => "prog",
            _ => continue,
        };
        // Hand-parsed: procfs has no reader for fdinfo's BPF keys (map_id,
        // prog_id, map_type, max_entries, memlock).
        let info = process
            .open_relative(format!("fdinfo/{}", fd.fd))
            .ok()
            .and_then(|f| std::io::read_to_string(f).ok());
        let Some(info) = info else {
            continue;
        };
        let field = |k: &str| -> u64 {
            info.lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let id = field(if kind == "map" { "map_id" } else { "prog_id" }) as u32;
        let name = if kind == "map" {
            aya::maps::MapInfo::from_id(id)
                .ok()
                .and_then(|i| i.name_as_str().map(String::from))
        } else {
            aya::programs::loaded_programs()
                .filter_map(Result::ok)
                .find(|p| p.id() == id)
                .and_then(|p| p.name_as_str().map(String::from))
        };
        seen.insert(
            (kind, id),
            BpfObject {
                kind,
                name: name.unwrap_or_else(|| format!("id {id}")),
                map_type: field("map_type") as u32,
                max_entries: field("max_entries") as u32,
                memlock: field("memlock"),
            },
        );
    }
    Ok(seen.into_values().collect())
}

pub(super) fn map_type_name(t: u32) -> String {
    match t {
        1 => "hash".into(),
        2 => "array".into(),
        5 => "percpu_hash".into(),
        6 => "percpu_array".into(),
        9 => "lru_hash".into(),
        11 => "lpm_trie".into(),
        27 => "ringbuf".into(),
        other => format!("type {other}"),
    }
}

pub(super) fn loadavg() -> String {
    // As /proc/loadavg prints them.
    LoadAverage::current()
        .map(|l| format!("{:.2} {:.2} {:.2}", l.one, l.five, l.fifteen))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_readers_read_this_process() {
        let pid = std::process::id();
        let (rss, hwm) = (rss_kib(pid).unwrap(), hwm_kib(pid).unwrap());
        assert!(rss > 0 && hwm >= rss, "{rss} {hwm}");
        cpu_ticks(pid).unwrap();
        assert!(bpf_objects(pid).unwrap().is_empty());
        assert_eq!(loadavg().split(' ').count(), 3, "{}", loadavg());
        assert!(rss_kib(u32::MAX).is_err());
    }
}
