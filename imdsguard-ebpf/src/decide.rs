//! The slow path: the destination's top 16 bits matched a protected prefix.
//! Look it up exactly, then find the caller's allow entry and report.

use aya_ebpf::{
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm,
        bpf_get_current_pid_tgid,
    },
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};
use imdsguard_common::{
    AddrKey, Config, Event, FULL_PREFIX, LAYOUT_VERSION, MAX_LEVEL_SPAN, MAX_PORT_RANGES,
    PROTO_ANY, PROTO_TCP, PROTO_UDP, Protected, action, counter, verdict,
};

use crate::{
    dest::PROCEED,
    maps::{ALLOWED, CONFIG, EVENTS, PROTECTED, count},
};

/// Return value that makes connect()/sendmsg() fail with EPERM.
const REJECT: i32 = 0;

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;

#[inline(always)]
pub fn protected_destination(ctx: &SockAddrContext, hook: u32, addr: AddrKey, form: u32) -> i32 {
    let Some(protected) = PROTECTED.get(Key::new(FULL_PREFIX, addr)) else {
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
    match caller_action() {
        action::ALLOW => {
            count(counter::ALLOWED);
            PROCEED
        }
        action::AUDIT => {
            count(counter::AUDITED);
            report(hook, addr, port, proto, form, verdict::AUDITED);
            PROCEED
        }
        // ENFORCE, and any value we do not know: fail closed.
        _ => {
            count(counter::DENIED);
            report(hook, addr, port, proto, form, verdict::DENIED);
            REJECT
        }
    }
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

/// The action of the deepest allow entry on the caller's cgroup path, or the
/// global default.
///
/// `bpf_get_current_ancestor_cgroup_id(level)` takes absolute levels, so we
/// walk from the deepest level that holds any entry up to the shallowest,
/// bounded by `MAX_LEVEL_SPAN` for the verifier. A level deeper than the
/// caller's own cgroup yields id 0 and is skipped.
#[inline(always)]
fn caller_action() -> u32 {
    let cfg: Config = match CONFIG.get(0) {
        Some(cfg) if cfg.layout_version == LAYOUT_VERSION => *cfg,
        // Not configured by a daemon of this layout: deny.
        _ => return action::ENFORCE,
    };
    let mut level = cfg.max_level;
    let mut step = 0;
    while step < MAX_LEVEL_SPAN {
        if level < cfg.min_level {
            break;
        }
        // SAFETY: helper call with a scalar argument.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id != 0 {
            if let Some(entry) = ALLOWED.get_ptr(id) {
                // SAFETY: the verifier checked the pointer is a map value.
                return unsafe { (*entry).action };
            }
        }
        if level == 0 {
            break;
        }
        level -= 1;
        step += 1;
    }
    cfg.default_action
}

#[inline(always)]
fn report(hook: u32, addr: AddrKey, port: u16, proto: u16, form: u32, verdict: u32) {
    let event = Event {
        // SAFETY: helper calls without pointer arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        pid_tgid: bpf_get_current_pid_tgid(),
        addr,
        comm: bpf_get_current_comm().unwrap_or_default(),
        port: port as u32,
        proto: proto as u32,
        hook,
        verdict,
        addr_form: form,
        _pad: 0,
    };
    if EVENTS.output::<Event>(&event, 0).is_err() {
        count(counter::EVENTS_DROPPED);
    }
}
