//! Shared pieces of the kernel tests.

use std::{path::Path, time::Duration};

use imdsguard_testlab::{
    cgroups::TestCgroup,
    daemon::{self, Daemon},
    handoff::Held,
    lab::Lab,
    probe::Outcome,
};
use serde_json::Value;

use aya::maps::{Map, MapData, RingBuf};
use imdsguard::bpf::pins::PinLayout;
use imdsguard_common::{Event, map_names};

pub const BIN: &str = env!("CARGO_BIN_EXE_imdsguard");

pub fn bin() -> &'static Path {
    Path::new(BIN)
}

pub fn lab(name: &str) -> Lab {
    Lab::new(name).expect("build the lab (needs root, cgroup v2, iproute2)")
}

/// `run --cgroup-root <lab root> --pin-dir <lab pins>` plus `extra`.
pub fn start(lab: &Lab, extra: &[String]) -> Daemon {
    let mut args = vec![
        "--cgroup-root".to_string(),
        lab.root().path().display().to_string(),
        "--pin-dir".to_string(),
        lab.pin_dir().display().to_string(),
    ];
    args.extend_from_slice(extra);
    Daemon::start(bin(), &args).expect("start imdsguard")
}

pub fn flag(name: &str, cg: &TestCgroup) -> [String; 2] {
    [format!("--{name}"), cg.path().display().to_string()]
}

pub fn args<const N: usize>(parts: [&[String]; N]) -> Vec<String> {
    parts.concat()
}

pub fn s(x: &str) -> String {
    x.to_string()
}

pub fn probe(lab: &Lab, cg: Option<&TestCgroup>, kind: &str, target: &str) -> Outcome {
    lab.probe(cg, kind, target)
        .unwrap_or_else(|e| panic!("probe {kind} {target}: {e:#}"))
}

#[track_caller]
pub fn assert_reached(lab: &Lab, cg: Option<&TestCgroup>, kind: &str, target: &str) {
    let o = probe(lab, cg, kind, target);
    assert!(
        o.reached(),
        "{kind} {target} from {:?} should be reached, got {o:?}",
        cg.map(|c| c.path())
    );
}

#[track_caller]
pub fn assert_eperm(lab: &Lab, cg: Option<&TestCgroup>, kind: &str, target: &str) {
    let o = probe(lab, cg, kind, target);
    assert!(
        o.eperm(),
        "{kind} {target} from {:?} should be denied with EPERM, got {o:?}",
        cg.map(|c| c.path())
    );
}

pub fn status(lab: &Lab) -> Value {
    daemon::status(bin(), &lab.pin_dir()).expect("imdsguard status")
}

