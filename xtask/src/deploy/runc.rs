//! The runc bundle of the container check: a private bpffs, throwaway
//! cgroups, the OCI config and starting and stopping the container.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::test::status;

use super::deploy_dir;

/// A runc bundle, a private bpffs and throwaway cgroups; removed on drop.
pub(super) struct ContainerLab {
    pub(super) dir: PathBuf,
    pub(super) bpffs: PathBuf,
    /// The cgroup the agent judges, inside the host's cgroup v2 mount.
    pub(super) root: PathBuf,
    pub(super) binary: PathBuf,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Run {
    Agent,
    /// The agent with revocation sweeping the bind-mounted namespaces.
    Revoking,
    Uninstall,
}

pub(super) const CONTAINER_ID: &str = "imdsguard-deploy-check";
pub(super) const ATTACH_TIMEOUT: Duration = Duration::from_secs(15);

impl ContainerLab {
    pub(super) fn new(binary: &Path) -> anyhow::Result<Self> {
        let dir = deploy_dir().join("runc");
        // Leftovers of a run that was cut short.
        let _ = Command::new("runc")
            .args(["delete", "--force", CONTAINER_ID])
            .output();
        let cgroup2 = cgroup2_mount()?;
        let root = cgroup2.join("imdsguard-deploy-check");
        let lab = ContainerLab {
            bpffs: dir.join("bpffs"),
            dir,
            root,
            binary: binary.to_owned(),
        };
        lab.cleanup();
        let rootfs = lab.dir.join("bundle/rootfs");
        for d in [
            "usr/local/bin",
            "proc",
            "sys",
            "dev",
            "etc",
            "tmp",
            "var/run/netns",
        ] {
            fs::create_dir_all(rootfs.join(d))?;
        }
        fs::copy(binary, rootfs.join("usr/local/bin/imdsguard"))
            .context("copy the binary into the bundle")?;
        fs::create_dir_all(&lab.bpffs)?;
        status(
            Command::new("mount")
                .args(["-t", "bpf", "bpf"])
                .arg(&lab.bpffs),
        )?;
        for c in ["pods/allowed", "pods/denied"] {
            fs::create_dir_all(lab.root.join(c))
                .with_context(|| format!("create cgroup {}", lab.root.join(c).display()))?;
        }
        Ok(lab)
    }

    pub(super) fn start(&self, run: Run, caps: &[String], seccomp: &str) -> anyhow::Result<Child> {
        if run != Run::Uninstall {
            // A clean slate: no pins from the previous case.
            let _ = Command::new(&self.binary)
                .arg("uninstall")
                .arg("--pin-dir")
                .arg(self.bpffs.join("imdsguard"))
                .output();
        }
        let config = self.config(run, caps, seccomp);
        fs::write(self.dir.join("bundle/config.json"), config)?;
        let log = fs::File::create(self.dir.join("agent.log"))?;
        Command::new("runc")
            .args(["run", "--bundle"])
            .arg(self.dir.join("bundle"))
            .arg(CONTAINER_ID)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start runc")
    }

    /// Whether both connect links show up in the pins before the agent exits
    /// or the timeout passes.
    pub(super) fn wait_attached(&self, child: &mut Child) -> anyhow::Result<bool> {
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        loop {
            let st = Command::new(&self.binary)
                .arg("status")
                .arg("--pin-dir")
                .arg(self.bpffs.join("imdsguard"))
                .args(["-o", "json"])
                .output()
                .context("run imdsguard status")?;
            let text = String::from_utf8_lossy(&st.stdout);
            if st.status.success()
                && text.contains("\"hook\": \"connect4\"")
                && text.contains("\"hook\": \"connect6\"")
            {
                return Ok(true);
            }
            if child.try_wait()?.is_some() {
                return Ok(false);
            }
            if Instant::now() > deadline {
                bail!(
                    "no attach and no exit after {ATTACH_TIMEOUT:?}:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    pub(super) fn stop(&self, child: &mut Child) {
        if child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("runc")
                .args(["kill", CONTAINER_ID, "KILL"])
                .output();
            let _ = child.wait();
        }
        let _ = Command::new("runc")
            .args(["delete", "--force", CONTAINER_ID])
            .output();
    }

    pub(super) fn log(&self) -> String {
        let text = fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default();
        // Without the colour codes of the agent's text log format.
        let mut plain = String::with_capacity(text.len());
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for c in chars.by_ref() {
                    if c == 'm' {
                        break;
                    }
                }
            } else {
                plain.push(c);
            }
        }
        plain
    }

