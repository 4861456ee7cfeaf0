//! Attempts to get around the connect hooks, tried for real: other ways of
//! writing the metadata address, other ways of connecting, and tampering
//! with the installation. Each attempt is made from a denied pod and must
//! fail with EPERM (or be refused by the kernel and provably reach nothing);
//! the same attempt from an allowed pod must work, so that every denial
//! shown here is the hook's doing and not a broken lab.

use std::{
    fs,
    net::{SocketAddr, TcpListener, UdpSocket},
    os::fd::{AsFd as _, OwnedFd},
    time::{Duration, Instant},
};

use imdsguard_testlab::{
    cgroups::TestCgroup,
    daemon::{self, Daemon},
    lab::Lab,
    probe::Outcome,
};
use libtest_mimic::Trial;
use serde_json::Value;

use crate::{support::*, trial};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "embedded_ipv4_forms_are_denied_over_tcp_and_udp",
            embedded_ipv4_forms_are_denied_over_tcp_and_udp,
        ),
        trial(
            "ipv6_sockets_given_ipv4_sockaddrs_are_judged_or_refused",
            ipv6_sockets_given_ipv4_sockaddrs_are_judged_or_refused,
        ),
        trial("tcp_fast_open_is_judged", tcp_fast_open_is_judged),
        trial("mptcp_is_judged", mptcp_is_judged),
        trial(
            "io_uring_connect_and_sendmsg_are_judged",
            io_uring_connect_and_sendmsg_are_judged,
        ),
        trial(
            "removed_link_pins_are_noticed_and_reattached",
            removed_link_pins_are_noticed_and_reattached,
        ),
        trial(
            "foreign_allow_all_programs_cannot_override_a_deny",
            foreign_allow_all_programs_cannot_override_a_deny,
        ),
    ]
}

const IMDS: &str = "169.254.169.254:80";

fn denied_count(lab: &Lab) -> u64 {
    counter(&status(lab), "denied")
}

/// Denies `kind target` for `test` and lets it through for `prod`.
#[track_caller]
fn judged(lab: &Lab, prod: &TestCgroup, test: &TestCgroup, kind: &str, target: &str) {
    assert_eperm(lab, Some(test), kind, target);
    assert_reached(lab, Some(prod), kind, target);
}

#[track_caller]
fn assert_refused(lab: &Lab, cg: &TestCgroup, kind: &str, target: &str, errno: i32) {
    let o = probe(lab, Some(cg), kind, target);
    assert!(
        matches!(&o, Outcome::Failed { errno: Some(e), .. } if *e == errno),
        "{kind} {target} from {} should fail with errno {errno}, got {o:?}",
        cg.path().display()
    );
}

/// Waits for the denial log line of one (hook, address form) for `cg`.
fn wait_denial(
    d: &mut Daemon,
    cg: &TestCgroup,
    destination: &str,
    hook: &str,
    form: &str,
) -> Value {
    d.wait_for(Duration::from_secs(10), |v| {
        v["cgroup_id"].as_u64() == Some(cg.id())
            && v["destination"].as_str() == Some(destination)
            && v["verdict"].as_str() == Some("denied")
            && v["hook"].as_str() == Some(hook)
            && v["address_form"].as_str() == Some(form)
    })
    .unwrap_or_else(|e| panic!("no {hook}/{form} denial for {destination}: {e:#}"))
}

