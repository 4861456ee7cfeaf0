//! Writing the desired state into the maps: the protected set, the allow
//! entries with their level window, and the global default.

use std::collections::BTreeMap;

use aya::maps::MapData;
use imdsguard_common::{
    AddrKey, AllowEntry, Config, LAYOUT_VERSION, MAX_ALLOWED, MAX_LEVEL_SPAN, PREFILTER_WORDS,
    Protected, config_flag,
};
use tracing::debug;

use crate::{
    Error, Result,
    bpf::{
        enforcer::{AllowTarget, Enforcer, Mode},
        maps::{AllowMap, ConfigMap, PrefilterMap, ProtectedMap},
    },
    destinations::Compiled,
};

/// A map as [`diff_and_sync`] sees it. The real maps implement it over
/// aya; tests use a fake, so no kernel is needed.
pub(crate) trait SyncMap {
    type Key: Ord + Copy;
    type Value: PartialEq + Copy;

    /// Every entry. An entry that cannot be read is an error, never
    /// skipped: a skipped entry would never be removed.
    fn entries(&self) -> Result<BTreeMap<Self::Key, Self::Value>>;
    fn insert(&mut self, key: Self::Key, value: &Self::Value) -> Result<()>;
    fn remove(&mut self, key: Self::Key) -> Result<()>;
}

/// Makes `map` hold exactly `desired` without ever emptying it: entries
/// that differ are inserted or updated first, then extras are removed. If
/// the current entries cannot all be read, nothing is written.
pub(crate) fn diff_and_sync<M: SyncMap>(
    map: &mut M,
    desired: &BTreeMap<M::Key, M::Value>,
) -> Result<SyncReport> {
    let current = map.entries()?;
    let mut report = SyncReport::default();
    for (&key, value) in desired {
        match current.get(&key) {
            Some(v) if v == value => continue,
            Some(_) => report.updated += 1,
            None => report.inserted += 1,
        }
        map.insert(key, value)?;
    }
    for &key in current.keys() {
        if !desired.contains_key(&key) {
            map.remove(key)?;
            report.removed += 1;
        }
    }
    Ok(report)
}

impl SyncMap for AllowMap<&mut MapData> {
    type Key = u64;
    type Value = AllowEntry;

    fn entries(&self) -> Result<BTreeMap<u64, AllowEntry>> {
        AllowMap::entries(self)
    }
    fn insert(&mut self, key: u64, value: &AllowEntry) -> Result<()> {
        AllowMap::insert(self, key, value)
    }
    fn remove(&mut self, key: u64) -> Result<()> {
        AllowMap::remove(self, key)
    }
}

impl SyncMap for ProtectedMap<&mut MapData> {
    type Key = (u32, AddrKey);
    type Value = Protected;

    fn entries(&self) -> Result<BTreeMap<(u32, AddrKey), Protected>> {
        ProtectedMap::entries(self)
    }
    fn insert(&mut self, key: (u32, AddrKey), value: &Protected) -> Result<()> {
        ProtectedMap::insert(self, key, value)
    }
    fn remove(&mut self, key: (u32, AddrKey)) -> Result<()> {
        ProtectedMap::remove(self, key)
    }
}

/// What a sync changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub inserted: usize,
    pub updated: usize,
    pub removed: usize,
}

impl Enforcer {
    /// Writes the protected set: trie entries first (insert/update, then
    /// remove extras), then the prefilter words that differ. A new
    /// destination becomes protected once both are in; a removed one stops
    /// matching as soon as its trie entry goes.
    pub fn sync_destinations(&mut self, compiled: &Compiled) -> Result<SyncReport> {
        let report = diff_and_sync(&mut ProtectedMap::of(&mut self.ebpf)?, &compiled.entries)?;
        let mut words = PrefilterMap::of(&mut self.ebpf)?;
        for i in 0..PREFILTER_WORDS {
            let want = compiled.prefilter[i as usize];
            if words.word(i)? != want {
                words.set_word(i, want)?;
            }
        }
        Ok(report)
    }

    fn read_config(&mut self) -> Result<Config> {
        ConfigMap::of(&mut self.ebpf)?.get()
    }

    fn write_config(&mut self, value: Config) -> Result<()> {
        ConfigMap::of(&mut self.ebpf)?.set(&value)
    }

