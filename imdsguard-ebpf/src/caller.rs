//! Who is calling, and what their cgroup's allow entry says: the one verdict
//! every program shares, with its counting and reporting.

use aya_ebpf::helpers::{
    bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm,
    bpf_get_current_pid_tgid, bpf_ktime_get_coarse_ns,
};
use aya_ebpf::programs::SockAddrContext;
use imdsguard_common::{
    AddrKey, Config, Event, LAYOUT_VERSION, MAX_LEVEL_SPAN, REPORT_BURST, REPORT_SLOTS,
    REPORT_WINDOW_NS, ReportKey, Scope, action, cause, config_flag, counter, scope_flag, verdict,
};

use crate::{
    filter, identity,
    maps::{ALLOWED, CONFIG, EVENTS, REPORT_LIMIT, SCOPE, count},
};

/// Return value that lets the operation proceed.
pub const PROCEED: i32 = 1;
/// Return value that makes the operation fail with EPERM: connect(),
/// sendmsg() or socket(), depending on the hook.
const REJECT: i32 = 0;

/// What an event says about the judged operation.
pub struct Subject {
    pub hook: u32,
    pub addr: AddrKey,
    pub port: u16,
    pub proto: u16,
    pub form: u32,
}

/// What a cgroup's allow entry (or the default) says.
#[derive(Clone, Copy)]
pub struct CallerAction {
    pub action: u32,
    /// The cgroup whose allow entry decided; 0 when the default did.
    pub entry: u64,
    /// False for a caller outside the judged subtree (a host process, when
    /// attached above it): let through, not counted, not stamped.
    pub judged: bool,
}

/// The scope entry (who is judged, whether creators are recorded), read
/// once per program run and handed to what needs it.
#[inline(always)]
pub fn scope() -> Scope {
    SCOPE.get(0).copied().unwrap_or_default()
}

/// Whether sock_create records creators (`--judge-socket-creators`).
#[inline(always)]
pub fn records_creators(scope: &Scope) -> bool {
    scope.flags & scope_flag::RECORD_CREATORS != 0
}

/// connect/sendmsg: judges the caller and, when creators are recorded, the
/// socket's creator (see `verdict`).
#[inline(always)]
pub fn judge(subject: &Subject, socket: &SockAddrContext) -> i32 {
    let scope = scope();
    let creator = records_creators(&scope).then_some(socket);
    verdict(subject, caller_action(&scope), creator, Some(socket))
}

/// Applies the verdict to `subject`: allow silently, allow and report
/// (audit), or deny and report. Counts every outcome.
///
/// With `creator`, the socket's creator is judged too (see `identity`) and
/// the stricter action wins. The record is only read when the caller alone
/// would not be denied, so a denied caller pays nothing more. Without
/// `--judge-socket-creators` no record is read at all (records left from an
/// earlier run with it are ignored, as the operator asked).
///
/// `connect` is the sock_addr context of a connect/sendmsg, which filter
/// mode may rewrite; None for socket().
#[inline(always)]
pub fn verdict(
    subject: &Subject,
    caller: CallerAction,
    creator: Option<&SockAddrContext>,
    connect: Option<&SockAddrContext>,
) -> i32 {
    if !caller.judged {
        return PROCEED;
    }
    let mut act = caller.action;
    let mut cause = cause::CALLER;
    let mut entry = caller.entry;
    if let Some(ctx) = creator
        && severity(act) < severity(action::ENFORCE)
        && let Some(creator) = identity::creator_action(ctx)
        && severity(creator) > severity(act)
    {
        act = creator;
        cause = cause::CREATOR;
        // The creator's record holds its action, not its entry: a creator
        // that made this filtered has no rules the proxy could apply, so
        // the proxy refuses every request on it (fail closed).
        entry = 0;
    }
    match act {
        action::ALLOW => {
            count(counter::ALLOWED);
            PROCEED
        }
        action::AUDIT => {
            count(counter::AUDITED);
            report(subject, verdict::AUDITED, cause);
            PROCEED
        }
        action::FILTER => {
            let who = CallerAction { entry, ..caller };
            match connect {
                Some(ctx) if filter::redirect(ctx, subject, &who) => PROCEED,
                _ => {
                    count(counter::DENIED);
                    report(subject, verdict::DENIED, cause::NOT_FILTERABLE);
                    REJECT
                }
            }
        }
        // ENFORCE, and any value we do not know: fail closed.
        _ => {
            count(counter::DENIED);
            report(subject, verdict::DENIED, cause);
            REJECT
        }
    }
}

/// Orders actions by strictness; a value we do not know counts as ENFORCE.
#[inline(always)]
fn severity(act: u32) -> u32 {
    match act {
        action::ALLOW => 0,
        action::AUDIT => 1,
        action::FILTER => 2,
        _ => 3,
    }
}