    /// An OCI runtime config with a DaemonSet's security settings: the
    /// agent's ([`Run::Agent`]) or the uninstall one's ([`Run::Uninstall`]:
    /// bpffs only, no cgroup tree).
    pub(super) fn config(&self, run: Run, caps: &[String], seccomp: &str) -> String {
        let quote = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
        let path = |p: &Path| quote(&p.to_string_lossy());
        let caps = caps.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", ");
        let (args, cgroup_mount) = match run {
            Run::Agent | Run::Revoking => {
                let agent = format!(
                    r#""run", "--cgroup-root", {}, "--allow-cgroup", {}, "--pin-dir", "/sys/fs/bpf/imdsguard""#,
                    path(&self.pods()),
                    path(&self.pods().join("allowed"))
                );
                let cgroup = r#"
    {"destination": "/sys/fs/cgroup", "type": "bind", "source": "/sys/fs/cgroup", "options": ["rbind", "ro", "rprivate"]},"#;
                if run == Run::Agent {
                    (agent, cgroup.to_owned())
                } else {
                    (
                        format!(
                            r#"{agent}, "--netns-dir", "/var/run/netns", "--log-level", "debug""#
                        ),
                        format!(
                            r#"{cgroup}
    {{"destination": "/var/run/netns", "type": "bind", "source": {}, "options": ["rbind", "ro", "rslave"]}},"#,
                            path(&self.netns_dir())
                        ),
                    )
                }
            }
            Run::Uninstall => (
                r#""uninstall", "--pin-dir", "/sys/fs/bpf/imdsguard""#.to_owned(),
                String::new(),
            ),
        };
        format!(
            r#"{{
  "ociVersion": "1.0.2",
  "process": {{
    "terminal": false,
    "user": {{"uid": 0, "gid": 0}},
    "args": ["/usr/local/bin/imdsguard", {args}],
    "env": ["PATH=/usr/local/bin"],
    "cwd": "/",
    "capabilities": {{"bounding": [{caps}], "effective": [{caps}], "permitted": [{caps}]}},
    "noNewPrivileges": true
  }},
  "root": {{"path": "rootfs", "readonly": true}},
  "hostname": "imdsguard",
  "mounts": [
    {{"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}},
    {{"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}},
    {{"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}},{cgroup_mount}
    {{"destination": "/sys/fs/bpf", "type": "bind", "source": {bpffs}, "options": ["rbind", "rw", "rslave"]}}
  ],
  "linux": {{
    "namespaces": [{{"type": "pid"}}, {{"type": "network"}}, {{"type": "ipc"}}, {{"type": "uts"}}, {{"type": "mount"}}, {{"type": "cgroup"}}],
    "cgroupsPath": "/imdsguard-deploy-check-runc",
    "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
    "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
    "seccomp": {seccomp}
  }}
}}
"#,
            bpffs = path(&self.bpffs),
        )
    }

    pub(super) fn cleanup(&self) {
        let _ = Command::new("runc")
            .args(["delete", "--force", CONTAINER_ID])
            .output();
        let pins = self.bpffs.join("imdsguard");
        if pins.exists() {
            let _ = Command::new(&self.binary)
                .arg("uninstall")
                .arg("--pin-dir")
                .arg(&pins)
                .output();
        }
        let _ = Command::new("umount").arg(&self.bpffs).output();
        let netns = self.netns_dir();
        let _ = Command::new("umount").arg(netns.join("check")).output();
        let _ = Command::new("umount").arg(&netns).output();
        for c in ["pods/allowed", "pods/denied", "pods", ""] {
            let _ = fs::remove_dir(self.root.join(c));
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for ContainerLab {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// The first cgroup2 mount point in /proc/self/mountinfo: /sys/fs/cgroup,
/// or /sys/fs/cgroup/unified on a hybrid host.
pub(super) fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").context("read mountinfo")?;
    mountinfo
        .lines()
        .find_map(|l| {
            let (fields, fs_part) = l.split_once(" - ")?;
            (fs_part.split_whitespace().next()? == "cgroup2")
                .then(|| fields.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .context("no cgroup2 mount in /proc/self/mountinfo")
}
