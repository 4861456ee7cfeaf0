//! The pinned allow map as the time-to-enforce bench polls it.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::Context as _;
use imdsguard::bpf::sys;

/// The pinned allow map (key: cgroup id, value: `AllowEntry`, whose first
/// u32 is the action), read with raw bpf(2) calls.
pub struct AllowMap {
    fd: OwnedFd,
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    /// `value` for lookups, `next_key` for BPF_MAP_GET_NEXT_KEY.
    value: u64,
    flags: u64,
}

impl AllowMap {
    pub fn open(pin: &Path) -> anyhow::Result<Self> {
        let fd = sys::obj_get(pin).with_context(|| format!("open {}", pin.display()))?;
        Ok(Self { fd })
    }

    fn call(&self, cmd: libc::c_long, key: u64, value: u64) -> io::Result<()> {
        let mut attr = ElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            _pad: 0,
            key,
            value,
            flags: 0,
        };
        // SAFETY: attr is laid out as the kernel's bpf_attr for the map
        // element commands; key and value point to live buffers of the
        // map's key (u64) and value (8 bytes) sizes, or key is null.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                &raw mut attr,
                size_of::<ElemAttr>() as libc::c_uint,
            )
        };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// The action of `id`'s entry, or None without one.
    pub fn action(&self, id: u64) -> anyhow::Result<Option<u32>> {
        let mut value = [0u32; 2];
        match self.call(
            BPF_MAP_LOOKUP_ELEM,
            &raw const id as u64,
            value.as_mut_ptr() as u64,
        ) {
            Ok(()) => Ok(Some(value[0])),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e).context("BPF_MAP_LOOKUP_ELEM"),
        }
    }

    /// The action of every entry.
    pub fn actions(&self) -> anyhow::Result<Vec<u32>> {
        let mut out = Vec::new();
        let mut key = 0u64;
        let mut next = 0u64;
        let mut first = true;
        loop {
            let k = if first { 0 } else { &raw const key as u64 };
            match self.call(BPF_MAP_GET_NEXT_KEY, k, &raw mut next as u64) {
                Ok(()) => {
                    key = next;
                    first = false;
                    // Gone since: skipped.
                    out.extend(self.action(key)?);
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
                Err(e) => return Err(e).context("BPF_MAP_GET_NEXT_KEY"),
            }
        }
    }
}
