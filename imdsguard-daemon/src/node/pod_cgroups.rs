//! [`CgroupResolver`] on the real cgroupfs: a pod's cgroup is the
//! directory kubelet names for it below the kubepods cgroup, if it exists.

use std::{
    cell::RefCell,
    collections::HashMap,
    ffi::OsString,
    os::unix::fs::DirEntryExt as _,
    path::{Path, PathBuf},
};

use crate::{
    cgroup::{
        mount::CgroupDir,
        pod::{KubepodsLayout, PodUid, QosClass},
    },
    policy::desired::CgroupResolver,
};

/// The pod cgroups below `root`, as one reconcile sees them: each directory
/// that holds pod directories (the QoS ones, and the root for Guaranteed
/// pods) is listed once, on first use, and a pod's cgroup id is the inode
/// number that listing returns (on cgroup2 the same as `stat`'s, the
/// cgroup id). A `stat` per pod, as [`Cgroupfs`] does, walked the whole
/// path for each of 10,000 pods on every reconcile.
pub struct CgroupListing<'a> {
    pub root: &'a CgroupDir,
    pub layout: &'a KubepodsLayout,
    /// Directory -> its subdirectories' names and inode numbers.
    listed: RefCell<HashMap<PathBuf, HashMap<OsString, u64>>>,
}

impl<'a> CgroupListing<'a> {
    pub fn new(root: &'a CgroupDir, layout: &'a KubepodsLayout) -> Self {
        Self {
            root,
            layout,
            listed: RefCell::default(),
        }
    }

    /// `path`, if it is a directory below the root, from its parent's listing.
    fn find(&self, path: &Path) -> Option<CgroupDir> {
        let below = path.strip_prefix(&self.root.path).ok()?;
        let (parent, name) = (path.parent()?, path.file_name()?);
        let mut listed = self.listed.borrow_mut();
        let dirs = listed
            .entry(parent.to_path_buf())
            .or_insert_with(|| subdirectories(parent));
        Some(CgroupDir {
            id: *dirs.get(name)?,
            path: path.to_path_buf(),
            level: self.root.level + below.components().count() as u32,
        })
    }
}

/// The subdirectories of `dir` by name, with their inode numbers; none if
/// it cannot be read (e.g. a QoS directory kubelet has not created).
fn subdirectories(dir: &Path) -> HashMap<OsString, u64> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return HashMap::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| (e.file_name(), e.ino()))
        .collect()
}

impl CgroupResolver for CgroupListing<'_> {
    fn pod_cgroup(&self, uid: &PodUid, qos: Option<QosClass>) -> Option<CgroupDir> {
        match qos {
            Some(q) => self.find(&self.layout.pod_dir(uid, q)),
            None => self
                .layout
                .candidates(uid)
                .iter()
                .find_map(|p| self.find(p)),
        }
    }
}

/// The pod cgroups below `root`, named as `layout` says.
pub struct Cgroupfs<'a> {
    pub root: &'a CgroupDir,
    pub layout: &'a KubepodsLayout,
}

impl CgroupResolver for Cgroupfs<'_> {
    fn pod_cgroup(&self, uid: &PodUid, qos: Option<QosClass>) -> Option<CgroupDir> {
        match qos {
            Some(q) => self.root.descendant(&self.layout.pod_dir(uid, q)),
            None => self
                .layout
                .candidates(uid)
                .iter()
                .find_map(|p| self.root.descendant(p)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    #[test]
    fn finds_the_directory_with_or_without_a_qos_class() {
        let base =
            std::env::temp_dir().join(format!("imdsguard-pod-cgroups-{}", std::process::id()));
        let root_path = base.join("kubepods");
        let uid: PodUid = "3f2a1b4c-5d6e-4f70-8a9b-0c1d2e3f4a5b".parse().unwrap();
        let dir = root_path.join(format!("besteffort/pod{uid}"));
        std::fs::create_dir_all(&dir).unwrap();
        let root = CgroupDir {
            id: std::fs::metadata(&root_path).unwrap().ino(),
            path: root_path.clone(),
            level: 1,
        };
        let layout = KubepodsLayout::at(&root_path).unwrap();
        let cgroups = Cgroupfs {
            root: &root,
            layout: &layout,
        };
        let ino = std::fs::metadata(&dir).unwrap().ino();
        let found = cgroups
            .pod_cgroup(&uid, Some(QosClass::BestEffort))
            .unwrap();
        assert_eq!((found.id, found.level), (ino, 3));
        assert_eq!(cgroups.pod_cgroup(&uid, None).map(|c| c.id), Some(ino));
        assert_eq!(cgroups.pod_cgroup(&uid, Some(QosClass::Burstable)), None);
        // The listing finds the same directory, id and level.
        let listing = CgroupListing::new(&root, &layout);
        for qos in [Some(QosClass::BestEffort), None] {
            assert_eq!(listing.pod_cgroup(&uid, qos), Some(found.clone()));
        }
        assert_eq!(listing.pod_cgroup(&uid, Some(QosClass::Burstable)), None);
        let other: PodUid = "3f2a1b4c-5d6e-4f70-8a9b-0c1d2e3f4a5c".parse().unwrap();
        assert_eq!(listing.pod_cgroup(&other, None), None);
        let _ = std::fs::remove_dir_all(&base);
    }
}
