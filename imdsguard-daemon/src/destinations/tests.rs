use imdsguard_common::{PROTO_TCP, PROTO_UDP};

use super::*;

fn d(s: &str) -> Destination {
    s.parse().unwrap()
}

#[test]
fn protects_matches_what_the_kernel_judges() {
    let c = compile(&defaults()).unwrap();
    let p = |a: &str, port, proto| c.protects(a.parse().unwrap(), port, proto);
    assert!(p("169.254.169.254", 80, PROTO_TCP));
    assert!(p("169.254.169.254", 8264, PROTO_UDP));
    // DNS on the same address is left open.
    assert!(!p("169.254.169.254", 53, PROTO_TCP));
    // IPv4-embedding IPv6 forms count as the IPv4 address.
    assert!(p("::ffff:169.254.169.254", 80, PROTO_TCP));
    assert!(p("::169.254.169.254", 80, PROTO_TCP));
    assert!(p("64:ff9b::a9fe:a9fe", 80, PROTO_TCP));
    assert!(p("fd00:ec2::254", 80, PROTO_TCP));
    assert!(!p("fd00:ec2::253", 80, PROTO_TCP));
    // Port-limited entries.
    assert!(p("168.63.129.16", 32526, PROTO_TCP));
    assert!(!p("168.63.129.16", 443, PROTO_TCP));
    assert!(!p("127.0.0.1", 8080, PROTO_TCP));
    assert!(!p("::1", 80, PROTO_TCP));
    // The longest prefix decides, as in the kernel's trie: a host entry
    // with only port 80 shadows a wider one protecting everything.
    let c = compile(&[d("10.0.0.0/8 tcp"), d("10.1.2.3/32 tcp ports=80")]).unwrap();
    assert!(c.protects("10.9.9.9".parse().unwrap(), 443, PROTO_TCP));
    assert!(c.protects("10.1.2.3".parse().unwrap(), 80, PROTO_TCP));
    assert!(!c.protects("10.1.2.3".parse().unwrap(), 443, PROTO_TCP));
    assert!(!c.protects("10.1.2.3".parse().unwrap(), 80, PROTO_UDP));
}

#[test]
fn bare_address_is_a_host_with_all_ports_and_protocols() {
    let x = d("169.254.169.254");
    assert_eq!(x.prefix.to_string(), "169.254.169.254/32");
    assert_eq!(x.protocols, PROTO_ANY);
    assert_eq!(x.effective_ranges(), vec![(0, 65535)]);
}

#[test]
fn except_splits_the_range() {
    let x = d("169.254.169.254/32 tcp except=53");
    assert_eq!(x.effective_ranges(), vec![(0, 52), (54, 65535)]);
    let y = d("10.0.0.1 ports=80-90 except=80,85-86,90");
    assert_eq!(y.effective_ranges(), vec![(81, 84), (87, 89)]);
}

#[test]
fn bad_specs_name_the_problem() {
    for (spec, needle) in [
        ("", "empty"),
        ("not-an-ip", "not an IP address"),
        ("10.0.0.0/33", "longer than 32"),
        ("10.0.0.1 sctp", "unknown protocol"),
        ("10.0.0.1 ports=90-80", "backwards"),
        ("10.0.0.1 ports=http", "not a port"),
        ("10.0.0.1 colour=red", "unknown key"),
        ("::/0", "covers IPv4-mapped"),
        ("64:ff9b::/64", "covers IPv4-mapped"),
    ] {
        let err = spec.parse::<Destination>().unwrap_err().to_string();
        assert!(err.contains(needle), "{spec:?}: {err}");
    }
}

#[test]
fn ipv6_forms_of_ipv4_normalise_to_ipv4() {
    for s in [
        "::ffff:169.254.169.254",
        "64:ff9b::a9fe:a9fe",
        "::a9fe:a9fe",
    ] {
        assert_eq!(d(s).prefix, d("169.254.169.254").prefix, "{s}");
    }
    // :: and ::1 are not IPv4-compatible addresses.
    assert!(d("::1").prefix.addr.is_ipv6());
}

#[test]
fn host_bits_are_cleared() {
    assert_eq!(d("169.254.169.254/16").prefix.to_string(), "169.254.0.0/16");
    assert_eq!(d("fd00:ec2::254/32").prefix.to_string(), "fd00:ec2::/32");
}

#[test]
fn trie_keys_round_trip() {
    for s in ["169.254.169.254/32", "fd00:ec2::254/128", "10.0.0.0/8"] {
        let p = d(s).prefix;
        let (len, key) = p.trie_key();
        assert_eq!(Prefix::from_trie_key(len, key), p);
    }
    let (len, key) = d("169.254.169.254").prefix.trie_key();
    assert_eq!(len, 128);
    assert_eq!(
        addr_of_words(key),
        "::ffff:169.254.169.254".parse::<Ipv6Addr>().unwrap()
    );
}

