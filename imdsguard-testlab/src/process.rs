//! Child processes of the lab's servers: started so that they die with us,
//! stopped by pid, and waited on with their log in the error.

use std::fs::{self, File};
use std::io;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{self, Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// How long a server may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// A graceful apiserver stop takes about 4 s.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(100);

/// Polls `ready` until it holds, `child` exits, or [`READY_TIMEOUT`] passes.
/// Errors carry the end of the child's log.
pub fn wait_until(
    child: &mut Child,
    log: &Path,
    mut ready: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "exited with {status}; log {}:\n{}",
                log.display(),
                log_tail(log)
            );
        }
        if ready() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "not ready after {READY_TIMEOUT:?}; log {}:\n{}",
                log.display(),
                log_tail(log)
            );
        }
        thread::sleep(POLL);
    }
}

pub fn log_tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]; reaps the child.
pub fn stop(child: &mut Child) -> io::Result<()> {
    if child.try_wait()?.is_some() {
        return Ok(());
    }
    let pid = libc::pid_t::try_from(child.id()).map_err(io::Error::other)?;
    // SAFETY: kill(2) touches no memory; the child is not reaped yet, so the
    // pid is still ours.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + STOP_TIMEOUT;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            child.kill()?;
            child.wait()?;
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Starts `cmd` with stdout and stderr appended to `log`, so that it dies if
/// this process dies.
pub fn spawn_logged(mut cmd: Command, log: &Path) -> anyhow::Result<Child> {
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("open {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let parent = libc::pid_t::try_from(process::id())?;
    // SAFETY: the hook runs between fork and exec, where only
    // async-signal-safe calls are allowed: prctl, getppid, sigemptyset and
    // sigprocmask are, and it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            // A test that routes its signals to one thread blocks them
            // everywhere (real_node::isolation); servers must get them.
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // This process died before prctl: the signal will never come.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let program = cmd.get_program().to_owned();
    spawn(cmd).with_context(|| format!("spawn {}", program.to_string_lossy()))
}

type SpawnJob = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns from one thread that lives as long as the process: the death
/// signal fires when the forking *thread* exits, and a test's thread or a
/// runtime's worker may end while the server is still in use.
fn spawn(cmd: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<io::Result<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        thread::Builder::new()
            .name("lab-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })?;
        Ok(tx)
    });
    let spawner = spawner
        .as_ref()
        .map_err(|e| io::Error::new(e.kind(), e.to_string()))?;
    let (reply, answer) = mpsc::channel();
    spawner
        .send((cmd, reply))
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| io::Error::other("the spawner thread is gone"))?
}

/// Runs `cmd` to the end; its stdout, or an error with its stderr.
pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
