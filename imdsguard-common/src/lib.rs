//! Wire types shared by the kernel programs and the daemon.
//!
//! Every type here is `#[repr(C)]` with explicit padding so the byte layout is
//! the same on both sides of the map boundary: flags are `u32`, never `bool`.
#![no_std]

/// Map names. The daemon pins each map under `<pin-dir>/maps/<name>`.
pub mod map_names {
    pub const ALLOWED: &str = "IMDSG_ALLOWED";
    pub const PROTECTED: &str = "IMDSG_PROTECTED";
    pub const PREFILTER: &str = "IMDSG_PREFILTER";
    pub const CONFIG: &str = "IMDSG_CONFIG";
    pub const COUNTERS: &str = "IMDSG_COUNTERS";
    pub const EVENTS: &str = "IMDSG_EVENTS";
    /// Socket-local storage: the creator's action, stamped at socket().
    pub const SOCKET_OWNER: &str = "IMDSG_SOCKET_OWNER";
    pub const SCOPE: &str = "IMDSG_SCOPE";
    /// Filter mode: where filtered connections are sent (the proxy).
    pub const PROXY: &str = "IMDSG_PROXY";
    /// Filter mode: connections rewritten by connect4/6, by socket cookie,
    /// until sock_ops learns their ports.
    pub const FILTER_PENDING: &str = "IMDSG_FILTER_PENDING";
    /// Filter mode: rewritten connections by 4-tuple, read by the proxy.
    pub const FILTER_CONNS: &str = "IMDSG_FILTER_CONNS";
    /// Per-CPU event limiter, by (cgroup, destination, hook, verdict).
    pub const REPORT_LIMIT: &str = "IMDSG_REPORT_LIMIT";
}

/// Bumped whenever a map's key or value layout changes. Pinned maps of
/// another layout are refused instead of being reused with the wrong shape.
pub const LAYOUT_VERSION: u32 = 2;

/// Capacity of the allowed-cgroup map. A node runs at most a few hundred pods;
/// 65536 leaves room for 10,000-pod soak tests and per-container entries.
/// With [`ALLOWED_MAP_FLAGS`] this is a ceiling, not memory paid up front.
pub const MAX_ALLOWED: u32 = 65_536;
/// Map flags of the allowed-cgroup map: `BPF_F_NO_PREALLOC`, so that its
/// kernel memory follows the entries present (about 1 MiB of buckets plus
/// some 100 bytes per entry) instead of 5.4 MiB preallocated for 65,536.
///
/// Why not a size from the node's pod capacity instead: the map is created
/// and the programs attached fail-closed before the API server answers, so
/// the Node object's `status.capacity.pods` is not known yet; a flag or
/// chart value would have to be kept in step with kubelet's `--max-pods`,
/// and each change would re-create the pinned map (`bpf/migrate.rs`, as
/// the upgrade from the preallocated map does once). The cost of not
/// preallocating: an insert can fail with ENOMEM under memory pressure,
/// which leaves that pod denied (fail closed) until the next reconcile
/// retries. Only the daemon writes this map; the programs only look up,
/// and a lookup is the same code whether the map is preallocated or not.
pub const ALLOWED_MAP_FLAGS: u32 = 1;
/// Capacity of the protected-destination trie.
pub const MAX_PROTECTED: u32 = 1_024;
/// Ring buffer size in bytes (power of two, multiple of the page size).
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// The prefilter holds one bit per top-16-bit address prefix, per family:
/// 65536 bits = 1024 u64 words per family.
pub const PREFILTER_WORDS_PER_FAMILY: u32 = 1024;
pub const PREFILTER_WORDS: u32 = 2 * PREFILTER_WORDS_PER_FAMILY;
/// Word offset of the IPv6 half of the prefilter.
pub const PREFILTER_V6_OFFSET: u32 = PREFILTER_WORDS_PER_FAMILY;

/// Index of a 16-bit address prefix (host byte order) in the prefilter:
/// `(word index, bit)`. IPv4 uses the top 16 bits of the address, IPv6
/// (non-IPv4-embedding) the top 16 bits of its first word.
#[inline(always)]
pub const fn prefilter_slot(is_v6: bool, hi16: u32) -> (u32, u64) {
    let base = if is_v6 { PREFILTER_V6_OFFSET } else { 0 };
    (base + ((hi16 & 0xffff) >> 6), 1u64 << (hi16 & 63))
}

