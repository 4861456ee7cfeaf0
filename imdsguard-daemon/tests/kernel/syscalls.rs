//! Counting the syscalls a piece of code makes, exactly, without timing it:
//! the code runs on a thread of its own under a seccomp filter that hands
//! each of its syscalls to a supervisor thread (SECCOMP_RET_USER_NOTIF),
//! which counts it and lets it proceed (SECCOMP_USER_NOTIF_FLAG_CONTINUE).
//! The filter is installed without TSYNC, so it binds that thread only.

use std::{
    collections::BTreeMap,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::mpsc,
};

/// The syscalls `f` made, by number; bpf(2) calls by command.
#[derive(Debug, Default)]
pub struct Counted {
    /// bpf(2) calls, by `cmd` (e.g. 15 is BPF_OBJ_GET_INFO_BY_FD).
    pub bpf: BTreeMap<u64, u64>,
    /// Every other syscall, by number.
    pub other: BTreeMap<i32, u64>,
}

/// Passed through uncounted: what memory allocation and thread exit may do
/// around or inside `f`. None of them is a way to look at a link.
const UNCOUNTED: [libc::c_long; 10] = [
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigprocmask,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Marks the start and the end of `f`: the supervisor counts only between
/// two of these.
const MARKER: libc::c_long = libc::SYS_getppid;

/// Runs `f` and counts its syscalls.
pub fn count<T: Send>(f: impl FnOnce() -> T + Send) -> (T, Counted) {
    std::thread::scope(|scope| {
        let (fd_tx, fd_rx) = mpsc::channel::<OwnedFd>();
        let worker = scope.spawn(move || {
            let listener = install().expect("install the seccomp filter");
            fd_tx.send(listener).expect("hand the listener over");
            // SAFETY: getppid has no arguments and cannot fail.
            unsafe { libc::syscall(MARKER) };
            let out = f();
            // SAFETY: as above.
            unsafe { libc::syscall(MARKER) };
            out
        });
        let listener = fd_rx.recv().expect("the worker's listener");
        let counted = supervise(&listener);
        (worker.join().expect("the counted code panicked"), counted)
    })
}

/// A filter that passes [`UNCOUNTED`] and notifies the listener of
/// everything else. Returns the listener.
fn install() -> io::Result<OwnedFd> {
    // SAFETY: BPF_STMT and BPF_JUMP only build plain structs.
    let mut prog: Vec<libc::sock_filter> = unsafe {
        let mut p = vec![libc::BPF_STMT(
            (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            0, // offsetof(struct seccomp_data, nr)
        )];
        let n = UNCOUNTED.len() as u8;
        for (i, nr) in UNCOUNTED.iter().enumerate() {
            // Matched: jump over the rest of the list and the notify.
            let to_allow = n - i as u8;
            p.push(libc::BPF_JUMP(
                (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
                *nr as u32,
                to_allow,
                0,
            ));
        }
        p.push(libc::BPF_STMT(
            (libc::BPF_RET | libc::BPF_K) as u16,
            libc::SECCOMP_RET_USER_NOTIF,
        ));
        p.push(libc::BPF_STMT(
            (libc::BPF_RET | libc::BPF_K) as u16,
            libc::SECCOMP_RET_ALLOW,
        ));
        p
    };
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: prctl with integer arguments; seccomp reads `fprog`, which
    // points to `prog`, alive across the call.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
            &raw const fprog,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd as i32))
    }
}

/// Answers every notification with "continue", counting those between the
/// two markers, until the filtered thread is gone.
fn supervise(listener: &OwnedFd) -> Counted {
    let mut counted = Counted::default();
    let mut markers = 0;
    loop {
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&raw mut pfd, 1, 10_000) };
        assert!(n > 0, "the counted thread went quiet: {n}");
        if pfd.revents & libc::POLLIN == 0 {
            // POLLHUP: no thread is left under the filter.
            break;
        }
        // SAFETY: all-zero is a valid seccomp_notif, as the kernel requires.
        let mut req: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        // SAFETY: RECV fills `req`.
        if unsafe {
            libc::ioctl(
                listener.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_RECV,
                &raw mut req,
            )
        } != 0
        {
            // The thread was interrupted or exited between poll and recv.
            continue;
        }
        let nr = libc::c_long::from(req.data.nr);
        if nr == MARKER {
            markers += 1;
        } else if markers == 1 {
            if nr == libc::SYS_bpf {
                *counted.bpf.entry(req.data.args[0]).or_default() += 1;
            } else {
                *counted.other.entry(req.data.nr).or_default() += 1;
            }
        }
        let mut resp = libc::seccomp_notif_resp {
            id: req.id,
            val: 0,
            error: 0,
            flags: libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
        };
        // SAFETY: SEND reads `resp`. A thread that died meanwhile makes it
        // fail with ENOENT, which is fine.
        unsafe {
            libc::ioctl(
                listener.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_SEND,
                &raw mut resp,
            )
        };
    }
    assert_eq!(markers, 2, "both markers seen");
    counted
}
