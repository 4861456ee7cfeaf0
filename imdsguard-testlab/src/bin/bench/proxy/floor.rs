//! Part 2: the fast path of unprotected traffic with filter mode
//! configured. `overhead`'s allow-all-floor ratio again, with a third arm:
//! the daemon with a filtered cgroup and its proxy, so sock_ops is attached
//! next to connect4/6 and runs on every TCP connect below the root.

use std::collections::BTreeMap;

use imdsguard::bpf::{pins::PinLayout, uninstall::uninstall};
use imdsguard_testlab::{
    bench::{Timings, Workload},
    noop,
    stats::{median, ratio_cell},
};

use super::Bench;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Arm {
    /// An allow-all program on connect4/6: the kernel's floor.
    Noop,
    /// `imdsguard run`, no filter entry: connect4/6.
    Imdsguard,
    /// `imdsguard run --filter-cgroup ... --proxy-listen ...`: connect4/6,
    /// sock_ops and the proxy.
    Filter,
}

impl Arm {
    const ALL: [Arm; 3] = [Arm::Noop, Arm::Imdsguard, Arm::Filter];

    fn name(self) -> &'static str {
        match self {
            Arm::Noop => "allow-all program (connect4/6)",
            Arm::Imdsguard => "imdsguard (connect4/6)",
            Arm::Filter => {
                "imdsguard, filter mode configured (connect4/6 + sock_ops, proxy running)"
            }
        }
    }
}

const WORKLOADS: [Workload; 2] = [Workload::TcpConnect, Workload::UdpConnect];

pub fn run(bench: &Bench, rounds: u32, iterations: u32) -> anyhow::Result<()> {
    let pins = PinLayout::new(bench.lab.pin_dir());
    let callers = [
        ("a pod without an entry", &bench.plain),
        ("the filtered pod", &bench.filtered),
    ];
    let it = iterations.to_string();
    let args: Vec<&str> = std::iter::once(it.as_str())
        .chain(WORKLOADS.map(Workload::key))
        .collect();
    let mut results: BTreeMap<(Arm, usize), Vec<Timings>> = BTreeMap::new();
    for round in 0..rounds {
        let mut order = Arm::ALL.to_vec();
        order.rotate_left(round as usize % Arm::ALL.len());
        for arm in order {
            // The daemon's pins outlive it (fail closed): take them away
            // so that each arm has only its own programs attached.
            drop(uninstall(&pins)?);
            let _noop;
            let _daemon;
            match arm {
                Arm::Noop => {
                    _noop =
                        noop::attach(bench.lab.root().path(), &[noop::CONNECT4, noop::CONNECT6])?
                }
                Arm::Imdsguard => _daemon = bench.daemon(false)?,
                Arm::Filter => _daemon = bench.daemon(true)?,
            }
            for (i, (_, cg)) in callers.iter().enumerate() {
                let r: Timings = bench.worker(cg, &args)?;
                results.entry((arm, i)).or_default().push(r);
            }
        }
        eprintln!("fast-path round {}/{rounds} done", round + 1);
    }
    drop(uninstall(&pins)?);

    println!(
        "## Filter mode and the fast path: unprotected loopback destination ({rounds} interleaved rounds x {iterations} calls)"
    );
    println!(
        "median ns per call; ratio = median [min..max] of per-round ratios against the allow-all program, same caller\n"
    );
    print!("| caller | arm |");
    for w in WORKLOADS {
        print!(" {} |", w.label());
    }
    println!("\n|---|---|{}", "---|".repeat(WORKLOADS.len()));
    for (i, (caller, _)) in callers.iter().enumerate() {
        let floor = &results[&(Arm::Noop, i)];
        for arm in Arm::ALL {
            let runs = &results[&(arm, i)];
            print!("| {caller} | {} |", arm.name());
            for w in WORKLOADS {
                let ns = |t: &Timings| t.get(w).unwrap_or(f64::NAN);
                let med = median(runs.iter().map(ns).collect());
                if arm == Arm::Noop {
                    print!(" {med:.0} ns |");
                } else {
                    let ratios: Vec<f64> =
                        runs.iter().zip(floor).map(|(r, f)| ns(r) / ns(f)).collect();
                    print!(" {} |", ratio_cell(med, &ratios));
                }
            }
            println!();
        }
    }
    println!();
    Ok(())
}
