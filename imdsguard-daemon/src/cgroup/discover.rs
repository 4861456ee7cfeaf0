//! Finding this node's kubepods cgroup below the cgroup2 mount when it is
//! not given: a bounded breadth-first scan that skips pod cgroups.

use std::{
    collections::VecDeque,
    fs, io,
    path::{Path, PathBuf},
};

use crate::cgroup::pod::{KubepodsLayout, PodCgroupError, is_pod_dir_name};

/// How deep below the cgroup2 mount [`discover`] looks for the kubepods
/// cgroup: deep enough for kind nodes seen from their host
/// (`system.slice/docker-<id>.scope/kubelet.slice/kubelet-kubepods.slice`).
pub const DISCOVER_MAX_DEPTH: usize = 4;

/// Finds this node's kubepods cgroup below the cgroup2 mount point,
/// breadth-first and at most [`DISCOVER_MAX_DEPTH`] levels down. Pod
/// cgroups and kubepods directories are not searched: a kubelet running
/// inside a pod is not this node's kubelet.
pub fn discover(cgroup2_mount: &Path) -> Result<KubepodsLayout, PodCgroupError> {
    scan(cgroup2_mount)?.verdict(cgroup2_mount)
}

/// One discovery pass below a cgroup2 mount.
pub(crate) struct Scan {
    /// Every kubepods directory found, sorted.
    pub found: Vec<KubepodsLayout>,
    /// Every directory listed: a kubepods cgroup that appears later shows
    /// up in one of these.
    pub listed: Vec<PathBuf>,
}

impl Scan {
    /// Exactly one kubepods directory, or why not.
    pub fn verdict(mut self, cgroup2_mount: &Path) -> Result<KubepodsLayout, PodCgroupError> {
        match self.found.len() {
            0 => Err(PodCgroupError::NoKubepods {
                mount: cgroup2_mount.into(),
                max_depth: DISCOVER_MAX_DEPTH,
            }),
            1 => Ok(self.found.remove(0)),
            _ => Err(PodCgroupError::AmbiguousKubepods {
                mount: cgroup2_mount.into(),
                found: self
                    .found
                    .into_iter()
                    .map(|l| l.root().to_path_buf())
                    .collect(),
            }),
        }
    }
}

