//! Bad input is refused with a message naming what is wrong, and nothing
//! is attached when it is.

use imdsguard_testlab::daemon;
use libtest_mimic::Trial;

use crate::{support::*, trial};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "bad_input_is_refused_and_nothing_attached",
            bad_input_is_refused_and_nothing_attached,
        ),
        trial("bad_environments_are_refused", bad_environments_are_refused),
        trial(
            "node_agent_checks_its_mounts_before_anything_else",
            node_agent_checks_its_mounts_before_anything_else,
        ),
    ]
}

/// Sets the propagation of the lab's own bpffs mount (MS_SHARED or
/// MS_PRIVATE); nothing else is touched.
fn propagate(path: &std::path::Path, flag: libc::c_ulong) {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid NUL-terminated path; a propagation change takes no
    // source, type or data.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            c.as_ptr(),
            std::ptr::null(),
            flag,
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
}

/// `imdsguard node` checks the pin directory's mount and the kubepods
/// root's filesystem first: a private bpffs is a warning that names the
/// fix, a pin directory off bpffs and a kubepods root that can never
/// appear on cgroup v2 are errors. No API server is needed: the agent
/// stops at its (missing) kubeconfig right after these checks.
fn node_agent_checks_its_mounts_before_anything_else() {
    let lab = lab("node-mounts");
    let dir = imdsguard_testlab::scratch::ScratchDir::new("imdsguard-node-mounts").unwrap();
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, imdsguard_testlab::cluster::SEED_POLICY).unwrap();
    let node = |pin_dir: &std::path::Path, kubepods: &std::path::Path| {
        let out = std::process::Command::new(bin())
            .args(["node", "--node-name", "n1", "--policy"])
            .arg(&policy)
            .arg("--pin-dir")
            .arg(pin_dir)
            .arg("--kubepods-root")
            .arg(kubepods)
            .env("KUBECONFIG", dir.join("no-such-kubeconfig"))
            .env_remove("KUBERNETES_SERVICE_HOST")
            .output()
            .unwrap();
        assert!(!out.status.success(), "no API server: it must stop");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let kubepods = lab.root().path().join("kubepods");

    propagate(lab.bpffs(), libc::MS_PRIVATE);
    let err = node(&lab.pin_dir(), &kubepods);
    assert!(
        err.contains("is private") && err.contains("mount --make-shared /sys/fs/bpf"),
        "no warning for a private bpffs:\n{err}"
    );
    assert!(err.contains(&lab.bpffs().display().to_string()), "{err}");
    assert!(err.contains("kubernetes client"), "{err}");

    propagate(lab.bpffs(), libc::MS_SHARED);
    let err = node(&lab.pin_dir(), &kubepods);
    assert!(!err.contains("is private"), "{err}");
    assert!(err.contains("kubernetes client"), "{err}");

    let err = node(&dir.join("pins"), &kubepods);
    assert!(err.contains("is not on a bpf filesystem"), "{err}");
    assert!(!err.contains("kubernetes client"), "{err}");

    let err = node(&lab.pin_dir(), &dir.join("kubepods"));
    assert!(err.contains("is not on cgroup v2"), "{err}");
    assert!(!err.contains("kubernetes client"), "{err}");
    assert_nothing_attached(&lab);
}

fn run_expecting_failure(args: &[String], needle: &str) {
    let mut full = vec![s("run")];
    full.extend_from_slice(args);
    let refs: Vec<&str> = full.iter().map(String::as_str).collect();
    let out = daemon::command(bin(), &refs).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(
        err.contains(needle),
        "{args:?}: expected {needle:?} in:\n{err}"
    );
}

