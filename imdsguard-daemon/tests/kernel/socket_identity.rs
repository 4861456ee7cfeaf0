//! Socket identity: a socket handed to another process (SCM_RIGHTS) is
//! judged on both its creator and the process that connects it. Neither
//! side's rights travel with the socket.

use imdsguard_testlab::{cgroups::TestCgroup, daemon::Daemon, handoff, lab::Lab, probe::Outcome};
use libtest_mimic::Trial;

use crate::{support::*, trial};

const IMDS: &str = "169.254.169.254:80";
const IMDS6: &str = "[fd00:ec2::254]:80";
/// Not protected: the hand-off itself must keep working.
const LOOPBACK: &str = "127.0.0.1:8080";

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "passed_sockets_are_judged_on_creator_and_caller",
            passed_sockets_are_judged_on_creator_and_caller,
        ),
        trial(
            "audit_mode_reports_the_creator_without_denying",
            audit_mode_reports_the_creator_without_denying,
        ),
        trial(
            "host_sockets_are_judged_when_attached_above_the_pods",
            host_sockets_are_judged_when_attached_above_the_pods,
        ),
    ]
}

fn hand_off(
    lab: &Lab,
    creator: Option<&TestCgroup>,
    receiver: &TestCgroup,
    target: &str,
    transport: &str,
) -> Outcome {
    handoff::hand_off(lab, creator, receiver, target, transport)
        .unwrap_or_else(|e| panic!("hand-off to {target}: {e:#}"))
}

#[track_caller]
fn assert_handoff(got: Outcome, reached: bool, what: &str) {
    if reached {
        assert!(got.reached(), "{what}: expected to reach, got {got:?}");
    } else {
        assert!(got.eperm(), "{what}: expected EPERM, got {got:?}");
    }
}

fn passed_sockets_are_judged_on_creator_and_caller() {
    let lab = lab("identity");
    let prod = lab.cgroup("prod").unwrap();
    let test = lab.cgroup("test").unwrap();
    let allow = flag("allow-cgroup", &prod);
    let mut d = start(&lab, &allow);

    // The control: an allowed pod's own socket, passed within the pod.
    assert_handoff(
        hand_off(&lab, Some(&prod), &prod, IMDS, "tcp"),
        true,
        "prod -> prod",
    );
    // The allowed creator's rights stay behind: the denied caller is denied.
    for (target, transport) in [(IMDS, "tcp"), (IMDS6, "tcp"), (IMDS, "udp")] {
        assert_handoff(
            hand_off(&lab, Some(&prod), &test, target, transport),
            false,
            &format!("prod -> test, {transport} {target}"),
        );
        let line = wait_decision(&mut d, test.id(), target, "denied");
        assert_eq!(line["decided_by"], "caller", "{line}");
    }
    // By default only the caller is judged: an allowed pod that connects a
    // socket a denied pod gave it is let through (it could as well proxy).
    assert_handoff(
        hand_off(&lab, Some(&test), &prod, IMDS, "tcp"),
        true,
        "test -> prod, callers only",
    );
    d.terminate().unwrap();

    // With creators judged (same pins, re-adopted), a denied pod's socket
    // keeps its creator's verdict whoever connects it.
    let mut d = start(&lab, &args([&allow, &[s("--judge-socket-creators")]]));
    assert_eq!(
        hooks(&status(&lab)),
        ["connect4", "connect6", "sock_create"]
    );
    for (target, transport) in [(IMDS, "tcp"), (IMDS6, "tcp"), (IMDS, "udp")] {
        assert_handoff(
            hand_off(&lab, Some(&test), &prod, target, transport),
            false,
            &format!("test -> prod, {transport} {target}"),
        );
        let line = wait_decision(&mut d, prod.id(), target, "denied");
        assert_eq!(line["decided_by"], "socket-creator", "{line}");
    }
    assert_handoff(
        hand_off(&lab, Some(&prod), &test, IMDS, "tcp"),
        false,
        "prod -> test, creators judged",
    );
    assert_handoff(
        hand_off(&lab, Some(&prod), &prod, IMDS, "tcp"),
        true,
        "prod -> prod, creators judged",
    );
    // Unprotected destinations are not judged at all.
    assert_handoff(
        hand_off(&lab, Some(&test), &prod, LOOPBACK, "tcp"),
        true,
        "test -> prod, unprotected",
    );
    // Sockets the kernel creates for the allowed pod carry no record and
    // are not denied: MPTCP's connect() runs the hook on its first subflow.
    assert_reached(&lab, Some(&prod), "http", IMDS);
    assert_reached_over_mptcp(&lab, &prod, "mptcp", "169.254.169.254:8262");
    assert_eperm(&lab, Some(&test), "mptcp", "169.254.169.254:8262");
}

