//! Another tool's program, for benchmarks and tamper tests: a two-instruction
//! cgroup sock_addr program that allows everything (`r0 = 1; exit`), loaded
//! and linked with raw bpf(2) so it shares nothing with imdsguard's loader.
//! Attached to the same hooks it gives the kernel's own cost of running any
//! cgroup sock_addr program: the floor imdsguard is measured against.

use std::{
    fs::File,
    mem::size_of,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, bail};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;

/// `enum bpf_attach_type` of connect4, connect6, sendmsg4, sendmsg6.
pub const CONNECT4: u32 = 10;
pub const CONNECT6: u32 = 11;
pub const SENDMSG4: u32 = 14;
pub const SENDMSG6: u32 = 15;

#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

pub(crate) fn bpf(cmd: libc::c_long, attr: &mut [u8]) -> std::io::Result<i32> {
    // SAFETY: attr is a zeroed buffer laid out as union bpf_attr for cmd.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r as i32)
    }
}

pub(crate) fn put<T: Copy>(buf: &mut [u8], off: usize, v: T) {
    // SAFETY: bounds are checked by the slice index; T is plain data.
    unsafe {
        std::ptr::write_unaligned(buf[off..off + size_of::<T>()].as_mut_ptr().cast::<T>(), v)
    };
}

/// Loads the allow-all program for one attach type.
pub fn load(attach_type: u32) -> anyhow::Result<OwnedFd> {
    // r0 = 1 (BPF_ALU64 | BPF_MOV | BPF_K); exit (BPF_JMP | BPF_EXIT)
    let insns = [
        Insn {
            code: 0xb7,
            regs: 0,
            off: 0,
            imm: 1,
        },
        Insn {
            code: 0x95,
            regs: 0,
            off: 0,
            imm: 0,
        },
    ];
    let license = c"GPL";
    let mut attr = [0u8; 128];
    put(&mut attr, 0, BPF_PROG_TYPE_CGROUP_SOCK_ADDR);
    put(&mut attr, 4, insns.len() as u32);
    put(&mut attr, 8, insns.as_ptr() as u64);
    put(&mut attr, 16, license.as_ptr() as u64);
    put(&mut attr, 68, attach_type); // expected_attach_type
    let fd = bpf(BPF_PROG_LOAD, &mut attr).context("BPF_PROG_LOAD (allow-all program)")?;
    // SAFETY: a new fd returned by the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A cgroup link of the allow-all program; dropping it detaches.
pub struct NoopLink {
    _link: OwnedFd,
    _prog: OwnedFd,
}

/// Attaches the allow-all program to `cgroup` (multi-attach, as a bpf_link)
/// for each attach type.
pub fn attach(cgroup: &Path, attach_types: &[u32]) -> anyhow::Result<Vec<NoopLink>> {
    let dir = File::open(cgroup).with_context(|| format!("open {}", cgroup.display()))?;
    attach_types
        .iter()
        .map(|&t| {
            let prog = load(t)?;
            let mut attr = [0u8; 64];
            put(&mut attr, 0, prog.as_raw_fd() as u32);
            put(&mut attr, 4, dir.as_raw_fd() as u32);
            put(&mut attr, 8, t);
            let link = match bpf(BPF_LINK_CREATE, &mut attr) {
                Ok(fd) => fd,
                Err(e) => bail!("BPF_LINK_CREATE (allow-all, attach type {t}): {e}"),
            };
            // SAFETY: a new fd returned by the kernel.
            Ok(NoopLink {
                _link: unsafe { OwnedFd::from_raw_fd(link) },
                _prog: prog,
            })
        })
        .collect()
}

/// The kernel's id of the program behind a link.
pub fn program_id(link: &NoopLink) -> anyhow::Result<u32> {
    use std::os::fd::AsFd as _;
    Ok(imdsguard::bpf::sys::link_info(link._link.as_fd())?.prog_id)
}
