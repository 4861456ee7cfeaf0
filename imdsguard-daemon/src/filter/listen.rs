//! Where the proxy listens, and what that tells the kernel: one address per
//! family at most, all on one port, since the programs rewrite a filtered
//! connect to "the proxy's address of the caller's family, that port".

use std::net::{IpAddr, SocketAddr};

use tokio::net::TcpListener;

use crate::{Error, Result, bpf::filter_conns::ProxyTarget};

/// The standalone default: loopback, since a host's filtered processes
/// share the host's network namespace. (A node agent has no default: the
/// chart passes the node's IP.)
pub const DEFAULT_STANDALONE: &str = "127.0.0.1:8169";

/// Checks a `--proxy-listen` set and turns it into the kernel's target.
pub fn target(addrs: &[SocketAddr]) -> Result<ProxyTarget> {
    let bad = |problem: &'static str| Error::ProxyListen {
        addrs: addrs.iter().map(ToString::to_string).collect(),
        problem,
    };
    let Some(first) = addrs.first() else {
        return Err(bad("no address given"));
    };
    let mut target = ProxyTarget {
        v4: None,
        v6: None,
        port: first.port(),
    };
    for a in addrs {
        if a.port() != target.port {
            return Err(bad("every address needs the same port"));
        }
        if a.port() == 0 {
            return Err(bad("port 0: the kernel needs the port in advance"));
        }
        if a.ip().is_unspecified() {
            return Err(bad(
                "an unspecified address (0.0.0.0, ::): the kernel needs the address the connections go to",
            ));
        }
        match a.ip() {
            IpAddr::V4(ip) if target.v4.replace(ip).is_some() => {
                return Err(bad("more than one IPv4 address"));
            }
            IpAddr::V6(ip) if ip.to_ipv4_mapped().is_some() => {
                return Err(bad("an IPv4-mapped IPv6 address: give it as IPv4"));
            }
            IpAddr::V6(ip) if target.v6.replace(ip).is_some() => {
                return Err(bad("more than one IPv6 address"));
            }
            _ => {}
        }
    }
    Ok(target)
}

/// Binds every address, before anything is attached: a port in use is an
/// error at start, and the kernel never sends connections to a proxy that
/// is not there yet.
pub async fn bind(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>> {
    let mut out = Vec::with_capacity(addrs.len());
    for a in addrs {
        let l = TcpListener::bind(a)
            .await
            .map_err(Error::io("listen on --proxy-listen", a.to_string()))?;
        out.push(l);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(addrs: &[&str]) -> Result<ProxyTarget> {
        let addrs: Vec<SocketAddr> = addrs.iter().map(|a| a.parse().unwrap()).collect();
        target(&addrs)
    }

    #[test]
    fn one_address_per_family_on_one_port() {
        let ok = t(&["10.0.0.5:8169", "[fd00::5]:8169"]).unwrap();
        assert_eq!(ok.port, 8169);
        assert_eq!(ok.v4, Some("10.0.0.5".parse().unwrap()));
        assert_eq!(ok.v6, Some("fd00::5".parse().unwrap()));
        for (bad, why) in [
            (&["10.0.0.5:8169", "[fd00::5]:8170"][..], "same port"),
            (
                &["10.0.0.5:8169", "10.0.0.6:8169"][..],
                "more than one IPv4",
            ),
            (&["0.0.0.0:8169"][..], "unspecified"),
            (&["127.0.0.1:0"][..], "port 0"),
            (&["[::ffff:127.0.0.1]:8169"][..], "IPv4-mapped"),
            (&[][..], "no address"),
        ] {
            let e = t(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }
}
