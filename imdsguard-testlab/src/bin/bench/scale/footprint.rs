//! Footprint: the agent's memory, idle CPU and the kernel memory of its
//! BPF objects.

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use imdsguard_testlab::daemon::Daemon;

use super::procinfo::{
    BpfObject, bpf_objects, cpu_pct, cpu_ticks, hwm_kib, map_type_name, rss_kib,
};

pub(super) struct FootprintRow {
    pub(super) build: &'static str,
    pub(super) pods: u32,
    pub(super) entries: u64,
    pub(super) rss: u64,
    pub(super) hwm: u64,
    pub(super) cpu_pct: f64,
    pub(super) idle: Duration,
    pub(super) objects: Vec<BpfObject>,
}

pub(super) fn footprint(
    agent: &Daemon,
    build: &'static str,
    size: u32,
    entries: u64,
    idle_secs: u64,
) -> anyhow::Result<FootprintRow> {
    let pid = agent.pid();
    // Let the start-up's allocations and the first watch events settle.
    std::thread::sleep(Duration::from_secs(2));
    let (c0, t0) = (cpu_ticks(pid)?, Instant::now());
    std::thread::sleep(Duration::from_secs(idle_secs));
    let (c1, idle) = (cpu_ticks(pid)?, t0.elapsed());
    Ok(FootprintRow {
        build,
        pods: size,
        entries,
        rss: rss_kib(pid)?,
        hwm: hwm_kib(pid)?,
        cpu_pct: cpu_pct(c1 - c0, idle),
        idle,
        objects: bpf_objects(pid)?,
    })
}

pub(super) fn print_footprint(out: &mut String, rows: &[FootprintRow], idle_secs: u64) {
    let _ = writeln!(
        out,
        "\n## Footprint while idle\n\n\
         VmRSS and VmHWM from /proc/PID/status after start-up and {idle_secs} s idle; \
         CPU is utime+stime over that interval (100% = one CPU); kernel memory is the \
         `memlock` of each BPF map and program the agent holds (fdinfo). Issue target: \
         VmRSS under 20 MiB at 110 pods.\n"
    );
    let _ = writeln!(
        out,
        "| pods on the node | build | allow-map entries | VmRSS | VmHWM (peak) | idle CPU | BPF maps | BPF programs |\n|---|---|---|---|---|---|---|---|"
    );
    for r in rows {
        let sum = |kind: &str| -> u64 {
            r.objects
                .iter()
                .filter(|o| o.kind == kind)
                .map(|o| o.memlock)
                .sum()
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.1} MiB | {:.1} MiB | {:.2}% over {:.0} s | {:.1} KiB | {:.1} KiB |",
            r.pods,
            r.build,
            r.entries,
            r.rss as f64 / 1024.0,
            r.hwm as f64 / 1024.0,
            r.cpu_pct,
            r.idle.as_secs_f64(),
            sum("map") as f64 / 1024.0,
            sum("prog") as f64 / 1024.0,
        );
    }
    // Per map, one column per size.
    let mut names: Vec<(String, String, u32)> = Vec::new();
    for r in rows {
        for m in r.objects.iter().filter(|o| o.kind == "map") {
            let key = (m.name.clone(), map_type_name(m.map_type), m.max_entries);
            if !names.contains(&key) {
                names.push(key);
            }
        }
    }
    let _ = writeln!(
        out,
        "\nPer map (memlock KiB):\n\n| map | type | max_entries |{}\n|---|---|---|{}",
        rows.iter()
            .map(|r| format!(" {} pods, {} |", r.pods, r.build))
            .collect::<String>(),
        "---|".repeat(rows.len())
    );
    for (name, ty, max_entries) in &names {
        let cells: String = rows
            .iter()
            .map(|r| {
                r.objects
                    .iter()
                    .find(|o| o.kind == "map" && &o.name == name)
                    .map_or_else(
                        || " - |".to_string(),
                        |o| format!(" {:.1} |", o.memlock as f64 / 1024.0),
                    )
            })
            .collect();
        let _ = writeln!(out, "| {name} | {ty} | {max_entries} |{cells}");
    }
}
