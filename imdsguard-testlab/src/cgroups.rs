//! Throwaway cgroup v2 directories.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;

/// A cgroup directory the lab created. Drop kills every process in its
/// subtree (`cgroup.kill`) and removes the subtree, deepest first.
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    /// A new cgroup directly below the cgroup v2 mount (found in mountinfo).
    pub fn create_top(name: &str) -> anyhow::Result<Self> {
        let mount = imdsguard::cgroup::mount::primary_cgroup2_mount()
            .context("find the cgroup v2 mount")?;
        Self::create(mount.mount_point.join(name))
    }

    pub fn create(path: PathBuf) -> anyhow::Result<Self> {
        fs::create_dir(&path).with_context(|| format!("create cgroup {}", path.display()))?;
        Ok(Self { path })
    }

    /// A nested cgroup; `rel` may have several components (created as needed).
    /// Only the deepest one is owned by the returned guard; the whole subtree
    /// is removed by the top-level guard anyway.
    pub fn child(&self, rel: &str) -> anyhow::Result<TestCgroup> {
        let path = self.path.join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)
                .with_context(|| format!("create cgroup {}", parent.display()))?;
        }
        Self::create(path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup id (inode number on cgroup v2).
    pub fn id(&self) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        fs::metadata(&self.path).map(|m| m.ino()).unwrap_or(0)
    }

    pub fn procs(&self) -> Vec<u32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

fn remove_tree(path: &Path) {
    // cgroup.kill (Linux 5.14+) kills the whole subtree at once.
    let _ = fs::write(path.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut dirs = Vec::new();
        collect_dirs(path, &mut dirs);
        // Deepest first.
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        let mut left = false;
        for d in &dirs {
            if fs::remove_dir(d).is_err() && d.exists() {
                left = true;
            }
        }
        if !left || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn collect_dirs(path: &Path, out: &mut Vec<PathBuf>) {
    if !path.is_dir() {
        return;
    }
    out.push(path.to_path_buf());
    if let Ok(entries) = fs::read_dir(path) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        remove_tree(&self.path);
    }
}