/// How far the kernel walks up the cgroup tree looking for an allow entry.
/// The daemon refuses allow entries whose levels span more than this.
pub const MAX_LEVEL_SPAN: u32 = 32;

/// Protocol bits in [`PortRange::proto_mask`].
pub const PROTO_TCP: u16 = 1;
pub const PROTO_UDP: u16 = 2;
pub const PROTO_ANY: u16 = PROTO_TCP | PROTO_UDP;

/// One protected port range on one destination prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    /// `PROTO_*` bits. Zero marks an unused slot.
    pub proto_mask: u16,
    /// First protected port, host byte order, inclusive.
    pub lo: u16,
    /// Last protected port, host byte order, inclusive.
    pub hi: u16,
    pub _pad: u16,
}

/// Number of port ranges one protected prefix can carry.
pub const MAX_PORT_RANGES: usize = 8;

/// Value of the protected-destination trie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Protected {
    pub ranges: [PortRange; MAX_PORT_RANGES],
}

/// Key data of the protected-destination trie: an IPv6 address as four
/// 32-bit words, each in network byte order (the layout of `user_ip6`).
/// IPv4 prefixes are stored in their IPv4-mapped form (`::ffff:a.b.c.d`,
/// prefix length + 96) so one lookup serves both families.
pub type AddrKey = [u32; 4];

/// Prefix length of a full address in the trie.
pub const FULL_PREFIX: u32 = 128;
/// Prefix length that the IPv4-mapped form adds in front of an IPv4 prefix.
pub const V4_MAPPED_PREFIX: u32 = 96;

/// Decision of an allow entry, and the global default.
pub mod action {
    /// Reach the destination, report nothing.
    pub const ALLOW: u32 = 1;
    /// Would be denied: allow it, but report it as an audit hit.
    pub const AUDIT: u32 = 2;
    /// Deny with EPERM and report it.
    pub const ENFORCE: u32 = 3;
    /// Filter mode: a TCP connect() to a protected destination's HTTP port
    /// goes to imdsguard's proxy instead, which passes only allowed paths.
    /// Everything else (other ports, UDP, raw sockets) is denied as under
    /// ENFORCE.
    pub const FILTER: u32 = 4;
}

/// Value of the allowed-cgroup map (key: cgroup id, u64).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowEntry {
    /// One of [`action`].
    pub action: u32,
    pub _pad: u32,
}

/// Socket-local storage value, written by sock_create when the creating
/// cgroup is not allowed (audit or enforce). A socket without one was
/// created by an allowed cgroup, by the kernel on a process's behalf
/// (MPTCP subflows), outside the judged subtree, or before imdsguard
/// attached: it is judged on its caller alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketOwner {
    /// One of [`action`]: the creator's action when socket() ran.
    pub action: u32,
}

/// Single entry (index 0) of the scope array: which callers are judged
/// when the programs are attached above the judged subtree (`--attach-at`),
/// and whether socket creators are recorded.
/// Callers outside it (host processes) are let through unjudged; the
/// point of attaching higher is that sockets they create are judged when
/// a pod uses them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    /// The judged subtree's root; 0 judges everything below the attach point.
    pub cgroup_id: u64,
    /// Its absolute level.
    pub level: u32,
    /// [`scope_flag`] bits.
    pub flags: u32,
}

/// Bits of [`Scope::flags`].
pub mod scope_flag {
    /// sock_create records creators that are not allowed, and connect() and
    /// sendmsg() judge them too (`--judge-socket-creators`).
    pub const RECORD_CREATORS: u32 = 1;
}

/// Single entry (index 0) of the config array. Its first three fields
/// keep their place in every layout: an upgrade reads the level window
/// from the previous release's config when the layout changes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Action for cgroups without an allow entry: `action::ENFORCE` or `action::AUDIT`.
    pub default_action: u32,
    /// Shallowest and deepest absolute cgroup level that holds an allow entry.
    /// The kernel only walks these levels. `max_level < min_level` means "none".
    pub min_level: u32,
    pub max_level: u32,
    /// Must equal [`LAYOUT_VERSION`]; zero means "not configured yet" and
    /// makes the programs enforce (fail closed).
    pub layout_version: u32,
    /// [`config_flag`] bits.
    pub flags: u32,
}

/// Bits of [`Config::flags`].
pub mod config_flag {
    /// An agent has written a complete allow set into this installation
    /// at least once. Until then (a cold install's first moment, before
    /// the node agent's first sync) a pod without an entry may be one the
    /// agent does not know yet; its events say so.
    pub const SYNCED: u32 = 1;
}

