//! Fixtures for the room's unit tests: a pod UID in both of kubelet's
//! spellings, a container id, and a fake cgroup tree.

use std::{
    fs,
    path::PathBuf,
    sync::atomic::{AtomicUsize, Ordering},
};

use crate::cgroup::pod::PodUid;

pub const UID: &str = "3f2a1b4c-5d6e-4f70-8a9b-0c1d2e3f4a5b";
/// [`UID`] as the systemd driver writes it.
pub const UID_: &str = "3f2a1b4c_5d6e_4f70_8a9b_0c1d2e3f4a5b";
pub const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

pub fn uid() -> PodUid {
    UID.parse().unwrap()
}

/// A fake cgroup tree in a temp dir, removed on drop.
pub struct Tree(pub PathBuf);

impl Tree {
    pub fn new(dirs: &[&str]) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let root =
            std::env::temp_dir().join(format!("imdsguard-cgroup-tree-{}-{n}", std::process::id()));
        let tree = Tree(root);
        for d in dirs {
            fs::create_dir_all(tree.0.join(d)).unwrap();
        }
        fs::create_dir_all(&tree.0).unwrap();
        tree
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
