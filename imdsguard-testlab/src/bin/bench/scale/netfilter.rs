//! The iptables arms' netfilter rules, in the lab namespace only, and the
//! proxy stub the DNAT rule points at.

use std::{
    net::TcpListener,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use imdsguard_testlab::netns::NetNs;

/// `iptables -V`, which must be the nf_tables backend: its tables can be
/// deleted between arms, where legacy tables stay registered for the life
/// of the namespace.
pub(super) fn netfilter_version(ns: &NetNs) -> anyhow::Result<String> {
    let out = ns
        .command("iptables")
        .arg("-V")
        .output()
        .context("run iptables (`cargo xtask bench-scale` installs it)")?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    ensure!(
        v.contains("nf_tables"),
        "iptables is {v:?}: the comparison needs the nf_tables backend"
    );
    netfilter_flush(ns)?;
    Ok(v)
}

/// `iptables RULE` in the lab namespace; RULE is split on whitespace.
pub(super) fn iptables(ns: &NetNs, rule: &str) -> anyhow::Result<()> {
    let out = ns
        .command("iptables")
        .args(rule.split_whitespace())
        .output()
        .context("run iptables")?;
    ensure!(
        out.status.success(),
        "iptables {rule}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Deletes every table in the lab namespace (unregistering their hooks)
/// and checks that nothing is left.
pub(super) fn netfilter_flush(ns: &NetNs) -> anyhow::Result<()> {
    let run = |args: &[&str]| -> anyhow::Result<String> {
        let out = ns
            .command("nft")
            .args(args)
            .output()
            .context("run nft (`cargo xtask bench-scale` installs nftables)")?;
        ensure!(
            out.status.success(),
            "nft {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    run(&["flush", "ruleset"])?;
    let left = run(&["list", "ruleset"])?;
    ensure!(
        left.trim().is_empty(),
        "tables left in the lab namespace: {left}"
    );
    Ok(())
}

/// Removes the lab namespace's tables on the way out, even on error (the
/// namespace itself goes with the lab anyway).
pub(super) struct NetfilterReset<'a>(pub(super) &'a NetNs);

impl Drop for NetfilterReset<'_> {
    fn drop(&mut self) {
        let _ = self.0.command("nft").args(["flush", "ruleset"]).output();
    }
}

/// What the DNAT rule points at: a listener on 127.0.0.1 in the lab
/// namespace that accepts and closes, counting connections.
pub(super) struct ProxyStub {
    pub(super) port: u16,
    pub(super) accepts: Arc<AtomicU64>,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) thread: Option<JoinHandle<()>>,
}

impl ProxyStub {
    pub(super) fn start(ns: &NetNs) -> anyhow::Result<Self> {
        let ns_fd = ns.raw_fd();
        let accepts = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel::<anyhow::Result<u16>>();
        let (a, s) = (accepts.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let bound = (|| {
                // SAFETY: moves only this thread into the namespace; the fd
                // outlives the thread, which is joined when the stub drops,
                // before the lab (and its namespace) does.
                if unsafe { libc::setns(ns_fd, libc::CLONE_NEWNET) } != 0 {
                    bail!("setns: {}", std::io::Error::last_os_error());
                }
                let l = TcpListener::bind("127.0.0.1:0")?;
                l.set_nonblocking(true)?;
                Ok(l)
            })();
            let l = match bound {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let _ = tx.send(l.local_addr().map(|a| a.port()).map_err(Into::into));
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok(_) => {
                        a.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        let port = rx.recv().context("proxy stub thread")??;
        Ok(Self {
            port,
            accepts,
            stop,
            thread: Some(thread),
        })
    }

    pub(super) fn accepts(&self) -> u64 {
        // The stub polls every 2 ms: give it time to see a fresh connection.
        std::thread::sleep(Duration::from_millis(20));
        self.accepts.load(Ordering::Relaxed)
    }
}

impl Drop for ProxyStub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