#[test]
fn defaults_keep_dns_and_ntp_open() {
    let c = compile(&defaults()).unwrap();
    let covered = |addr: &str, proto: u16, port: u16| {
        let (len, key) = d(addr).prefix.trie_key();
        assert_eq!(len, 128);
        c.entries.get(&(len, key)).is_some_and(|p| {
            p.ranges
                .iter()
                .any(|r| r.proto_mask & proto != 0 && r.lo <= port && port <= r.hi)
        })
    };
    assert!(covered("169.254.169.254", PROTO_TCP, 80));
    assert!(covered("fd00:ec2::254", PROTO_TCP, 80));
    assert!(covered("168.63.129.16", PROTO_TCP, 80));
    assert!(covered("168.63.129.16", PROTO_TCP, 32526));
    for (addr, port) in [
        ("169.254.169.254", 53),
        ("169.254.169.254", 123),
        ("fd20:ce::254", 53),
        ("fd20:ce::254", 123),
        ("169.254.169.253", 53),
        ("168.63.129.16", 53),
        ("169.254.20.10", 53),
        ("169.254.169.123", 123),
        ("fd00:ec2::123", 123),
    ] {
        assert!(!covered(addr, PROTO_UDP, port), "{addr}:{port}/udp");
        assert!(!covered(addr, PROTO_TCP, port), "{addr}:{port}/tcp");
    }
    assert!(!covered("168.63.129.16", PROTO_TCP, 443));
}

#[test]
fn defaults_cover_every_clouds_endpoints() {
    let c = compile(&defaults()).unwrap();
    for addr in [
        "169.254.169.254",
        "fd00:ec2::254",
        "169.254.170.2",
        "169.254.170.23",
        "fd00:ec2::23",
        "169.254.169.252",
        "fd20:ce::254",
        "100.100.100.200",
        "fd00:c1::a9fe:a9fe",
        "192.0.0.192",
        "100.96.0.96",
        "169.254.0.23",
        "169.254.42.42",
        "fd00:42::42",
        "fd00:a9fe:a9fe::1",
        "fe80::a9fe:a9fe",
    ] {
        let ip = addr.parse().unwrap();
        for proto in [PROTO_TCP, PROTO_UDP] {
            assert!(c.protects(ip, 80, proto), "{addr}:80/{proto}");
            assert!(c.protects(ip, 443, proto), "{addr}:443/{proto}");
        }
    }
    // Every default is its own host prefix: one trie entry each.
    assert_eq!(c.entries.len(), defaults().len());
    assert_eq!(c.entries.len(), 17);
    // Names are unique, so each line of `imdsguard destinations` says which
    // entry it is.
    let mut names: Vec<String> = defaults().into_iter().map(|d| d.name).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), defaults().len());
}

#[test]
fn same_prefix_merges_ranges() {
    let c = compile(&[d("10.1.2.3 tcp ports=80"), d("10.1.2.3 udp ports=53")]).unwrap();
    assert_eq!(c.entries.len(), 1);
    let v = c.entries.values().next().unwrap();
    assert_eq!(v.ranges.iter().filter(|r| r.proto_mask != 0).count(), 2);
}

#[test]
fn too_many_ranges_is_an_error() {
    let spec = "10.1.2.3 ports=1,3,5,7,9,11,13,15,17";
    assert!(matches!(
        compile(&[d(spec)]),
        Err(Error::TooManyPortRanges { count: 9, .. })
    ));
}

#[test]
fn prefilter_marks_exactly_the_covered_slices() {
    let c = compile(&[d("169.254.169.254")]).unwrap();
    let ones: u32 = c.prefilter.iter().map(|w| w.count_ones()).sum();
    assert_eq!(ones, 1);
    let (w, bit) = prefilter_slot(false, 0xa9fe);
    assert_ne!(c.prefilter[w as usize] & bit, 0);
    let wide = compile(&[d("10.0.0.0/8")]).unwrap();
    assert_eq!(
        wide.prefilter.iter().map(|w| w.count_ones()).sum::<u32>(),
        256
    );
    let v6 = compile(&[d("fd00:ec2::254")]).unwrap();
    let (w, bit) = prefilter_slot(true, 0xfd00);
    assert_ne!(v6.prefilter[w as usize] & bit, 0);
    let all_v4 = compile(&[d("0.0.0.0/0")]).unwrap();
    assert_eq!(
        all_v4.prefilter.iter().map(|w| w.count_ones()).sum::<u32>(),
        65536
    );
}
