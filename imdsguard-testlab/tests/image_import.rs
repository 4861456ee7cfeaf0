//! An image archive from `imdsguard_testlab::image` imports into a real
//! containerd 1.6 with `ctr` and is unpacked, and so does the agent's amd64
//! OCI archive from `cargo xtask image`, under its release name, for
//! linux/amd64, and runs. The containerd is private to each test: its own
//! root, state, sockets, `opt` and temp dir, and no CRI. Needs root;
//! installs containerd from Debian when it is missing, and fails (never
//! skips) when containerd cannot start or the OCI archive is missing.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use imdsguard_testlab::image::{self, ImageBuilder};
use imdsguard_testlab::scratch::ScratchDir;

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

fn has_command(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs containerd (and runc, which it would run pods with) from
/// Debian, refreshing the package lists only when the first try fails.
fn ensure_containerd() {
    if has_command("containerd") && has_command("ctr") {
        return;
    }
    let install = || {
        Command::new("apt-get")
            .args([
                "install",
                "-y",
                "--no-install-recommends",
                "containerd",
                "runc",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        let updated = Command::new("apt-get").arg("update").status();
        assert!(updated.is_ok_and(|s| s.success()), "apt-get update failed");
        assert!(install(), "apt-get install containerd runc failed");
    }
}

/// The mount points at or under `dir`, from /proc/self/mountinfo (the
/// containerd runs in our mount namespace).
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    fs::read_to_string("/proc/self/mountinfo")
        .expect("read /proc/self/mountinfo")
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|m| m.starts_with(dir))
        .collect()
}

/// A containerd with everything in its own temp dir. Dropping it stops the
/// process (SIGTERM, then SIGKILL), detaches any mount it left, and removes
/// the dir.
struct Containerd {
    child: Option<Child>,
    dir: ScratchDir,
}

impl Containerd {
    fn start() -> Self {
        let dir = ScratchDir::new("imdsguard-containerd").expect("create the containerd dir");
        let path = |name: &str| {
            dir.join(name)
                .to_str()
                .expect("a UTF-8 temp dir")
                .to_owned()
        };
        let q = |name: &str| serde_json::Value::from(path(name)).to_string();
        let config = format!(
            "version = 2\n\
             root = {root}\n\
             state = {state}\n\
             temp = {tmp}\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\", \"io.containerd.snapshotter.v1.aufs\", \
             \"io.containerd.snapshotter.v1.btrfs\", \"io.containerd.snapshotter.v1.devmapper\", \
             \"io.containerd.snapshotter.v1.zfs\"]\n\
             [grpc]\n  address = {sock}\n\
             [ttrpc]\n  address = {ttrpc}\n\
             [debug]\n  address = \"\"\n\
             [metrics]\n  address = \"\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = {opt}\n",
            root = q("root"),
            state = q("state"),
            tmp = q("tmp"),
            sock = q("containerd.sock"),
            ttrpc = q("containerd.sock.ttrpc"),
            opt = q("opt"),
        );
        fs::write(dir.join("config.toml"), config).expect("write config.toml");
        fs::create_dir(dir.join("tmp")).expect("create tmp");
        let log = File::create(dir.join("containerd.log")).expect("create the log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            // Temp mounts (the layer unpack) go under TMPDIR, read at start.
            .env("TMPDIR", dir.join("tmp"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log"))
            .stderr(log)
            .spawn()
            .expect("spawn containerd");
        let mut containerd = Self {
            child: Some(child),
            dir,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let ready = Command::new("ctr")
                .arg("--address")
                .arg(containerd.socket())
                .args(["--connect-timeout", "1s", "version"])
                .output()
                .is_ok_and(|o| o.status.success());
            if ready {
                return containerd;
            }
            let exited = containerd
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                panic!(
                    "containerd did not start ({exited:?}):\n{}",
                    fs::read_to_string(containerd.dir.join("containerd.log")).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops containerd by its pid: SIGTERM, then SIGKILL after a timeout.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill has no memory preconditions; the pid is our unreaped child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
        // Never remove files through a mount that was left behind: detach
        // the deepest first. `dir` is removed after this.
        for mount in mounts_under(self.dir()).iter().rev() {
            if let Ok(c) = std::ffi::CString::new(mount.as_os_str().as_encoded_bytes()) {
                // SAFETY: a valid NUL-terminated path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

/// Whether any process's command line names `needle`.
fn processes_naming(needle: &str) -> Vec<String> {
    fs::read_dir("/proc")
        .expect("read /proc")
        .filter_map(|e| {
            let e = e.ok()?;
            e.file_name().to_str()?.parse::<u32>().ok()?;
            let cmdline = fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(needle).then_some(cmdline)
        })
        .collect()
}

#[test]
fn archive_imports_into_containerd_and_unpacks() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test runs containerd: run it as root"
    );
    ensure_containerd();

    let work = ScratchDir::new("imdsguard-image-import").expect("scratch dir");
    let archive = work.join("podprobe.tar");
    let built = ImageBuilder::new("imdsguard.local/podprobe:e2e")
        .entrypoint(["/bin/true"])
        .file("/bin/true", Path::new("/bin/true"), 0o755)
        .file("/etc/hostname", b"podprobe\n", 0o644)
        .symlink("/sbin", "bin")
        .write(&archive)
        .expect("write the archive");

    let mut containerd = Containerd::start();
    let dir = containerd.dir().to_owned();
    let socket = containerd.socket();
    image::import(&archive, &socket).expect("ctr images import");
    let listed = image::list(&socket).expect("ctr images ls");
    assert!(
        image::is_listed("imdsguard.local/podprobe:e2e", &socket).expect("ctr images ls"),
        "not listed: {listed:?}"
    );
    // Unpacked: a one-layer image's only snapshot is named by its diff id
    // (its chain id) in the default overlayfs snapshotter.
    let snapshots = Command::new("ctr")
        .arg("--address")
        .arg(&socket)
        .args(["--namespace", image::K8S_NAMESPACE, "snapshots", "ls"])
        .output()
        .expect("ctr snapshots ls");
    let snapshots = String::from_utf8_lossy(&snapshots.stdout);
    assert!(
        snapshots.contains(&built.diff_id),
        "no snapshot {} in:\n{snapshots}",
        built.diff_id
    );
    // Importing the same archive again is harmless.
    image::import(&archive, &socket).expect("ctr images import, again");

    containerd.stop();
    let left = processes_naming(dir.to_str().expect("UTF-8"));
    assert!(left.is_empty(), "processes left: {left:?}");
    let mounts = mounts_under(&dir);
    drop(containerd);
    assert!(
        mounts.is_empty(),
        "mounts left under {}: {mounts:?}",
        dir.display()
    );
    assert!(!dir.exists(), "{} is still there", dir.display());
}

/// `$IMDSGUARD_AGENT_OCI`, or where `cargo xtask image` writes the amd64
/// archive: `<target>/image/imdsguard-<version>-amd64.oci.tar`.
fn agent_archive() -> PathBuf {
    if let Some(p) = std::env::var_os("IMDSGUARD_AGENT_OCI") {
        return p.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    target.join(format!(
        "image/imdsguard-{}-amd64.oci.tar",
        env!("CARGO_PKG_VERSION")
    ))
}

/// The archive's index.json.
fn index_json(archive: &Path) -> serde_json::Value {
    let file = File::open(archive).expect("open the archive");
    let mut tar = tar::Archive::new(file);
    let entry = tar
        .entries()
        .expect("a tar")
        .map(|e| e.expect("an entry"))
        .find(|e| e.path().is_ok_and(|p| p == Path::new("index.json")))
        .expect("index.json in the archive");
    serde_json::from_reader(entry).expect("index.json is JSON")
}

/// The `ctr images ls` line of `name`, split into its columns (REF TYPE
/// DIGEST SIZE... PLATFORMS LABELS).
fn listing(socket: &Path, name: &str) -> Option<Vec<String>> {
    let out = Command::new("ctr")
        .arg("--address")
        .arg(socket)
        .args(["--namespace", image::K8S_NAMESPACE, "images", "ls"])
        .output()
        .expect("ctr images ls");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .find(|cols| cols.first().is_some_and(|c| c == name))
}

#[test]
fn agent_oci_archive_imports_for_amd64_and_runs() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test runs containerd: run it as root"
    );
    ensure_containerd();
    let archive = agent_archive();
    assert!(
        archive.is_file(),
        "{} is missing: run `cargo xtask image` first (or set IMDSGUARD_AGENT_OCI)",
        archive.display()
    );
    let name = format!("ghcr.io/imdsguard/imdsguard:{}", env!("CARGO_PKG_VERSION"));

    let mut containerd = Containerd::start();
    let dir = containerd.dir().to_owned();
    let socket = containerd.socket();
    image::import_platform(&archive, "linux/amd64", &socket).expect("ctr images import");
    let cols = listing(&socket, &name).unwrap_or_else(|| {
        panic!(
            "{name} not listed: {:?}",
            image::list(&socket).unwrap_or_default()
        )
    });
    // ctr names the index's manifest for the platform.
    let index = index_json(&archive);
    assert_eq!(
        (cols.get(1), cols.get(2)),
        (
            Some(&"application/vnd.oci.image.manifest.v1+json".to_owned()),
            index["manifests"][0]["digest"]
                .as_str()
                .map(str::to_owned)
                .as_ref()
        ),
        "{cols:?}, index.json {index}"
    );
    assert_eq!(
        cols.iter().rev().nth(1).map(String::as_str),
        Some("linux/amd64"),
        "the platforms column of {cols:?}"
    );
    // The two names the real-node e2e gives it for its helm upgrade.
    let tags = [
        "imdsguard.local/imdsguard:e2e-1",
        "imdsguard.local/imdsguard:e2e-2",
    ];
    image::tag(&name, &tags, &socket).expect("ctr images tag");
    for t in tags {
        assert!(image::is_listed(t, &socket).expect("ctr images ls"), "{t}");
    }

    // The unpacked root filesystem holds the agent, which runs.
    let rootfs = dir.join("rootfs");
    fs::create_dir(&rootfs).expect("create the mount point");
    let ctr = |args: &[&str]| {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&socket)
            .args(["--namespace", image::K8S_NAMESPACE])
            .args(args)
            .output()
            .expect("run ctr");
        assert!(
            out.status.success(),
            "ctr {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let mountpoint = rootfs.to_str().expect("UTF-8");
    ctr(&[
        "images",
        "mount",
        "--platform",
        "linux/amd64",
        &name,
        mountpoint,
    ]);
    let version = Command::new(rootfs.join("usr/local/bin/imdsguard"))
        .arg("--version")
        .output();
    let entries: Vec<String> = fs::read_dir(&rootfs)
        .map(|d| {
            d.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    ctr(&["images", "unmount", "--rm", mountpoint]);
    let version = version.expect("run the image's imdsguard");
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("imdsguard {}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(entries, ["usr"], "the image holds more than the agent");

    containerd.stop();
    let left = processes_naming(dir.to_str().expect("UTF-8"));
    assert!(left.is_empty(), "processes left: {left:?}");
    let mounts = mounts_under(&dir);
    drop(containerd);
    assert!(
        mounts.is_empty(),
        "mounts left under {}: {mounts:?}",
        dir.display()
    );
}
