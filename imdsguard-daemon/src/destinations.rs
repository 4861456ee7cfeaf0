//! Protected destinations: the default set, the `--protect` spec syntax, and
//! compilation into the kernel's trie entries and prefilter bitmap.
//!
//! Spec syntax (one destination, whitespace-separated):
//!
//! ```text
//! CIDR [tcp|udp|any] [ports=all|P|P-Q,...] [except=P|P-Q,...] [name=LABEL]
//! 169.254.169.254/32 any except=53 name=aws-imds
//! 168.63.129.16 tcp ports=80,32526 name=azure-wireserver
//! ```
//!
//! A bare address means a single host; protocol defaults to `any` and ports
//! to `all`.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use imdsguard_common::{
    AddrKey, MAX_PORT_RANGES, PREFILTER_WORDS, PROTO_ANY, PortRange, Protected, V4_MAPPED_PREFIX,
    prefilter_slot,
};
use serde::Serialize;

use crate::{Error, Result, vocabulary::Protocol};

/// An address prefix, normalised: host bits cleared, and IPv6 forms that
/// embed IPv4 (mapped, compatible, NAT64) turned into the IPv4 prefix, the
/// same way the kernel side judges them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    pub fn new(addr: IpAddr, len: u8) -> std::result::Result<Self, String> {
        match addr {
            IpAddr::V4(a) => {
                if len > 32 {
                    return Err(format!("prefix length {len} is longer than 32"));
                }
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                Ok(Self {
                    addr: IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask)),
                    len,
                })
            }
            IpAddr::V6(a) => {
                if len > 128 {
                    return Err(format!("prefix length {len} is longer than 128"));
                }
                let bits = u128::from(a);
                let hi96 = bits >> 32;
                let embedded = hi96 == 0xffff || hi96 == 0 || hi96 == 0x0064_ff9b_u128 << 64;
                if embedded && len >= 96 && !(hi96 == 0 && bits <= 1) {
                    return Self::new(IpAddr::V4(Ipv4Addr::from(bits as u32)), len - 96);
                }
                let mask = if len == 0 {
                    0
                } else {
                    u128::MAX << (128 - len)
                };
                // The kernel judges IPv4-embedding forms as IPv4, so a shorter
                // IPv6 prefix could never match them: say so instead.
                let embedding = [0xffff_u128 << 32, 0, 0x0064_ff9b_u128 << 96];
                if len < 96 && embedding.iter().any(|e| e & mask == bits & mask) {
                    return Err(format!(
                        "IPv6 prefix /{len} covers IPv4-mapped, -compatible or NAT64 addresses; protect the IPv4 prefix instead"
                    ));
                }
                Ok(Self {
                    addr: IpAddr::V6(Ipv6Addr::from(bits & mask)),
                    len,
                })
            }
        }
    }

    /// The trie key: the IPv6 (or IPv4-mapped) address as network-order
    /// words, and the prefix length in that 128-bit space.
    pub fn trie_key(&self) -> (u32, AddrKey) {
        let (v6, len) = match self.addr {
            IpAddr::V4(a) => (a.to_ipv6_mapped(), u32::from(self.len) + V4_MAPPED_PREFIX),
            IpAddr::V6(a) => (a, u32::from(self.len)),
        };
        (len, words_of(&v6))
    }

    pub fn from_trie_key(len: u32, key: AddrKey) -> Self {
        let v6 = addr_of_words(key);
        match v6.to_ipv4_mapped() {
            Some(v4) if len >= V4_MAPPED_PREFIX => Self {
                addr: IpAddr::V4(v4),
                len: (len - V4_MAPPED_PREFIX) as u8,
            },
            _ => Self {
                addr: IpAddr::V6(v6),
                len: len as u8,
            },
        }
    }
}

/// The kernel's `user_ip6` layout: four words, each in network byte order.
pub fn words_of(a: &Ipv6Addr) -> AddrKey {
    let o = a.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

pub fn addr_of_words(w: AddrKey) -> Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, word) in w.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
    }
    Ipv6Addr::from(o)
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Prefix {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr = addr
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .map_err(|_| format!("{addr:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(l) => l
                .parse::<u8>()
                .map_err(|_| format!("{l:?} is not a prefix length"))?,
            None => max,
        };
        Self::new(addr, len)
    }
}

