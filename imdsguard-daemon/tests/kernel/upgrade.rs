//! An upgrade across a change in a map's shape: the new agent replaces the
//! previous release's pinned map without a gap in either direction.

use std::{fs, mem::size_of, time::Duration};

use aya::maps::{Array, HashMap, Map, MapData, MapInfo};
use imdsguard::bpf::{
    enforcer::Enforcer,
    maps::{AllowMap, ConfigMap},
    pins::PinLayout,
};
use imdsguard_common::{ALLOWED_MAP_FLAGS, AllowEntry, LAYOUT_VERSION, MAX_ALLOWED, map_names};
use imdsguard_testlab::raw_bpf;
use libtest_mimic::Trial;

use crate::{support::*, trial};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "an_upgrade_replaces_a_reshaped_allow_map_without_a_gap",
            an_upgrade_replaces_a_reshaped_allow_map_without_a_gap,
        ),
        trial(
            "an_upgrade_replaces_a_preallocated_allow_map_without_a_gap",
            an_upgrade_replaces_a_preallocated_allow_map_without_a_gap,
        ),
        trial(
            "an_upgrade_from_a_layout_1_config_keeps_its_level_window",
            an_upgrade_from_a_layout_1_config_keeps_its_level_window,
        ),
    ]
}

/// Releases up to 0.2.0 preallocated their allow map: same key, value and
/// size as this one's, flags 0 instead of `BPF_F_NO_PREALLOC`.
fn an_upgrade_replaces_a_preallocated_allow_map_without_a_gap() {
    upgrade_replacing_the_allow_map(MAX_ALLOWED);
}

/// The previous release's allow map had 1,024 entries; this one's has
/// [`MAX_ALLOWED`]. A node agent starts knowing no pods (its first sync
/// comes later), so the allowed pod stays allowed only if the entries are
/// carried over, and the denied pod stays denied only if the old programs
/// keep enforcing until the new ones are swapped in.
fn an_upgrade_replaces_a_reshaped_allow_map_without_a_gap() {
    upgrade_replacing_the_allow_map(1024);
}

/// The previous release's allow map: a preallocated hash of `max_entries`.
fn upgrade_replacing_the_allow_map(max_entries: u32) {
    let lab = lab("reshape");
    let (prod, test) = pods(&lab);
    let pins = PinLayout::new(lab.pin_dir());
    let previous = start(&lab, &flag("allow-cgroup", &prod));
    previous.kill();

    // What the previous release left pinned: its allow entries, in a map
    // of another size. (Its programs keep the map they were loaded with.)
    let entries = AllowMap::open_pinned(&pins).unwrap().entries().unwrap();
    assert_eq!(entries.len(), 1, "prod's entry: {entries:?}");
    let fd = raw_bpf::create(
        raw_bpf::BPF_MAP_TYPE_HASH,
        8,
        size_of::<AllowEntry>() as u32,
        max_entries,
    )
    .unwrap();
    let pin = pins.map(map_names::ALLOWED);
    fs::remove_file(&pin).unwrap();
    let data = MapData::from_fd(fd).unwrap();
    data.pin(&pin).unwrap();
    let mut old: HashMap<MapData, u64, AllowEntry> = HashMap::try_from(Map::HashMap(data)).unwrap();
    for (k, v) in &entries {
        old.insert(k, v, 0).unwrap();
    }
    drop(old);

    // The new agent's start, as the node agent makes it: allow entries
    // unknown.
    let plan = node_agent_start(&lab, &[]);
    let loops = Loops::start(&lab, &prod, &test, 3000);
    std::thread::sleep(Duration::from_millis(500));
    let (enforcer, report) = Enforcer::start(plan.attachment.clone(), &plan.desired).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    loops.check("upgrade that replaces the allow map");

    assert_eq!(report.maps_replaced, [map_names::ALLOWED]);
    assert_eq!(report.replaced.len(), 2, "both links swapped: {report:?}");
    let info = MapInfo::from_pin(&pin).unwrap();
    assert_eq!(info.max_entries(), MAX_ALLOWED, "the new map took the pin");
    assert_eq!(
        info.map_flags(),
        ALLOWED_MAP_FLAGS,
        "the new map took the pin"
    );
    let now = AllowMap::open_pinned(&pins).unwrap().entries().unwrap();
    assert_eq!(now, entries, "the entries were carried over");
    let leftovers: Vec<_> = fs::read_dir(pins.maps_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with("_next"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // A second start finds every pin of this release's shape.
    drop(enforcer);
    let (_again, report) = Enforcer::start(plan.attachment, &plan.desired).unwrap();
    assert!(report.maps_replaced.is_empty(), "{report:?}");
    assert_reached(&lab, Some(&prod), "tcp", "169.254.169.254:80");
    assert_eperm(&lab, Some(&test), "tcp", "169.254.169.254:80");
}

/// Release 0.1.0's config (layout 1) was 16 bytes: default action, min and
/// max level, layout version. A new config without its level window would
/// walk no level and deny the allowed pod until the first sync.
fn an_upgrade_from_a_layout_1_config_keeps_its_level_window() {
    let lab = lab("oldconfig");
    let (prod, test) = pods(&lab);
    let pins = PinLayout::new(lab.pin_dir());
    let previous = start(&lab, &flag("allow-cgroup", &prod));
    previous.kill();
    let now = ConfigMap::open_pinned(&pins).unwrap().get().unwrap();
    assert!(now.min_level <= now.max_level, "{now:?}");

    let fd = raw_bpf::create(raw_bpf::BPF_MAP_TYPE_ARRAY, 4, 16, 1).unwrap();
    let pin = pins.map(map_names::CONFIG);
    fs::remove_file(&pin).unwrap();
    let data = MapData::from_fd(fd).unwrap();
    data.pin(&pin).unwrap();
    let mut old: Array<MapData, [u32; 4]> = Array::try_from(Map::Array(data)).unwrap();
    old.set(0, &[now.default_action, now.min_level, now.max_level, 1], 0)
        .unwrap();
    drop(old);

    let plan = node_agent_start(&lab, &[]);
    let loops = Loops::start(&lab, &prod, &test, 3000);
    std::thread::sleep(Duration::from_millis(500));
    let (_enforcer, report) = Enforcer::start(plan.attachment, &plan.desired).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    loops.check("upgrade that replaces a layout-1 config");
    assert_eq!(report.maps_replaced, [map_names::CONFIG]);
    let new = ConfigMap::open_pinned(&pins).unwrap().get().unwrap();
    assert_eq!(
        (new.min_level, new.max_level, new.layout_version),
        (now.min_level, now.max_level, LAYOUT_VERSION)
    );
}
