//! Upgrading across a change in a map's shape.
//!
//! A release may change a map's key, value, size or flags. The pinned map
//! of the previous release cannot be reused then (aya refuses it with
//! `IncompatiblePinnedMap`), and it must not be unpinned first either: the
//! previous release's programs, still attached, use it, and the node would
//! lose its allow entries. So the new agent:
//!
//! 1. loads the object with a fresh, unpinned map for each map whose pin
//!    has another shape, and reuses every other pin as before;
//! 2. fills the fresh maps, copying the allow entries from the old pin
//!    when their layout is unchanged, and the config's level window (a
//!    node agent does not know the allowed pods until its first sync, and
//!    must not deny them meanwhile);
//! 3. swaps its programs into the pinned links (`BPF_LINK_UPDATE`, atomic
//!    per hook), so the previous programs and their maps enforce until the
//!    moment the new ones do;
//! 4. pins each fresh map as `<name>_next` and renames it over the old pin,
//!    which bpffs does atomically, so a crash leaves either pin, never none.
//!
//! A crash between 3 and 4 leaves old-shaped pins beside new programs; the
//! next start sees the shapes differ again and repeats the steps, the links
//! holding a program throughout. What is lost: filter-mode connections in
//! flight at the swap (their records are in the old maps) and events the
//! old programs wrote to the old ring buffer after the new agent started.

use std::fs;

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, Map, MapData, MapError},
};
use imdsguard_common::map_names;
use tracing::{info, warn};

use crate::{
    Error, Result,
    bpf::{maps, pins::PinLayout},
};

/// The loaded object and the maps it got fresh because their pins differ.
pub(super) struct Loaded {
    pub ebpf: Ebpf,
    pub replaced: Vec<&'static str>,
}

/// Loads `object`, reusing every pinned map of the same shape. A pinned map
/// of another shape is left pinned and alone, and the object gets a fresh
/// map in its place (to be pinned by [`repin`] after the link swap).
pub(super) fn load(pins: &PinLayout, object: &[u8]) -> Result<Loaded> {
    remove_leftovers(pins)?;
    let mut replaced: Vec<&'static str> = Vec::new();
    // aya reports one incompatible map per load; each round marks one more.
    // Creating the maps is cheap: the programs are only verified at attach.
    for _ in 0..=maps::NAMES.len() {
        let mut loader = EbpfLoader::new();
        for name in maps::NAMES {
            if !replaced.contains(&name) {
                loader.map_pin_path(name, pins.map(name));
            }
        }
        match loader.load(object) {
            Ok(ebpf) => return Ok(Loaded { ebpf, replaced }),
            Err(EbpfError::MapError(MapError::IncompatiblePinnedMap {
                name,
                property,
                expected,
                actual,
            })) => {
                let known = maps::NAMES.iter().find(|n| **n == name.as_str());
                let Some(&known) = known.filter(|n| !replaced.contains(n)) else {
                    return Err(Error::Load(EbpfError::MapError(
                        MapError::IncompatiblePinnedMap {
                            name,
                            property,
                            expected,
                            actual,
                        },
                    )));
                };
                info!(
                    map = known,
                    property,
                    expected,
                    actual,
                    "the pinned map has another shape (an upgrade); a new map replaces it after the programs are swapped"
                );
                replaced.push(known);
            }
            Err(e) => return Err(Error::Load(e)),
        }
    }
    unreachable!("each round marks a new map, and there are NAMES.len() of them")
}

/// Copies the allow entries from the old pinned allow map into the fresh
/// one, when only its size or flags changed. Returns how many.
pub(super) fn copy_allowed(pins: &PinLayout, ebpf: &mut Ebpf) -> Result<usize> {
    let old = match maps::AllowMap::open_pinned(pins) {
        Ok(old) => old.entries()?,
        Err(e) => {
            // Its key or value changed: the entries cannot be read. Until the
            // first sync, allowed pods are denied (fail closed).
            warn!(error = %e, "the old allow map cannot be read with this release's layout; pods are allowed again from the first sync");
            return Ok(0);
        }
    };
    let mut new = maps::AllowMap::of(ebpf)?;
    for (cgroup, entry) in &old {
        new.insert(*cgroup, entry)?;
    }
    Ok(old.len())
}

/// The level window in the old pinned config, when the config is being
/// replaced. Every layout keeps `default_action, min_level, max_level` as
/// its first three `u32`s; layout 1 (release 0.1.0) ended with
/// `layout_version`. Without the window, the new programs would walk no
/// level and deny every allowed pod until the first sync.
pub(super) fn old_window(pins: &PinLayout) -> Option<(u32, u32)> {
    const LAYOUT_1: u32 = 1;
    let data = MapData::from_pin(pins.map(map_names::CONFIG)).ok()?;
    let config: Array<MapData, [u32; 4]> = Array::try_from(Map::Array(data)).ok()?;
    let [_, min, max, layout] = config.get(&0, 0).ok()?;
    (layout == LAYOUT_1).then_some((min, max))
}

/// Pins each replaced map in place of the old pin (atomically, by rename).
pub(super) fn repin(pins: &PinLayout, ebpf: &Ebpf, replaced: &[&'static str]) -> Result<()> {
    for &name in replaced {
        let map = ebpf.map(name).ok_or(Error::MapMissing { name })?;
        let pin = pins.map(name);
        let next = next_pin(pins, name);
        map.pin(&next).map_err(|source| Error::Pin {
            path: next.clone(),
            source,
        })?;
        fs::rename(&next, &pin).map_err(Error::io("rename", &next))?;
        info!(map = name, "replaced the pinned map");
    }
    Ok(())
}

/// Where a replacement is pinned before the rename. (bpffs refuses names
/// with a dot: "reserved for future use".)
pub(crate) fn next_pin(pins: &PinLayout, name: &str) -> std::path::PathBuf {
    pins.maps_dir().join(format!("{name}_next"))
}

/// A `_next` pin left by a crash before its rename: never in use.
fn remove_leftovers(pins: &PinLayout) -> Result<()> {
    for name in maps::NAMES {
        let next = next_pin(pins, name);
        if next.exists() {
            fs::remove_file(&next).map_err(Error::io("unpin", &next))?;
        }
    }
    Ok(())
}

/// Whether the allow entries are in a map being replaced.
pub(super) fn carries_allow_entries(replaced: &[&'static str]) -> bool {
    replaced.contains(&map_names::ALLOWED)
}

/// Whether the config (and its level window) is being replaced.
pub(super) fn carries_config(replaced: &[&'static str]) -> bool {
    replaced.contains(&map_names::CONFIG)
}
