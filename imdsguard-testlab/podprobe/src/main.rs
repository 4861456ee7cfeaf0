use std::io;
use std::process::ExitCode;

use imdsguard_podprobe::{ArgError, USAGE, hold, parse_args, run};

fn main() -> ExitCode {
    let opts = match parse_args(std::env::args().skip(1)) {
        Ok(opts) => opts,
        Err(ArgError::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("imdsguard-podprobe: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    exit_on_signals();
    if let Some(addr) = opts.hold {
        std::thread::spawn(move || {
            if let Err(e) = hold(addr, &mut io::stdout()) {
                eprintln!("imdsguard-podprobe: write stdout: {e}");
            }
        });
    }
    // Not locked for the whole run: the hold thread writes lines too.
    match run(&opts, &mut io::stdout()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("imdsguard-podprobe: write stdout: {e}");
            ExitCode::FAILURE
        }
    }
}

extern "C" fn exit_now(_: libc::c_int) {
    // SAFETY: _exit is async-signal-safe. Every line is already flushed.
    unsafe { libc::_exit(0) }
}

/// As a container's PID 1 a signal with the default disposition is ignored,
/// so SIGTERM (and SIGINT) need a handler: it exits 0 at once, even in the
/// middle of a probe.
fn exit_on_signals() {
    let handler = exit_now as extern "C" fn(libc::c_int);
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only calls _exit.
        unsafe { libc::signal(signal, handler as libc::sighandler_t) };
    }
}
