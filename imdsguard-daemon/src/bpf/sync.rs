//! Writing the desired state into the maps: the protected set, the allow
//! entries with their level window, and the global default.

use std::collections::BTreeMap;

use aya::maps::{Array, HashMap, LpmTrie, MapData, lpm_trie::Key};
use imdsguard_common::{
    AddrKey, AllowEntry, Config, LAYOUT_VERSION, MAX_ALLOWED, MAX_LEVEL_SPAN, PREFILTER_WORDS,
    Protected, map_names,
};
use tracing::debug;

use crate::{
    Error, Result,
    bpf::enforcer::{AllowTarget, Enforcer, Mode},
    destinations::Compiled,
};

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
        let name = map_names::PROTECTED;
        let err = move |source| Error::Map { name, source };
        let mut report = SyncReport::default();
        {
            let mut trie: LpmTrie<&mut MapData, AddrKey, Protected> =
                LpmTrie::try_from(self.map_mut(name)?).map_err(err)?;
            let current: BTreeMap<(u32, AddrKey), Protected> = trie
                .iter()
                .filter_map(|r| r.ok())
                .map(|(k, v)| ((k.prefix_len(), k.data()), v))
                .collect();
            for (&(len, key), value) in &compiled.entries {
                match current.get(&(len, key)) {
                    Some(v) if v == value => continue,
                    Some(_) => report.updated += 1,
                    None => report.inserted += 1,
                }
                trie.insert(&Key::new(len, key), value, 0).map_err(err)?;
            }
            for &(len, key) in current.keys() {
                if !compiled.entries.contains_key(&(len, key)) {
                    trie.remove(&Key::new(len, key)).map_err(err)?;
                    report.removed += 1;
                }
            }
        }
        let name = map_names::PREFILTER;
        let err = move |source| Error::Map { name, source };
        let mut words: Array<&mut MapData, u64> =
            Array::try_from(self.map_mut(name)?).map_err(err)?;
        for i in 0..PREFILTER_WORDS {
            let want = compiled.prefilter[i as usize];
            if words.get(&i, 0).map_err(err)? != want {
                words.set(i, &want, 0).map_err(err)?;
            }
        }
        Ok(report)
    }

    fn read_config(&mut self) -> Result<Config> {
        let name = map_names::CONFIG;
        let cfg: Array<&mut MapData, Config> =
            Array::try_from(self.map_mut(name)?).map_err(|source| Error::Map { name, source })?;
        cfg.get(&0, 0).map_err(|source| Error::Map { name, source })
    }

    fn write_config(&mut self, value: Config) -> Result<()> {
        let name = map_names::CONFIG;
        let mut cfg: Array<&mut MapData, Config> =
            Array::try_from(self.map_mut(name)?).map_err(|source| Error::Map { name, source })?;
        cfg.set(0, &value, 0)
            .map_err(|source| Error::Map { name, source })
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
        let config = |w: Option<(u32, u32)>| Config {
            default_action: mode.action(),
            // An empty window is min > max.
            min_level: w.map_or(1, |w| w.0),
            max_level: w.map_or(0, |w| w.1),
            layout_version: LAYOUT_VERSION,
        };
        // The union may span more than the kernel walks; in that case the
        // deepest MAX_LEVEL_SPAN levels are walked, which only ever denies
        // more (never allows more) during the sync.
        self.write_config(config(union))?;

        let name = map_names::ALLOWED;
        let err = move |source| Error::Map { name, source };
        let mut report = SyncReport::default();
        {
            let mut map: HashMap<&mut MapData, u64, AllowEntry> =
                HashMap::try_from(self.map_mut(name)?).map_err(err)?;
            let current: BTreeMap<u64, AllowEntry> = map.iter().filter_map(|r| r.ok()).collect();
            for (&id, target) in desired {
                let entry = AllowEntry {
                    action: target.action,
                    _pad: 0,
                };
                match current.get(&id) {
                    Some(e) if *e == entry => continue,
                    Some(_) => report.updated += 1,
                    None => report.inserted += 1,
                }
                map.insert(&id, &entry, 0).map_err(err)?;
            }
            for id in current.keys() {
                if !desired.contains_key(id) {
                    map.remove(id).map_err(err)?;
                    report.removed += 1;
                }
            }
        }
        self.write_config(config(new_window))?;
        if report != SyncReport::default() {
            debug!(?report, "allow map synced");
        }
        Ok(report)
    }

    /// Sets the global default, keeping the allow entries and their window.
    pub fn set_mode(&mut self, mode: Mode) -> Result<()> {
        let old = self.read_config()?;
        let mut config = if old.layout_version == LAYOUT_VERSION {
            old
        } else {
            Config {
                min_level: 1,
                max_level: 0,
                layout_version: LAYOUT_VERSION,
                default_action: 0,
            }
        };
        config.default_action = mode.action();
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