/// The action of the deepest allow entry on the caller's cgroup path, or the
/// global default.
///
/// `bpf_get_current_ancestor_cgroup_id(level)` takes absolute levels, so we
/// walk from the deepest level that holds any entry up to the shallowest,
/// bounded by `MAX_LEVEL_SPAN` for the verifier. A level deeper than the
/// caller's own cgroup yields id 0 and is skipped.
#[inline(always)]
pub fn caller_action(scope: &Scope) -> CallerAction {
    // The scope first: with the programs on the hierarchy root, a host
    // process must never depend on the rest of our state.
    if scope.cgroup_id != 0 {
        // SAFETY: helper call with a scalar argument.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(scope.level as i32) };
        if id != scope.cgroup_id {
            return CallerAction {
                action: action::ALLOW,
                entry: 0,
                judged: false,
            };
        }
    }
    let cfg: Config = match CONFIG.get(0) {
        Some(cfg) if cfg.layout_version == LAYOUT_VERSION => *cfg,
        // Not configured by a daemon of this layout: deny.
        _ => {
            return CallerAction {
                action: action::ENFORCE,
                entry: 0,
                judged: true,
            };
        }
    };
    let found = |action, entry| CallerAction {
        action,
        entry,
        judged: true,
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
            // aya-ebpf 0.3 takes the key by reference.
            if let Some(entry) = ALLOWED.get_ptr(&id) {
                // SAFETY: the verifier checked the pointer is a map value.
                return found(unsafe { (*entry).action }, id);
            }
        }
        if level == 0 {
            break;
        }
        level -= 1;
        step += 1;
    }
    found(cfg.default_action, 0)
}

/// 1 until an agent has written a complete allow set (see
/// `config_flag::SYNCED`). Read again here rather than carried from the
/// walk: only the event path, past the limiter, pays the lookup.
#[inline(always)]
fn before_sync() -> u32 {
    match CONFIG.get(0) {
        Some(cfg) if cfg.flags & config_flag::SYNCED != 0 => 0,
        _ => 1,
    }
}

/// The limiter slot of `key`: a multiplicative hash of its words.
#[inline(always)]
fn slot(key: &ReportKey) -> u32 {
    let mut h = key.cgroup_id
        ^ (u64::from(key.addr[2]) << 32 | u64::from(key.addr[3]))
        ^ (u64::from(key.addr[0]) << 32 | u64::from(key.addr[1])).rotate_left(17)
        ^ (u64::from(key.form) << 32
            | u64::from(key.port) << 16
            | u64::from(key.hook) << 8
            | u64::from(key.verdict));
    h = h.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (h >> 54) as u32 & (REPORT_SLOTS - 1)
}

/// Reports a decision through the ring buffer, at most `REPORT_BURST`
/// times per key and CPU in each `REPORT_WINDOW_NS`. A decision over the
/// limit is only counted in its key's bucket and carried by the key's next
/// event; the verdict and the per-CPU counters never depend on it. Building
/// a ring-buffer record (comm, pid, reserve, submit) is most of the deny
/// path's cost, so a flood pays a lookup instead.
#[inline(always)]
fn report(subject: &Subject, verdict: u32, cause: u32) {
    // SAFETY: helper calls without pointer arguments. The coarse clock
    // (tick resolution) is enough for a one-second window and cheaper.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let key = ReportKey {
        cgroup_id,
        addr: subject.addr,
        port: subject.port,
        hook: subject.hook as u8,
        verdict: verdict as u8,
        form: subject.form as u8,
        _pad: [0; 3],
    };
    let carried = match REPORT_LIMIT.get_ptr_mut(slot(&key)) {
        Some(bucket) => {
            // SAFETY: a map value pointer checked by the verifier, this
            // CPU's copy, written with migration disabled.
            let b = unsafe { &mut *bucket };
            if b.key != key {
                // Another key had the slot (or none yet): start afresh. The
                // other key's pending count stays in the counters.
                b.key = key;
                b.window_start = now;
                b.sent = 0;
                b.suppressed = 0;
            } else if now.wrapping_sub(b.window_start) >= REPORT_WINDOW_NS {
                b.window_start = now;
                b.sent = 0;
            }
            if b.sent >= REPORT_BURST {
                b.suppressed = b.suppressed.saturating_add(1);
                return;
            }
            b.sent += 1;
            let carried = b.suppressed;
            b.suppressed = 0;
            carried
        }
        // Unreachable (the slot is always in bounds): report unlimited.
        None => 0,
    };
    let event = Event {
        cgroup_id,
        pid_tgid: bpf_get_current_pid_tgid(),
        addr: subject.addr,
        comm: bpf_get_current_comm().unwrap_or_default(),
        port: subject.port as u32,
        proto: subject.proto as u32,
        hook: subject.hook,
        verdict,
        addr_form: subject.form,
        cause,
        suppressed: carried,
        before_sync: before_sync(),
    };
    if EVENTS.output::<Event>(&event, 0).is_err() {
        count(counter::EVENTS_DROPPED);
    }
}