    /// Makes the allow map equal `desired` without ever emptying it.
    ///
    /// The config's level window is first widened to cover both old and new
    /// entries, then entries are inserted/updated/removed one by one, then
    /// the window is narrowed to the new entries. An entry is therefore
    /// visible to the kernel from the moment it is written.
    pub fn sync_allowed(
        &mut self,
        mode: Mode,
        desired: &BTreeMap<u64, AllowTarget>,
    ) -> Result<SyncReport> {
        if desired.len() > MAX_ALLOWED as usize {
            return Err(Error::MapFull {
                what: "allowed cgroups",
                count: desired.len(),
                max: MAX_ALLOWED,
            });
        }
        let new_window = level_window(desired.values().map(|t| t.level))?;
        let old = self.read_config()?;
        let old_window = (old.layout_version == LAYOUT_VERSION && old.min_level <= old.max_level)
            .then_some((old.min_level, old.max_level));
        let union = match (old_window, new_window) {
            (Some(a), Some(b)) => Some((a.0.min(b.0), a.1.max(b.1))),
            (a, b) => a.or(b),
        };
        let old_flags = if old.layout_version == LAYOUT_VERSION {
            old.flags
        } else {
            0
        };
        let config = |w: Option<(u32, u32)>, flags| Config {
            default_action: mode.action().kernel(),
            // An empty window is min > max.
            min_level: w.map_or(1, |w| w.0),
            max_level: w.map_or(0, |w| w.1),
            layout_version: LAYOUT_VERSION,
            flags,
        };
        // The union may span more than the kernel walks; in that case the
        // deepest MAX_LEVEL_SPAN levels are walked, which only ever denies
        // more (never allows more) during the sync.
        self.write_config(config(union, old_flags))?;

        let want: BTreeMap<u64, AllowEntry> = desired
            .iter()
            .map(|(&id, target)| {
                let entry = AllowEntry {
                    action: target.action.kernel(),
                    _pad: 0,
                };
                (id, entry)
            })
            .collect();
        let report = diff_and_sync(&mut AllowMap::of(&mut self.ebpf)?, &want)?;
        // The complete allow set is in: from now on a pod without an entry
        // is one the policy leaves out, not one the agent does not know.
        self.write_config(config(new_window, config_flag::SYNCED))?;
        if report != SyncReport::default() {
            debug!(?report, "allow map synced");
        }
        Ok(report)
    }

    /// Sets the global default, keeping the allow entries and their window
    /// (or taking `carried`, the previous release's, into a new config).
    pub fn set_mode(&mut self, mode: Mode, carried: Option<(u32, u32)>) -> Result<()> {
        let old = self.read_config()?;
        let mut config = if old.layout_version == LAYOUT_VERSION {
            old
        } else {
            let (min_level, max_level) = carried.unwrap_or((1, 0));
            Config {
                min_level,
                max_level,
                layout_version: LAYOUT_VERSION,
                default_action: 0,
                flags: 0,
            }
        };
        config.default_action = mode.action().kernel();
        self.write_config(config)
    }
}

/// (min, max) absolute level among the entries, or None when there are none.
pub fn level_window(levels: impl Iterator<Item = u32>) -> Result<Option<(u32, u32)>> {
    let mut window: Option<(u32, u32)> = None;
    for l in levels {
        window = Some(window.map_or((l, l), |(a, b)| (a.min(l), b.max(l))));
    }
    if let Some((min, max)) = window
        && max - min >= MAX_LEVEL_SPAN
    {
        return Err(Error::LevelSpanTooWide {
            min,
            max,
            span: MAX_LEVEL_SPAN,
        });
    }
    Ok(window)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A map whose iteration yields its entries in key order, then, if
    /// `fail_after` is set, an error after that many entries (as aya's
    /// iterator does when a bpf(2) call fails mid-walk).
    #[derive(Default)]
    struct FakeMap {
        entries: BTreeMap<u64, u32>,
        fail_after: Option<usize>,
        writes: usize,
    }

    impl SyncMap for FakeMap {
        type Key = u64;
        type Value = u32;

        fn entries(&self) -> Result<BTreeMap<u64, u32>> {
            let eio = || Error::Map {
                name: imdsguard_common::map_names::ALLOWED,
                source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_get_next_key",
                    io_error: std::io::Error::from_raw_os_error(5),
                }),
            };
            let items = self.entries.iter().map(|(&k, &v)| Ok((k, v)));
            match self.fail_after {
                Some(n) => items.take(n).chain(std::iter::once(Err(eio()))).collect(),
                None => items.collect(),
            }
        }
        fn insert(&mut self, key: u64, value: &u32) -> Result<()> {
            self.writes += 1;
            self.entries.insert(key, *value);
            Ok(())
        }
        fn remove(&mut self, key: u64) -> Result<()> {
            self.writes += 1;
            self.entries.remove(&key);
            Ok(())
        }
    }

    #[test]
    fn diff_and_sync_inserts_updates_and_removes() {
        let mut map = FakeMap {
            entries: [(1, 10), (2, 20), (3, 30)].into(),
            ..FakeMap::default()
        };
        let want = [(1, 10), (2, 21), (4, 40)].into();
        let report = diff_and_sync(&mut map, &want).unwrap();
        assert_eq!(
            report,
            SyncReport {
                inserted: 1,
                updated: 1,
                removed: 1
            }
        );
        assert_eq!(map.entries, want);
        assert_eq!(map.writes, 3);
    }

    #[test]
    fn diff_and_sync_fails_when_iteration_fails() {
        // Entry 3 is behind the failed step: were the error skipped, 3
        // would look absent and its stale allow would stay.
        let mut map = FakeMap {
            entries: [(1, 10), (2, 20), (3, 30)].into(),
            fail_after: Some(1),
            ..FakeMap::default()
        };
        let want = [(1, 10)].into();
        let e = diff_and_sync(&mut map, &want).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Map {
                    source: aya::maps::MapError::SyscallError(_),
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(map.writes, 0, "nothing is written from a partial view");
    }

    #[test]
    fn level_window_spans_entries() {
        assert_eq!(level_window([].into_iter()).unwrap(), None);
        assert_eq!(level_window([3, 5, 4].into_iter()).unwrap(), Some((3, 5)));
        assert!(matches!(
            level_window([1, 1 + MAX_LEVEL_SPAN].into_iter()),
            Err(Error::LevelSpanTooWide { .. })
        ));
    }
}
