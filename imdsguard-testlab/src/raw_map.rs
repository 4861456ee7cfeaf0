//! A map made with raw bpf(2), of any shape: what a previous release
//! pinned, for the upgrade tests. aya creates maps only from an object's
//! definitions, which are this release's.

use std::os::fd::{FromRawFd as _, OwnedFd};

use anyhow::Context as _;

use crate::noop::{bpf, put};

const BPF_MAP_CREATE: libc::c_long = 0;
pub const BPF_MAP_TYPE_HASH: u32 = 1;

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
