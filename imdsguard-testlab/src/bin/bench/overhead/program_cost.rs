//! Part 2: per-run cost of imdsguard's programs from the kernel's own
//! accounting (run_time_ns / run_cnt), for each path through them.

use std::{
    os::fd::AsFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use imdsguard::{bpf::hook::Hook, bpf::uninstall::uninstall};
use imdsguard_testlab::{
    bench::{Timings, Workload},
    cgroups::TestCgroup,
    noop,
};

use super::{Bench, Hooks, Pods, prog_stats};

pub fn run(bench: &Bench, pods: &Pods, iterations: u32) -> anyhow::Result<()> {
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?;
    connect4(bench, pods, iterations)?;
    sock_create(bench, pods, iterations)
}

/// The kernel's id of the program behind imdsguard's pinned link for `hook`.
fn linked_program(bench: &Bench, hook: Hook) -> anyhow::Result<u32> {
    let link = imdsguard::bpf::sys::obj_get(&bench.pins.link(hook))?;
    Ok(imdsguard::bpf::sys::link_info(link.as_fd())?.prog_id)
}

/// ns per run of program `id` while `f` runs; fails if it did not run.
fn per_run(id: u32, what: &str, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let (t0, c0) = prog_stats(id)?;
    f()?;
    let (t1, c1) = prog_stats(id)?;
    anyhow::ensure!(c1 > c0, "the program did not run for {what}");
    Ok((t1 - t0) as f64 / (c1 - c0) as f64)
}

fn connect4(bench: &Bench, pods: &Pods, iterations: u32) -> anyhow::Result<()> {
    let it = iterations.to_string();
    println!(
        "## Program cost per run (kernel bpf_stats, {iterations} runs each; entries span 2 levels)\n"
    );
    println!("### connect4 (default hooks)\n");
    println!("| path | ns per run |\n|---|---|");
    // The accounting itself costs something per run: measure it on the
    // allow-all program, attached alone, as the zero line.
    let noop = noop::attach(bench.lab.root().path(), &[noop::CONNECT4])?;
    let ns = per_run(noop::program_id(&noop[0])?, "the allow-all program", || {
        let _: u32 = bench.worker(Some(&pods.denied), &["udp-connect", "127.0.0.1:9", &it])?;
        Ok(())
    })?;
    println!("| allow-all program (the accounting floor) | {ns:.1} |");
    drop(noop);

    let mut enforcer = bench.install(Hooks::default(), pods.allow_map()?)?;
    // Drain the ring buffer as the daemon would, so the deny path's event
    // output is measured succeeding, not failing on a full buffer.
    let mut ring = enforcer.take_events()?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let drain = std::thread::spawn(move || {
        while !stop2.load(Ordering::Relaxed) {
            while ring.next().is_some() {}
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    let prog_id = linked_program(bench, Hook::Connect4)?;
    let cases: [(&str, &TestCgroup, &str); 4] = [
        (
            "fast path: unprotected destination (127.0.0.1)",
            &pods.allowed,
            "127.0.0.1:9",
        ),
        (
            "deny path: protected, no entry (EPERM + event)",
            &pods.denied,
            "169.254.169.254:80",
        ),
        (
            "allowed path: entry on the pod, caller in its container",
            &pods.allowed,
            "169.254.169.254:80",
        ),
        (
            "allowed path: entry on a Guaranteed pod, caller in it",
            &pods.guaranteed,
            "169.254.169.254:80",
        ),
    ];
    for (name, cg, target) in cases {
        let ns = per_run(prog_id, name, || {
            let _eperm: u32 = bench.worker(Some(cg), &["udp-connect", target, &it])?;
            Ok(())
        })?;
        println!("| {name} | {ns:.1} |");
    }
    stop.store(true, Ordering::Relaxed);
    let _ = drain.join();
    drop(enforcer);
    drop(uninstall(&bench.pins)?);
    Ok(())
}

/// sock_create on socket(AF_INET, SOCK_DGRAM): the raw-socket variant
/// alone, then creator recording for a pod without and with an entry.
fn sock_create(bench: &Bench, pods: &Pods, iterations: u32) -> anyhow::Result<()> {
    let it = iterations.to_string();
    println!(
        "\n### sock_create, socket(AF_INET, SOCK_DGRAM) (no allow-all sock program here: the --deny-raw-sockets row is the nearest floor)\n"
    );
    println!("| installation, caller | ns per run |\n|---|---|");
    let cases: [(&str, Hooks, &TestCgroup); 3] = [
        (
            "--deny-raw-sockets (type test, records nothing), pod not allowed",
            Hooks {
                deny_raw_sockets: true,
                ..Hooks::default()
            },
            &pods.denied,
        ),
        (
            "--judge-socket-creators, pod not allowed (walk 2 levels, allocate a record)",
            Hooks {
                judge_socket_creators: true,
                ..Hooks::default()
            },
            &pods.denied,
        ),
        (
            "--judge-socket-creators, pod allowed (entry found one level up, no record)",
            Hooks {
                judge_socket_creators: true,
                ..Hooks::default()
            },
            &pods.allowed,
        ),
    ];
    for (name, hooks, cg) in cases {
        drop(uninstall(&bench.pins)?);
        let enforcer = bench.install(hooks, pods.allow_map()?)?;
        let prog_id = linked_program(bench, Hook::SockCreate)?;
        let ns = per_run(prog_id, name, || {
            let _: Timings = bench.worker(Some(cg), &[&it, Workload::SocketClose.key()])?;
            Ok(())
        })?;
        println!("| {name} | {ns:.1} |");
        drop(enforcer);
    }
    drop(uninstall(&bench.pins)?);
    Ok(())
}
