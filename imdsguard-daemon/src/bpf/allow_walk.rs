//! The kernel's allow walk, replayed in userspace: which allow entry
//! decides for a cgroup. `explain` replays it over the pinned maps, the
//! revocation sweep over the state the owner last wrote; both must find
//! what the programs find, so this mirrors `caller_action` in
//! `imdsguard-ebpf/src/caller.rs` step for step.

use imdsguard_common::MAX_LEVEL_SPAN;

/// The allow entry the walk found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found<E> {
    /// The absolute level of the cgroup that holds it.
    pub level: u32,
    pub cgroup_id: u64,
    pub entry: E,
}

/// The deepest allow entry on a cgroup's path, or None when the default
/// applies.
///
/// Like the kernel, it walks absolute levels from `max_level` up to
/// `min_level` (the config's window; `max_level < min_level` is an empty
/// one), at most `MAX_LEVEL_SPAN` of them. `ancestor_at(level)` is the id of
/// the cgroup's ancestor (or itself) at that level, None when the cgroup is
/// shallower (the kernel's helper returns 0); `entry_of(id)` is its allow
/// entry, if any.
pub fn deepest_entry<E>(
    min_level: u32,
    max_level: u32,
    mut ancestor_at: impl FnMut(u32) -> Option<u64>,
    mut entry_of: impl FnMut(u64) -> Option<E>,
) -> Option<Found<E>> {
    let mut level = max_level;
    let mut step = 0;
    while step < MAX_LEVEL_SPAN {
        if level < min_level {
            break;
        }
        if let Some(cgroup_id) = ancestor_at(level)
            && let Some(entry) = entry_of(cgroup_id)
        {
            return Some(Found {
                level,
                cgroup_id,
                entry,
            });
        }
        if level == 0 {
            break;
        }
        level -= 1;
        step += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// A cgroup at level 5 whose ancestor at level `l` has id `100 + l`.
    fn ancestor(level: u32) -> Option<u64> {
        (level <= 5).then_some(100 + u64::from(level))
    }

    fn walk(min: u32, max: u32, entries: &[(u64, &'static str)]) -> Option<(u32, &'static str)> {
        let entries: HashMap<u64, &str> = entries.iter().copied().collect();
        deepest_entry(min, max, ancestor, |id| entries.get(&id).copied())
            .map(|f| (f.level, f.entry))
    }

    #[test]
    fn the_deepest_entry_wins() {
        let both = [(103, "allow"), (105, "enforce")];
        assert_eq!(walk(3, 5, &both), Some((5, "enforce")));
        assert_eq!(walk(3, 4, &both), Some((3, "allow")));
        assert_eq!(walk(0, 2, &both), None, "no entry on the path: the default");
    }

    #[test]
    fn only_the_window_is_walked() {
        let entry = [(102, "allow")];
        assert_eq!(walk(3, 5, &entry), None);
        assert_eq!(walk(2, 2, &entry), Some((2, "allow")));
        assert_eq!(walk(1, 0, &entry), None, "an empty window");
    }

    #[test]
    fn levels_below_the_cgroup_are_skipped() {
        // Entries at levels 6..9 belong to other cgroups' subtrees; the
        // caller at level 5 has no ancestor there.
        assert_eq!(walk(2, 9, &[(102, "audit")]), Some((2, "audit")));
    }

    #[test]
    fn at_most_max_level_span_levels_are_walked() {
        let deep = |level: u32| Some(u64::from(level));
        let top = MAX_LEVEL_SPAN + 10;
        let shallow = top - MAX_LEVEL_SPAN;
        let hit = |wanted: u32| {
            deepest_entry(0, top, deep, |id| (id == u64::from(wanted)).then_some(()))
                .map(|f| f.level)
        };
        assert_eq!(hit(shallow + 1), Some(shallow + 1), "the last level walked");
        assert_eq!(hit(shallow), None, "one past MAX_LEVEL_SPAN levels");
        assert_eq!(
            deepest_entry(0, 0, |_| Some(7), |_| Some(())).map(|f| f.cgroup_id),
            Some(7),
            "level 0 is walked, then the walk stops"
        );
    }
}
