//! A private bpffs instance per lab. Each bpffs mount is its own
//! filesystem, so unmounting it drops every pin the test left behind.

use std::{ffi::CString, fs, os::unix::ffi::OsStrExt as _, path::PathBuf};

use anyhow::{Context as _, bail};

pub struct PrivateBpffs {
    path: PathBuf,
}

impl PrivateBpffs {
    pub fn mount(name: &str) -> anyhow::Result<Self> {
        Self::mount_with_flags(name, 0)
    }

    /// A read-only instance: nothing can be pinned in it.
    pub fn mount_readonly(name: &str) -> anyhow::Result<Self> {
        Self::mount_with_flags(name, libc::MS_RDONLY)
    }

    fn mount_with_flags(name: &str, flags: libc::c_ulong) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(name);
        fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        let c = CString::new(path.as_os_str().as_bytes())?;
        // SAFETY: valid NUL-terminated strings; no data argument.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                c.as_ptr(),
                c"bpf".as_ptr(),
                flags,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            let _ = fs::remove_dir(&path);
            bail!("mount bpffs at {}: {e}", path.display());
        }
        Ok(Self { path })
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        if let Ok(c) = CString::new(self.path.as_os_str().as_bytes()) {
            // SAFETY: valid path; MNT_DETACH cannot fail on a busy mount.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = fs::remove_dir(&self.path);
    }
}
