//! The pinned maps: their names, the layout this build expects of each,
//! and reading the per-CPU counters.

use aya::maps::{LpmTrie, MapData, MapInfo, PerCpuArray};
use imdsguard_common::{
    AddrKey, AllowEntry, Config, PortRange, Protected, Scope, SocketOwner, counter, map_names,
};

use crate::{
    Error, Result,
    bpf::{enforcer::Counters, pins::PinLayout},
    destinations::Prefix,
};

/// Every map of the object, all pinned.
pub const NAMES: [&str; 8] = [
    map_names::ALLOWED,
    map_names::PROTECTED,
    map_names::PREFILTER,
    map_names::CONFIG,
    map_names::COUNTERS,
    map_names::EVENTS,
    map_names::SOCKET_OWNER,
    map_names::SCOPE,
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

/// Sums the per-CPU counters.
pub fn read_counters(map: &aya::maps::Map) -> Result<Counters> {
    let name = map_names::COUNTERS;
    let err = move |source| Error::Map { name, source };
    let arr: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map).map_err(err)?;
    let sum = |i: u32| -> Result<u64> { Ok(arr.get(&i, 0).map_err(err)?.iter().sum()) };
    Ok(Counters {
        allowed: sum(counter::ALLOWED)?,
        denied: sum(counter::DENIED)?,
        audited: sum(counter::AUDITED)?,
        events_dropped: sum(counter::EVENTS_DROPPED)?,
    })
}

/// The pinned protected-destination trie: each prefix with its port ranges
/// in use, sorted by prefix. A read error fails the listing: one that
/// skipped an entry would show a map that is not there.
pub fn read_protected(pins: &PinLayout) -> Result<Vec<(Prefix, Vec<PortRange>)>> {
    let name = map_names::PROTECTED;
    let trie = LpmTrie::<_, AddrKey, Protected>::try_from(pins.open_map(name)?)
        .map_err(|source| Error::Map { name, source })?;
    let mut out = trie
        .iter()
        .map(|r| {
            r.map(|(k, v)| {
                let ranges = v.ranges.iter().filter(|r| r.proto_mask != 0).copied();
                (
                    Prefix::from_trie_key(k.prefix_len(), k.data()),
                    ranges.collect(),
                )
            })
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|source| Error::Map { name, source })?;
    out.sort_by_key(|(p, _)| *p);
    Ok(out)
}

/// `80`, or `8000-8080`.
pub fn ports_text(r: &PortRange) -> String {
    if r.lo == r.hi {
        r.lo.to_string()
    } else {
        format!("{}-{}", r.lo, r.hi)
    }
}
