//! Filter mode's kernel state: where the programs send filtered callers
//! (the proxy array), and the connections they sent there (read by the
//! proxy to learn who is calling).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Mutex,
};

use aya::maps::{HashMap, MapData};
use imdsguard_common::{AddrKey, ConnKey, FilterOrigin, ProxyConfig, map_names};

use crate::{
    Error, Result,
    bpf::{enforcer::Enforcer, maps::ProxyMap, pins::PinLayout},
    destinations::{addr_of_words, words_of},
};

/// The metadata services' HTTP port: the only port a filtered caller's
/// connect is sent to the proxy from. Every other protected port stays
/// denied.
pub const METADATA_HTTP_PORT: u16 = 80;

/// Where the kernel sends a filtered caller's metadata connections: the
/// proxy's listening addresses. A family without an address has its
/// filtered connects denied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyTarget {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
    pub port: u16,
}

impl ProxyTarget {
    /// The array entry the programs read.
    pub fn config(target: Option<&Self>) -> ProxyConfig {
        let Some(t) = target else {
            // Port zero: no proxy, filtered callers are denied.
            return ProxyConfig::default();
        };
        ProxyConfig {
            addr6: t.v6.as_ref().map(words_of).unwrap_or_default(),
            addr4: t.v4.map(|a| u32::from(a).to_be()).unwrap_or(0),
            port: t.port,
            http_port: METADATA_HTTP_PORT,
        }
    }
}

/// An address in the maps' form (IPv4 as IPv4-mapped, network order words).
fn key_of(ip: IpAddr) -> AddrKey {
    match ip {
        IpAddr::V4(a) => words_of(&a.to_ipv6_mapped()),
        IpAddr::V6(a) => words_of(&a),
    }
}

/// An address from the maps' form; IPv4-mapped comes back as IPv4.
fn ip_of(key: AddrKey) -> IpAddr {
    let v6 = addr_of_words(key);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

impl Enforcer {
    /// Tells the programs where the proxy is (or that there is none).
    /// Written before any attach, like every map.
    pub(super) fn write_proxy(&mut self) -> Result<()> {
        let config = ProxyTarget::config(self.attachment.filter.as_ref());
        ProxyMap::of(&mut self.ebpf)?.set(&config)
    }
}

/// One connection the kernel sent to the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnOrigin {
    /// The calling task's cgroup.
    pub caller_cgroup: u64,
    /// The cgroup whose entry said filter (0: none the proxy can name).
    pub entry_cgroup: u64,
    /// Where the caller was connecting before the rewrite.
    pub upstream: SocketAddr,
}

/// The proxy's reader of the filtered-connection map. It opens the pinned
/// map itself rather than asking the owner task: a lookup per accepted
/// connection must not queue behind map syncs, and this map holds no
/// policy, only per-connection records the programs write.
pub struct FilterConns {
    map: Mutex<HashMap<MapData, ConnKey, FilterOrigin>>,
}

impl FilterConns {
    pub fn open(pins: &PinLayout) -> Result<Self> {
        let name = map_names::FILTER_CONNS;
        let map = HashMap::try_from(pins.open_map(name)?)
            .map_err(|source| Error::Map { name, source })?;
        Ok(Self {
            map: Mutex::new(map),
        })
    }

    /// Takes the record of the connection the proxy accepted from `peer`
    /// on `local`. The record is removed: the proxy keeps it for the
    /// connection's life, and the map stays small.
    pub fn take(&self, peer: SocketAddr, local: SocketAddr) -> Result<Option<ConnOrigin>> {
        let key = ConnKey {
            peer: key_of(peer.ip()),
            local: key_of(local.ip()),
            peer_port: peer.port(),
            local_port: local.port(),
            _pad: 0,
        };
        let name = map_names::FILTER_CONNS;
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let origin = match map.get(&key, 0) {
            Ok(o) => o,
            Err(aya::maps::MapError::KeyNotFound) => return Ok(None),
            Err(source) => return Err(Error::Map { name, source }),
        };
        // Already gone (evicted) is as good as removed.
        let _ = map.remove(&key);
        Ok(Some(ConnOrigin {
            caller_cgroup: origin.caller_cgroup,
            entry_cgroup: origin.entry_cgroup,
            upstream: SocketAddr::new(ip_of(origin.addr), origin.port),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_through_the_map_form() {
        for ip in ["169.254.169.254", "fd00:ec2::254", "10.0.0.1", "::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_of(key_of(ip)), ip);
        }
        // The programs write IPv4 as ::ffff:a.b.c.d in network order.
        let k = key_of("169.254.169.254".parse().unwrap());
        assert_eq!(k[2], 0x0000_ffffu32.to_be());
        assert_eq!(k[3], u32::from(Ipv4Addr::new(169, 254, 169, 254)).to_be());
    }

    #[test]
    fn no_proxy_means_port_zero() {
        assert_eq!(ProxyTarget::config(None).port, 0);
        let t = ProxyTarget {
            v4: Some(Ipv4Addr::LOCALHOST),
            v6: None,
            port: 8169,
        };
        let c = ProxyTarget::config(Some(&t));
        assert_eq!((c.port, c.http_port, c.addr6), (8169, 80, [0; 4]));
        assert_eq!(c.addr4, u32::from(Ipv4Addr::LOCALHOST).to_be());
    }
}
