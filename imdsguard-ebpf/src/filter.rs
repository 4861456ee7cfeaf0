//! Filter mode: a filtered caller's TCP connect() to a protected
//! destination's HTTP port goes to imdsguard's proxy instead, and the
//! connection's origin is recorded so that the proxy learns who called from
//! the kernel, never from a source address or a header.
//!
//! Two steps, because connect4/connect6 run before the kernel binds the
//! source port: `redirect` records the origin by socket cookie and rewrites
//! the destination; `connected` (sock_ops, at TCP_CONNECT_CB: the port is
//! bound and the SYN not yet sent, so the entry exists before the proxy can
//! accept) moves it to a map keyed by the 4-tuple the proxy's accepted
//! socket sees. Both maps are LRU: a connect that never completes is
//! evicted, and a full map never makes an insert fail for a new one.

use aya_ebpf::{
    bindings::BPF_SOCK_OPS_TCP_CONNECT_CB,
    helpers::generated::bpf_get_socket_cookie,
    programs::{SockAddrContext, SockOpsContext},
};
use imdsguard_common::{AddrKey, ConnKey, FilterOrigin, PROTO_TCP, addr_form, hook};

use crate::{
    caller::{CallerAction, Subject},
    maps::{FILTER_CONNS, FILTER_PENDING, PROXY},
};

/// `::ffff:0:0/96` in network byte order, third word.
const V4_MAPPED_WORD2: u32 = 0x0000_ffff;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[inline(always)]
fn v4_mapped(ip_be: u32) -> AddrKey {
    [0, 0, V4_MAPPED_WORD2.to_be(), ip_be]
}

/// Sends a filtered caller's connect to the proxy. False when this
/// operation cannot be filtered (not a TCP connect to the HTTP port, no
/// proxy for the family, or the origin could not be recorded): the caller
/// then denies it.
#[inline(always)]
pub fn redirect(ctx: &SockAddrContext, subject: &Subject, caller: &CallerAction) -> bool {
    if subject.proto != PROTO_TCP {
        return false;
    }
    let Some(proxy) = PROXY.get(0) else {
        return false;
    };
    if proxy.port == 0 || subject.port != proxy.http_port {
        return false;
    }
    // Where the connection goes instead, in the caller's own family: an
    // IPv4 socket needs the proxy's IPv4 address, an IPv6 socket either its
    // IPv6 address or (for a v4-mapped destination on a dual-stack socket)
    // the v4-mapped form of its IPv4 one. Other IPv4-embedding forms
    // (IPv4-compatible, NAT64) are not filtered.
    let target6 = match (subject.hook, subject.form) {
        (hook::CONNECT4, _) if proxy.addr4 != 0 => None,
        (hook::CONNECT6, addr_form::PLAIN) if proxy.addr6 != [0; 4] => Some(proxy.addr6),
        (hook::CONNECT6, addr_form::V4_MAPPED) if proxy.addr4 != 0 => Some(v4_mapped(proxy.addr4)),
        _ => return false,
    };
    let origin = FilterOrigin {
        // SAFETY: helper call without arguments.
        caller_cgroup: unsafe { aya_ebpf::helpers::bpf_get_current_cgroup_id() },
        entry_cgroup: caller.entry,
        addr: subject.addr,
        port: subject.port,
        _pad: [0; 3],
    };
    // SAFETY: for sock_addr programs the helper takes the context itself
    // (bpf_get_socket_cookie_sock_addr_proto, ARG_PTR_TO_CTX).
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // Record before rewriting: a connection that reached the proxy without
    // a record would only be refused there, but refusing it here says why.
    if FILTER_PENDING.insert(&cookie, &origin, 0).is_err() {
        return false;
    }
    // SAFETY: context field stores, rewritten by the verifier; connect4 and
    // connect6 may write user_ip4/user_ip6 (as 32-bit words) and user_port.
    unsafe {
        let sa = ctx.sock_addr;
        match target6 {
            None => (*sa).user_ip4 = proxy.addr4,
            Some(w) => {
                (*sa).user_ip6[0] = w[0];
                (*sa).user_ip6[1] = w[1];
                (*sa).user_ip6[2] = w[2];
                (*sa).user_ip6[3] = w[3];
            }
        }
        // user_port holds the port in network byte order in its low 16 bits.
        (*sa).user_port = u32::from(proxy.port.to_be());
    }
    true
}

/// sock_ops: once a redirected connection has its source port, key its
/// origin by the 4-tuple. Every other TCP connect pays one hash lookup.
#[inline(always)]
pub fn connected(ctx: &SockOpsContext) {
    if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return;
    }
    // SAFETY: for sock_ops the helper takes the context itself.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    let Some(origin) = FILTER_PENDING.get_ptr(&cookie) else {
        return;
    };
    // SAFETY: a map value pointer checked by the verifier.
    let origin = unsafe { *origin };
    // The client's side is the proxy's peer. A dual-stack socket's
    // addresses are already v4-mapped, which is the form the key uses.
    let (peer, local) = match ctx.family() {
        AF_INET => (v4_mapped(ctx.local_ip4()), v4_mapped(ctx.remote_ip4())),
        AF_INET6 => (local_ip6(ctx), remote_ip6(ctx)),
        _ => return,
    };
    let key = ConnKey {
        peer,
        local,
        // local_port is in host byte order; remote_port holds the
        // network-order port in its upper 16 bits on little-endian (the
        // kernel loads skc_dport and shifts it left by 16).
        peer_port: ctx.local_port() as u16,
        local_port: u16::from_be((ctx.remote_port() >> 16) as u16),
        _pad: 0,
    };
    // A failed insert leaves the connection without a record: the proxy
    // refuses it (fail closed).
    let _ = FILTER_CONNS.insert(&key, &origin, 0);
    let _ = FILTER_PENDING.remove(&cookie);
}

// The verifier accepts `local_ip6`/`remote_ip6` context reads only as 32-bit
// loads; reading the array whole could be lowered to wider ones.
#[inline(always)]
fn local_ip6(ctx: &SockOpsContext) -> AddrKey {
    // SAFETY: a context field, read by `words`.
    unsafe { words(&raw const (*ctx.ops).local_ip6) }
}

#[inline(always)]
fn remote_ip6(ctx: &SockOpsContext) -> AddrKey {
    // SAFETY: as in `local_ip6`.
    unsafe { words(&raw const (*ctx.ops).remote_ip6) }
}

/// Four 32-bit context loads, rewritten by the verifier.
///
/// # Safety
/// `p` points at an IPv6 address field of the sock_ops context.
#[inline(always)]
unsafe fn words(p: *const [u32; 4]) -> AddrKey {
    // SAFETY: the caller's pointer is a context field.
    unsafe {
        [
            core::ptr::read_volatile(&raw const (*p)[0]),
            core::ptr::read_volatile(&raw const (*p)[1]),
            core::ptr::read_volatile(&raw const (*p)[2]),
            core::ptr::read_volatile(&raw const (*p)[3]),
        ]
    }
}
