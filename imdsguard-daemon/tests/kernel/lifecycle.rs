//! Enforcement outlives the daemon: SIGKILL, restart and re-adoption
//! without a gap, counters under a flood, and the explicit uninstall.

use std::time::Duration;

use imdsguard_testlab::probe::{self, LoopReport};
use libtest_mimic::Trial;

use crate::{support::*, trial};

pub fn trials() -> Vec<Trial> {
    vec![
        trial("enforcement_survives_sigkill", enforcement_survives_sigkill),
        trial(
            "restart_readopts_pins_without_a_gap",
            restart_readopts_pins_without_a_gap,
        ),
        trial(
            "a_denial_flood_is_counted_exactly",
            a_denial_flood_is_counted_exactly,
        ),
        trial("uninstall_removes_everything", uninstall_removes_everything),
        trial(
            "text_logs_have_no_colour_off_a_terminal",
            text_logs_have_no_colour_off_a_terminal,
        ),
    ]
}

/// `run` with text logs into a pipe (a log file, `kubectl logs`): the
/// ready line and a denial (a WARN, coloured on a terminal) carry no ANSI
/// escapes.
fn text_logs_have_no_colour_off_a_terminal() {
    use std::io::{BufRead as _, BufReader};

    let lab = lab("nocolour");
    let test = lab.cgroup("test").unwrap();
    let mut child = std::process::Command::new(bin())
        .args(["--log-format", "text", "run", "--cgroup-root"])
        .arg(lab.root().path())
        .arg("--pin-dir")
        .arg(lab.pin_dir())
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stderr = child.stderr.take().unwrap();
    let _child = Kill(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut lines = Vec::new();
    let wait_for = |what: &str, lines: &mut Vec<String>| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !lines.iter().any(|l| l.contains(what)) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) => lines.push(l),
                Err(e) => panic!("no {what:?} line ({e}): {lines:#?}"),
            }
        }
    };
    wait_for(" ready", &mut lines);
    assert_eperm(&lab, Some(&test), "tcp", "169.254.169.254:80");
    wait_for("metadata access denied", &mut lines);
    let coloured: Vec<&String> = lines.iter().filter(|l| l.contains('\x1b')).collect();
    assert!(coloured.is_empty(), "ANSI escapes in {coloured:#?}");
    assert!(
        lines.iter().any(|l| l.contains(" WARN ")),
        "the denial is a plain WARN line: {lines:#?}"
    );
}

fn enforcement_survives_sigkill() {
    let lab = lab("sigkill");
    let prod = lab.cgroup("prod").unwrap();
    let test = lab.cgroup("test").unwrap();
    let d = start(&lab, &flag("allow-cgroup", &prod));
    d.kill();
    assert_eperm(&lab, Some(&test), "http", "169.254.169.254:80");
    assert_reached(&lab, Some(&prod), "http", "169.254.169.254:80");
    assert_eq!(hooks(&status(&lab)), ["connect4", "connect6"]);
}

fn restart_readopts_pins_without_a_gap() {
    let lab = lab("restart");
    let prod = lab.cgroup("imds/prod").unwrap();
    let test = lab.cgroup("imds/test").unwrap();
    let late = lab.cgroup("imds/late").unwrap();
    let a = start(&lab, &flag("allow-cgroup", &prod));
    let before = links(&status(&lab));

    // Both pods hammer the metadata service while the daemon is killed and a
    // new one (with one more allowed cgroup) re-adopts the pins.
    let loops = Loops::start(&lab, &prod, &test, 4000);
    std::thread::sleep(Duration::from_millis(500));
    a.kill();
    std::thread::sleep(Duration::from_millis(300));
    let _b = start(
        &lab,
        &args([&flag("allow-cgroup", &prod), &flag("allow-cgroup", &late)]),
    );
    loops.check("SIGKILL + restart with re-adoption");

    let after = links(&status(&lab));
    assert_eq!(before.len(), 2);
    for (hook, old) in &before {
        let new = after[hook];
        assert_eq!(
            old.link_id, new.link_id,
            "{hook}: the pinned link is re-adopted, not re-created"
        );
        assert_ne!(
            old.program_id, new.program_id,
            "{hook}: the new program is swapped in with BPF_LINK_UPDATE"
        );
        assert_eq!(new.on_hook, 1, "{hook}: no leftover program on the hook");
    }
    assert_reached(&lab, Some(&late), "tcp", "169.254.169.254:80");
}

