//! imdsguard's kernel side: cgroup sock_addr programs that deny connect()
//! and sendmsg() to protected metadata destinations unless both the calling
//! task's cgroup and, when recorded, the socket's creator (or an ancestor
//! of each) are in the allow map; and opt-in cgroup sock programs that
//! record socket creators and deny raw sockets.
//!
//! Each entry point is thin; the verdict on the caller lives in `caller`.
#![no_std]
#![no_main]
// rustc shows a successful link's stderr as `linker_messages` warnings, and
// bpf-linker 0.10 writes noise there: its libLLVM loader tries every
// `libLLVM*` in the nightly's lib directory in directory order, and the
// first may be `libLLVM-22-rust-<version>.so`, a linker script dlopen
// cannot load ("unable to open LLVM shared lib ... dlopen failed"), before
// the real `libLLVM.so.22.1-rust-<version>`. Which comes first depends on
// the filesystem. A failed link is still an error, with bpf-linker's stderr.
#![allow(linker_messages)]

mod caller;
mod decide;
mod dest;
mod filter;
mod identity;
mod maps;
mod raw_sockets;

use aya_ebpf::{
    macros::{cgroup_sock, cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockContext, SockOpsContext},
};
use imdsguard_common::hook;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    dest::inet4(&ctx, hook::CONNECT4)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    dest::inet6(&ctx, hook::CONNECT6)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    dest::inet4(&ctx, hook::SENDMSG4)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    dest::inet6(&ctx, hook::SENDMSG6)
}

/// Records who created the socket (see `identity`); attached with
/// `--judge-socket-creators`.
#[cgroup_sock(sock_create)]
pub fn sock_create(ctx: SockContext) -> i32 {
    let scope = caller::scope();
    if caller::records_creators(&scope) {
        identity::stamp(&ctx, caller::caller_action(&scope));
    }
    caller::PROCEED
}

/// Raw sockets need an allow entry (`--deny-raw-sockets`), plus what
/// `sock_create` does. Attached in its place, through the same link.
#[cgroup_sock(sock_create)]
pub fn sock_create_raw(ctx: SockContext) -> i32 {
    raw_sockets::sock_create(&ctx)
}

/// Filter mode: keys a redirected connection's origin by its 4-tuple once
/// it has a source port (see `filter`). Attached only when a proxy is
/// configured.
#[sock_ops]
pub fn filter_conns(ctx: SockOpsContext) -> u32 {
    filter::connected(&ctx);
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
