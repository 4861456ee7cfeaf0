//! Audit mode, per-entry actions, and allow entries on ancestors.

use libtest_mimic::Trial;

use crate::{support::*, trial};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "audit_mode_allows_and_reports",
            audit_mode_allows_and_reports,
        ),
        trial(
            "per_entry_actions_override_the_default",
            per_entry_actions_override_the_default,
        ),
        trial(
            "an_allowed_ancestor_covers_its_subtree",
            an_allowed_ancestor_covers_its_subtree,
        ),
    ]
}

fn audit_mode_allows_and_reports() {
    let lab = lab("audit");
    let prod = lab.cgroup("prod").unwrap();
    let test = lab.cgroup("test").unwrap();
    let mut d = start(
        &lab,
        &args([&flag("allow-cgroup", &prod), &[s("--mode"), s("audit")]]),
    );
    assert_reached(&lab, Some(&test), "tcp", "169.254.169.254:80");
    let line = wait_decision(&mut d, test.id(), "169.254.169.254:80", "audited");
    assert_eq!(line["message"], "metadata access would be denied (audit)");
    // Allowed pods are not reported at all.
    assert_reached(&lab, Some(&prod), "tcp", "169.254.169.254:80");
    let st = status(&lab);
    assert_eq!(st["default_action"], "audit");
    assert_eq!(
        (
            counter(&st, "audited"),
            counter(&st, "denied"),
            counter(&st, "allowed")
        ),
        (1, 0, 1)
    );
    assert!(
        !d.logs()
            .iter()
            .any(|v| v["cgroup_id"].as_u64() == Some(prod.id()))
    );
}

fn per_entry_actions_override_the_default() {
    let lab = lab("per-entry");
    let rollout = lab.cgroup("team-a").unwrap();
    let strict = lab.cgroup("team-b").unwrap();
    let other = lab.cgroup("team-c").unwrap();

    // Global audit, one subtree already enforced.
    let d = start(
        &lab,
        &args([&flag("enforce-cgroup", &strict), &[s("--mode"), s("audit")]]),
    );
    assert_eperm(&lab, Some(&strict), "tcp", "169.254.169.254:80");
    assert_reached(&lab, Some(&other), "tcp", "169.254.169.254:80");
    d.terminate().unwrap();

    // Global enforce, one subtree still in audit.
    let mut d = start(&lab, &flag("audit-cgroup", &rollout));
    assert_reached(&lab, Some(&rollout), "tcp", "169.254.169.254:80");
    wait_decision(&mut d, rollout.id(), "169.254.169.254:80", "audited");
    assert_eperm(&lab, Some(&other), "tcp", "169.254.169.254:80");
    let st = status(&lab);
    assert_eq!(st["allowed"][0]["action"], "audit");
}

fn an_allowed_ancestor_covers_its_subtree() {
    let lab = lab("ancestor");
    let team = lab.cgroup("kubepods/burstable/team").unwrap();
    let deep = lab.cgroup("kubepods/burstable/team/pod1/ctr").unwrap();
    let untrusted = lab.cgroup("kubepods/burstable/team/pod2").unwrap();
    let sibling = lab.cgroup("kubepods/burstable/team2/pod").unwrap();
    let _d = start(
        &lab,
        &args([
            &flag("allow-cgroup", &team),
            &flag("enforce-cgroup", &untrusted),
        ]),
    );
    assert_reached(&lab, Some(&team), "tcp", "169.254.169.254:80");
    assert_reached(&lab, Some(&deep), "tcp", "169.254.169.254:80");
    // The deepest entry decides: an enforce entry inside an allowed subtree.
    assert_eperm(&lab, Some(&untrusted), "tcp", "169.254.169.254:80");
    assert_eperm(&lab, Some(&sibling), "tcp", "169.254.169.254:80");

    // `explain` reads the same maps and walks the same way.
    let explain = |cg: &imdsguard_testlab::cgroups::TestCgroup| -> serde_json::Value {
        let pins = lab.pin_dir().display().to_string();
        let path = cg.path().display().to_string();
        let out = imdsguard_testlab::daemon::command(
            bin(),
            &[
                "explain",
                "--cgroup",
                &path,
                "--pin-dir",
                &pins,
                "-o",
                "json",
            ],
        )
        .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let e = explain(&deep);
    assert_eq!(e["action"], "allow");
    assert_eq!(e["entry"][0], team.path().display().to_string());
    assert!(
        e["destinations"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["verdict"] == "reachable")
    );
    let e = explain(&untrusted);
    assert_eq!(
        (
            e["action"].as_str(),
            e["destinations"][0]["verdict"].as_str()
        ),
        (Some("enforce"), Some("EPERM"))
    );
    let e = explain(&sibling);
    assert_eq!(e["entry"], serde_json::Value::Null);
    assert_eq!(e["decided_by"], "no entry on the path: global default");
    assert_eq!(e["destinations"][0]["verdict"], "EPERM");
}