/// Breadth-first, at most [`DISCOVER_MAX_DEPTH`] levels down; errors only
/// when the mount itself cannot be read.
pub(crate) fn scan(cgroup2_mount: &Path) -> Result<Scan, PodCgroupError> {
    let io = |op, path: &Path| {
        let path = path.to_path_buf();
        move |source| PodCgroupError::Io { op, path, source }
    };
    let mut found = Vec::new();
    let mut listed = Vec::new();
    let mut queue = VecDeque::from([(cgroup2_mount.to_path_buf(), 0)]);
    while let Some((dir, depth)) = queue.pop_front() {
        let entries = match fs::read_dir(&dir) {
            // Cgroups come and go while we walk; only the mount must exist.
            Err(e) if e.kind() == io::ErrorKind::NotFound && depth > 0 => continue,
            other => other.map_err(io("read", &dir))?,
        };
        listed.push(dir.clone());
        for entry in entries {
            let entry = entry.map_err(io("read", &dir))?;
            // file_type() does not follow symlinks: the walk stays in the tree.
            if !entry
                .file_type()
                .map_err(io("stat", &entry.path()))?
                .is_dir()
            {
                continue;
            }
            let path = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if let Some(layout) = KubepodsLayout::from_root(&path) {
                found.push(layout);
            } else if depth + 1 < DISCOVER_MAX_DEPTH && !is_pod_dir_name(&name) {
                queue.push_back((path, depth + 1));
            }
        }
    }
    found.sort_by(|a, b| a.root().cmp(b.root()));
    Ok(Scan { found, listed })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::pod::{CgroupDriver, QosClass};
    use crate::cgroup::test_tree::{CID, Tree, UID, UID_, uid};

    #[test]
    fn discover_finds_a_systemd_root() {
        let t = Tree::new(&[
            "init.scope",
            "system.slice/containerd.service",
            "user.slice/user-1000.slice",
            &format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
            ),
        ]);
        let l = discover(&t.0).unwrap();
        assert_eq!(
            (l.root(), l.driver(), l.slice_prefix()),
            (
                t.path("kubepods.slice").as_path(),
                CgroupDriver::Systemd,
                "kubepods"
            )
        );
        assert!(l.pod_dir(&uid(), QosClass::Burstable).is_dir());
    }

    #[test]
    fn discover_finds_a_cgroupfs_root() {
        let t = Tree::new(&[
            "system.slice",
            &format!("kubepods/besteffort/pod{UID}/{CID}"),
        ]);
        let l = discover(&t.0).unwrap();
        assert_eq!(
            (l.root(), l.driver()),
            (t.path("kubepods").as_path(), CgroupDriver::Cgroupfs)
        );
        assert!(l.pod_dir(&uid(), QosClass::BestEffort).is_dir());
    }

    #[test]
    fn discover_finds_kinds_nested_roots() {
        let t = Tree::new(&[
            &format!("kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID_}.slice"),
            "system.slice",
        ]);
        let l = discover(&t.0).unwrap();
        assert_eq!(l.slice_prefix(), "kubelet-kubepods");
        assert!(l.pod_dir(&uid(), QosClass::Guaranteed).is_dir());

        let t = Tree::new(&[&format!("kubelet/kubepods/burstable/pod{UID}")]);
        let l = discover(&t.0).unwrap();
        assert_eq!(
            (l.root(), l.driver()),
            (t.path("kubelet/kubepods").as_path(), CgroupDriver::Cgroupfs)
        );
        assert!(l.pod_dir(&uid(), QosClass::Burstable).is_dir());
    }

    #[test]
    fn discover_reports_every_candidate() {
        // A host running two kind nodes, each with its own kubelet.
        let node = |id: &str| {
            format!("system.slice/docker-{id}.scope/kubelet.slice/kubelet-kubepods.slice")
        };
        let t = Tree::new(&[&node("aa"), &node("bb"), "kubepods.slice"]);
        let e = discover(&t.0).unwrap_err();
        let PodCgroupError::AmbiguousKubepods { found, .. } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(
            found,
            &[
                t.path("kubepods.slice"),
                t.path(&node("aa")),
                t.path(&node("bb"))
            ]
        );
        let msg = e.to_string();
        assert!(msg.starts_with("several kubepods cgroups below "), "{msg}");
        for p in found {
            assert!(msg.contains(&p.display().to_string()), "{msg}");
        }
    }

    #[test]
    fn discover_is_bounded() {
        // Too deep, inside a pod cgroup, or not a directory: none counts.
        let t = Tree::new(&[
            "a.slice/b.slice/c.slice/d.slice/kubepods.slice",
            &format!("kubelet-kubepods-pod{UID_}.slice/kubepods.slice"),
            &format!("pod{UID}/kubepods"),
            "files",
        ]);
        fs::write(t.path("files/kubepods.slice"), "").unwrap();
        std::os::unix::fs::symlink(
            t.path("a.slice/b.slice/c.slice/d.slice/kubepods.slice"),
            t.path("files/kubepods"),
        )
        .unwrap();
        let e = discover(&t.0).unwrap_err();
        assert!(
            matches!(e, PodCgroupError::NoKubepods { max_depth: 4, .. }),
            "{e:?}"
        );
        assert!(e.to_string().starts_with("no kubepods cgroup"), "{e}");

        let t = Tree::new(&["a.slice/b.slice/c.slice/kubepods.slice"]);
        assert_eq!(
            discover(&t.0).unwrap().root(),
            t.path("a.slice/b.slice/c.slice/kubepods.slice")
        );
    }

    #[test]
    fn discover_needs_the_mount() {
        let t = Tree::new(&[]);
        let e = discover(&t.path("nope")).unwrap_err();
        assert!(
            matches!(&e, PodCgroupError::Io { op: "read", source, .. } if source.kind() == io::ErrorKind::NotFound)
        );
    }
}
