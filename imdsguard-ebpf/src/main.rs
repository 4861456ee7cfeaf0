//! imdsguard's kernel side: cgroup sock_addr programs that deny connect()
//! and sendmsg() to protected metadata destinations unless the calling
//! task's cgroup (or an ancestor) is in the allow map, and an opt-in
//! cgroup sock program that denies raw sockets on the same terms.
//!
//! Each entry point is thin; the verdict on the caller lives in `caller`.
#![no_std]
#![no_main]

mod caller;
mod decide;
mod dest;
mod maps;
mod raw_sockets;

use aya_ebpf::{
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
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

#[cgroup_sock(sock_create)]
pub fn sock_create(ctx: SockContext) -> i32 {
    raw_sockets::sock_create(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
