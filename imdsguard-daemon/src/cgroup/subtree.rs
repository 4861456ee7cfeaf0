//! Walking a cgroup subtree on cgroupfs: every cgroup below a root with its
//! id and parent's id, and the way from cgroup ids back to their paths.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// One cgroup found by [`walk`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubCgroup {
    pub path: PathBuf,
    pub id: u64,
    /// The parent's id; 0 for the walk's root.
    pub parent: u64,
}

/// Whether a directory can have subdirectories, from its stat: cgroupfs
/// (kernfs), like ext4 and tmpfs, gives a directory 2 links plus one per
/// subdirectory. A leaf cgroup is then not listed at all: listing it would
/// find only its interface files. On hybrid hosts nobody removes the
/// unified hierarchy's `pod<uid>` directories, so empty leaves pile up
/// below kubepods; this keeps each of them down to the one stat that gives
/// its id. Filesystems that report another count (btrfs says 1) are listed.
pub fn may_have_subdirs(meta: &fs::Metadata) -> bool {
    meta.nlink() != 2
}

/// Every cgroup directory from `root` down, root first. `root` must be
/// readable; cgroups removed while we walk are skipped.
pub fn walk(root: &Path) -> std::io::Result<Vec<SubCgroup>> {
    let at = |op: &str, p: &Path, e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("{op} {}: {e}", p.display()))
    };
    let meta = fs::metadata(root).map_err(|e| at("stat", root, e))?;
    let id = meta.ino();
    let mut out = vec![SubCgroup {
        path: root.to_path_buf(),
        id,
        parent: 0,
    }];
    // Parallel to `out`: whether to list it.
    let mut list = vec![may_have_subdirs(&meta)];
    let mut next = 0;
    while next < out.len() {
        let (dir, parent) = (out[next].path.clone(), out[next].id);
        next += 1;
        if !list[next - 1] {
            continue;
        }
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if parent != id && e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(at("list", &dir, e)),
        };
        for entry in entries.flatten() {
            // file_type() does not follow symlinks, and cgroupfs has none.
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if let Ok(meta) = entry.metadata() {
                out.push(SubCgroup {
                    path: entry.path(),
                    id: meta.ino(),
                    parent,
                });
                list.push(may_have_subdirs(&meta));
            }
        }
    }
    Ok(out)
}

/// Finds the directory of each cgroup id below `root` (for status and
/// attribution). Stops early once all are found; unreadable entries are
/// skipped because cgroups come and go while we walk.
pub fn paths_of_ids(root: &Path, ids: &[u64]) -> std::collections::HashMap<u64, PathBuf> {
    let mut found = std::collections::HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if found.len() == ids.len() {
            break;
        }
        let Ok(meta) = fs::metadata(&dir) else {
            continue;
        };
        if ids.contains(&meta.ino()) {
            found.insert(meta.ino(), dir.clone());
        }
        if !may_have_subdirs(&meta) {
            continue;
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
            }
        }
    }
    found
}
#[cfg(test)]
mod tests {
    use super::*;

    /// A temp tree: `top/{a/{b,c},leaf}`, removed on drop.
    struct Tree(PathBuf);

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn tree() -> Tree {
        let t =
            Tree(std::env::temp_dir().join(format!("imdsguard-subtree-{}", std::process::id())));
        for d in ["a/b", "a/c", "leaf"] {
            fs::create_dir_all(t.0.join(d)).unwrap();
        }
        t
    }

    #[test]
    fn leaves_are_known_by_their_link_count() {
        let t = tree();
        let nlink_works = fs::metadata(&t.0).unwrap().nlink() == 4;
        for (dir, subdirs) in [("", true), ("a", true), ("a/b", false), ("leaf", false)] {
            let meta = fs::metadata(t.0.join(dir)).unwrap();
            // Only where the filesystem counts links as cgroupfs does.
            if nlink_works {
                assert_eq!(may_have_subdirs(&meta), subdirs, "{dir:?}");
            } else {
                assert!(may_have_subdirs(&meta), "{dir:?}");
            }
        }
        // Leaves are still in the walk (their ids are owners of sockets),
        // and found by id.
        let all = walk(&t.0).unwrap();
        let mut rel: Vec<String> = all
            .iter()
            .map(|c| c.path.strip_prefix(&t.0).unwrap().display().to_string())
            .collect();
        rel.sort();
        assert_eq!(rel, ["", "a", "a/b", "a/c", "leaf"]);
        let b = fs::metadata(t.0.join("a/b")).unwrap().ino();
        assert_eq!(
            all.iter().find(|c| c.id == b).map(|c| c.parent),
            Some(fs::metadata(t.0.join("a")).unwrap().ino())
        );
        assert_eq!(paths_of_ids(&t.0, &[b]).get(&b), Some(&t.0.join("a/b")));
    }
}
