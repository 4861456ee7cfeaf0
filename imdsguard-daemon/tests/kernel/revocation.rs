//! Revocation: connections to protected destinations that were opened
//! while allowed (or before imdsguard attached) are closed once their
//! owner is denied; nothing else is touched.

use std::time::Duration;

use imdsguard_testlab::{cgroups::TestCgroup, handoff::Held, lab::Lab};
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

fn hold(lab: &Lab, cg: &TestCgroup, target: &str, transport: &str) -> Held {
    hold_for(lab, cg, target, HOLD_MS, transport)
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

    // The control: with --no-revoke, attaching alone closes nothing. The
    // daemon runs long enough for a sweep it should not make.
    let allow = flag("allow-cgroup", &prod);
    let control = start(&lab, &args([&allow, &[s("--no-revoke")]]));
    std::thread::sleep(Duration::from_millis(1000));
    let logs = control.render_logs();
    control.terminate().unwrap();
    assert!(!logs.contains("revocation sweep"), "{logs}");
    for h in &mut denied {
        assert_still_holding(h, "closed without revocation");
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
    assert_still_holding(&mut allowed, "the allowed pod's connection stays");
    assert_still_holding(&mut unprotected, "unprotected connections stay");
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
    assert_still_holding(&mut kept, "before the restart");

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
