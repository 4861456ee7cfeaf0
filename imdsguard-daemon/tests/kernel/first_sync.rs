//! A cold install's first moment: until the agent has written a complete
//! allow set, the kernel's events say the caller may be a pod the agent
//! does not know yet, so that the report does not count them as audit
//! hits of pods the policy leaves out.

use std::collections::BTreeMap;

use imdsguard::bpf::enforcer::{Enforcer, Mode};
use imdsguard_common::verdict;
use libtest_mimic::Trial;

use crate::{support::*, trial};

pub fn trials() -> Vec<Trial> {
    vec![trial(
        "events_before_the_first_sync_say_so",
        events_before_the_first_sync_say_so,
    )]
}

fn events_before_the_first_sync_say_so() {
    let lab = lab("firstsync");
    let (_prod, test) = pods(&lab);
    let plan = node_agent_start(&lab, &["--mode", "audit"]);
    let (mut enforcer, _) = Enforcer::start(plan.attachment, &plan.desired).unwrap();

    assert_reached(&lab, Some(&test), "tcp", "169.254.169.254:80");
    let before = audits_of(&lab, test.id());
    assert_eq!(
        before,
        [1],
        "one audit hit, before the first sync: {before:?}"
    );

    // The first complete allow set (this node has no allowed pod).
    enforcer
        .sync_allowed(Mode::Audit, &BTreeMap::new())
        .unwrap();
    assert_reached(&lab, Some(&test), "tcp", "169.254.169.254:80");
    let after = audits_of(&lab, test.id());
    assert_eq!(after, [0], "one audit hit, after the sync: {after:?}");

    // A restart adopts the pins: the installation has been synced before.
    drop(enforcer);
    let plan = node_agent_start(&lab, &["--mode", "audit"]);
    let (_again, _) = Enforcer::start(plan.attachment, &plan.desired).unwrap();
    assert_reached(&lab, Some(&test), "tcp", "169.254.169.254:80");
    let restarted = audits_of(&lab, test.id());
    assert_eq!(restarted, [0], "after a restart: {restarted:?}");
}

/// The `before_sync` of each pending audit event of `cgroup` (draining
/// the ring buffer).
fn audits_of(lab: &imdsguard_testlab::lab::Lab, cgroup: u64) -> Vec<u32> {
    pending_events(lab)
        .into_iter()
        .filter(|e| e.cgroup_id == cgroup && e.verdict == verdict::AUDITED)
        .map(|e| e.before_sync)
        .collect()
}
