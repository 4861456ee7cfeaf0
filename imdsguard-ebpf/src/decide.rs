//! The slow path: the destination's top 16 bits matched a protected prefix.
//! Look it up exactly, then let `caller` judge the caller.

use aya_ebpf::{maps::lpm_trie::Key, programs::SockAddrContext};
use imdsguard_common::{
    AddrKey, FULL_PREFIX, MAX_PORT_RANGES, PROTO_ANY, PROTO_TCP, PROTO_UDP, Protected,
};

use crate::{
    caller::{self, PROCEED, Subject},
    maps::PROTECTED,
};

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;

#[inline(always)]
pub fn protected_destination(ctx: &SockAddrContext, hook: u32, addr: AddrKey, form: u32) -> i32 {
    // aya-ebpf 0.3 takes the key by reference.
    let Some(protected) = PROTECTED.get(&Key::new(FULL_PREFIX, addr)) else {
        return PROCEED;
    };
    // SAFETY: plain context field loads, rewritten by the verifier.
    let (user_port, sock_type) = unsafe { ((*ctx.sock_addr).user_port, (*ctx.sock_addr).type_) };
    // user_port holds the port in network byte order in its low 16 bits.
    let port = u16::from_be(user_port as u16);
    // Classify by socket type, not protocol number: MPTCP (IPPROTO_MPTCP) is
    // a stream socket and must count as TCP. Anything else matches both.
    let proto = match sock_type {
        SOCK_STREAM => PROTO_TCP,
        SOCK_DGRAM => PROTO_UDP,
        _ => PROTO_ANY,
    };
    if !port_protected(protected, proto, port) {
        return PROCEED;
    }
    caller::judge(
        &Subject {
            hook,
            addr,
            port,
            proto,
            form,
        },
        ctx,
    )
}

#[inline(always)]
fn port_protected(protected: &Protected, proto: u16, port: u16) -> bool {
    let mut i = 0;
    while i < MAX_PORT_RANGES {
        let r = &protected.ranges[i];
        if r.proto_mask == 0 {
            // Ranges are packed from the front; the first empty slot ends them.
            return false;
        }
        if r.proto_mask & proto != 0 && r.lo <= port && port <= r.hi {
            return true;
        }
        i += 1;
    }
    false
}
