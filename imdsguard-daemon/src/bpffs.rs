//! Checks for the bpf filesystem that holds our pins.

use std::path::Path;

use crate::{Error, Result, sys};

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