pub fn counter(status: &Value, name: &str) -> u64 {
    status["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("counter {name} in {status}"))
}

/// Hook names with a pinned link.
pub fn hooks(status: &Value) -> Vec<String> {
    status["links"]
        .as_array()
        .expect("links")
        .iter()
        .map(|l| l["hook"].as_str().expect("hook").to_string())
        .collect()
}

/// Waits for a decision log line about `cgroup_id` and `destination`.
pub fn wait_decision(d: &mut Daemon, cgroup_id: u64, destination: &str, verdict: &str) -> Value {
    d.wait_for(Duration::from_secs(10), |v| {
        v["cgroup_id"].as_u64() == Some(cgroup_id)
            && v["destination"].as_str() == Some(destination)
            && v["verdict"].as_str() == Some(verdict)
    })
    .unwrap_or_else(|e| {
        panic!("no {verdict} decision for cgroup {cgroup_id} -> {destination}: {e:#}")
    })
}

/// Both pods probing the metadata service in a tight loop during a fault.
pub struct Loops {
    prod: std::process::Child,
    test: std::process::Child,
}

impl Loops {
    pub fn start(lab: &Lab, prod: &TestCgroup, test: &TestCgroup, millis: u64) -> Self {
        let ms = millis.to_string();
        let spawn = |cg| {
            lab.spawn_probe(Some(cg), &["tcp-loop", "169.254.169.254:80", &ms])
                .unwrap()
        };
        Self {
            prod: spawn(prod),
            test: spawn(test),
        }
    }

    /// The allowed pod was never denied and the denied pod never got
    /// through; prints the counts (the closing note quotes them).
    pub fn check(self, fault: &str) {
        use imdsguard_testlab::probe::{LoopReport, wait};
        let p: LoopReport = wait(self.prod, Duration::from_secs(30)).unwrap();
        let t: LoopReport = wait(self.test, Duration::from_secs(30)).unwrap();
        eprintln!(
            "fault {fault}: denied pod {} attempts, {} got through; allowed pod {} attempts, {} denied",
            t.reached + t.eperm + t.other,
            t.reached,
            p.reached + p.eperm + p.other,
            p.eperm
        );
        assert!(
            t.eperm > 0 && t.reached == 0,
            "{fault}: denied pod got through: {t:?}"
        );
        assert!(
            p.reached > 0 && p.eperm == 0,
            "{fault}: allowed pod was denied: {p:?}"
        );
    }
}

/// `imdsguard uninstall --pin-dir <lab pins>`; returns its stdout.
pub fn uninstall(lab: &Lab) -> String {
    let out = daemon::command(
        bin(),
        &[
            "uninstall",
            "--pin-dir",
            &lab.pin_dir().display().to_string(),
        ],
    )
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Holds a connection from `cg` for `millis` (see `handoff::Held`).
pub fn hold_for(lab: &Lab, cg: &TestCgroup, target: &str, millis: u64, transport: &str) -> Held {
    Held::start(lab, cg, target, millis, transport)
        .unwrap_or_else(|e| panic!("hold {transport} {target}: {e:#}"))
}

/// Asserts that the connection was aborted by a SOCK_DESTROY: TCP fails
/// with ECONNABORTED; a UDP socket is disconnected, so its next send()
/// fails with EDESTADDRREQ unless it was waiting in recv() (ECONNABORTED).
#[track_caller]
pub fn assert_revoked(held: Held, what: &str) {
    let r = held.report(Duration::from_secs(10)).unwrap();
    let errnos: &[i32] = if what == "udp" {
        &[libc::ECONNABORTED, libc::EDESTADDRREQ]
    } else {
        &[libc::ECONNABORTED]
    };
    assert!(
        r.ended == "error" && r.errno.is_some_and(|e| errnos.contains(&e)),
        "{what}: {r:?}"
    );
    assert!(r.round_trips > 0, "{what}: it worked before: {r:?}");
}

/// Asserts that a held connection is still up. The probe makes a round trip
/// every 20 ms and exits when one fails, so waiting 300 ms first lets a
/// connection that was wrongly closed show.
#[track_caller]
pub fn assert_still_holding(held: &mut Held, what: &str) {
    std::thread::sleep(Duration::from_millis(300));
    assert!(held.still_holding(), "{what}: the connection is gone");
}

/// Waits for the daemon's log line about a revoked connection; returns it.
pub fn wait_revoked(d: &mut Daemon, cgroup_id: u64, destination: &str) -> Value {
    d.wait_for(Duration::from_secs(10), |v| {
        v["message"] == "revoked a connection to a protected destination"
            && v["cgroup_id"].as_u64() == Some(cgroup_id)
            && v["destination"].as_str() == Some(destination)
    })
    .unwrap_or_else(|e| panic!("no revocation of {destination} for cgroup {cgroup_id}: {e:#}"))
}

/// Asserts that an MPTCP probe from `cg` made a real MPTCP connection (the
/// probe says so when the socket did not fall back to TCP).
#[track_caller]
pub fn assert_reached_over_mptcp(lab: &Lab, cg: &TestCgroup, kind: &str, target: &str) {
    let ok = probe(lab, Some(cg), kind, target);
    assert!(
        matches!(&ok, Outcome::Reached { detail } if detail.ends_with(", mptcp")),
        "{kind} {target} from {:?} should be a real MPTCP connection, got {ok:?}",
        cg.path()
    );
}

/// The lab's pods: `prod` (allowed in most tests) and `test`.
pub fn pods(lab: &Lab) -> (TestCgroup, TestCgroup) {
    (lab.cgroup("prod").unwrap(), lab.cgroup("test").unwrap())
}

/// Programs attached directly to `cg` at `attach_type`.
pub fn programs_on(cg: &TestCgroup, attach_type: u32) -> Vec<u32> {
    let f = std::fs::File::open(cg.path()).unwrap();
    imdsguard::bpf::sys::query_cgroup_programs(std::os::fd::AsFd::as_fd(&f), attach_type).unwrap()
}

/// No program on the lab root at any attach type imdsguard uses.
#[track_caller]
pub fn assert_nothing_attached(lab: &Lab) {
    for hook in imdsguard::bpf::hook::Hook::ALL {
        let progs = programs_on(lab.root(), hook.attach_type());
        assert!(progs.is_empty(), "{} still has {progs:?}", hook.name());
    }
}

/// A bare HTTP GET against a daemon's metrics address (host loopback).
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The records waiting in the pinned ring buffer, read while no daemon
/// consumes it.
pub fn pending_events(lab: &Lab) -> Vec<Event> {
    let path = PinLayout::new(lab.pin_dir()).map(map_names::EVENTS);
    let map = Map::from_map_data(MapData::from_pin(&path).unwrap()).unwrap();
    let mut ring = RingBuf::try_from(map).unwrap();
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        assert!(item.len() >= size_of::<Event>(), "short record");
        // SAFETY: Event is repr(C) plain integers; any bit pattern is valid.
        out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) });
    }
    out
}

/// What the node agent starts from, for a library-level start in the lab:
/// `run`'s plan for the lab (plus `extra` flags) with the allow set
/// unknown, as it is until the node agent's first sync.
pub fn node_agent_start(lab: &Lab, extra: &[&str]) -> imdsguard::standalone::Plan {
    use clap::Parser as _;
    use imdsguard::cli::args::{Cli, Command};
    let root = lab.root().path().display().to_string();
    let pins = lab.pin_dir().display().to_string();
    let mut argv = vec![
        "imdsguard",
        "run",
        "--cgroup-root",
        &root,
        "--pin-dir",
        &pins,
    ];
    argv.extend_from_slice(extra);
    let Command::Run(args) = Cli::parse_from(argv).command else {
        unreachable!("parsed as run")
    };
    let mut plan = imdsguard::standalone::plan(&args).unwrap();
    plan.desired.allowed = None;
    plan
}

/// One pinned link as `status` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkRow {
    pub link_id: u64,
    pub program_id: u64,
    /// How many programs the hook has on the attach point.
    pub on_hook: usize,
}

/// hook -> its pinned link, from `status`.
pub fn links(st: &Value) -> std::collections::BTreeMap<String, LinkRow> {
    st["links"]
        .as_array()
        .expect("links")
        .iter()
        .map(|l| {
            (
                l["hook"].as_str().unwrap().to_string(),
                LinkRow {
                    link_id: l["link_id"].as_u64().unwrap(),
                    program_id: l["program_id"].as_u64().unwrap(),
                    on_hook: l["programs_on_hook"].as_array().unwrap().len(),
                },
            )
        })
        .collect()
}
