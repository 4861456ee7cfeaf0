//! The probe exits 0 on SIGTERM, also as PID 1 (a container's first
//! process), where a signal with the default disposition is ignored. The
//! PID 1 case runs in a new PID namespace, so it needs root.

use std::io::{BufRead as _, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Kills what is left of the child on drop, so a failed test leaves nothing.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` with the probe's arguments and waits for its first line.
/// Nothing listens on the target, so every probe is an `error` at once.
fn start(mut cmd: Command) -> Running {
    let closed = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    cmd.arg(env!("CARGO_BIN_EXE_imdsguard-podprobe"))
        .args(["--interval-ms", "60000", "--target"])
        .arg(closed.to_string())
        .stdout(Stdio::piped());
    let mut child = Running(cmd.spawn().expect("spawn the probe"));
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read the first line");
    assert!(
        line.starts_with("imdsguard-probe seq=1 first=1 verdict=error step=put errno=111 "),
        "{line}"
    );
    child
}

fn sigterm(pid: u32) {
    // SAFETY: kill has no memory preconditions.
    let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill {pid}");
}

fn wait(child: &mut Running) -> ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "the probe ignored SIGTERM");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_exits_zero() {
    let mut child = start(Command::new("env"));
    let pid = child.0.id();
    // `env` execs the probe, so the pid is the probe's.
    sigterm(pid);
    assert!(wait(&mut child).success());
}

#[test]
fn sigterm_exits_zero_as_pid_1() {
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--kill-child"]);
    let mut unshare = start(cmd);
    let children = format!("/proc/{0}/task/{0}/children", unshare.0.id());
    let probe: u32 = std::fs::read_to_string(&children)
        .expect("read the probe's pid")
        .trim()
        .parse()
        .expect("one child");
    let status = std::fs::read_to_string(format!("/proc/{probe}/status")).expect("status");
    assert!(
        status
            .lines()
            .any(|l| l.split_whitespace().eq(["NSpid:", &probe.to_string(), "1"])),
        "the probe is not PID 1 in its namespace:\n{status}"
    );
    sigterm(probe);
    // unshare exits with its child's status.
    assert!(wait(&mut unshare).success());
}
