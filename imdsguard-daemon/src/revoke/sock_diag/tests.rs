use std::{
    io::Read as _,
    net::{TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    time::Duration,
};

use super::*;
use crate::revoke::netns::tests::own_cgroup_id;

/// Runs `f` on a thread of its own in a new network namespace with `lo`
/// up, so the test neither sees nor disturbs the host's sockets.
fn in_fresh_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare(2) moves only this thread, which ends with f.
            let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "{}", io::Error::last_os_error());
            let udp = UdpSocket::bind("0.0.0.0:0").unwrap();
            // SAFETY: all-zero is a valid ifreq; "lo" stays NUL-terminated.
            let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
            ifr.ifr_name[..2].copy_from_slice(&[b'l' as libc::c_char, b'o' as libc::c_char]);
            // SAFETY: both ioctls take an ifreq naming a device and fill
            // or read ifru_flags, the union member we use.
            unsafe {
                assert_eq!(
                    libc::ioctl(udp.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr),
                    0
                );
                ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
                assert_eq!(libc::ioctl(udp.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr), 0);
            }
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

fn family_of(a: SocketAddr) -> u8 {
    (if a.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    }) as u8
}

#[test]
fn tcp_connections_are_dumped_and_destroyed() {
    let cgroup = own_cgroup_id();
    in_fresh_netns(|| {
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let listener = TcpListener::bind(bind).unwrap();
            let server = listener.local_addr().unwrap();
            let mut client = TcpStream::connect(server).unwrap();
            let local = client.local_addr().unwrap();
            let _accepted = listener.accept().unwrap();
            let diag = SockDiag::open().unwrap();
            let family = family_of(server);
            let dumped = diag.dump(Protocol::Tcp, family).unwrap();
            // The accepted end shows, the listener does not.
            assert!(dumped.iter().any(|s| s.src == server && s.dst == local));
            assert!(dumped.iter().all(|s| s.state != TCP_LISTEN), "{dumped:#?}");
            let s = dumped
                .iter()
                .find(|s| s.src == local)
                .expect("client socket");
            assert_eq!(
                (s.transport, s.family, s.dst, s.state),
                (Protocol::Tcp, family, server, 1)
            );
            assert_eq!(s.cgroup_id, Some(cgroup));
            // SAFETY: geteuid(2) cannot fail.
            assert_eq!(s.uid, unsafe { libc::geteuid() });
            assert_ne!(s.inode, 0);

            assert_eq!(diag.destroy(s).unwrap(), Destroyed::Closed);
            let e = client.read(&mut [0; 1]).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ECONNABORTED), "{e}");
            assert_eq!(diag.destroy(s).unwrap(), Destroyed::Gone);
            // Destroyed, it is CLOSE and unhashed: gone from the dump.
            let after = diag.dump(Protocol::Tcp, family).unwrap();
            assert!(after.iter().all(|a| a.src != local), "{after:#?}");
        }
    });
}

#[test]
fn connected_udp_sockets_are_dumped_and_destroyed() {
    let cgroup = own_cgroup_id();
    in_fresh_netns(|| {
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let server = UdpSocket::bind(bind).unwrap();
            let server_addr = server.local_addr().unwrap();
            let client = UdpSocket::bind(bind).unwrap();
            client.connect(server_addr).unwrap();
            let local = client.local_addr().unwrap();
            let diag = SockDiag::open().unwrap();
            let dumped = diag.dump(Protocol::Udp, family_of(server_addr)).unwrap();
            let s = dumped
                .iter()
                .find(|s| s.src == local)
                .expect("client socket");
            assert_eq!(
                (s.transport, s.dst, s.state),
                (Protocol::Udp, server_addr, 1)
            );
            assert_eq!(s.cgroup_id, Some(cgroup));
            let unconnected = dumped.iter().find(|s| s.src == server_addr).unwrap();
            assert_eq!((unconnected.dst.port(), unconnected.state), (0, TCP_CLOSE));

            assert_eq!(diag.destroy(s).unwrap(), Destroyed::Closed);
            client
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let e = client.recv(&mut [0; 1]).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ECONNABORTED), "{e}");
            assert_eq!(diag.destroy(s).unwrap(), Destroyed::Gone);
        }
    });
}