/// `sysctl KEY[=VALUE]` inside the lab's namespace; returns the value.
fn netns_sysctl(lab: &Lab, key: &str, value: Option<&str>) -> String {
    let mut cmd = lab.netns().command("sysctl");
    match value {
        Some(v) => cmd.args(["-q", "-w", &format!("{key}={v}")]),
        None => cmd.args(["-n", key]),
    };
    let out = cmd.output().expect("run sysctl");
    assert!(
        out.status.success(),
        "sysctl {key}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if value.is_some() {
        return netns_sysctl(lab, key, None);
    }
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

// --- 1. Address forms --------------------------------------------------

fn embedded_ipv4_forms_are_denied_over_tcp_and_udp() {
    let lab = lab("forms");
    let (prod, test) = pods(&lab);
    let mut d = start(&lab, &args([&flag("allow-cgroup", &prod), &[s("--udp")]]));
    // `::a9fe:a9fe` is on the lab's lo like the others (the lab checked that
    // the kernel routes it locally): the kernel does not refuse it, so the
    // hook has to.
    let forms = [
        ("[::ffff:169.254.169.254]:80", "ipv4-mapped"),
        ("[::a9fe:a9fe]:80", "ipv4-compatible"),
        ("[64:ff9b::a9fe:a9fe]:80", "nat64"),
    ];
    let before = denied_count(&lab);
    for (target, _) in forms {
        for kind in ["tcp", "udp-connect", "udp-sendto"] {
            judged(&lab, &prod, &test, kind, target);
        }
    }
    assert_eq!(denied_count(&lab) - before, 9, "one denial per attempt");
    for (_, form) in forms {
        wait_denial(&mut d, &test, IMDS, "connect6", form);
    }
    wait_denial(&mut d, &test, IMDS, "sendmsg6", "ipv4-compatible");
    wait_denial(&mut d, &test, IMDS, "sendmsg6", "nat64");
    // udpv6_sendmsg() turns a v4-mapped destination into a sockaddr_in
    // before any hook runs: sendmsg4 judges it as the plain address.
    wait_denial(&mut d, &test, IMDS, "sendmsg4", "plain");
}

/// Sockets the test binds in the lab's namespace on an otherwise unused
/// protected port, to prove that a failed attempt reached no one.
struct Witness {
    tcp: TcpListener,
    udp: UdpSocket,
}

impl Witness {
    fn bind(lab: &Lab, addr: SocketAddr) -> Self {
        std::thread::scope(|s| {
            s.spawn(|| {
                // Only this short-lived thread enters the namespace; the
                // sockets stay in it.
                lab.netns().enter_current_thread().unwrap();
                let tcp = TcpListener::bind(addr).unwrap();
                let udp = UdpSocket::bind(addr).unwrap();
                tcp.set_nonblocking(true).unwrap();
                udp.set_nonblocking(true).unwrap();
                Self { tcp, udp }
            })
            .join()
            .unwrap()
        })
    }

    /// Connections and datagrams that arrived since the last call.
    fn arrivals(&self) -> usize {
        let mut n = 0;
        while self.tcp.accept().is_ok() {
            n += 1;
        }
        let mut buf = [0u8; 64];
        while self.udp.recv_from(&mut buf).is_ok() {
            n += 1;
        }
        n
    }
}

fn ipv6_sockets_given_ipv4_sockaddrs_are_judged_or_refused() {
    let lab = lab("sockaddrs");
    let (prod, test) = pods(&lab);
    let mut d = start(&lab, &args([&flag("allow-cgroup", &prod), &[s("--udp")]]));
    let before = denied_count(&lab);
    // A dual-stack UDP socket takes a sockaddr_in: udpv6_pre_connect() and
    // udpv6_sendmsg() hand it to the IPv4 code, whose hooks run.
    judged(&lab, &prod, &test, "udp6-sin-connect", IMDS);
    wait_denial(&mut d, &test, IMDS, "connect4", "plain");
    judged(&lab, &prod, &test, "udp6-sin-sendto", IMDS);
    wait_denial(&mut d, &test, IMDS, "sendmsg4", "plain");
    // udp_sendmsg() takes sin_family = AF_UNSPEC as IPv4, too.
    judged(&lab, &prod, &test, "udp-sendto-unspec", IMDS);
    assert_eq!(denied_count(&lab) - before, 3, "one denial per attempt");

    // A TCP AF_INET6 socket does not: tcp_v6_pre_connect() refuses a
    // sockaddr_in's length with EINVAL before the hook, and with the length
    // padded to a sockaddr_in6, connect6 sees `::` (the sin_zero bytes) and
    // tcp_v6_connect() then refuses the family with EAFNOSUPPORT. The same
    // happens to the allowed pod: the kernel refuses, not us.
    let target = "169.254.169.254:8254";
    let witness = Witness::bind(&lab, target.parse().unwrap());
    // The witness sees the allowed pod's plain connect (and not the denied
    // pod's, which EPERM stopped before any SYN)...
    assert_reached(&lab, Some(&prod), "tcp", target);
    assert_eperm(&lab, Some(&test), "tcp", target);
    assert_eq!(witness.arrivals(), 1, "the witness catches a connection");
    let before = denied_count(&lab);
    for cg in [&test, &prod] {
        assert_refused(&lab, cg, "tcp6-sin", target, libc::EINVAL);
        assert_refused(&lab, cg, "tcp6-sin-padded", target, libc::EAFNOSUPPORT);
    }
    // ... and nothing from the refused ones.
    assert_eq!(
        witness.arrivals(),
        0,
        "a refused connect reached the server"
    );
    assert_eq!(denied_count(&lab), before, "refused before any verdict");
}

// --- 2. Other connect paths --------------------------------------------

/// TCP/IPv4, IPv4 through a dual-stack socket, TCP/IPv6.
fn stream_targets(port: u16) -> [String; 3] {
    [
        format!("169.254.169.254:{port}"),
        format!("[::ffff:169.254.169.254]:{port}"),
        format!("[fd00:ec2::254]:{port}"),
    ]
}

fn tcp_fast_open_is_judged() {
    let lab = lab("tfo");
    let (prod, test) = pods(&lab);
    let mut d = start(&lab, &flag("allow-cgroup", &prod));
    // Client and server Fast Open in the lab's namespace, so that once a
    // cookie is cached the SYN itself carries the request to the lab's
    // Fast Open listeners (port 8263).
    assert_eq!(netns_sysctl(&lab, "net.ipv4.tcp_fastopen", Some("3")), "3");
    let before = denied_count(&lab);
    for target in stream_targets(8263) {
        for kind in ["tcp-fastopen-sendto", "tcp-fastopen-connect"] {
            // First from the allowed pod: fetches the cookie.
            assert_reached(&lab, Some(&prod), kind, &target);
            // Now a real Fast Open is possible, and is denied at connect.
            assert_eperm(&lab, Some(&test), kind, &target);
            let again = probe(&lab, Some(&prod), kind, &target);
            assert!(
                matches!(&again, Outcome::Reached { detail } if detail.contains("syn-data")),
                "{kind} {target}: the cookie should make the SYN carry data, got {again:?}"
            );
        }
    }
    assert_eq!(denied_count(&lab) - before, 6, "one denial per attempt");
    let line = wait_denial(&mut d, &test, "169.254.169.254:8263", "connect4", "plain");
    assert_eq!(line["protocol"], "tcp");
    wait_denial(
        &mut d,
        &test,
        "169.254.169.254:8263",
        "connect6",
        "ipv4-mapped",
    );
    wait_denial(&mut d, &test, "[fd00:ec2::254]:8263", "connect6", "plain");
}

fn mptcp_is_judged() {
    let lab = lab("mptcp");
    let (prod, test) = pods(&lab);
    let mut d = start(&lab, &flag("allow-cgroup", &prod));
    // Per-namespace switch; a new namespace starts enabled, and the lab's
    // MPTCP listeners were only created if it was.
    assert!(
        std::path::Path::new("/proc/sys/net/mptcp/enabled").exists(),
        "this kernel has no MPTCP (CONFIG_MPTCP)"
    );
    assert_eq!(netns_sysctl(&lab, "net.mptcp.enabled", None), "1");
    let before = denied_count(&lab);
    // 8262: the lab's MPTCP listeners (protected: every port but 53).
    for target in stream_targets(8262) {
        for kind in ["mptcp", "mptcp-fastopen-sendto"] {
            assert_eperm(&lab, Some(&test), kind, &target);
            assert_reached_over_mptcp(&lab, &prod, kind, &target);
        }
    }
    assert_eq!(denied_count(&lab) - before, 6, "one denial per attempt");
    // The hook runs on the first subflow, a SOCK_STREAM socket: TCP.
    let line = wait_denial(&mut d, &test, "169.254.169.254:8262", "connect4", "plain");
    assert_eq!(line["protocol"], "tcp");
    let line = wait_denial(&mut d, &test, "[fd00:ec2::254]:8262", "connect6", "plain");
    assert_eq!(line["protocol"], "tcp");
}

fn io_uring_connect_and_sendmsg_are_judged() {
    let lab = lab("io-uring");
    let (prod, test) = pods(&lab);
    let mut d = start(&lab, &args([&flag("allow-cgroup", &prod), &[s("--udp")]]));
    // 0: allowed; 1: only for CAP_SYS_ADMIN or io_uring_group (the probes
    // run as root); 2: io_uring_setup() fails with EPERM for everyone.
    // A host that disables io_uring for everyone (2) refuses the ring
    // itself; the paths below would then go unexercised, so say so.
    let disabled = fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "0".into());
    assert_ne!(
        disabled, "2",
        "kernel.io_uring_disabled=2: io_uring cannot be tested on this host"
    );
    // Issued by the probe inside io_uring_enter(), by an io-wq worker
    // (IOSQE_ASYNC) and by the SQPOLL kernel thread: io_uring's threads
    // belong to the process and its cgroup, so each is judged as the pod.
    let kinds = [
        "io-uring-connect",
        "io-uring-connect-async",
        "io-uring-connect-sqpoll",
        "io-uring-udp-sendmsg",
        "io-uring-udp-sendmsg-sqpoll",
    ];
    let before = denied_count(&lab);
    for target in stream_targets(80) {
        for kind in kinds {
            judged(&lab, &prod, &test, kind, &target);
        }
    }
    assert_eq!(denied_count(&lab) - before, 15, "one denial per attempt");
    wait_denial(&mut d, &test, IMDS, "connect4", "plain");
    wait_denial(&mut d, &test, IMDS, "connect6", "ipv4-mapped");
    wait_denial(&mut d, &test, IMDS, "sendmsg4", "plain");
    wait_denial(&mut d, &test, "[fd00:ec2::254]:80", "sendmsg6", "plain");
}

