//! Tampering as an admin on the node would do it: `bpftool link detach`.

use std::{os::fd::AsRawFd as _, path::Path};

use anyhow::Context as _;

const BPF_LINK_DETACH: libc::c_long = 34;

/// BPF_LINK_DETACH on the link pinned at `pin`: the program leaves its
/// cgroup at once, while the link and its pin stay (a cgroup link then
/// reports cgroup_id 0). Holders of the link fd are not told.
pub fn detach_link(pin: &Path) -> anyhow::Result<()> {
    let fd = imdsguard::bpf::sys::obj_get(pin)
        .with_context(|| format!("open the pinned link {}", pin.display()))?;
    #[repr(C)]
    struct Attr {
        link_fd: u32,
    }
    let mut attr = Attr {
        link_fd: fd.as_raw_fd() as u32,
    };
    // SAFETY: `attr` is the link_detach member of union bpf_attr.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            &raw mut attr,
            size_of::<Attr>() as libc::c_uint,
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("BPF_LINK_DETACH {}", pin.display()));
    }
    Ok(())
}
