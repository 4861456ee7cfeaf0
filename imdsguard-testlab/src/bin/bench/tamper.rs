//! The tamper window (`imdsguard-bench tamper`, `cargo xtask bench-tamper`).
//! See BENCHMARKS.md, "The tamper window".
//!
//! The agent runs with one allowed cgroup; a tight connect loop runs in a
//! denied one. Half a second in, the bench detaches the agent's connect
//! links by hand (BPF_LINK_DETACH, as `bpftool link detach` does), and the
//! loop counts what is not denied until the agent puts them back: attempts
//! through, and the window from the detach to the start of the last one
//! through. Before that, the idle agent's CPU time is read from procfs.
//! With `--before`, the build before runs as a second arm, round by round
//! interleaved with this one.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use imdsguard_testlab::{
    cgroups::TestCgroup,
    daemon::{self, Daemon},
    lab::Lab,
    probe::{self, TimedLoopReport, monotonic_ns},
    stats::median,
    tamper::detach_link,
};
use procfs::process::Process;

/// `imdsguard-bench tamper`: how long detached links stay detached, and the
/// idle cost of watching for it.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// The `imdsguard` binary of the build before (e.g. main's), run as a
    /// second arm. Without it, only this build is measured.
    #[arg(long, value_name = "PATH")]
    pub before: Option<PathBuf>,
    /// Interleaved rounds; each arm gets one detach per round.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
    /// How long the denied loop runs. The detach comes 0.5 s in; the rest
    /// must outlast the slowest check measured (the old one: 2 s).
    #[arg(long, default_value_t = 4.0)]
    pub loop_secs: f64,
    /// Before each loop, a random wait of up to this long, so that the
    /// detach falls at a random point of the agent's check period (it
    /// should cover the slowest check measured: the old one, 2 s). Without
    /// it the detach would come at the same point every round.
    #[arg(long, default_value_t = 2.0)]
    pub phase_secs: f64,
    /// Seconds of idle agent CPU read per arm and round (0: skip).
    #[arg(long, default_value_t = 30)]
    pub idle_secs: u64,
    /// Where the loop connects: a protected destination. The default is a
    /// closed port of the metadata address (all its ports but 53 are
    /// protected): with no server in the loop, an attempt through is
    /// refused at once, as quick as a denied one, so the window is seen to
    /// the attempt. Port 80 reaches the lab's one-thread fake service,
    /// whose accept queue then paces the loop.
    #[arg(long, default_value = "169.254.169.254:81")]
    pub target: String,
}

/// When the detach comes, into the loop.
const DETACH_AFTER: Duration = Duration::from_millis(500);
const HOOKS: [&str; 2] = ["connect4", "connect6"];

/// One arm: a binary and what each round measured.
struct Arm {
    name: &'static str,
    bin: PathBuf,
    rounds: Vec<Round>,
}

struct Round {
    loop_: TimedLoopReport,
    /// Detach to the start of the last attempt through, in ms.
    window_ms: f64,
    /// The last attempt through came in the loop's last 100 ms: the window
    /// may not have closed.
    open_at_end: bool,
    /// From the agent's log: the detach to its warning, and the warning to
    /// its line saying the programs are back, in ms.
    noticed_ms: Option<f64>,
    reattach_ms: Option<f64>,
    idle: Option<Idle>,
}

/// CPU time over an idle stretch: utime+stime (clock ticks) and the
/// scheduler's exact run time and timeslices, summed over threads.
#[derive(Clone, Copy)]
struct Idle {
    secs: f64,
    ticks: u64,
    exec_ns: u64,
    slices: u64,
}

pub fn run(o: &Options, bin: PathBuf) -> anyhow::Result<()> {
    let lab = Lab::new("bench-tamper")?;
    let prod = lab.cgroup("pods/prod")?;
    let test = lab.cgroup("pods/test")?;
    let mut arms: Vec<Arm> = o
        .before
        .iter()
        .map(|b| Arm {
            name: "before",
            bin: b.clone(),
            rounds: Vec::new(),
        })
        .collect();
    arms.push(Arm {
        name: "this build",
        bin: bin.clone(),
        rounds: Vec::new(),
    });
    for round in 0..o.rounds {
        // Alternate which arm goes first.
        let mut order: Vec<usize> = (0..arms.len()).collect();
        order.rotate_left(round as usize % arms.len());
        for i in order {
            let r = one_round(&lab, &arms[i].bin, &bin, &prod, &test, o)
                .with_context(|| format!("{} round {}", arms[i].name, round + 1))?;
            eprintln!(
                "round {}/{} {}: {} through, window {:.1} ms",
                round + 1,
                o.rounds,
                arms[i].name,
                r.loop_.through(),
                r.window_ms
            );
            arms[i].rounds.push(r);
        }
    }
    print!("{}", report(&arms, o));
    Ok(())
}