// --- 3. Tampering ------------------------------------------------------

const ALL_HOOKS: [&str; 4] = ["connect4", "connect6", "sendmsg4", "sendmsg6"];

fn removed_link_pins_are_noticed_and_reattached() {
    let lab = lab("unpinned");
    let (prod, test) = pods(&lab);
    let mut d = start(
        &lab,
        &args([
            &flag("allow-cgroup", &prod),
            &[s("--udp"), s("--check-interval-secs"), s("1")],
        ]),
    );
    let before = links(&status(&lab));
    assert_eq!(before.len(), 4);
    // The daemon holds an fd of each link, so unlinking the pins detaches
    // nothing while it runs; its pin check (every second here) notices the
    // missing pins and puts a new, pinned link in each old one's place.
    for hook in ALL_HOOKS {
        fs::remove_file(lab.pin_dir().join("links").join(hook)).unwrap();
    }
    let warn = d
        .wait_for(Duration::from_secs(5), |v| {
            daemon::message(v) == Some("programs were detached behind our back; re-attaching")
        })
        .unwrap_or_else(|e| panic!("the daemon did not notice: {e:#}"));
    assert_eq!(warn["level"], "WARN");
    let missing = warn["missing"].to_string();
    for hook in ALL_HOOKS {
        assert!(missing.contains(hook), "{hook} not in {missing}");
    }
    // Re-attached once every hook has a pinned link again (the pin is made
    // after the attach): new links, each alone on its hook.
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let now = daemon::status(bin(), &lab.pin_dir())
            .map(|st| links(&st))
            .unwrap_or_default();
        if now.len() == 4 {
            break now;
        }
        assert!(Instant::now() < deadline, "not re-attached: {now:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    for (hook, old) in &before {
        let new = after[hook];
        assert_ne!(
            old.link_id, new.link_id,
            "{hook}: a new link, the old one is gone"
        );
        assert_eq!(new.on_hook, 1, "{hook}: only the new program on the hook");
    }
    for target in [IMDS, "[fd00:ec2::254]:80"] {
        judged(&lab, &prod, &test, "tcp", target);
        judged(&lab, &prod, &test, "udp-sendto", target);
    }
}

