//! What is denied and what is not: address families, embedded IPv4 forms,
//! other metadata services, ports, DNS/NTP neighbours, UDP.

use imdsguard_testlab::fake_imds::INSTANCE_ID;
use libtest_mimic::Trial;

use crate::{support::*, trial};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "imds_v4_is_denied_unless_the_cgroup_is_allowed",
            imds_v4_is_denied_unless_the_cgroup_is_allowed,
        ),
        trial(
            "ipv6_and_embedded_ipv4_forms_are_denied",
            ipv6_and_embedded_ipv4_forms_are_denied,
        ),
        trial(
            "other_metadata_services_and_ports",
            other_metadata_services_and_ports,
        ),
        trial("dns_and_ntp_keep_working", dns_and_ntp_keep_working),
        trial(
            "udp_sends_are_only_judged_with_udp_flag",
            udp_sends_are_only_judged_with_udp_flag,
        ),
        trial(
            "protect_flag_replaces_or_extends_the_set",
            protect_flag_replaces_or_extends_the_set,
        ),
    ]
}

fn imds_v4_is_denied_unless_the_cgroup_is_allowed() {
    let lab = lab("v4");
    let prod = lab.cgroup("imds/prod").unwrap();
    let test = lab.cgroup("imds/test").unwrap();
    let mut d = start(&lab, &flag("allow-cgroup", &prod));

    let got = probe(&lab, Some(&prod), "http", "169.254.169.254:80");
    assert_eq!(
        got,
        imdsguard_testlab::probe::Outcome::Reached {
            detail: INSTANCE_ID.into()
        }
    );
    assert_eperm(&lab, Some(&test), "http", "169.254.169.254:80");
    // Processes outside the attach root (like kubelet on a node) are untouched.
    assert_reached(&lab, None, "http", "169.254.169.254:80");
    // Unprotected destinations are untouched for the denied pod.
    assert_reached(&lab, Some(&test), "tcp", "127.0.0.1:8080");

    let line = wait_decision(&mut d, test.id(), "169.254.169.254:80", "denied");
    assert_eq!(line["hook"], "connect4");
    assert_eq!(line["protocol"], "tcp");
    assert_eq!(line["address_form"], "plain");
    let exe = std::env::current_exe().unwrap();
    let name = exe.file_name().unwrap().to_string_lossy();
    let comm: String = name.chars().take(15).collect();
    assert_eq!(line["comm"], comm.as_str(), "comm of the probe process");
    assert!(line["pid"].as_u64().unwrap() > 0);
    assert_eq!(line["cgroup"], test.path().display().to_string());

    let st = status(&lab);
    assert_eq!(counter(&st, "denied"), 1);
    // PUT token + GET instance-id: two allowed connects.
    assert_eq!(counter(&st, "allowed"), 2);
    assert_eq!(hooks(&st), ["connect4", "connect6"]);
    let allowed = st["allowed"].as_array().unwrap();
    assert_eq!(allowed.len(), 1);
    assert_eq!(allowed[0]["cgroup"], prod.path().display().to_string());
}

fn ipv6_and_embedded_ipv4_forms_are_denied() {
    let lab = lab("v6");
    let prod = lab.cgroup("prod").unwrap();
    let test = lab.cgroup("test").unwrap();
    let mut d = start(&lab, &flag("allow-cgroup", &prod));
    for target in [
        "[fd00:ec2::254]:80",
        "[fd00:ec2::23]:80",
        "[fd00:c1::a9fe:a9fe]:80",
        // An AF_INET6 socket to the IPv4-mapped form runs connect6, not
        // connect4: it must still be judged as 169.254.169.254.
        "[::ffff:169.254.169.254]:80",
        "[64:ff9b::a9fe:a9fe]:80",
    ] {
        assert_eperm(&lab, Some(&test), "tcp", target);
        assert_reached(&lab, Some(&prod), "tcp", target);
    }
    assert_reached(&lab, Some(&test), "tcp", "[::1]:8080");
    let mapped = wait_decision(&mut d, test.id(), "169.254.169.254:80", "denied");
    assert_eq!(mapped["hook"], "connect6");
    assert_eq!(mapped["address_form"], "ipv4-mapped");
    let v6 = wait_decision(&mut d, test.id(), "[fd00:ec2::254]:80", "denied");
    assert_eq!(v6["hook"], "connect6");
}