#[test]
fn dump_rejects_other_families() {
    let e = SockDiag::open()
        .unwrap()
        .dump(Protocol::Tcp, libc::AF_UNIX as u8);
    assert_eq!(e.unwrap_err().kind(), io::ErrorKind::InvalidInput);
}

/// `linux/netlink.h` and `linux/sock_diag.h`, spelled out here so the
/// tests check the crate against the uapi rather than against itself.
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLA_HDRLEN: usize = 4;
/// `struct inet_diag_msg`, the fixed part of each dumped socket.
const INET_DIAG_MSG_LEN: usize = 72;

fn message(ty: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let len = (NLMSG_HDRLEN + payload.len()) as u32;
    // struct nlmsghdr: length, type, flags, seq, port.
    let header = [
        &len.to_ne_bytes()[..],
        &ty.to_ne_bytes(),
        &0u16.to_ne_bytes(),
        &seq.to_ne_bytes(),
        &0u32.to_ne_bytes(),
    ];
    let mut m = [&header.concat()[..], payload].concat();
    m.resize(m.len().next_multiple_of(4), 0);
    m
}

fn attr(ty: u16, value: &[u8]) -> Vec<u8> {
    let len = (NLA_HDRLEN + value.len()) as u16;
    let mut a = [&len.to_ne_bytes()[..], &ty.to_ne_bytes(), value].concat();
    a.resize(a.len().next_multiple_of(4), 0);
    a
}

/// A dumped AF_INET socket 10.0.0.1:1234 -> 169.254.169.254:80 (uid
/// 1000, inode 42) with the given attributes after the fixed part, laid
/// out byte by byte as `struct inet_diag_msg`.
fn socket(attrs: &[u8]) -> Vec<u8> {
    let mut msg = vec![libc::AF_INET as u8, 1, 0, 0];
    msg.extend(1234u16.to_be_bytes());
    msg.extend(80u16.to_be_bytes());
    msg.extend([10, 0, 0, 1]);
    msg.extend([0; 12]);
    msg.extend([169, 254, 169, 254]);
    msg.extend([0; 12]);
    // ifindex, cookie, expires, rqueue, wqueue.
    msg.extend([0; 4 + 8 + 4 + 4 + 4]);
    msg.extend(1000u32.to_ne_bytes());
    msg.extend(42u32.to_ne_bytes());
    assert_eq!(msg.len(), INET_DIAG_MSG_LEN);
    [&msg[..], attrs].concat()
}

#[test]
fn parses_dumps_and_acks() {
    // INET_DIAG_SHUTDOWN (8) is one to step over.
    let attrs = [
        attr(8, &[0]),
        attr(INET_DIAG_CGROUP_ID, &7u64.to_ne_bytes()),
    ]
    .concat();
    let buf = [
        message(SOCK_DIAG_BY_FAMILY, 9, &socket(&attrs)),
        message(SOCK_DIAG_BY_FAMILY, 8, &[]),
    ];
    let mut out = Vec::new();
    assert!(!parse_dump(&buf.concat(), 9, Protocol::Tcp, &mut out).unwrap());
    assert_eq!(out.len(), 1, "the stale seq 8 message is skipped");
    assert_eq!(out[0].src, "10.0.0.1:1234".parse().unwrap());
    assert_eq!(out[0].dst, "169.254.169.254:80".parse().unwrap());
    assert_eq!(
        (out[0].cgroup_id, out[0].uid, out[0].inode),
        (Some(7), 1000, 42)
    );
    let done = message(NLMSG_DONE, 9, &0i32.to_ne_bytes());
    assert!(parse_dump(&done, 9, Protocol::Tcp, &mut out).unwrap());
    let eperm = message(NLMSG_ERROR, 9, &(-libc::EPERM).to_ne_bytes());
    let e = parse_dump(&eperm, 9, Protocol::Tcp, &mut out).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    let enoent = message(NLMSG_ERROR, 3, &(-libc::ENOENT).to_ne_bytes());
    assert_eq!(parse_ack(&enoent, 3).unwrap(), Some(libc::ENOENT));
    assert_eq!(parse_ack(&enoent, 4).unwrap(), None);
}