/// Indices into the per-CPU counter array. A raw socket's socket() under
/// `--deny-raw-sockets` counts like a protected destination.
pub mod counter {
    /// Protected destination, allowed by an allow entry.
    pub const ALLOWED: u32 = 0;
    /// Protected destination, denied.
    pub const DENIED: u32 = 1;
    /// Protected destination, audit hit (allowed, reported).
    pub const AUDITED: u32 = 2;
    /// Events lost because the ring buffer was full.
    pub const EVENTS_DROPPED: u32 = 3;
    pub const COUNT: u32 = 4;
}

/// Hook that produced an event.
pub mod hook {
    pub const CONNECT4: u32 = 1;
    pub const CONNECT6: u32 = 2;
    pub const SENDMSG4: u32 = 3;
    pub const SENDMSG6: u32 = 4;
    /// A raw socket's socket() (`--deny-raw-sockets`). The event's address
    /// and port are zero and its `proto` is `PROTO_ANY`.
    pub const SOCK_CREATE: u32 = 5;
    /// Filter mode's sock_ops program. It judges nothing, so no event
    /// names it; the daemon uses the value to name its link.
    pub const SOCK_OPS: u32 = 6;
}

/// Verdict recorded in an event.
pub mod verdict {
    pub const DENIED: u32 = 1;
    pub const AUDITED: u32 = 2;
}

/// How the destination was written by the caller, when it embeds IPv4.
pub mod addr_form {
    pub const PLAIN: u32 = 0;
    /// `::ffff:a.b.c.d`
    pub const V4_MAPPED: u32 = 1;
    /// `::a.b.c.d`
    pub const V4_COMPAT: u32 = 2;
    /// `64:ff9b::a.b.c.d`
    pub const NAT64: u32 = 3;
}

/// Ring-buffer record for every denial and audit hit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub cgroup_id: u64,
    /// `bpf_get_current_pid_tgid()`: tgid in the high half, pid (tid) in the low.
    pub pid_tgid: u64,
    /// Destination in the trie's form: IPv4 is IPv4-mapped. Network byte order.
    pub addr: AddrKey,
    pub comm: [u8; 16],
    /// Destination port, host byte order.
    pub port: u32,
    /// `PROTO_TCP` or `PROTO_UDP` (or both when the socket type is neither).
    pub proto: u32,
    pub hook: u32,
    pub verdict: u32,
    pub addr_form: u32,
    /// One of [`cause`]: whose action decided.
    pub cause: u32,
    /// Decisions of the same key on this CPU that were counted but not
    /// reported since its last event (see [`ReportBucket`]): this event
    /// stands for `1 + suppressed` of them.
    pub suppressed: u32,
    /// 1 when no complete allow set had been written yet
    /// ([`config_flag::SYNCED`] unset): the caller may be a pod the agent
    /// did not know yet rather than one the policy leaves out.
    pub before_sync: u32,
}

/// Events per key (cgroup, destination, hook, verdict, address form) and CPU in one
/// [`REPORT_WINDOW_NS`]: a per-CPU token bucket that refills each window.
/// A flood then costs a map lookup per denial instead of a ring-buffer
/// record, and every denial is still counted (the per-CPU counters, and
/// the `suppressed` count of the key's next event).
pub const REPORT_BURST: u32 = 4;
/// The limiter's window.
pub const REPORT_WINDOW_NS: u64 = 1_000_000_000;
/// Slots of the limiter per CPU (a power of two). A key hashes to one
/// slot; a key that takes over a slot from another starts afresh, and the
/// other key's pending count stays in the counters only.
pub const REPORT_SLOTS: u32 = 1_024;

/// Key of the per-CPU event limiter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ReportKey {
    pub cgroup_id: u64,
    pub addr: AddrKey,
    pub port: u16,
    pub hook: u8,
    pub verdict: u8,
    /// How the destination was written ([`addr_form`]): a new way of
    /// writing the same destination (a bypass attempt) is reported, not
    /// folded into the old one's count.
    pub form: u8,
    pub _pad: [u8; 3],
}

/// One slot of the per-CPU event limiter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReportBucket {
    /// The key this slot counts for.
    pub key: ReportKey,
    /// `bpf_ktime_get_ns()` when the current window began.
    pub window_start: u64,
    /// Events sent in the current window.
    pub sent: u32,
    /// Decisions counted but not reported since the key's last event.
    pub suppressed: u32,
}

