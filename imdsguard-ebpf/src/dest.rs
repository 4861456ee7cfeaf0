//! Destination classification: the fast path every connect()/sendmsg() on
//! the attached subtree pays.
//!
//! Order matters for cost: read the address, test one prefilter bit, and
//! return. Only destinations whose top 16 bits match a protected prefix reach
//! the trie lookup in `decide`.

use aya_ebpf::programs::SockAddrContext;
use imdsguard_common::{AddrKey, addr_form, prefilter_slot};

use crate::{caller::PROCEED, decide, maps::PREFILTER};

/// `::ffff:0:0/96` in network byte order, third word.
const V4_MAPPED_WORD2: u32 = 0x0000_ffff;
/// `64:ff9b::/96` (RFC 6052 well-known NAT64 prefix), first word.
const NAT64_WORD0: u32 = 0x0064_ff9b;

#[inline(always)]
fn prefilter_hit(is_v6: bool, hi16: u32) -> bool {
    let (word, bit) = prefilter_slot(is_v6, hi16);
    match PREFILTER.get(word) {
        Some(bits) => *bits & bit != 0,
        // Unreachable (the index is always in bounds), but if it ever were,
        // take the slow path rather than skip the check.
        None => true,
    }
}

#[inline(always)]
fn v4_mapped_key(ip_be: u32) -> AddrKey {
    [0, 0, V4_MAPPED_WORD2.to_be(), ip_be]
}

/// connect4 / sendmsg4.
#[inline(always)]
pub fn inet4(ctx: &SockAddrContext, hook: u32) -> i32 {
    // SAFETY: ctx.sock_addr is the kernel-provided context; the verifier
    // rewrites this field load into a read of the real sockaddr.
    let ip_be = unsafe { (*ctx.sock_addr).user_ip4 };
    if !prefilter_hit(false, u32::from_be(ip_be) >> 16) {
        return PROCEED;
    }
    decide::protected_destination(ctx, hook, v4_mapped_key(ip_be), addr_form::PLAIN)
}

/// connect6 / sendmsg6. IPv6 forms that embed an IPv4 address are judged as
/// that IPv4 address, so a dual-stack socket is no way around the policy.
#[inline(always)]
pub fn inet6(ctx: &SockAddrContext, hook: u32) -> i32 {
    // Four 32-bit loads: the verifier only accepts `user_ip6` reads of at
    // most 4 bytes at 4-byte-aligned offsets on older kernels, and reading
    // the array whole could be lowered to wider loads.
    let (w0, w1, w2, w3) = unsafe {
        let p = &raw const (*ctx.sock_addr).user_ip6;
        (
            core::ptr::read_volatile(&raw const (*p)[0]),
            core::ptr::read_volatile(&raw const (*p)[1]),
            core::ptr::read_volatile(&raw const (*p)[2]),
            core::ptr::read_volatile(&raw const (*p)[3]),
        )
    };
    let (h0, h1, h2) = (u32::from_be(w0), u32::from_be(w1), u32::from_be(w2));
    let form = if h0 == 0 && h1 == 0 && h2 == V4_MAPPED_WORD2 {
        addr_form::V4_MAPPED
    } else if h0 == 0 && h1 == 0 && h2 == 0 && u32::from_be(w3) > 1 {
        // Deprecated IPv4-compatible form `::a.b.c.d`. `::` and `::1` are
        // IPv6's own unspecified and loopback addresses, not IPv4: the
        // daemon's prefix normalisation draws the same line.
        addr_form::V4_COMPAT
    } else if h0 == NAT64_WORD0 && h1 == 0 && h2 == 0 {
        addr_form::NAT64
    } else {
        if !prefilter_hit(true, h0 >> 16) {
            return PROCEED;
        }
        return decide::protected_destination(ctx, hook, [w0, w1, w2, w3], addr_form::PLAIN);
    };
    if !prefilter_hit(false, u32::from_be(w3) >> 16) {
        return PROCEED;
    }
    decide::protected_destination(ctx, hook, v4_mapped_key(w3), form)
}