#[test]
fn malformed_replies_are_errors() {
    let good = message(
        SOCK_DIAG_BY_FAMILY,
        1,
        &socket(&attr(INET_DIAG_CGROUP_ID, &[0; 8])),
    );
    // Every truncation, then header lengths too short and past the end.
    let mut bad: Vec<Vec<u8>> = (1..good.len()).map(|n| good[..n].to_vec()).collect();
    for len in [0u32, 15, good.len() as u32 + 4] {
        bad.push([&len.to_ne_bytes()[..], &good[4..]].concat());
    }
    // An attribute longer than the message.
    let mut m = good.clone();
    let at = NLMSG_HDRLEN + INET_DIAG_MSG_LEN;
    m[at..at + 2].copy_from_slice(&200u16.to_ne_bytes());
    bad.push(m);
    // A 4-byte cgroup id, an unknown family, a short error, a bad type.
    bad.push(message(
        SOCK_DIAG_BY_FAMILY,
        1,
        &socket(&attr(INET_DIAG_CGROUP_ID, &[0; 4])),
    ));
    let mut m = message(SOCK_DIAG_BY_FAMILY, 1, &socket(&[]));
    m[NLMSG_HDRLEN] = 99;
    bad.push(m);
    // An AF_UNIX socket where an inet one belongs.
    let mut m = message(SOCK_DIAG_BY_FAMILY, 1, &socket(&[]));
    m[NLMSG_HDRLEN] = libc::AF_UNIX as u8;
    bad.push(m);
    bad.push(message(NLMSG_ERROR, 1, &[0; 2]));
    bad.push(message(77, 1, &[]));
    for buf in &bad {
        let e = parse_dump(buf, 1, Protocol::Tcp, &mut Vec::new()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    }
    assert!(parse_ack(&good[..10], 1).is_err());
    assert!(parse_ack(&message(NLMSG_ERROR, 1, &5i32.to_ne_bytes()), 1).is_err());
}

#[test]
fn a_destroy_request_names_the_dumped_socket_with_its_cookie() {
    let mut attrs = attr(INET_DIAG_CGROUP_ID, &7u64.to_ne_bytes());
    let mut dumped = socket(&[]);
    // The cookie, at offset 4 + 2 * 2 + 2 * 16 + 4 of inet_diag_msg.
    dumped[44..52].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
    dumped.append(&mut attrs);
    let mut out = Vec::new();
    let reply = message(SOCK_DIAG_BY_FAMILY, 1, &dumped);
    parse_dump(&reply, 1, Protocol::Udp, &mut out).unwrap();
    let s = &out[0];
    let req = inet_request(s.transport, s.family, u32::MAX, s.id.clone());
    let req = SockDiagDestroy::new(SockDiagMessage::InetRequest(req));
    let bytes = request_bytes(req, NLM_F_ACK, 5);
    // struct inet_diag_req_v2 after the header.
    assert_eq!(bytes.len(), NLMSG_HDRLEN + 56);
    let header = [
        &(bytes.len() as u32).to_ne_bytes()[..],
        &21u16.to_ne_bytes(), // SOCK_DESTROY
        &(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes(),
        &5u32.to_ne_bytes(),
        &0u32.to_ne_bytes(),
    ]
    .concat();
    assert_eq!(bytes[..NLMSG_HDRLEN], header[..]);
    let body = &bytes[NLMSG_HDRLEN..];
    assert_eq!(
        body[..8],
        [
            libc::AF_INET as u8,
            libc::IPPROTO_UDP as u8,
            0,
            0,
            255,
            255,
            255,
            255
        ]
    );
    // The socket id as dumped: ports, addresses, ifindex and cookie.
    assert_eq!(body[8..], dumped[4..52]);
}