/// Whose action decided a verdict. connect() and sendmsg() are judged on
/// both the calling task's cgroup and the socket's creator; the stricter
/// wins.
pub mod cause {
    /// The calling task's cgroup.
    pub const CALLER: u32 = 0;
    /// The cgroup that created the socket (a socket passed over SCM_RIGHTS,
    /// or inherited across fork/exec into another cgroup).
    pub const CREATOR: u32 = 1;
    /// The action was filter, but this operation cannot go through the
    /// proxy (not a TCP connect to the metadata HTTP port, or no proxy
    /// configured for the address family): denied.
    pub const NOT_FILTERABLE: u32 = 2;
}

/// Capacity of the two filter-mode connection maps (LRU: a connect that
/// never reaches the proxy is evicted, never refused).
pub const MAX_FILTER_CONNS: u32 = 16_384;

/// Single entry (index 0) of the proxy array: where connect4/connect6 send
/// a filtered caller's connection. A zero port means "no proxy": filtered
/// callers are then denied like enforced ones (fail closed).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyConfig {
    /// The proxy's IPv6 address (network byte order words); all zero when
    /// it has none, and native IPv6 destinations are then denied.
    pub addr6: AddrKey,
    /// The proxy's IPv4 address, network byte order; zero when it has none.
    pub addr4: u32,
    /// The proxy's port, host byte order.
    pub port: u16,
    /// The metadata HTTP port that is redirected (80), host byte order.
    pub http_port: u16,
}

/// What connect4/connect6 record for a connection sent to the proxy: who
/// made it and where it was going.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FilterOrigin {
    /// The calling task's cgroup.
    pub caller_cgroup: u64,
    /// The cgroup whose allow entry said filter (0: the default did).
    pub entry_cgroup: u64,
    /// The original destination, in the trie's form (IPv4 is IPv4-mapped).
    pub addr: AddrKey,
    /// The original destination port, host byte order.
    pub port: u16,
    pub _pad: [u16; 3],
}

/// Key of the filtered-connection map: the connection as the proxy's
/// accepted socket sees it. Addresses in the trie's form (IPv4 is
/// IPv4-mapped), ports in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// The client's address and port (the proxy's peer).
    pub peer: AddrKey,
    /// The proxy's address and port (the client's destination after the
    /// rewrite).
    pub local: AddrKey,
    pub peer_port: u16,
    pub local_port: u16,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY: all of these are repr(C), contain only integers, and have no
    // implicit padding (checked by the layout tests in the daemon).
    unsafe impl aya::Pod for super::PortRange {}
    unsafe impl aya::Pod for super::Protected {}
    unsafe impl aya::Pod for super::AllowEntry {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::SocketOwner {}
    unsafe impl aya::Pod for super::Scope {}
    unsafe impl aya::Pod for super::ProxyConfig {}
    unsafe impl aya::Pod for super::FilterOrigin {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::ReportKey {}
    unsafe impl aya::Pod for super::ReportBucket {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<PortRange>(), 8);
        assert_eq!(size_of::<Protected>(), 8 * MAX_PORT_RANGES);
        assert_eq!(size_of::<AllowEntry>(), 8);
        assert_eq!(size_of::<Config>(), 20);
        assert_eq!(size_of::<Event>(), 8 + 8 + 16 + 16 + 8 * 4);
        assert_eq!(size_of::<ReportKey>(), 8 + 16 + 2 + 1 + 1 + 4);
        assert_eq!(size_of::<ReportBucket>(), 32 + 16);
        assert_eq!(size_of::<SocketOwner>(), 4);
        assert_eq!(size_of::<Scope>(), 16);
        assert_eq!(size_of::<ProxyConfig>(), 16 + 4 + 2 + 2);
        assert_eq!(size_of::<FilterOrigin>(), 8 + 8 + 16 + 2 + 6);
        assert_eq!(size_of::<ConnKey>(), 16 + 16 + 2 + 2 + 4);
    }

    #[test]
    fn prefilter_slots_split_families_and_words() {
        assert_eq!(
            prefilter_slot(false, 0xa9fe),
            (0xa9fe >> 6, 1 << (0xa9fe & 63))
        );
        let (w6, _) = prefilter_slot(true, 0xa9fe);
        assert_eq!(w6, PREFILTER_V6_OFFSET + (0xa9fe >> 6));
        assert!(prefilter_slot(true, 0xffff).0 < PREFILTER_WORDS);
    }
}
