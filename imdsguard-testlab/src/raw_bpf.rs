//! Raw bpf(2) calls the tests need and no loader offers: a map of any
//! shape (what a previous release pinned; aya creates maps only from an
//! object's definitions, which are this release's), and how many programs
//! a cgroup has on a hook (what is left after an uninstall).

use std::{
    fs::File,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::Context as _;

use crate::noop::{bpf, put};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_QUERY: libc::c_long = 16;
pub const BPF_MAP_TYPE_HASH: u32 = 1;
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;

/// `BPF_MAP_CREATE` of `map_type` with these sizes and no flags.
pub fn create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> anyhow::Result<OwnedFd> {
    let mut attr = [0u8; 72];
    put(&mut attr, 0, map_type);
    put(&mut attr, 4, key_size);
    put(&mut attr, 8, value_size);
    put(&mut attr, 12, max_entries);
    let fd = bpf(BPF_MAP_CREATE, &mut attr).context("BPF_MAP_CREATE")?;
    // SAFETY: a new fd returned by the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// How many programs are attached to the cgroup at `path` for
/// `attach_type` (`enum bpf_attach_type`, e.g. [`crate::noop::CONNECT4`]),
/// counting its own only (no inherited ones).
pub fn programs_attached(path: &Path, attach_type: u32) -> anyhow::Result<u32> {
    let dir = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut attr = [0u8; 40];
    put(&mut attr, 0, dir.as_raw_fd() as u32); // target_fd
    put(&mut attr, 4, attach_type);
    // prog_ids stays 0: the kernel then only fills prog_cnt.
    bpf(BPF_PROG_QUERY, &mut attr)
        .with_context(|| format!("BPF_PROG_QUERY on {}", path.display()))?;
    Ok(u32::from_ne_bytes(
        attr[24..28].try_into().expect("4 bytes"),
    ))
}
