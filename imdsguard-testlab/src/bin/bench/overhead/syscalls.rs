//! Part 1: per-call cost of each workload with each arm attached, arms
//! interleaved round by round.

use std::collections::BTreeMap;

use imdsguard::bpf::uninstall::uninstall;
use imdsguard_testlab::{
    bench::{Timings, Workload},
    cgroups::TestCgroup,
    noop,
};

use imdsguard_testlab::stats::{median, ratio_cell};

use super::{Bench, Hooks, Pods};

/// What is attached to the lab root during an arm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Setup {
    /// Nothing attached anywhere on the machine.
    Detached,
    /// An allow-all program on connect4/6: the kernel's floor.
    Noop,
    /// imdsguard, default hooks.
    Imdsguard,
    /// An allow-all program on connect4/6 and sendmsg4/6.
    NoopUdp,
    /// imdsguard --udp.
    ImdsguardUdp,
    /// imdsguard --deny-raw-sockets: sock_create tests the socket type and
    /// records nothing.
    DenyRaw,
    /// imdsguard --judge-socket-creators: sock_create walks the allow map
    /// and records every creator that is not allowed.
    JudgeCreators,
}

/// Who runs the worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Caller {
    /// A container of a pod without an allow entry.
    Pod,
    /// A container of a pod with an allow entry.
    AllowedPod,
    /// A host process, outside the attach root.
    Host,
}

impl Setup {
    const ALL: [Setup; 7] = [
        Setup::Detached,
        Setup::Noop,
        Setup::Imdsguard,
        Setup::NoopUdp,
        Setup::ImdsguardUdp,
        Setup::DenyRaw,
        Setup::JudgeCreators,
    ];

    fn name(self) -> &'static str {
        match self {
            Setup::Detached => "not attached",
            Setup::Noop => "allow-all program (connect4/6)",
            Setup::Imdsguard => "imdsguard (connect4/6)",
            Setup::NoopUdp => "allow-all program (+sendmsg4/6)",
            Setup::ImdsguardUdp => "imdsguard --udp (+sendmsg4/6)",
            Setup::DenyRaw => "imdsguard --deny-raw-sockets (+sock_create)",
            Setup::JudgeCreators => "imdsguard --judge-socket-creators (+sock_create)",
        }
    }

    /// What each arm is compared with in the connect/sendmsg table: the
    /// allow-all program for imdsguard's sock_addr hooks, imdsguard's
    /// default for what sock_create adds.
    fn floor(self) -> Setup {
        match self {
            Setup::Imdsguard => Setup::Noop,
            Setup::ImdsguardUdp => Setup::NoopUdp,
            Setup::DenyRaw | Setup::JudgeCreators => Setup::Imdsguard,
            _ => Setup::Detached,
        }
    }

    /// Who runs the worker: the allowed pod only where its entry changes
    /// what the programs do for an unprotected destination.
    fn callers(self) -> &'static [Caller] {
        match self {
            Setup::JudgeCreators => &[Caller::Pod, Caller::AllowedPod, Caller::Host],
            _ => &[Caller::Pod, Caller::Host],
        }
    }

    fn hooks(self) -> Hooks {
        Hooks {
            udp: self == Setup::ImdsguardUdp,
            deny_raw_sockets: self == Setup::DenyRaw,
            judge_socket_creators: self == Setup::JudgeCreators,
        }
    }
}

type Arm = (Setup, Caller);

fn row_name((setup, caller): Arm) -> String {
    match (setup, caller) {
        (Setup::JudgeCreators, Caller::Pod) => format!("{}, pod not allowed", setup.name()),
        (Setup::JudgeCreators, Caller::AllowedPod) => format!("{}, pod allowed", setup.name()),
        _ => setup.name().to_owned(),
    }
}