fn other_metadata_services_and_ports() {
    let lab = lab("services");
    let test = lab.cgroup("test").unwrap();
    let _d = start(&lab, &[]);
    for target in [
        "169.254.170.2:80",       // ECS task metadata
        "169.254.170.23:80",      // EKS Pod Identity
        "169.254.169.252:988",    // GKE metadata server
        "100.100.100.200:80",     // Alibaba
        "168.63.129.16:80",       // Azure WireServer
        "168.63.129.16:32526",    // Azure WireServer (guest agent)
        "192.0.0.192:80",         // Oracle Cloud Classic
        "100.96.0.96:80",         // Volcano Engine / BytePlus
        "169.254.0.23:80",        // Tencent Cloud
        "169.254.42.42:80",       // Scaleway
        "[fd20:ce::254]:80",      // GCP, IPv6-only VMs
        "[fd00:42::42]:80",       // Scaleway over IPv6
        "[fd00:a9fe:a9fe::1]:80", // Linode over IPv6
        // Linode and OpenStack over IPv6 (link-local): nothing listens, the
        // hook answers before the kernel would ask for a scope id.
        "[fe80::a9fe:a9fe]:80",
    ] {
        assert_eperm(&lab, Some(&test), "tcp", target);
    }
    // WireServer is only protected on its two ports.
    assert_reached(&lab, Some(&test), "tcp", "168.63.129.16:443");
    // The new services answer when no pod cgroup is in the way: the denials
    // above are the hook's, not a missing listener's.
    for target in [
        "192.0.0.192:80",
        "100.96.0.96:80",
        "169.254.0.23:80",
        "169.254.42.42:80",
        "[fd20:ce::254]:80",
        "[fd00:42::42]:80",
        "[fd00:a9fe:a9fe::1]:80",
    ] {
        assert_reached(&lab, None, "tcp", target);
    }
}

fn dns_and_ntp_keep_working() {
    let lab = lab("dns-ntp");
    let test = lab.cgroup("test").unwrap();
    // With UDP enforcement on, the strictest configuration.
    let _d = start(&lab, &[s("--udp")]);
    for target in [
        "169.254.169.254:53",
        "169.254.169.253:53",
        "168.63.129.16:53",
        "169.254.20.10:53",
        "[fd00:ec2::254]:53",
        "[fd20:ce::254]:53",
    ] {
        assert_reached(&lab, Some(&test), "udp-sendto", target);
        assert_reached(&lab, Some(&test), "udp-connect", target);
        assert_reached(&lab, Some(&test), "tcp", target);
    }
    assert_reached(&lab, Some(&test), "udp-sendto", "[fd00:ec2::253]:53");
    // GCP's time server is its metadata server, on both families.
    for target in [
        "169.254.169.123:123",
        "[fd00:ec2::123]:123",
        "169.254.169.254:123",
        "[fd20:ce::254]:123",
    ] {
        assert_reached(&lab, Some(&test), "udp-sendto", target);
        assert_reached(&lab, Some(&test), "udp-connect", target);
    }
    // ... while the metadata port on the same address stays closed.
    assert_eperm(&lab, Some(&test), "udp-sendto", "169.254.169.254:80");
    assert_eperm(&lab, Some(&test), "tcp", "169.254.169.254:80");
    assert_eperm(&lab, Some(&test), "tcp", "[fd20:ce::254]:80");
}

fn udp_sends_are_only_judged_with_udp_flag() {
    let lab = lab("udp");
    let prod = lab.cgroup("prod").unwrap();
    let test = lab.cgroup("test").unwrap();
    let allow = flag("allow-cgroup", &prod);

    // Default: connect hooks only. A UDP connect() is judged, an unconnected
    // sendto() is not (no sendmsg program: documented trade-off).
    let d = start(&lab, &allow);
    assert_eq!(hooks(&status(&lab)), ["connect4", "connect6"]);
    assert_eperm(&lab, Some(&test), "udp-connect", "169.254.169.254:80");
    assert_reached(&lab, Some(&test), "udp-sendto", "169.254.169.254:80");
    d.terminate().unwrap();

    // --udp on the same pins: sendmsg hooks are added and deny like connect.
    let d = start(&lab, &args([&allow, &[s("--udp")]]));
    assert_eq!(
        hooks(&status(&lab)),
        ["connect4", "connect6", "sendmsg4", "sendmsg6"]
    );
    for target in [
        "169.254.169.254:80",
        "[::ffff:169.254.169.254]:80",
        "[fd00:ec2::254]:80",
    ] {
        assert_eperm(&lab, Some(&test), "udp-sendto", target);
        assert_reached(&lab, Some(&prod), "udp-sendto", target);
    }
    d.terminate().unwrap();

    // Back without --udp: the sendmsg links are detached again.
    let _d = start(&lab, &allow);
    assert_eq!(hooks(&status(&lab)), ["connect4", "connect6"]);
    assert_reached(&lab, Some(&test), "udp-sendto", "169.254.169.254:80");
}

fn protect_flag_replaces_or_extends_the_set() {
    let lab = lab("protect");
    let test = lab.cgroup("test").unwrap();
    let d = start(&lab, &[s("--protect"), s("127.0.0.1 tcp ports=8080")]);
    assert_eperm(&lab, Some(&test), "tcp", "127.0.0.1:8080");
    assert_eperm(&lab, Some(&test), "tcp", "169.254.169.254:80");
    assert_reached(&lab, None, "tcp", "127.0.0.1:8080");
    d.terminate().unwrap();

    let _d = start(
        &lab,
        &[
            s("--no-default-destinations"),
            s("--protect"),
            s("[::1] tcp ports=8080"),
        ],
    );
    assert_reached(&lab, Some(&test), "tcp", "169.254.169.254:80");
    assert_reached(&lab, Some(&test), "tcp", "127.0.0.1:8080");
    assert_eperm(&lab, Some(&test), "tcp", "[::1]:8080");
    let st = status(&lab);
    assert_eq!(st["protected"].as_array().unwrap().len(), 1);
}