/// Raw bpf(2), as another tool on the node would use it.
mod foreign {
    use std::{
        io,
        os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    };

    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_ATTACH: libc::c_long = 8;
    const BPF_PROG_DETACH: libc::c_long = 9;
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
    pub const INET4_CONNECT: u32 = 10;
    pub const INET6_CONNECT: u32 = 11;
    pub const F_ALLOW_OVERRIDE: u32 = 1;
    pub const F_ALLOW_MULTI: u32 = 2;
    pub const F_REPLACE: u32 = 4;

    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
        // SAFETY: `attr` is a repr(C) prefix of the kernel's union bpf_attr
        // for `cmd`; the kernel zero-fills the rest.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                std::ptr::from_mut(attr),
                size_of::<T>() as libc::c_uint,
            )
        };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    }

    fn owned(fd: i64) -> OwnedFd {
        // SAFETY: bpf(2) returned a new fd that we own.
        unsafe { OwnedFd::from_raw_fd(fd as i32) }
    }

    /// `r0 = 1; exit`: a sock_addr program that allows everything.
    pub fn load_allow_all(attach_type: u32) -> OwnedFd {
        #[repr(C)]
        struct Attr {
            prog_type: u32,
            insn_cnt: u32,
            insns: u64,
            license: u64,
            log_level: u32,
            log_size: u32,
            log_buf: u64,
            kern_version: u32,
            prog_flags: u32,
            prog_name: [u8; 16],
            prog_ifindex: u32,
            expected_attach_type: u32,
        }
        // BPF_ALU64|BPF_MOV|BPF_K r0 = 1; BPF_JMP|BPF_EXIT.
        let insns: [u64; 2] = [0xb7 | (1 << 32), 0x95];
        let mut name = [0u8; 16];
        name[..9].copy_from_slice(b"allow_all");
        let mut attr = Attr {
            prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            insn_cnt: 2,
            insns: insns.as_ptr() as u64,
            license: c"GPL".as_ptr() as u64,
            log_level: 0,
            log_size: 0,
            log_buf: 0,
            kern_version: 0,
            prog_flags: 0,
            prog_name: name,
            prog_ifindex: 0,
            expected_attach_type: attach_type,
        };
        owned(bpf(BPF_PROG_LOAD, &mut attr).expect("load the allow-all program"))
    }

    #[repr(C)]
    struct AttachAttr {
        target_fd: u32,
        attach_bpf_fd: u32,
        attach_type: u32,
        attach_flags: u32,
        replace_bpf_fd: u32,
    }

    /// BPF_PROG_ATTACH; `replace` only with F_REPLACE.
    pub fn attach(
        cgroup: BorrowedFd<'_>,
        prog: BorrowedFd<'_>,
        attach_type: u32,
        flags: u32,
        replace: Option<BorrowedFd<'_>>,
    ) -> io::Result<()> {
        let mut attr = AttachAttr {
            target_fd: cgroup.as_raw_fd() as u32,
            attach_bpf_fd: prog.as_raw_fd() as u32,
            attach_type,
            attach_flags: flags,
            replace_bpf_fd: replace.map_or(0, |r| r.as_raw_fd() as u32),
        };
        bpf(BPF_PROG_ATTACH, &mut attr).map(drop)
    }

    pub fn detach(
        cgroup: BorrowedFd<'_>,
        prog: BorrowedFd<'_>,
        attach_type: u32,
    ) -> io::Result<()> {
        let mut attr = AttachAttr {
            target_fd: cgroup.as_raw_fd() as u32,
            attach_bpf_fd: prog.as_raw_fd() as u32,
            attach_type,
            attach_flags: 0,
            replace_bpf_fd: 0,
        };
        bpf(BPF_PROG_DETACH, &mut attr).map(drop)
    }

    pub fn prog_fd_by_id(id: u32) -> OwnedFd {
        #[repr(C)]
        struct Attr {
            prog_id: u32,
            next_id: u32,
            open_flags: u32,
        }
        let mut attr = Attr {
            prog_id: id,
            next_id: 0,
            open_flags: 0,
        };
        owned(bpf(BPF_PROG_GET_FD_BY_ID, &mut attr).expect("BPF_PROG_GET_FD_BY_ID"))
    }
}