/// Starts the agent, reads its idle CPU, runs the loop across a detach,
/// then stops it and uninstalls (with `uninstall_bin`, this build's).
fn one_round(
    lab: &Lab,
    bin: &Path,
    uninstall_bin: &Path,
    prod: &TestCgroup,
    test: &TestCgroup,
    o: &Options,
) -> anyhow::Result<Round> {
    let pin_dir = lab.pin_dir();
    let args: Vec<String> = [
        "--cgroup-root",
        &lab.root().path().display().to_string(),
        "--pin-dir",
        &pin_dir.display().to_string(),
        "--allow-cgroup",
        &prod.path().display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    let agent = Daemon::start(bin, &args)?;
    let idle = if o.idle_secs > 0 {
        // Start-up work (the first sweep) settles first.
        std::thread::sleep(Duration::from_secs(1));
        let t0 = monotonic_ns();
        let a = cpu(agent.pid())?;
        std::thread::sleep(Duration::from_secs(o.idle_secs));
        let b = cpu(agent.pid())?;
        Some(Idle {
            secs: (monotonic_ns() - t0) as f64 / 1e9,
            ticks: b.ticks - a.ticks,
            exec_ns: b.exec_ns - a.exec_ns,
            slices: b.slices - a.slices,
        })
    } else {
        None
    };

    std::thread::sleep(Duration::from_secs_f64(o.phase_secs * random_fraction()));
    let millis = (o.loop_secs * 1000.0) as u64;
    let child = lab.spawn_probe(
        Some(test),
        &["tcp-loop-timed", &o.target, &millis.to_string()],
    )?;
    let loop_start = monotonic_ns();
    std::thread::sleep(DETACH_AFTER);
    let detached_at = monotonic_ns();
    let detached_wall = day_secs_now();
    let logs_before = agent.logs().len();
    for hook in HOOKS {
        detach_link(&pin_dir.join("links").join(hook))?;
    }
    let loop_: TimedLoopReport = probe::wait(child, Duration::from_millis(millis + 30_000))?;
    let loop_end = loop_start + millis * 1_000_000;
    let window_ms = loop_
        .last_through_ns
        .map_or(0.0, |t| t.saturating_sub(detached_at) as f64 / 1e6);
    let open_at_end = loop_
        .last_through_ns
        .is_some_and(|t| t + 100_000_000 > loop_end);

    let (noticed_ms, reattach_ms) = from_log(&agent.logs()[logs_before..], detached_wall);
    agent.kill();
    let out = daemon::command(
        uninstall_bin,
        &["uninstall", "--pin-dir", &pin_dir.display().to_string()],
    )?;
    anyhow::ensure!(out.status.success(), "uninstall failed: {out:?}");
    Ok(Round {
        loop_,
        window_ms,
        open_at_end,
        noticed_ms,
        reattach_ms,
        idle,
    })
}

/// When the agent noticed (its warning) and how long it took to put the
/// programs back (to "programs re-attached", or "programs in place" after
/// a reload, as the build before does), from the log's timestamps.
fn from_log(logs: &[serde_json::Value], detached: f64) -> (Option<f64>, Option<f64>) {
    let at = |v: &serde_json::Value| v["timestamp"].as_str().and_then(day_secs);
    let Some(w) = logs.iter().position(|v| {
        daemon::message(v) == Some("programs were detached behind our back; re-attaching")
    }) else {
        return (None, None);
    };
    let warned = at(&logs[w]);
    let back = logs[w..]
        .iter()
        .find(|v| {
            matches!(
                daemon::message(v),
                Some("programs re-attached" | "programs in place")
            )
        })
        .and_then(at);
    (
        warned.map(|t| (t - detached) * 1e3),
        warned.zip(back).map(|(a, b)| (b - a) * 1e3),
    )
}

/// Seconds since midnight UTC of a timestamp as tracing writes it
/// (`2026-11-30T07:41:51.123456Z`). A run across midnight gets one odd
/// round.
fn day_secs(ts: &str) -> Option<f64> {
    let time = ts.split_once('T')?.1.trim_end_matches('Z');
    let mut parts = time.split(':').map(str::parse::<f64>);
    let (h, m, s) = (
        parts.next()?.ok()?,
        parts.next()?.ok()?,
        parts.next()?.ok()?,
    );
    Some(h * 3600.0 + m * 60.0 + s)
}

/// A uniform random number in [0, 1): std's hasher keys are random per
/// `RandomState`, which is enough to scatter a phase.
fn random_fraction() -> f64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let bits = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

fn day_secs_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() % 86_400.0)
}

