//! [`CgroupResolver`] on the real cgroupfs: a pod's cgroup is the
//! directory kubelet names for it below the kubepods cgroup, if it exists.

use crate::{
    cgroup::{
        mount::CgroupDir,
        pod::{KubepodsLayout, PodUid, QosClass},
    },
    policy::desired::CgroupResolver,
};

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
        let _ = std::fs::remove_dir_all(&base);
    }
}