fn a_denial_flood_is_counted_exactly() {
    use aya::maps::{Map, MapData, PerCpuArray};
    use imdsguard::bpf::pins::PinLayout;
    use imdsguard_common::{REPORT_BURST, ReportBucket, map_names};

    let lab = lab("flood");
    let test = lab.cgroup("test").unwrap();
    // Nobody reads the ring buffer once the daemon is gone: what the
    // kernel reports stays there for us to count.
    start(&lab, &[]).kill();
    let before = status(&lab);
    let t = lab
        .spawn_probe(Some(&test), &["tcp-loop", "169.254.169.254:80", "1500"])
        .unwrap();
    let flood: LoopReport = probe::wait(t, Duration::from_secs(20)).unwrap();
    let after = status(&lab);
    let denied = counter(&after, "denied") - counter(&before, "denied");
    let dropped = counter(&after, "events_dropped") - counter(&before, "events_dropped");
    assert_eq!(flood.reached, 0);
    assert_eq!(denied, flood.eperm, "every EPERM is counted");
    assert!(flood.eperm > 5_000, "flood too small: {flood:?}");
    // The limiter: a few events per CPU and second stand for the flood,
    // so the ring buffer never fills.
    let events: Vec<_> = pending_events(&lab)
        .into_iter()
        .filter(|e| e.cgroup_id == test.id())
        .collect();
    let cpus = std::thread::available_parallelism().unwrap().get() as u64;
    assert_eq!(dropped, 0, "nothing lost to a full ring buffer");
    assert!(
        (events.len() as u64) <= 3 * u64::from(REPORT_BURST) * cpus,
        "{} events for one key",
        events.len()
    );
    // Each event carries what was held back before it; what the last
    // window held back waits in the key's per-CPU bucket. Together: every
    // denial, exactly.
    let reported: u64 = events.iter().map(|e| 1 + u64::from(e.suppressed)).sum();
    let path = PinLayout::new(lab.pin_dir()).map(map_names::REPORT_LIMIT);
    let map = Map::from_map_data(MapData::from_pin(&path).unwrap()).unwrap();
    let buckets: PerCpuArray<_, ReportBucket> = PerCpuArray::try_from(map).unwrap();
    let pending: u64 = buckets
        .iter()
        .map(|r| r.unwrap())
        .flat_map(|per_cpu| per_cpu.iter().copied().collect::<Vec<_>>())
        .filter(|b| b.key.cgroup_id == test.id())
        .map(|b| u64::from(b.suppressed))
        .sum();
    assert_eq!(
        reported + pending,
        denied,
        "events {} carry {reported}, buckets hold {pending}",
        events.len()
    );
}

fn uninstall_removes_everything() {
    let lab = lab("uninstall");
    let test = lab.cgroup("test").unwrap();
    start(&lab, &[s("--udp")]).kill();
    assert_eperm(&lab, Some(&test), "tcp", "169.254.169.254:80");
    let text = uninstall(&lab);
    assert!(
        text.contains("connect4, connect6, sendmsg4, sendmsg6"),
        "{text}"
    );
    assert!(!lab.pin_dir().exists(), "pin dir removed");
    assert_reached(&lab, Some(&test), "tcp", "169.254.169.254:80");
    assert_reached(&lab, Some(&test), "udp-sendto", "169.254.169.254:80");
    // Nothing of ours is left on the cgroup.
    assert_nothing_attached(&lab);
    // A second uninstall is a no-op, not an error.
    uninstall(&lab);
}
