//! A fake cgroup tree for the room's unit tests.

use std::{
    fs,
    path::PathBuf,
    sync::atomic::{AtomicUsize, Ordering},
};

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
