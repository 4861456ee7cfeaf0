//! cgroup v2 discovery: where the unified hierarchy is mounted, and the id
//! and absolute level of a cgroup directory.
//!
//! The kernel's `bpf_get_current_ancestor_cgroup_id(level)` counts levels
//! from the real root of the hierarchy, so a level is computed from the
//! mount's root inside the hierarchy (field 4 of mountinfo) plus the path
//! below the mount point. That stays right inside a container whose cgroup
//! mount is not the hierarchy root.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Component, Path, PathBuf},
};

use procfs::process::{MountInfo, Process};

use crate::{Error, Result, bpf::sys};

pub const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;

/// One cgroup2 mount from `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup2Mount {
    /// Where it is mounted, e.g. `/sys/fs/cgroup` or `/sys/fs/cgroup/unified`.
    pub mount_point: PathBuf,
    /// Which directory of the hierarchy the mount shows, usually `/`.
    pub root: PathBuf,
}

/// The cgroup2 mounts among `mounts`, in order.
fn cgroup2_of(mounts: impl IntoIterator<Item = MountInfo>) -> Vec<Cgroup2Mount> {
    mounts
        .into_iter()
        .filter(|m| m.fs_type == "cgroup2")
        .map(|m| Cgroup2Mount {
            // procfs leaves mountinfo's octal escapes in place.
            mount_point: PathBuf::from(unescape_mountinfo(&m.mount_point.to_string_lossy())),
            root: PathBuf::from(unescape_mountinfo(&m.root)),
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
pub fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..=i + 3].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// All cgroup2 mounts of this process's mount namespace.
pub fn cgroup2_mounts() -> Result<Vec<Cgroup2Mount>> {
    let mountinfo = Process::myself()
        .and_then(|p| p.mountinfo())
        .map_err(|source| Error::Procfs {
            path: "/proc/self/mountinfo",
            source,
        })?;
    let mounts = cgroup2_of(mountinfo);
    if mounts.is_empty() {
        return Err(Error::NoCgroup2Mount);
    }
    Ok(mounts)
}

/// The first cgroup2 mount that shows the whole hierarchy, else the first one.
pub fn primary_cgroup2_mount() -> Result<Cgroup2Mount> {
    let mounts = cgroup2_mounts()?;
    Ok(mounts
        .iter()
        .find(|m| m.root == Path::new("/"))
        .unwrap_or(&mounts[0])
        .clone())
}

/// A cgroup v2 directory with the identity the kernel uses for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupDir {
    pub path: PathBuf,
    /// The cgroup id: on cgroup2 (kernfs, 64-bit inode numbers) it is the
    /// directory's inode number, the value `bpf_get_current_cgroup_id` returns.
    pub id: u64,
    /// Absolute depth below the hierarchy root (the root is level 0).
    pub level: u32,
}

impl CgroupDir {
    /// Opens an existing cgroup v2 directory. Errors name the path when it
    /// does not exist or is not on cgroup v2.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let canonical = match fs::canonicalize(path) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::CgroupMissing { path: path.into() });
            }
            Err(e) => return Err(Error::io("resolve", path)(e)),
        };
        let magic = sys::statfs_magic(&canonical)?;
        if magic != CGROUP2_SUPER_MAGIC {
            return Err(Error::NotCgroup2 {
                path: path.into(),
                magic,
            });
        }
        let meta = fs::metadata(&canonical).map_err(Error::io("stat", &canonical))?;
        let level = level_of(&canonical, &cgroup2_mounts()?)?;
        Ok(Self {
            path: canonical,
            id: meta.ino(),
            level,
        })
    }

    /// A directory below this one, if it exists. Cheaper than [`open`]
    /// for many pods: the level comes from ours, not from mountinfo.
    ///
    /// [`open`]: CgroupDir::open
    pub fn descendant(&self, path: &Path) -> Option<CgroupDir> {
        let below = path.strip_prefix(&self.path).ok()?;
        let meta = fs::metadata(path).ok()?;
        if !meta.is_dir() {
            return None;
        }
        let depth = below
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .count();
        Some(Self {
            path: path.to_path_buf(),
            id: meta.ino(),
            level: self.level + depth as u32,
        })
    }

    /// Whether `self` is `other` or lies below it.
    pub fn is_within(&self, other: &CgroupDir) -> bool {
        self.path.starts_with(&other.path)
    }
}

/// Absolute level of a canonical path inside one of `mounts` (longest
/// matching mount point wins).
pub fn level_of(path: &Path, mounts: &[Cgroup2Mount]) -> Result<u32> {
    let mount = mounts
        .iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.components().count())
        .ok_or_else(|| Error::NotBelowCgroup2Mount { path: path.into() })?;
    let below = path
        .strip_prefix(&mount.mount_point)
        .expect("filtered on starts_with");
    let count = |p: &Path| {
        p.components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .count()
    };
    Ok((count(&mount.root) + count(below)) as u32)
}

#[cfg(test)]
mod tests {
    use procfs::{FromBufRead as _, process::MountInfos};

    use super::*;

    fn parse_cgroup2_mounts(mountinfo: &str) -> Vec<Cgroup2Mount> {
        cgroup2_of(MountInfos::from_buf_read(mountinfo.as_bytes()).unwrap())
    }

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_the_unified_mount_on_a_hybrid_host() {
        let mounts = parse_cgroup2_mounts(HYBRID);
        assert_eq!(
            mounts,
            vec![Cgroup2Mount {
                mount_point: "/sys/fs/cgroup/unified".into(),
                root: "/".into()
            }]
        );
    }

    #[test]
    fn cgroup_v1_only_has_no_cgroup2_mount() {
        let v1 = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n";
        assert!(parse_cgroup2_mounts(v1).is_empty());
    }

    #[test]
    fn levels_count_from_the_hierarchy_root() {
        let mounts = parse_cgroup2_mounts(HYBRID);
        let p = Path::new("/sys/fs/cgroup/unified/kubepods.slice/kubepods-burstable.slice/pod");
        assert_eq!(level_of(p, &mounts).unwrap(), 3);
        assert_eq!(
            level_of(Path::new("/sys/fs/cgroup/unified"), &mounts).unwrap(),
            0
        );
        assert!(level_of(Path::new("/tmp/x"), &mounts).is_err());
    }

    #[test]
    fn a_namespaced_mount_adds_its_root_depth() {
        // A container whose cgroup namespace root is /kubepods/pod1/ctr.
        let text = "50 40 0:38 /kubepods/pod1/ctr /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let mounts = parse_cgroup2_mounts(text);
        assert_eq!(
            level_of(Path::new("/sys/fs/cgroup/child"), &mounts).unwrap(),
            4
        );
    }

    #[test]
    fn the_longest_mount_point_wins() {
        let text = "\
1 0 0:1 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw
2 1 0:1 /a/b /sys/fs/cgroup/x rw - cgroup2 cgroup2 rw
";
        let mounts = parse_cgroup2_mounts(text);
        assert_eq!(
            level_of(Path::new("/sys/fs/cgroup/x/c"), &mounts).unwrap(),
            3
        );
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        let text = "1 0 0:1 / /mnt/with\\040space rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mounts(text)[0].mount_point,
            Path::new("/mnt/with space")
        );
    }
}
