//! One typed handle per pinned map. The owner borrows read-write handles
//! from its loaded object (`X::of`, over `&mut MapData`); status tools open
//! the pin (`X::open_pinned`, over an owned `MapData`) and get a handle
//! with no write methods: only `X<&mut MapData>` has them.

use std::collections::BTreeMap;

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, lpm_trie::Key},
};
use imdsguard_common::{
    AddrKey, AllowEntry, Config, PortRange, Protected, ProxyConfig, Scope, counter, map_names,
};

use crate::{
    Error, Result,
    bpf::{enforcer::Counters, pins::PinLayout},
    destinations::Prefix,
};

/// The error of an operation on the map `name`.
fn map_error(name: &'static str) -> impl Fn(MapError) -> Error + Copy {
    move |source| Error::Map { name, source }
}

/// Declares a handle over the aya map type `$aya<_, $params>` of the map
/// pinned as `$map_name`, with its two ways to open it.
macro_rules! handle {
    ($(#[$meta:meta])* $handle:ident: $aya:ident<$($param:ty),+> = $map_name:expr) => {
        $(#[$meta])*
        pub struct $handle<T>($aya<T, $($param),+>);

        impl<T> $handle<T> {
            pub const NAME: &'static str = $map_name;
        }

        impl $handle<MapData> {
            /// Opens the pinned map read-only (for `status` and `explain`).
            pub fn open_pinned(pins: &PinLayout) -> Result<Self> {
                let map = pins.open_map(Self::NAME)?;
                $aya::try_from(map).map(Self).map_err(map_error(Self::NAME))
            }
        }

        impl<'a> $handle<&'a mut MapData> {
            /// The owner's read-write handle on its loaded map.
            pub fn of(ebpf: &'a mut Ebpf) -> Result<Self> {
                let map: &'a mut Map = ebpf
                    .map_mut(Self::NAME)
                    .ok_or(Error::MapMissing { name: Self::NAME })?;
                $aya::try_from(map).map(Self).map_err(map_error(Self::NAME))
            }
        }
    };
}

handle! {
    /// The allow map: cgroup id to allow entry.
    AllowMap: HashMap<u64, AllowEntry> = map_names::ALLOWED
}

impl<T: std::borrow::Borrow<MapData>> AllowMap<T> {
    /// The entry of `cgroup_id`, if it has one.
    pub fn get(&self, cgroup_id: u64) -> Result<Option<AllowEntry>> {
        match self.0.get(&cgroup_id, 0) {
            Ok(e) => Ok(Some(e)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_error(Self::NAME)(e)),
        }
    }

    /// Every entry. A read error fails the whole listing: one that skipped
    /// an entry would show (or sync against) a map that is not there.
    pub fn entries(&self) -> Result<BTreeMap<u64, AllowEntry>> {
        self.0
            .iter()
            .map(|r| r.map_err(map_error(Self::NAME)))
            .collect()
    }
}

impl AllowMap<&mut MapData> {
    pub fn insert(&mut self, cgroup_id: u64, entry: &AllowEntry) -> Result<()> {
        self.0
            .insert(&cgroup_id, entry, 0)
            .map_err(map_error(Self::NAME))
    }
    pub fn remove(&mut self, cgroup_id: u64) -> Result<()> {
        self.0.remove(&cgroup_id).map_err(map_error(Self::NAME))
    }
}

handle! {
    /// The protected-destination trie, keyed by (prefix length, address).
    ProtectedMap: LpmTrie<AddrKey, Protected> = map_names::PROTECTED
}

impl<T: std::borrow::Borrow<MapData>> ProtectedMap<T> {
    /// Every entry, by (prefix length, address). A read error fails it.
    pub fn entries(&self) -> Result<BTreeMap<(u32, AddrKey), Protected>> {
        self.0
            .iter()
            .map(|r| {
                r.map(|(k, v)| ((k.prefix_len(), k.data()), v))
                    .map_err(map_error(Self::NAME))
            })
            .collect()
    }

    /// Each prefix with its port ranges in use, sorted by prefix.
    pub fn listing(&self) -> Result<Vec<(Prefix, Vec<PortRange>)>> {
        let mut out: Vec<_> = self
            .entries()?
            .into_iter()
            .map(|((len, key), v)| {
                let ranges = v.ranges.iter().filter(|r| r.proto_mask != 0).copied();
                (Prefix::from_trie_key(len, key), ranges.collect())
            })
            .collect();
        out.sort_by_key(|(p, _)| *p);
        Ok(out)
    }
}

impl ProtectedMap<&mut MapData> {
    pub fn insert(&mut self, (len, key): (u32, AddrKey), value: &Protected) -> Result<()> {
        self.0
            .insert(&Key::new(len, key), value, 0)
            .map_err(map_error(Self::NAME))
    }
    pub fn remove(&mut self, (len, key): (u32, AddrKey)) -> Result<()> {
        self.0
            .remove(&Key::new(len, key))
            .map_err(map_error(Self::NAME))
    }
}

handle! {
    /// The prefilter: one bit per top-16-bit address prefix, per family.
    PrefilterMap: Array<u64> = map_names::PREFILTER
}

impl<T: std::borrow::Borrow<MapData>> PrefilterMap<T> {
    pub fn word(&self, index: u32) -> Result<u64> {
        self.0.get(&index, 0).map_err(map_error(Self::NAME))
    }
}

impl PrefilterMap<&mut MapData> {
    pub fn set_word(&mut self, index: u32, word: u64) -> Result<()> {
        self.0.set(index, &word, 0).map_err(map_error(Self::NAME))
    }
}

handle! {
    /// The config array's single entry: default action and level window.
    ConfigMap: Array<Config> = map_names::CONFIG
}

impl<T: std::borrow::Borrow<MapData>> ConfigMap<T> {
    pub fn get(&self) -> Result<Config> {
        self.0.get(&0, 0).map_err(map_error(Self::NAME))
    }
}

impl ConfigMap<&mut MapData> {
    pub fn set(&mut self, config: &Config) -> Result<()> {
        self.0.set(0, config, 0).map_err(map_error(Self::NAME))
    }
}

handle! {
    /// The scope array's single entry: who is judged.
    ScopeMap: Array<Scope> = map_names::SCOPE
}

impl<T: std::borrow::Borrow<MapData>> ScopeMap<T> {
    pub fn get(&self) -> Result<Scope> {
        self.0.get(&0, 0).map_err(map_error(Self::NAME))
    }
}

handle! {
    /// Filter mode: where the programs send filtered connections (one entry).
    ProxyMap: Array<ProxyConfig> = map_names::PROXY
}

impl ProxyMap<MapData> {
    /// The pinned proxy entry (all zero: no proxy).
    pub fn read_pinned(pins: &PinLayout) -> Result<ProxyConfig> {
        Self::open_pinned(pins)?
            .0
            .get(&0, 0)
            .map_err(map_error(Self::NAME))
    }
}

impl ProxyMap<&mut MapData> {
    pub fn set(&mut self, proxy: &ProxyConfig) -> Result<()> {
        self.0.set(0, proxy, 0).map_err(map_error(Self::NAME))
    }
}

impl ScopeMap<MapData> {
    /// The pinned scope entry. An installation from before the scope map
    /// has none, which means the same as an empty one: everything below the
    /// attach point is judged.
    pub fn read_pinned(pins: &PinLayout) -> Result<Scope> {
        match pins.open_map(Self::NAME) {
            Ok(map) => Array::<_, Scope>::try_from(map)
                .and_then(|a| a.get(&0, 0))
                .map_err(map_error(Self::NAME)),
            Err(_) => Ok(Scope::default()),
        }
    }
}

impl ScopeMap<&mut MapData> {
    pub fn set(&mut self, scope: &Scope) -> Result<()> {
        self.0.set(0, scope, 0).map_err(map_error(Self::NAME))
    }
}

/// The per-CPU counters. Read-only on both sides: only the kernel counts.
pub struct CounterMap<T>(PerCpuArray<T, u64>);

impl<T> CounterMap<T> {
    pub const NAME: &'static str = map_names::COUNTERS;
}

impl CounterMap<MapData> {
    pub fn open_pinned(pins: &PinLayout) -> Result<Self> {
        let map = pins.open_map(Self::NAME)?;
        PerCpuArray::try_from(map)
            .map(Self)
            .map_err(map_error(Self::NAME))
    }
}

impl<'a> CounterMap<&'a MapData> {
    pub fn of(ebpf: &'a Ebpf) -> Result<Self> {
        let map = ebpf
            .map(Self::NAME)
            .ok_or(Error::MapMissing { name: Self::NAME })?;
        PerCpuArray::try_from(map)
            .map(Self)
            .map_err(map_error(Self::NAME))
    }
}

impl<T: std::borrow::Borrow<MapData>> CounterMap<T> {
    /// Sums the per-CPU counters.
    pub fn totals(&self) -> Result<Counters> {
        let sum = |i: u32| -> Result<u64> {
            let per_cpu = self.0.get(&i, 0).map_err(map_error(Self::NAME))?;
            Ok(per_cpu.iter().sum())
        };
        Ok(Counters {
            allowed: sum(counter::ALLOWED)?,
            denied: sum(counter::DENIED)?,
            audited: sum(counter::AUDITED)?,
            events_dropped: sum(counter::EVENTS_DROPPED)?,
        })
    }
}