pub fn run(bench: &Bench, pods: &Pods, rounds: u32, iterations: u32) -> anyhow::Result<()> {
    let allowed = pods.allow_map()?;
    let mut results: BTreeMap<Arm, Vec<Timings>> = BTreeMap::new();
    let it = iterations.to_string();
    for round in 0..rounds {
        let mut order = Setup::ALL.to_vec();
        order.rotate_left(round as usize % Setup::ALL.len());
        for setup in order {
            drop(uninstall(&bench.pins)?);
            let _noop;
            let _enforcer;
            let root = bench.lab.root().path();
            match setup {
                Setup::Detached => {}
                Setup::Noop => _noop = noop::attach(root, &[noop::CONNECT4, noop::CONNECT6])?,
                Setup::NoopUdp => {
                    _noop = noop::attach(
                        root,
                        &[
                            noop::CONNECT4,
                            noop::CONNECT6,
                            noop::SENDMSG4,
                            noop::SENDMSG6,
                        ],
                    )?
                }
                Setup::Imdsguard | Setup::ImdsguardUdp | Setup::DenyRaw | Setup::JudgeCreators => {
                    _enforcer = bench.install(setup.hooks(), allowed.clone())?
                }
            }
            for &caller in setup.callers() {
                let cg: Option<&TestCgroup> = match caller {
                    Caller::Pod => Some(&pods.denied),
                    Caller::AllowedPod => Some(&pods.allowed),
                    Caller::Host => None,
                };
                let r: Timings = bench.worker(cg, &[&it])?;
                results.entry((setup, caller)).or_default().push(r);
            }
        }
        eprintln!("round {}/{rounds} done", round + 1);
    }
    drop(uninstall(&bench.pins)?);

    println!(
        "\n## Hook overhead, unprotected loopback destination ({rounds} interleaved rounds x {iterations} calls)"
    );
    println!(
        "median ns per call; ratio = median [min..max] of per-round ratios against the arm in brackets (pod runs against pod runs, host against host)\n"
    );
    println!(
        "Every imdsguard arm has the same two allow entries (a Burstable pod and a Guaranteed pod), neither on the pod of the \"pod not allowed\" rows. \
         UDP connect and UDP sendto reuse one socket, so sock_create does not run in their timed loop: their sock_create rows are controls.\n"
    );
    connect_table(&results, true);
    connect_table(&results, false);
    socket_table(&results);
    Ok(())
}

fn pod_rows() -> Vec<Arm> {
    Setup::ALL
        .into_iter()
        .flat_map(|s| {
            s.callers()
                .iter()
                .filter(|c| **c != Caller::Host)
                .map(move |c| (s, *c))
        })
        .collect()
}

/// "median ns, median ratio [min..max]" of `w` in `runs` against `floor`,
/// round by round.
fn cell(runs: &[Timings], floor: Option<&[Timings]>, w: Workload) -> String {
    let ns = |r: &Timings| r.get(w).unwrap_or(f64::NAN);
    let med = median(runs.iter().map(ns).collect());
    let Some(floor) = floor else {
        return format!("{med:.0} ns");
    };
    let ratios: Vec<f64> = runs.iter().zip(floor).map(|(r, b)| ns(r) / ns(b)).collect();
    ratio_cell(med, &ratios)
}

/// The connect/sendmsg workloads (TCP connect+close includes its socket()).
fn connect_table(results: &BTreeMap<Arm, Vec<Timings>>, in_pod: bool) {
    let workloads = [
        Workload::TcpConnect,
        Workload::UdpConnect,
        Workload::UdpSendto,
    ];
    println!(
        "{}",
        if in_pod {
            "### From a pod (below the attach root)"
        } else {
            "### From a host process (outside the attach root)"
        }
    );
    print!("| arm | vs |");
    for w in workloads {
        print!(" {} |", w.label());
    }
    println!("\n|---|---|{}", "---|".repeat(workloads.len()));
    let rows: Vec<Arm> = if in_pod {
        pod_rows()
    } else {
        Setup::ALL.into_iter().map(|s| (s, Caller::Host)).collect()
    };
    for (setup, caller) in rows {
        let runs = &results[&(setup, caller)];
        let floor_caller = if caller == Caller::Host {
            Caller::Host
        } else {
            Caller::Pod
        };
        let floor =
            (setup != Setup::Detached).then(|| results[&(setup.floor(), floor_caller)].as_slice());
        print!(
            "| {} | {} |",
            row_name((setup, caller)),
            if setup == Setup::Detached {
                "-"
            } else {
                setup.floor().name()
            }
        );
        for w in workloads {
            print!(" {} |", cell(runs, floor, w));
        }
        println!();
    }
    println!();
}

/// socket()+close() of a UDP socket, every arm against "not attached".
fn socket_table(results: &BTreeMap<Arm, Vec<Timings>>) {
    let w = Workload::SocketClose;
    println!("### socket(AF_INET, SOCK_DGRAM)+close(), against \"not attached\"");
    println!(
        "The connect/sendmsg arms attach nothing that socket() runs: they are controls. A host process runs no program below the attach root: its column is a control too.\n"
    );
    println!("| arm | from a pod | from a host process |\n|---|---|---|");
    let detached = |c| results[&(Setup::Detached, c)].as_slice();
    for (setup, caller) in pod_rows() {
        let floor = (setup != Setup::Detached).then(|| detached(Caller::Pod));
        let host = if caller == Caller::AllowedPod {
            "(as above)".to_owned()
        } else {
            cell(
                &results[&(setup, Caller::Host)],
                (setup != Setup::Detached).then(|| detached(Caller::Host)),
                w,
            )
        };
        println!(
            "| {} | {} | {host} |",
            row_name((setup, caller)),
            cell(&results[&(setup, caller)], floor, w),
        );
    }
    println!();
}
