//! Revocation: connections to protected destinations that were opened
//! while allowed (or before imdsguard attached) are closed once their
//! owner is denied; nothing else is touched.

use std::time::Duration;

use imdsguard_testlab::{daemon::Daemon, handoff::Held, lab::Lab};
use libtest_mimic::Trial;

use crate::{support::*, trial};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "first_attach_closes_what_denied_pods_hold",
            first_attach_closes_what_denied_pods_hold,
        ),
        trial(
            "losing_the_allow_closes_open_connections",
            losing_the_allow_closes_open_connections,
        ),
    ]
}

const HOLD_TCP: &str = "169.254.169.254:8264";
const HOLD_TCP6: &str = "[fd00:ec2::254]:8264";
/// The fake service's UDP echo on a protected port.
const UDP_ECHO: &str = "169.254.169.254:80";
const UNPROTECTED: &str = "127.0.0.1:8264";
const HOLD_MS: u64 = 8000;

fn hold(lab: &Lab, cg: &imdsguard_testlab::cgroups::TestCgroup, target: &str, t: &str) -> Held {
    Held::start(lab, cg, target, HOLD_MS, t).unwrap_or_else(|e| panic!("hold {t} {target}: {e:#}"))
}

/// Asserts that the connection was aborted by a SOCK_DESTROY: TCP fails
/// with ECONNABORTED; a UDP socket is disconnected, so its next send()
/// fails with EDESTADDRREQ unless it was waiting in recv() (ECONNABORTED).
#[track_caller]
fn assert_revoked(held: Held, what: &str) {
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

/// Waits for the daemon's log line about a revoked connection.
fn wait_revoked(d: &mut Daemon, cgroup_id: u64, destination: &str) {
    d.wait_for(Duration::from_secs(10), |v| {
        v["message"] == "revoked a connection to a protected destination"
            && v["cgroup_id"].as_u64() == Some(cgroup_id)
            && v["destination"].as_str() == Some(destination)
    })
    .unwrap_or_else(|e| panic!("no revocation of {destination} for cgroup {cgroup_id}: {e:#}"));
}

fn first_attach_closes_what_denied_pods_hold() {
    let lab = lab("revoke-first");
    let prod = lab.cgroup("prod").unwrap();
    let test = lab.cgroup("test").unwrap();
    // Opened before imdsguard is there.
    let mut denied = [
        hold(&lab, &test, HOLD_TCP, "tcp"),
        hold(&lab, &test, HOLD_TCP6, "tcp"),
        hold(&lab, &test, UDP_ECHO, "udp"),
    ];
    let mut allowed = hold(&lab, &prod, HOLD_TCP, "tcp");
    let mut unprotected = hold(&lab, &test, UNPROTECTED, "tcp");

    // The control: with --no-revoke, attaching alone closes nothing.
    let allow = flag("allow-cgroup", &prod);
    start(&lab, &args([&allow, &[s("--no-revoke")]]))
        .terminate()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    for h in &mut denied {
        assert!(h.still_holding(), "closed without revocation");
    }

    let mut d = start(&lab, &allow);
    for ((h, target), what) in denied
        .into_iter()
        .zip([HOLD_TCP, "[fd00:ec2::254]:8264", UDP_ECHO])
        .zip(["tcp", "tcp6", "udp"])
    {
        assert_revoked(h, what);
        wait_revoked(&mut d, test.id(), target);
    }
    assert!(
        allowed.still_holding(),
        "the allowed pod's connection stays"
    );
    assert!(unprotected.still_holding(), "unprotected connections stay");
    // New connections are judged as usual.
    assert_eperm(&lab, Some(&test), "tcp", HOLD_TCP);
    assert_reached(&lab, Some(&prod), "tcp", HOLD_TCP);
}

fn losing_the_allow_closes_open_connections() {
    let lab = lab("revoke-loss");
    let prod = lab.cgroup("prod").unwrap();
    let ctr = lab.cgroup("prod/ctr").unwrap();
    let other = lab.cgroup("other").unwrap();
    let d = start(
        &lab,
        &args([&flag("allow-cgroup", &prod), &flag("allow-cgroup", &other)]),
    );
    // Opened while allowed: the entry on the pod covers its container.
    let from_pod = hold(&lab, &prod, HOLD_TCP, "tcp");
    let from_ctr = hold(&lab, &ctr, HOLD_TCP6, "tcp");
    let mut kept = hold(&lab, &other, HOLD_TCP, "tcp");
    d.terminate().unwrap();
    assert!(kept.still_holding());

    // The same pins, re-adopted with `prod` no longer allowed.
    let mut d = start(&lab, &flag("allow-cgroup", &other));
    assert_revoked(from_pod, "pod");
    assert_revoked(from_ctr, "container");
    wait_revoked(&mut d, prod.id(), HOLD_TCP);
    wait_revoked(&mut d, ctr.id(), "[fd00:ec2::254]:8264");
    assert!(
        kept.still_holding(),
        "the still-allowed cgroup keeps its own"
    );
}
