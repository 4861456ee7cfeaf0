//! The few bpf(2) commands aya 0.16 does not expose: link info with the
//! cgroup fields, BPF_LINK_UPDATE for cgroup sock links, and BPF_PROG_QUERY
//! on a cgroup. Each function names what aya lacks. Plus statfs for
//! filesystem checks.

use std::{
    ffi::CString,
    io,
    mem::size_of,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use crate::{Error, Result};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_UPDATE: libc::c_long = 29;
/// `BPF_F_REPLACE`: only swap when the link still runs `old_prog_fd`.
const BPF_F_REPLACE: u32 = 1 << 2;

/// `enum bpf_attach_type` values of the hooks we use.
pub mod attach_type {
    pub const INET_SOCK_CREATE: u32 = 2;
    pub const SOCK_OPS: u32 = 3;
    pub const INET4_CONNECT: u32 = 10;
    pub const INET6_CONNECT: u32 = 11;
    pub const UDP4_SENDMSG: u32 = 14;
    pub const UDP6_SENDMSG: u32 = 15;
}

/// `BPF_LINK_TYPE_CGROUP`.
pub const LINK_TYPE_CGROUP: u32 = 3;

fn bpf(cmd: libc::c_long, attr: *mut u8, size: usize) -> io::Result<i64> {
    // SAFETY: attr points to a zero-initialised buffer of `size` bytes laid
    // out as the kernel's union bpf_attr member for `cmd`.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size as libc::c_uint) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Opens a pinned object (link, map or program) by path.
// aya 0.16: `PinnedLink`/`FdLink` expose no fd (no `AsFd`) for `link_info`/`link_update`.
pub fn obj_get(path: &Path) -> Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| Error::Io {
        op: "open pinned object",
        path: path.into(),
        source: io::Error::new(io::ErrorKind::InvalidInput, e),
    })?;
    #[repr(C)]
    struct Attr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let mut attr = Attr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    let fd = bpf(BPF_OBJ_GET, (&raw mut attr).cast(), size_of::<Attr>())
        .map_err(Error::io("open pinned object", path))?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The fields of `struct bpf_link_info` we read. The union after `prog_id`
/// is 8-byte aligned (it holds `__aligned_u64`s), hence the padding.
#[repr(C)]
#[derive(Clone, Copy)]
struct RawLinkInfo {
    type_: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    _rest: [u8; 108],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    /// Only meaningful for cgroup links. Zero once the cgroup is gone.
    pub cgroup_id: u64,
    pub attach_type: u32,
}

// aya 0.16: `LinkInfo` has no accessor for the cgroup fields (`cgroup_id`, `attach_type`).
pub fn link_info(link: BorrowedFd<'_>) -> Result<LinkInfo> {
    // SAFETY: all-zero is a valid RawLinkInfo.
    let mut info: RawLinkInfo = unsafe { std::mem::zeroed() };
    #[repr(C)]
    struct Attr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = Attr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: size_of::<RawLinkInfo>() as u32,
        info: &raw mut info as u64,
    };
    bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        (&raw mut attr).cast(),
        size_of::<Attr>(),
    )
    .map_err(|source| Error::Syscall {
        call: "BPF_OBJ_GET_INFO_BY_FD(link)",
        source,
    })?;
    Ok(LinkInfo {
        link_type: info.type_,
        id: info.id,
        prog_id: info.prog_id,
        cgroup_id: info.cgroup_id,
        attach_type: info.attach_type,
    })
}

/// Atomically swaps the program of a link: the hook never runs without a
/// program, which is what makes upgrades and re-adoption gap-free. With
/// `old_prog` the swap only happens if the link still runs that program.
// aya 0.16: no `CgroupSock::attach_to_link` (only `CgroupSockAddr` has it); one path for all.
pub fn link_update(
    link: BorrowedFd<'_>,
    new_prog: BorrowedFd<'_>,
    old_prog: Option<BorrowedFd<'_>>,
) -> Result<()> {
    #[repr(C)]
    struct Attr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = Attr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: new_prog.as_raw_fd() as u32,
        flags: if old_prog.is_some() { BPF_F_REPLACE } else { 0 },
        old_prog_fd: old_prog.map_or(0, |fd| fd.as_raw_fd() as u32),
    };
    bpf(BPF_LINK_UPDATE, (&raw mut attr).cast(), size_of::<Attr>())
        .map(drop)
        .map_err(|source| Error::Syscall {
            call: "BPF_LINK_UPDATE",
            source,
        })
}

/// Ids of the programs attached directly to `cgroup` at `attach_type`
/// (not inherited ones).
// aya 0.16: no `CgroupSockAddr::query`/`CgroupSock::query` (only CgroupDevice, LircMode2).
pub fn query_cgroup_programs(cgroup: BorrowedFd<'_>, attach_type: u32) -> Result<Vec<u32>> {
    #[repr(C)]
    #[derive(Default)]
    struct Attr {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
        prog_attach_flags: u64,
        link_ids: u64,
        link_attach_flags: u64,
        revision: u64,
    }
    let mut ids = vec![0u32; 64];
    let mut attr = Attr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    bpf(BPF_PROG_QUERY, (&raw mut attr).cast(), size_of::<Attr>()).map_err(|source| {
        Error::Syscall {
            call: "BPF_PROG_QUERY",
            source,
        }
    })?;
    ids.truncate(attr.prog_cnt as usize);
    Ok(ids)
}

/// `f_type` of the filesystem holding `path`.
pub fn statfs_magic(path: &Path) -> Result<u64> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| Error::Io {
        op: "statfs",
        path: path.into(),
        source: io::Error::new(io::ErrorKind::InvalidInput, e),
    })?;
    // SAFETY: zeroed statfs is valid; c is a NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(Error::io("statfs", path)(io::Error::last_os_error()));
    }
    Ok(st.f_type as u64)
}