/// A protected destination as configured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Destination {
    pub name: String,
    pub prefix: Prefix,
    /// `PROTO_*` bits.
    pub protocols: u16,
    /// Protected port ranges (inclusive) before exceptions.
    pub ports: Vec<(u16, u16)>,
    /// Ports carved out of `ports`, e.g. DNS on 53.
    pub except: Vec<(u16, u16)>,
}

fn parse_ports(list: &str) -> std::result::Result<Vec<(u16, u16)>, String> {
    if list == "all" {
        return Ok(vec![(0, u16::MAX)]);
    }
    list.split(',')
        .map(|item| {
            let p = |s: &str| s.parse::<u16>().map_err(|_| format!("{s:?} is not a port"));
            let (lo, hi) = match item.split_once('-') {
                Some((a, b)) => (p(a)?, p(b)?),
                None => (p(item)?, p(item)?),
            };
            if lo > hi {
                return Err(format!("port range {item:?} is backwards"));
            }
            Ok((lo, hi))
        })
        .collect()
}

impl FromStr for Destination {
    type Err = Error;
    fn from_str(spec: &str) -> Result<Self> {
        let bad = |reason: String| Error::InvalidDestination {
            spec: spec.into(),
            reason,
        };
        let mut tokens = spec.split_whitespace();
        let prefix: Prefix = tokens
            .next()
            .ok_or_else(|| bad("empty".into()))?
            .parse()
            .map_err(bad)?;
        let mut d = Destination {
            name: prefix.to_string(),
            prefix,
            protocols: PROTO_ANY,
            ports: vec![(0, u16::MAX)],
            except: Vec::new(),
        };
        for t in tokens {
            match t.split_once('=') {
                None => {
                    d.protocols = match Protocol::ALL.into_iter().find(|p| p.name() == t) {
                        Some(p) => p.mask(),
                        None if t == "any" => PROTO_ANY,
                        None => {
                            return Err(bad(format!("unknown protocol {t:?} (tcp, udp or any)")));
                        }
                    }
                }
                Some(("ports", v)) => d.ports = parse_ports(v).map_err(bad)?,
                Some(("except", v)) => d.except = parse_ports(v).map_err(bad)?,
                Some(("name", v)) if !v.is_empty() => d.name = v.into(),
                Some((k, _)) => {
                    return Err(bad(format!("unknown key {k:?} (ports, except, name)")));
                }
            }
        }
        Ok(d)
    }
}

impl Destination {
    /// The protected ranges after removing the exceptions.
    pub fn effective_ranges(&self) -> Vec<(u16, u16)> {
        let mut out = Vec::new();
        for &(lo, hi) in &self.ports {
            let mut pieces = vec![(u32::from(lo), u32::from(hi))];
            for &(elo, ehi) in &self.except {
                let (elo, ehi) = (u32::from(elo), u32::from(ehi));
                pieces = pieces
                    .into_iter()
                    .flat_map(|(a, b)| {
                        let mut keep = Vec::new();
                        if ehi < a || elo > b {
                            keep.push((a, b));
                        } else {
                            if a < elo {
                                keep.push((a, elo - 1));
                            }
                            if ehi < b {
                                keep.push((ehi + 1, b));
                            }
                        }
                        keep
                    })
                    .collect();
            }
            out.extend(pieces.into_iter().map(|(a, b)| (a as u16, b as u16)));
        }
        out
    }
}

