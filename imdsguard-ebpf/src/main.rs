//! imdsguard's kernel side: cgroup sock_addr programs that deny connect()
//! and sendmsg() to protected metadata destinations unless the calling
//! task's cgroup (or an ancestor) is in the allow map.
//!
//! Each entry point is thin; the shared decision lives in `decide`.
#![no_std]
#![no_main]

mod decide;
mod dest;
mod maps;

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
