//! Anonymous network namespaces that hold only `lo`.
//!
//! The namespace is created by a short-lived thread (`unshare` is per
//! thread) and kept alive by an fd, not by a name under /run/netns, so
//! nothing is left behind even if the test process is killed.

use std::{
    fs::File,
    net::IpAddr,
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::process::CommandExt as _,
    },
    process::Command,
};

use anyhow::{Context as _, bail, ensure};

pub struct NetNs {
    fd: OwnedFd,
}

impl NetNs {
    pub fn new() -> anyhow::Result<Self> {
        let fd = std::thread::spawn(|| -> anyhow::Result<OwnedFd> {
            // SAFETY: affects only this thread, which ends right after.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                bail!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
            }
            Ok(File::open("/proc/thread-self/ns/net")
                .context("open the new netns")?
                .into())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("netns thread panicked"))??;
        let ns = Self { fd };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The calling thread's own namespace, e.g. the real node's, which the
    /// whole test process entered (`real_node::isolation::isolate`).
    pub fn current() -> anyhow::Result<Self> {
        let fd = File::open("/proc/thread-self/ns/net")
            .context("open this thread's netns")?
            .into();
        Ok(Self { fd })
    }

    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// Enters the namespace on the calling thread.
    pub fn enter_current_thread(&self) -> anyhow::Result<()> {
        // SAFETY: setns on a namespace fd we own.
        if unsafe { libc::setns(self.fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        let fd = self.fd.as_raw_fd();
        // SAFETY: only async-signal-safe setns between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Runs `ip ARGS` in the namespace and returns its stdout.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .command("ip")
            .args(args)
            .output()
            .context("run ip (iproute2)")?;
        ensure!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Puts `addr` on `lo` and proves it is local: `ip route get` must say
    /// `local`, so no probe to it can ever leave the namespace.
    pub fn add_local_address(&self, addr: IpAddr) -> anyhow::Result<()> {
        let a = addr.to_string();
        match addr {
            IpAddr::V4(_) => self.ip(&["addr", "add", &format!("{a}/32"), "dev", "lo"])?,
            IpAddr::V6(_) => self.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{a}/128"),
                "dev",
                "lo",
                "nodad",
            ])?,
        };
        self.assert_local(addr)
    }

    /// The kernel adds an IPv6 address's `local` route a moment after the
    /// address itself, so this waits up to a second for it.
    pub fn assert_local(&self, addr: IpAddr) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        loop {
            let route = self.ip(&["route", "get", &addr.to_string()])?;
            if route.starts_with("local ") {
                return Ok(());
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "route to {addr} in the test netns is not local: {route}"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// The namespace must hold nothing but `lo`: no route out exists.
    pub fn assert_isolated(&self) -> anyhow::Result<()> {
        let links = self.ip(&["-o", "link", "show"])?;
        let names: Vec<&str> = links.lines().filter_map(|l| l.split(": ").nth(1)).collect();
        ensure!(
            names == ["lo"],
            "test netns has interfaces other than lo: {names:?}"
        );
        Ok(())
    }
}