/// The set that ships with imdsguard: every address at which a cloud's
/// metadata service hands out credentials (IAM/RAM/CAM role keys, service
/// account tokens) or secrets (user-data, SSH keys, WireServer goal state).
/// Every entry covers TCP and UDP: no metadata service answers over UDP, but
/// denying it costs nothing and UDP is only checked on sendmsg with `--udp`
/// anyway. DNS (53) and NTP (123) stay open where a resolver or time server
/// shares the address; those on addresses of their own (169.254.169.253,
/// 169.254.169.123, fd00:ec2::123, fd00:ec2::253, 169.254.20.10) are simply
/// not listed.
///
/// Clouds whose IPv4 endpoint is 169.254.169.254 are covered by its entry:
/// AWS, GCP, Azure IMDS, OCI, OpenStack, DigitalOcean, Huawei (its
/// OpenStack-style `securitykey` serves temporary AK/SK), Linode, Brightbox,
/// JD Cloud, and (from their docs, not re-read here) Hetzner and IBM VPC.
///
/// Each added entry names its source; "evidence" marks an address that the
/// provider's own pages, as far as they could be read, do not state.
pub fn defaults() -> Vec<Destination> {
    [
        // AWS docs.aws.amazon.com/AWSEC2/latest/UserGuide/instancedata-data-retrieval.html,
        // OCI docs.oracle.com/en-us/iaas/Content/Compute/Tasks/gettingmetadata.htm,
        // and the others above. 53: GCP's resolver answers here; 123: GCP's
        // NTP server is metadata.google.internal
        // (cloud.google.com/compute/docs/instances/configure-ntp).
        "169.254.169.254/32 any except=53,123 name=aws-gcp-azure-oci-imds",
        // AWS IMDS over IPv6 (same page as above; Nitro instances).
        "fd00:ec2::254/128 any except=53 name=aws-imds-v6",
        "169.254.170.2/32 any name=aws-ecs-task-metadata",
        "169.254.170.23/32 any name=aws-eks-pod-identity",
        "fd00:ec2::23/128 any name=aws-eks-pod-identity-v6",
        "169.254.169.252/32 any name=gke-metadata-server",
        // GCP metadata server for IPv6-only VMs (service-account tokens).
        // Evidence: Google's IPv6 pages read here only say dual-stack VMs
        // reach it over IPv4; fd20:ce::254 is the address several SSRF
        // denylists in public code agree on. Kept open like the IPv4
        // address: 53 and 123.
        "fd20:ce::254/128 any except=53,123 name=gcp-metadata-v6",
        // www.alibabacloud.com/help/en/ecs/user-guide/view-instance-metadata
        "100.100.100.200/32 any name=alibaba-metadata",
        // 80 and 32526 serve the goal state (certificates, extensions); 53
        // is the VNet resolver and stays open.
        "168.63.129.16/32 any ports=80,32526 name=azure-wireserver",
        "fd00:c1::a9fe:a9fe/128 any name=oci-metadata-v6",
        // Oracle Cloud Classic / Cloud at Customer (SSH keys, user attributes):
        // docs.oracle.com/en/cloud/cloud-at-customer/occ-get-started/retrieve-predefined-instance-metadata.html
        // vArmor's block-access-to-oci-metadata-service blocks it too.
        "192.0.0.192/32 any name=oracle-classic-metadata",
        // Volcano Engine / BytePlus ECS: www.volcengine.com/docs/6396/113780;
        // role credentials at /volcstack/latest/iam/security_credentials/
        // (Volcano Engine's own CNI, volcengine/cello). Also in vArmor's rule.
        "100.96.0.96/32 any name=volcengine-metadata",
        // Tencent Cloud CVM: metadata.tencentyun.com
        // (www.tencentcloud.com/document/product/213/4934), CAM role keys at
        // /latest/meta-data/cam/security-credentials/ (document/product/213/45917).
        // Evidence for the address behind the name: the Datadog agent's
        // Tencent cloud provider uses http://169.254.0.23. No resolver or
        // time server is documented at this address.
        "169.254.0.23/32 any name=tencent-metadata",
        // Scaleway Instances: user data (cloud-init) and /conf (SSH keys,
        // tags) at www.scaleway.com/en/developers/api/instance/user-data and
        // docs.cloud-init.io/en/latest/reference/datasources/scaleway.html.
        // Scaleway answers user_data only from source ports below 1024,
        // which a container gets by default (CAP_NET_BIND_SERVICE).
        "169.254.42.42/32 any name=scaleway-metadata",
        "fd00:42::42/128 any name=scaleway-metadata-v6",
        // Linode / Akamai: techdocs.akamai.com/cloud-computing/docs/metadata-service-api
        // (user data behind a PUT token); IPv4 is 169.254.169.254 above.
        "fd00:a9fe:a9fe::1/128 any name=linode-metadata-v6",
        // Linode's second IPv6 address (same page); OpenStack Neutron serves
        // metadata to IPv6-only networks at the same link-local address
        // (bugs.launchpad.net/neutron/+bug/1460177, referenced by the
        // neutron-specs distributed-metadata spec).
        "fe80::a9fe:a9fe/128 any name=linode-openstack-v6",
    ]
    .iter()
    .map(|s| s.parse().expect("built-in destination spec is valid"))
    .collect()
}

