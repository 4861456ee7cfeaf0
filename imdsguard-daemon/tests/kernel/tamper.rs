//! The tamper window: links detached by hand (BPF_LINK_DETACH, as
//! `bpftool link detach` does) are caught by the cheap check of the held
//! links, and put back from the programs already loaded. The window itself
//! is measured by `imdsguard-bench tamper`, never asserted here.

use std::{collections::BTreeMap, fs, os::fd::AsFd as _, path::Path, time::Duration};

use imdsguard::{
    bpf::{
        enforcer::{Attachment, Enforcer, MapState, Mode},
        hook::Hook,
        pins::PinLayout,
        sys,
    },
    cgroup::mount::CgroupDir,
    destinations,
};
use imdsguard_testlab::{daemon, lab::Lab, tamper};
use libtest_mimic::Trial;

use crate::{support::*, syscalls, trial};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "detached_links_are_caught_by_the_watch_and_relinked",
            detached_links_are_caught_by_the_watch_and_relinked,
        ),
        trial(
            "the_link_watch_is_one_link_info_call_per_link",
            the_link_watch_is_one_link_info_call_per_link,
        ),
    ]
}

const IMDS: &str = "169.254.169.254:80";
const HOOKS: [&str; 4] = ["connect4", "connect6", "sendmsg4", "sendmsg6"];

fn detach(pin: &Path) {
    tamper::detach_link(pin).unwrap_or_else(|e| panic!("{e:#}"));
}

/// With the full pin check made hourly, only the watch of the held links
/// can notice the detach; the re-attach reuses the loaded programs (same
/// program ids, new links) and denies again.
fn detached_links_are_caught_by_the_watch_and_relinked() {
    let lab = lab("tamper");
    let (prod, test) = pods(&lab);
    let mut d = start(
        &lab,
        &args([
            &flag("allow-cgroup", &prod),
            &[s("--udp"), s("--check-interval-secs"), s("3600")],
        ]),
    );
    let before = links(&status(&lab));
    assert_eq!(before.len(), 4, "{before:?}");
    for hook in HOOKS {
        detach(&lab.pin_dir().join("links").join(hook));
    }
    // A generous deadline, not a timing claim: the bench measures the window.
    let warn = d
        .wait_for(Duration::from_secs(10), |v| {
            daemon::message(v) == Some("programs were detached behind our back; re-attaching")
        })
        .unwrap_or_else(|e| panic!("the watch did not notice: {e:#}"));
    let missing = warn["missing"].to_string();
    for hook in HOOKS {
        assert!(missing.contains(hook), "{hook} not in {missing}");
    }
    let done = d
        .wait_for(Duration::from_secs(10), |v| {
            daemon::message(v) == Some("programs re-attached")
        })
        .unwrap_or_else(|e| panic!("not re-attached: {e:#}"));
    assert_eq!(done["how"], "relinked", "{done}");
    let after = links(&status(&lab));
    assert_eq!(after.len(), 4, "{after:?}");
    for (hook, old) in &before {
        let new = after[hook];
        assert_ne!(old.link_id, new.link_id, "{hook}: a new link");
        assert_eq!(
            old.program_id, new.program_id,
            "{hook}: the same program, not reloaded"
        );
        assert_eq!(new.on_hook, 1, "{hook}: only the new link on the hook");
    }
    for target in [IMDS, "[fd00:ec2::254]:80"] {
        for kind in ["tcp", "udp-sendto"] {
            assert_eperm(&lab, Some(&test), kind, target);
            assert_reached(&lab, Some(&prod), kind, target);
        }
    }
}

/// The enforcer of `lab`, in this process, with UDP: four held links.
fn enforcer(lab: &Lab) -> Enforcer {
    let attachment = Attachment {
        cgroup_root: CgroupDir::open(lab.root().path()).unwrap(),
        attach_at: None,
        pins: PinLayout::new(lab.pin_dir()),
        udp: true,
        deny_raw_sockets: false,
        judge_socket_creators: false,
        filter: None,
    };
    let desired = MapState {
        mode: Mode::Enforce,
        allowed: Some(BTreeMap::new()),
        destinations: destinations::compile(&destinations::defaults()).unwrap(),
    };
    Enforcer::start(attachment, &desired)
        .expect("start the enforcer")
        .0
}

/// The check the agent runs ten times a second: counted syscall by syscall,
/// it is one BPF_OBJ_GET_INFO_BY_FD per link and nothing else (no path
/// lookup, no fd opened or closed), it needs no pin, and it names exactly
/// the link that was detached. Then the re-attach, with the loaded program.
fn the_link_watch_is_one_link_info_call_per_link() {
    const INFO: u64 = 15; // BPF_OBJ_GET_INFO_BY_FD
    const OBJ_GET: u64 = 7; // BPF_OBJ_GET
    const CHECKS: u64 = 1_000;
    let lab = lab("tamper-cost");
    let mut e = enforcer(&lab);
    assert_eq!(e.held_links(), 4);

    let (found, counted) = syscalls::count(|| {
        (0..CHECKS)
            .map(|_| e.detached_links().expect("check"))
            .filter(|d| !d.is_empty())
            .count()
    });
    assert_eq!(found, 0, "nothing was detached");
    assert_eq!(
        counted.bpf,
        BTreeMap::from([(INFO, 4 * CHECKS)]),
        "{counted:?}"
    );
    assert!(counted.other.is_empty(), "{counted:?}");

    // The full check, counted the same way, opens each pin (BPF_OBJ_GET,
    // a stat, a close): the counter tells the two apart.
    let (_, full) = syscalls::count(|| e.attached_hooks().expect("full check"));
    assert_eq!(full.bpf.get(&OBJ_GET), Some(&4), "{full:?}");
    assert!(!full.other.is_empty(), "{full:?}");

    // Without its pins the held links still answer (and stay attached).
    let links_dir = lab.pin_dir().join("links");
    let connect6 = links_dir.join("connect6");
    detach(&connect6);
    let moved = lab.pin_dir().join("links-moved");
    fs::rename(&links_dir, &moved).unwrap();
    let (detached, counted) = syscalls::count(|| e.detached_links().expect("check"));
    assert_eq!(detached, [Hook::Connect6]);
    assert_eq!(counted.bpf, BTreeMap::from([(INFO, 4)]), "{counted:?}");
    fs::rename(&moved, &links_dir).unwrap();

    // And the re-attach puts connect6 back with the loaded program.
    let old = pinned(&connect6);
    e.relink(
        &detached,
        &MapState {
            mode: Mode::Enforce,
            allowed: Some(BTreeMap::new()),
            destinations: destinations::compile(&destinations::defaults()).unwrap(),
        },
    )
    .expect("relink");
    assert!(e.detached_links().unwrap().is_empty());
    let new = pinned(&connect6);
    assert_eq!(
        new.cgroup_id,
        CgroupDir::open(lab.root().path()).unwrap().id
    );
    assert_eq!(new.prog_id, old.prog_id, "the same program");
    assert_ne!(new.id, old.id, "a new link");
}

/// The link pinned at `pin`, as the kernel describes it.
fn pinned(pin: &Path) -> sys::LinkInfo {
    sys::link_info(sys::obj_get(pin).unwrap().as_fd()).unwrap()
}