fn audit_mode_reports_the_creator_without_denying() {
    let lab = lab("identity-audit");
    let prod = lab.cgroup("prod").unwrap();
    let test = lab.cgroup("test").unwrap();
    let mut d = start(
        &lab,
        &args([
            &flag("allow-cgroup", &prod),
            &[s("--mode"), s("audit"), s("--judge-socket-creators")],
        ]),
    );
    // Audit never denies, but it names the socket's creator as the reason.
    assert_handoff(
        hand_off(&lab, Some(&test), &prod, IMDS, "tcp"),
        true,
        "test -> prod (audit)",
    );
    let line = wait_decision(&mut d, prod.id(), IMDS, "audited");
    assert_eq!(line["decided_by"], "socket-creator", "{line}");
}

/// The lab root stands in for the node's hierarchy root: `pods` is the
/// judged subtree (kubepods) and `host` holds the node's own processes.
fn host_sockets_are_judged_when_attached_above_the_pods() {
    let lab = lab("identity-host");
    let pods = lab.cgroup("pods").unwrap();
    let prod = lab.cgroup("pods/prod").unwrap();
    let test = lab.cgroup("pods/test").unwrap();
    let host = lab.cgroup("host").unwrap();
    let path = |c: &TestCgroup| c.path().display().to_string();
    let run = |extra: &[String]| {
        let mut a = vec![
            s("--cgroup-root"),
            path(&pods),
            s("--pin-dir"),
            lab.pin_dir().display().to_string(),
            s("--allow-cgroup"),
            path(&prod),
        ];
        a.extend_from_slice(extra);
        Daemon::start(bin(), &a).expect("start imdsguard")
    };

    // Attached at the pods' root (the default), a host socket in a pod's
    // hands is not judged: the kernel runs the programs of the cgroup that
    // created the socket. This is the gap `--attach-at` closes.
    let d = run(&[]);
    assert_handoff(
        hand_off(&lab, Some(&host), &test, IMDS, "tcp"),
        true,
        "host -> test, attached at the pods' root",
    );
    d.terminate().unwrap();
    uninstall(&lab);

    let mut d = run(&[s("--attach-at"), path(lab.root())]);
    let st = status(&lab);
    for link in st["links"].as_array().unwrap() {
        assert_eq!(link["cgroup_id"], lab.root().id(), "{link}");
    }
    assert_eq!(st["scope"]["judged_root_id"], pods.id(), "{st}");
    // The host's socket is judged on the pod that uses it...
    assert_handoff(
        hand_off(&lab, Some(&host), &test, IMDS, "tcp"),
        false,
        "host -> test",
    );
    let line = wait_decision(&mut d, test.id(), IMDS, "denied");
    assert_eq!(line["decided_by"], "caller", "{line}");
    // An allowed pod may use a host socket: the host is trusted, and the
    // pod is allowed on its own.
    assert_handoff(
        hand_off(&lab, Some(&host), &prod, IMDS, "tcp"),
        true,
        "host -> prod",
    );

    // Host processes are neither judged nor counted.
    let before = status(&lab)["counters"].clone();
    assert_reached(&lab, Some(&host), "http", IMDS);
    assert_reached(&lab, Some(&host), "udp-connect", IMDS);
    assert_handoff(
        hand_off(&lab, Some(&test), &host, IMDS, "tcp"),
        true,
        "test -> host: the host is trusted",
    );
    assert_eq!(status(&lab)["counters"], before);
    // Pods are judged as before.
    assert_reached(&lab, Some(&prod), "http", IMDS);
    assert_eperm(&lab, Some(&test), "http", IMDS);
    // `explain` says the same of both.
    let explain = |cg: &TestCgroup| -> serde_json::Value {
        let pins = lab.pin_dir().display().to_string();
        let cgroup = path(cg);
        let args = [
            "explain",
            "--cgroup",
            &cgroup,
            "--pin-dir",
            &pins,
            "-o",
            "json",
        ];
        let out = imdsguard_testlab::daemon::command(bin(), &args).unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let host_says = explain(&host);
    assert_eq!(host_says["action"], "allow", "{host_says}");
    assert!(
        host_says["decided_by"]
            .as_str()
            .unwrap()
            .contains("outside the judged subtree"),
        "{host_says}"
    );
    let test_says = explain(&test);
    assert_eq!(
        test_says["destinations"][0]["verdict"], "EPERM",
        "{test_says}"
    );
}