/// What the kernel maps hold for a destination set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compiled {
    /// Trie entries: (prefix length, key) → port ranges.
    pub entries: BTreeMap<(u32, AddrKey), Protected>,
    /// Prefilter words, `PREFILTER_WORDS` of them.
    pub prefilter: Vec<u64>,
}

impl Compiled {
    /// Whether the kernel programs would judge a connection to `ip`:`port`
    /// over `proto` (`PROTO_TCP` or `PROTO_UDP`): the same normalisation of
    /// IPv4-embedding forms, the longest matching prefix, then its port
    /// ranges. Used to pick the open connections to revoke.
    pub fn protects(&self, ip: IpAddr, port: u16, proto: u16) -> bool {
        let full = if ip.is_ipv4() { 32 } else { 128 };
        let Ok(prefix) = Prefix::new(ip, full) else {
            return false;
        };
        let (_, key) = prefix.trie_key();
        let bits = u128::from(addr_of_words(key));
        let longest = self
            .entries
            .iter()
            .filter(|((len, k), _)| {
                let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
                u128::from(addr_of_words(*k)) & mask == bits & mask
            })
            .max_by_key(|((len, _), _)| *len);
        longest.is_some_and(|(_, p)| {
            p.ranges
                .iter()
                .take_while(|r| r.proto_mask != 0)
                .any(|r| r.proto_mask & proto != 0 && r.lo <= port && port <= r.hi)
        })
    }
}

pub fn compile(destinations: &[Destination]) -> Result<Compiled> {
    let mut by_prefix: BTreeMap<Prefix, Vec<PortRange>> = BTreeMap::new();
    for d in destinations {
        let ranges = by_prefix.entry(d.prefix).or_default();
        for (lo, hi) in d.effective_ranges() {
            ranges.push(PortRange {
                proto_mask: d.protocols,
                lo,
                hi,
                _pad: 0,
            });
        }
    }
    let mut entries = BTreeMap::new();
    let mut prefilter = vec![0u64; PREFILTER_WORDS as usize];
    for (prefix, mut ranges) in by_prefix {
        ranges.sort();
        ranges.dedup();
        if ranges.is_empty() {
            // Every port excepted: nothing to protect, nothing to look up.
            continue;
        }
        if ranges.len() > MAX_PORT_RANGES {
            return Err(Error::TooManyPortRanges {
                prefix: prefix.to_string(),
                count: ranges.len(),
                max: MAX_PORT_RANGES,
            });
        }
        let mut value = Protected::default();
        value.ranges[..ranges.len()].copy_from_slice(&ranges);
        entries.insert(prefix.trie_key(), value);
        set_prefilter_bits(&mut prefilter, &prefix);
    }
    if entries.len() > imdsguard_common::MAX_PROTECTED as usize {
        return Err(Error::MapFull {
            what: "protected prefixes",
            count: entries.len(),
            max: imdsguard_common::MAX_PROTECTED,
        });
    }
    Ok(Compiled { entries, prefilter })
}

/// Sets the bit of every top-16-bit value the prefix covers.
fn set_prefilter_bits(words: &mut [u64], prefix: &Prefix) {
    let (is_v6, hi16) = match prefix.addr {
        IpAddr::V4(a) => (false, u32::from(a) >> 16),
        IpAddr::V6(a) => (true, (u128::from(a) >> 112) as u32),
    };
    let span = if prefix.len >= 16 {
        1
    } else {
        1u32 << (16 - prefix.len)
    };
    for v in hi16..hi16 + span {
        let (w, bit) = prefilter_slot(is_v6, v);
        words[w as usize] |= bit;
    }
}

#[cfg(test)]
mod tests;