struct Cpu {
    ticks: u64,
    exec_ns: u64,
    slices: u64,
}

/// utime+stime of the process; run time and timeslices of each thread.
fn cpu(pid: u32) -> anyhow::Result<Cpu> {
    let p = Process::new(i32::try_from(pid)?).with_context(|| format!("open /proc/{pid}"))?;
    let stat = p.stat().context("read stat")?;
    let (mut exec_ns, mut slices) = (0, 0);
    // A thread that exits between the listing and the read is skipped.
    for task in p.tasks().context("list tasks")?.flatten() {
        if let Ok(s) = task.schedstat() {
            exec_ns += s.sum_exec_runtime;
            slices += s.pcount;
        }
    }
    Ok(Cpu {
        ticks: stat.utime + stat.stime,
        exec_ns,
        slices,
    })
}

fn report(arms: &[Arm], o: &Options) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## The tamper window\n\n\
         {} rounds per arm, interleaved. Per round: the agent starts, idles {} s (CPU \
         read from procfs), waits a random 0 to {} s, then a `tcp-loop-timed` probe \
         connects to {} from a denied cgroup for {} s; {} ms in, both connect links \
         are detached by hand \
         (BPF_LINK_DETACH). Through: attempts not denied. Window: from the detach to the \
         start of the last attempt through.\n",
        o.rounds,
        o.idle_secs,
        o.phase_secs,
        o.target,
        o.loop_secs,
        DETACH_AFTER.as_millis()
    );
    let _ = writeln!(
        out,
        "| arm | through: median [min..max] | window ms: median [min..max] | noticed after ms (log) | re-attach took ms (log) | denied attempts/s, hooks attached | idle CPU | idle run time per s | timeslices per s |\n|---|---|---|---|---|---|---|---|---|"
    );
    for arm in arms {
        let through: Vec<f64> = arm
            .rounds
            .iter()
            .map(|r| r.loop_.through() as f64)
            .collect();
        let window: Vec<f64> = arm.rounds.iter().map(|r| r.window_ms).collect();
        let noticed: Vec<f64> = arm.rounds.iter().filter_map(|r| r.noticed_ms).collect();
        let reattach: Vec<f64> = arm.rounds.iter().filter_map(|r| r.reattach_ms).collect();
        let rate: Vec<f64> = arm
            .rounds
            .iter()
            .map(|r| r.loop_.eperm as f64 / (o.loop_secs - r.window_ms / 1000.0).max(1e-3))
            .collect();
        let idle: Vec<Idle> = arm.rounds.iter().filter_map(|r| r.idle).collect();
        let idle_cells = if idle.is_empty() {
            ["-".to_string(), "-".to_string(), "-".to_string()]
        } else {
            let secs: f64 = idle.iter().map(|i| i.secs).sum();
            let ticks: u64 = idle.iter().map(|i| i.ticks).sum();
            let exec: u64 = idle.iter().map(|i| i.exec_ns).sum();
            let slices: u64 = idle.iter().map(|i| i.slices).sum();
            let hz = procfs::ticks_per_second().max(1) as f64;
            [
                format!(
                    "{:.3}% ({ticks} ticks in {secs:.0} s)",
                    ticks as f64 / hz / secs * 100.0
                ),
                format!("{:.1} µs", exec as f64 / 1e3 / secs),
                format!("{:.1}", slices as f64 / secs),
            ]
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:.0} | {} | {} | {} |",
            arm.name,
            cell(&through, 0),
            cell(&window, 1),
            cell(&noticed, 1),
            cell(&reattach, 2),
            median(rate),
            idle_cells[0],
            idle_cells[1],
            idle_cells[2],
        );
    }
    let open: usize = arms
        .iter()
        .flat_map(|a| &a.rounds)
        .filter(|r| r.open_at_end)
        .count();
    if open > 0 {
        let _ = writeln!(
            out,
            "\nnote: in {open} rounds the window was still open 100 ms before the loop ended: raise --loop-secs"
        );
    }
    let _ = writeln!(out, "\nper round (through / window ms):");
    for arm in arms {
        let cells: Vec<String> = arm
            .rounds
            .iter()
            .map(|r| format!("{} / {:.1}", r.loop_.through(), r.window_ms))
            .collect();
        let _ = writeln!(out, "- {}: {}", arm.name, cells.join(", "));
    }
    out
}

/// `median [min..max]` with `decimals`.
fn cell(v: &[f64], decimals: usize) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let (min, max) = imdsguard_testlab::stats::min_max(v);
    format!(
        "{:.decimals$} [{:.decimals$}..{:.decimals$}]",
        median(v.to_vec()),
        min,
        max
    )
}