fn bad_input_is_refused_and_nothing_attached() {
    let lab = lab("refusals");
    let root = lab.root().path().display().to_string();
    let pins = lab.pin_dir().display().to_string();
    let base = |extra: &[&str]| -> Vec<String> {
        let mut v = vec![
            s("--cgroup-root"),
            root.clone(),
            s("--pin-dir"),
            pins.clone(),
        ];
        v.extend(extra.iter().map(|x| s(x)));
        v
    };
    let missing = format!("{root}/does-not-exist");
    run_expecting_failure(
        &base(&["--allow-cgroup", &missing]),
        "does-not-exist does not exist",
    );

    let tmp = std::env::temp_dir().join(imdsguard_testlab::unique("not-a-cgroup"));
    std::fs::create_dir(&tmp).unwrap();
    let tmp_s = tmp.display().to_string();
    run_expecting_failure(
        &[
            s("--cgroup-root"),
            tmp_s.clone(),
            s("--pin-dir"),
            pins.clone(),
        ],
        "is not a cgroup v2 directory",
    );
    run_expecting_failure(
        &[
            s("--cgroup-root"),
            root.clone(),
            s("--pin-dir"),
            format!("{tmp_s}/pins"),
        ],
        "is not on a bpf filesystem",
    );
    std::fs::remove_dir(&tmp).unwrap();

    let outside = lab.root().path().parent().unwrap().display().to_string();
    run_expecting_failure(
        &base(&["--allow-cgroup", &outside]),
        "is not inside the cgroup root",
    );
    run_expecting_failure(
        &[
            s("--cgroup-root"),
            outside.clone(),
            s("--pin-dir"),
            pins.clone(),
        ],
        "is the root of the cgroup v2 hierarchy",
    );
    // The attach point must be above the judged root, never inside it.
    let inside = lab.cgroup("inside").unwrap();
    run_expecting_failure(
        &base(&["--attach-at", &inside.path().display().to_string()]),
        "is not an ancestor of (or equal to) the judged cgroup root",
    );
    run_expecting_failure(
        &base(&["--protect", "169.254.169.254/40"]),
        "prefix length 40 is longer than 32",
    );
    run_expecting_failure(
        &base(&["--mode", "permissive"]),
        "invalid value 'permissive'",
    );

    assert_nothing_attached(&lab);
    assert!(
        !lab.pin_dir().join("links").exists()
            || std::fs::read_dir(lab.pin_dir().join("links"))
                .unwrap()
                .next()
                .is_none()
    );
}

/// A node where the programs cannot work is refused at start, never run
/// half-enforcing.
fn bad_environments_are_refused() {
    let lab = lab("bad-env");
    let root = lab.root().path().display().to_string();

    // A cgroup v1 hierarchy (hybrid host: pods in v1 are invisible to the
    // v2 hooks). A named v1 hierarchy of our own, so this runs anywhere.
    let v1 = V1Mount::new();
    run_expecting_failure(
        &[
            s("--cgroup-root"),
            v1.0.display().to_string(),
            s("--pin-dir"),
            lab.pin_dir().display().to_string(),
        ],
        "is not a cgroup v2 directory",
    );

    // A read-only bpffs: nothing can be pinned, so nothing may be attached.
    let ro = imdsguard_testlab::bpffs::PrivateBpffs::mount_readonly(&imdsguard_testlab::unique(
        "imdsguard-ro-bpffs",
    ))
    .unwrap();
    run_expecting_failure(
        &[
            s("--cgroup-root"),
            root.clone(),
            s("--pin-dir"),
            ro.path().join("imdsguard").display().to_string(),
        ],
        "Read-only file system",
    );

    // The node agent without API access stops before it looks for (or
    // waits for) the kubepods cgroup, so before anything is attached. A
    // unified hierarchy without kubepods is no longer an error: the agent
    // waits for it (kubernetes::node_agent_waits_for_a_kubepods_root_that_
    // does_not_exist_yet, and the discovery wait's unit tests). A kubepods
    // root that cannot appear on cgroup v2 still is one (below).
    let policy = std::env::temp_dir().join(imdsguard_testlab::unique("imdsguard-policy.yaml"));
    std::fs::write(&policy, "rules: []\n").unwrap();
    let out = std::process::Command::new(bin())
        .args(["node", "--node-name", "n", "--policy"])
        .arg(&policy)
        .arg("--pin-dir")
        .arg(lab.pin_dir())
        .env("KUBECONFIG", policy.with_extension("no-such-kubeconfig"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("kubernetes client"), "{err}");
    assert!(!err.contains("waiting for it"), "{err}");
    let v1 = V1Mount::new();
    let out = std::process::Command::new(bin())
        .args(["node", "--node-name", "n", "--policy"])
        .arg(&policy)
        .arg("--pin-dir")
        .arg(lab.pin_dir())
        .arg("--kubepods-root")
        .arg(v1.0.join("kubepods"))
        .env("KUBECONFIG", policy.with_extension("no-such-kubeconfig"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    std::fs::remove_file(&policy).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("is not on cgroup v2") && err.contains("can never appear there"),
        "{err}"
    );

    assert_nothing_attached(&lab);
}

/// A private cgroup v1 hierarchy with no controllers (`-o none,name=...`),
/// unmounted on drop.
struct V1Mount(std::path::PathBuf);

impl V1Mount {
    fn new() -> Self {
        let name = imdsguard_testlab::unique("imdsguard-v1");
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "cgroup",
                "-o",
                &format!("none,name={}", &name[..name.len().min(30)]),
                "cgroup",
            ])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mount a cgroup v1 hierarchy at {}",
            dir.display()
        );
        Self(dir)
    }
}

impl Drop for V1Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}
