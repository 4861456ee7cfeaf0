//! The maps shared with the daemon. Names must match
//! `imdsguard_common::map_names`; the daemon pins every one of them so that
//! enforcement and its state outlive the daemon process.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use imdsguard_common::{
    ALLOWED_MAP_FLAGS, AddrKey, AllowEntry, Config, ConnKey, EVENTS_BYTES, FilterOrigin,
    MAX_ALLOWED, MAX_FILTER_CONNS, MAX_PROTECTED, PREFILTER_WORDS, Protected, ProxyConfig,
    REPORT_SLOTS, ReportBucket, Scope, counter,
};

/// One bit per 16-bit address prefix that has any protected destination.
/// An array lookup is inlined by the verifier into a bounds check and a load,
/// so the fast path for ordinary traffic costs no helper call.
#[map(name = "IMDSG_PREFILTER")]
pub static PREFILTER: Array<u64> = Array::with_max_entries(PREFILTER_WORDS, 0);

/// Protected destinations, longest-prefix match on the IPv6 (or IPv4-mapped)
/// address; the value lists the protected protocol/port ranges.
#[map(name = "IMDSG_PROTECTED")]
pub static PROTECTED: LpmTrie<AddrKey, Protected> = LpmTrie::with_max_entries(MAX_PROTECTED, 0);

/// Allowed (or per-entry audited/enforced) cgroups by cgroup id. Not
/// preallocated (see `ALLOWED_MAP_FLAGS`).
#[map(name = "IMDSG_ALLOWED")]
pub static ALLOWED: HashMap<u64, AllowEntry> =
    HashMap::with_max_entries(MAX_ALLOWED, ALLOWED_MAP_FLAGS);

#[map(name = "IMDSG_CONFIG")]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// The judged subtree, when attached above it (see `Scope`).
#[map(name = "IMDSG_SCOPE")]
pub static SCOPE: Array<Scope> = Array::with_max_entries(1, 0);

/// Verdict counters. Per-CPU so that a denial flood on every core never
/// contends on a shared cache line.
#[map(name = "IMDSG_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// Every denial and audit hit. When it is full the record is dropped and
/// counted in `counter::EVENTS_DROPPED`; the verdict itself never depends on it.
#[map(name = "IMDSG_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Filter mode: where filtered connections go (see `filter`).
#[map(name = "IMDSG_PROXY")]
pub static PROXY: Array<ProxyConfig> = Array::with_max_entries(1, 0);

/// Filter mode: origins of redirected connects by socket cookie, until
/// sock_ops sees their ports.
#[map(name = "IMDSG_FILTER_PENDING")]
pub static FILTER_PENDING: LruHashMap<u64, FilterOrigin> =
    LruHashMap::with_max_entries(MAX_FILTER_CONNS, 0);

/// Filter mode: origins of redirected connections by 4-tuple, for the proxy.
#[map(name = "IMDSG_FILTER_CONNS")]
pub static FILTER_CONNS: LruHashMap<ConnKey, FilterOrigin> =
    LruHashMap::with_max_entries(MAX_FILTER_CONNS, 0);

/// The event limiter (see `caller::report`): a per-CPU array of slots the
/// key hashes to, not a hash map, because the verifier inlines an array
/// lookup into a bounds check and a load, where a hash map lookup is a
/// helper call and a hash of the 32-byte key. Per CPU, so a slot is
/// updated without atomics: a program runs with migration disabled.
#[map(name = "IMDSG_REPORT_LIMIT")]
pub static REPORT_LIMIT: PerCpuArray<ReportBucket> = PerCpuArray::with_max_entries(REPORT_SLOTS, 0);

#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: the pointer is this CPU's slot; cgroup programs run with
        // migration disabled, so no other writer touches it concurrently.
        unsafe { *slot += 1 };
    }
}
