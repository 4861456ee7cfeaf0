//! The pinned maps: their names, the layout this build expects of each,
//! and one typed handle per map (`handles.rs`).

mod handles;

pub use handles::{
    AllowMap, ConfigMap, CounterMap, PrefilterMap, ProtectedMap, ProxyMap, ScopeMap,
};

use aya::maps::MapInfo;
use imdsguard_common::{
    AddrKey, AllowEntry, Config, ConnKey, FilterOrigin, PortRange, Protected, ProxyConfig,
    ReportBucket, Scope, SocketOwner, map_names,
};

use crate::{Error, Result, bpf::pins::PinLayout};

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

/// Expected (key, value) sizes of each pinned map; the ring buffer has none.
fn expected_layout(name: &str) -> Option<(u32, u32)> {
    use std::mem::size_of;
    let s = |n: usize| n as u32;
    match name {
        map_names::ALLOWED => Some((8, s(size_of::<AllowEntry>()))),
        map_names::PROTECTED => Some((4 + s(size_of::<AddrKey>()), s(size_of::<Protected>()))),
        map_names::PREFILTER => Some((4, 8)),
        map_names::CONFIG => Some((4, s(size_of::<Config>()))),
        map_names::COUNTERS => Some((4, 8)),
        // Socket-local storage is keyed by a socket fd (an int).
        map_names::SOCKET_OWNER => Some((4, s(size_of::<SocketOwner>()))),
        map_names::SCOPE => Some((4, s(size_of::<Scope>()))),
        map_names::PROXY => Some((4, s(size_of::<ProxyConfig>()))),
        map_names::FILTER_PENDING => Some((8, s(size_of::<FilterOrigin>()))),
        map_names::FILTER_CONNS => Some((s(size_of::<ConnKey>()), s(size_of::<FilterOrigin>()))),
        map_names::REPORT_LIMIT => Some((4, s(size_of::<ReportBucket>()))),
        _ => None,
    }
}

/// Refuses pinned maps whose layout differs from this build's.
pub(super) fn check_pinned_layouts(pins: &PinLayout) -> Result<()> {
    for name in NAMES {
        let path = pins.map(name);
        let Some((want_key, want_value)) = expected_layout(name) else {
            continue;
        };
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|source| Error::Map { name, source })?;
        if info.key_size() != want_key || info.value_size() != want_value {
            return Err(Error::PinnedMapLayout {
                name,
                found_key: info.key_size(),
                found_value: info.value_size(),
                want_key,
                want_value,
            });
        }
    }
    Ok(())
}

/// `80`, or `8000-8080`.
pub fn ports_text(r: &PortRange) -> String {
    if r.lo == r.hi {
        r.lo.to_string()
    } else {
        format!("{}-{}", r.lo, r.hi)
    }
}