/// A foreign program attached to a cgroup; detached on drop.
struct Attached {
    cgroup: fs::File,
    prog: OwnedFd,
    attach_type: u32,
}

impl Attached {
    fn new(
        cgroup: &TestCgroup,
        prog: &OwnedFd,
        attach_type: u32,
        flags: u32,
    ) -> std::io::Result<Self> {
        let cgroup = fs::File::open(cgroup.path()).unwrap();
        let prog = prog.try_clone().unwrap();
        foreign::attach(cgroup.as_fd(), prog.as_fd(), attach_type, flags, None)?;
        Ok(Self {
            cgroup,
            prog,
            attach_type,
        })
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = foreign::detach(self.cgroup.as_fd(), self.prog.as_fd(), self.attach_type);
    }
}

fn foreign_allow_all_programs_cannot_override_a_deny() {
    let lab = lab("foreign");
    let prod = lab.cgroup("prod").unwrap();
    // The child cgroup another tool attaches to, with the denied pod below.
    let pods = lab.cgroup("pods").unwrap();
    let test = lab.cgroup("pods/test").unwrap();
    let _d = start(&lab, &flag("allow-cgroup", &prod));
    let allow4 = foreign::load_allow_all(foreign::INET4_CONNECT);
    let allow6 = foreign::load_allow_all(foreign::INET6_CONNECT);
    let ours = |hook: &str| -> u32 {
        status(&lab)["links"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["hook"] == hook)
            .and_then(|l| l["program_id"].as_u64())
            .unwrap() as u32
    };
    let (ours4, ours6) = (ours("connect4"), ours("connect6"));

    let still_denied = |what: &str| {
        for target in [IMDS, "[::ffff:169.254.169.254]:80", "[fd00:ec2::254]:80"] {
            let o = probe(&lab, Some(&test), "tcp", target);
            assert!(o.eperm(), "{what}: {target} from the denied pod got {o:?}");
            assert_reached(&lab, Some(&prod), "tcp", target);
        }
    };

    // On the child, in every mode the kernel has: it accepts the attach
    // (our link on the parent is multi, which allows programs below), and
    // still runs the parent's programs after the child's: a deny from any
    // of them is EPERM.
    for (mode, flags) in [
        ("multi", foreign::F_ALLOW_MULTI),
        ("override", foreign::F_ALLOW_OVERRIDE),
        ("exclusive", 0),
    ] {
        let a4 = Attached::new(&pods, &allow4, foreign::INET4_CONNECT, flags)
            .unwrap_or_else(|e| panic!("{mode} attach on the child: {e}"));
        let a6 = Attached::new(&pods, &allow6, foreign::INET6_CONNECT, flags)
            .unwrap_or_else(|e| panic!("{mode} attach on the child: {e}"));
        assert_eq!(programs_on(&pods, foreign::INET4_CONNECT).len(), 1);
        still_denied(&format!("allow-all in {mode} mode on the child"));
        drop((a4, a6));
        assert!(programs_on(&pods, foreign::INET4_CONNECT).is_empty());
    }

    // On our own cgroup: multi runs both (ours denies)...
    {
        let _a4 = Attached::new(
            lab.root(),
            &allow4,
            foreign::INET4_CONNECT,
            foreign::F_ALLOW_MULTI,
        )
        .expect("multi attach next to ours");
        let _a6 = Attached::new(
            lab.root(),
            &allow6,
            foreign::INET6_CONNECT,
            foreign::F_ALLOW_MULTI,
        )
        .expect("multi attach next to ours");
        let on_root = programs_on(lab.root(), foreign::INET4_CONNECT);
        assert_eq!(on_root.len(), 2, "ours and theirs: {on_root:?}");
        assert!(on_root.contains(&ours4));
        still_denied("allow-all in multi mode next to ours");
    }
    // ... while override or exclusive mode would replace the hook's
    // programs, and the kernel refuses it next to a multi attachment.
    for (mode, flags) in [("override", foreign::F_ALLOW_OVERRIDE), ("exclusive", 0)] {
        for (prog, t) in [
            (&allow4, foreign::INET4_CONNECT),
            (&allow6, foreign::INET6_CONNECT),
        ] {
            let e = Attached::new(lab.root(), prog, t, flags)
                .err()
                .unwrap_or_else(|| panic!("{mode} attach on our cgroup was accepted"));
            assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{mode}: {e}");
        }
    }
    // Neither can a tool swap or detach our program with the attach API:
    // it is held by a bpf_link, which only the link (our pin) can change.
    let root = fs::File::open(lab.root().path()).unwrap();
    for (ours, prog, t) in [
        (ours4, &allow4, foreign::INET4_CONNECT),
        (ours6, &allow6, foreign::INET6_CONNECT),
    ] {
        let ours_fd = foreign::prog_fd_by_id(ours);
        let e = foreign::attach(
            root.as_fd(),
            prog.as_fd(),
            t,
            foreign::F_ALLOW_MULTI | foreign::F_REPLACE,
            Some(ours_fd.as_fd()),
        )
        .expect_err("BPF_F_REPLACE of our program was accepted");
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "replace: {e}");
        let e = foreign::detach(root.as_fd(), ours_fd.as_fd(), t)
            .expect_err("BPF_PROG_DETACH of our program was accepted");
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "detach: {e}");
    }
    for t in [foreign::INET4_CONNECT, foreign::INET6_CONNECT] {
        assert_eq!(programs_on(lab.root(), t).len(), 1, "only ours is left");
    }
    assert_eq!(hooks(&status(&lab)), ["connect4", "connect6"]);
    still_denied("after the attempts");
}
