//! Checks for the bpf filesystem that holds our pins.

use std::path::{Path, PathBuf};

use crate::{Error, Result, bpf::sys, cgroup::mount::unescape_mountinfo};

pub const BPF_FS_MAGIC: u64 = 0xcafe_4a11;

/// Errors unless `dir` (or, when it does not exist yet, its nearest existing
/// ancestor) is on bpffs: pinning anywhere else fails, and a pin on the wrong
/// filesystem would not outlive the daemon.
pub fn ensure_on_bpffs(dir: &Path) -> Result<()> {
    let mut probe = dir;
    while !probe.exists() {
        probe = probe.parent().unwrap_or(Path::new("/"));
    }
    let magic = sys::statfs_magic(probe)?;
    if magic == BPF_FS_MAGIC {
        Ok(())
    } else {
        Err(Error::NotBpffs {
            path: probe.into(),
            magic,
        })
    }
}

/// Whether `dir` itself is on bpffs.
pub fn is_bpffs(dir: &Path) -> bool {
    sys::statfs_magic(dir).is_ok_and(|m| m == BPF_FS_MAGIC)
}

/// How a mount passes later mounts on (`shared:N` and `master:N` in
/// mountinfo's optional fields).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Propagation {
    /// Sends and receives mount events (`mount --make-shared`).
    Shared,
    /// Receives them from a master (a container's HostToContainer mount).
    Slave,
    /// Neither: the default where nothing (systemd) made it shared.
    Private,
}

/// The mount that holds a path, from mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountOf {
    pub mount_point: PathBuf,
    pub fstype: String,
    pub propagation: Propagation,
}

/// The mount in `mountinfo` that `path` (absolute, symlinks resolved) lies
/// on: the longest mount point above it, the later line where mounts are
/// stacked on the same point.
pub fn mount_of(mountinfo: &str, path: &Path) -> Option<MountOf> {
    let mut best: Option<MountOf> = None;
    for line in mountinfo.lines() {
        // "36 35 98:0 /root /mnt rw,noatime shared:1 master:2 - fstype src opts"
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = pre.split_whitespace().collect();
        let (Some(point), Some(fstype)) = (fields.get(4), post.split_whitespace().next()) else {
            continue;
        };
        let point = PathBuf::from(unescape_mountinfo(point));
        if !path.starts_with(&point)
            || best
                .as_ref()
                .is_some_and(|b| b.mount_point.components().count() > point.components().count())
        {
            continue;
        }
        let optional = fields.get(6..).unwrap_or_default();
        let propagation = if optional.iter().any(|f| f.starts_with("shared:")) {
            Propagation::Shared
        } else if optional.iter().any(|f| f.starts_with("master:")) {
            Propagation::Slave
        } else {
            Propagation::Private
        };
        best = Some(MountOf {
            mount_point: point,
            fstype: fstype.to_string(),
            propagation,
        });
    }
    best
}

/// The mount that holds `dir` in this process's mount namespace (or its
/// nearest existing ancestor, when `dir` does not exist yet).
pub fn pin_mount(dir: &Path) -> Result<Option<MountOf>> {
    let mut probe = dir;
    while !probe.exists() {
        probe = probe.parent().unwrap_or(Path::new("/"));
    }
    let probe = std::fs::canonicalize(probe).map_err(Error::io("resolve", probe))?;
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(Error::io("read", "/proc/self/mountinfo"))?;
    Ok(mount_of(&text, &probe))
}

/// The node agent's start check: the pin directory must be on bpffs
/// (before the agent waits for anything, so that a missing bpffs is an
/// error at once). A private bpffs mount works for
/// pinning, but it is a mis-setup worth a warning: a bpffs the host
/// mounts later is not seen (in a pod), and an agent pod with
/// `mountPropagation: HostToContainer` cannot start on this node (kubelet
/// refuses it with CreateContainerError) when it is the host's mount.
pub fn check_pin_mount(pin_dir: &Path) -> Result<()> {
    ensure_on_bpffs(pin_dir)?;
    if let Some(m) = pin_mount(pin_dir)?
        && m.propagation == Propagation::Private
    {
        tracing::warn!(
            pin_dir = %pin_dir.display(),
            mount = %m.mount_point.display(),
            "the bpffs mount holding the pin directory is private (neither shared nor slave): in a pod, a bpffs the host mounts later is not seen here; on the host, an agent pod with mountPropagation: HostToContainer fails with `CreateContainerError: path \"/sys/fs/bpf\" is mounted on \"/sys/fs/bpf\" but it is not a shared or slave mount`. Fix it on the host with `mount --make-shared /sys/fs/bpf`; check with `findmnt -o TARGET,PROPAGATION /sys/fs/bpf`"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw
30 22 0:26 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:9 - bpf bpf rw,mode=700
31 22 0:27 / /sys/fs/cgroup rw - tmpfs tmpfs rw
";

    #[test]
    fn finds_the_mount_and_its_propagation() {
        let m = mount_of(MOUNTINFO, Path::new("/sys/fs/bpf/imdsguard")).unwrap();
        assert_eq!(
            m,
            MountOf {
                mount_point: "/sys/fs/bpf".into(),
                fstype: "bpf".into(),
                propagation: Propagation::Shared
            }
        );
        // No bpffs mounted there: the pins would land on sysfs.
        let m = mount_of(MOUNTINFO, Path::new("/sys/kernel")).unwrap();
        assert_eq!(
            (m.fstype.as_str(), m.propagation),
            ("sysfs", Propagation::Private)
        );
        assert_eq!(mount_of(MOUNTINFO, Path::new("/tmp")), None);
    }

    #[test]
    fn private_slave_and_stacked_mounts() {
        // A host without systemd: bpffs mounted by hand, private. Then a
        // container's HostToContainer view of it (a slave), stacked later
        // on the same point.
        let private = "30 22 0:26 / /sys/fs/bpf rw - bpf bpf rw\n";
        assert_eq!(
            mount_of(private, Path::new("/sys/fs/bpf/imdsguard"))
                .unwrap()
                .propagation,
            Propagation::Private
        );
        let stacked = "30 22 0:26 / /sys/fs/bpf rw - bpf bpf rw\n\
                       41 30 0:26 / /sys/fs/bpf rw master:9 - bpf bpf rw\n";
        assert_eq!(
            mount_of(stacked, Path::new("/sys/fs/bpf"))
                .unwrap()
                .propagation,
            Propagation::Slave
        );
        let escaped = "30 22 0:26 / /mnt/b\\040pf rw shared:3 master:1 - bpf bpf rw\n";
        let m = mount_of(escaped, Path::new("/mnt/b pf/x")).unwrap();
        assert_eq!(m.propagation, Propagation::Shared);
    }
}
