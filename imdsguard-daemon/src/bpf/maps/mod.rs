//! The pinned maps: their names and one typed handle per map
//! (`handles.rs`). aya checks each pin's shape against the object's
//! definition when it reuses the pin; `migrate.rs` handles a mismatch.

mod handles;

pub use handles::{
    AllowMap, ConfigMap, CounterMap, PrefilterMap, ProtectedMap, ProxyMap, ScopeMap,
};

use imdsguard_common::{PortRange, map_names};

/// Every map of the object, all pinned.
pub const NAMES: [&str; 12] = [
    map_names::ALLOWED,
    map_names::PROTECTED,
    map_names::PREFILTER,
    map_names::CONFIG,
    map_names::COUNTERS,
    map_names::EVENTS,
    map_names::SOCKET_OWNER,
    map_names::SCOPE,
    map_names::PROXY,
    map_names::FILTER_PENDING,
    map_names::FILTER_CONNS,
    map_names::REPORT_LIMIT,
];

/// `80`, or `8000-8080`.
pub fn ports_text(r: &PortRange) -> String {
    if r.lo == r.hi {
        r.lo.to_string()
    } else {
        format!("{}-{}", r.lo, r.hi)
    }
}
