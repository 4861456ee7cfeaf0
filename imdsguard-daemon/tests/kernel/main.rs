//! Root integration tests against the real kernel. Each test builds a lab
//! (test cgroup root, isolated netns with a fake metadata service, private
//! bpffs), runs the real `imdsguard` binary against it, and probes from
//! processes placed in test cgroups. Nothing leaves the lab's namespace.

mod support;

mod endpoints;
mod enforcement;
mod filter;
mod first_sync;
mod hardening;
mod kubernetes;
mod lifecycle;
mod modes;
mod raw_sockets;
mod refusals;
mod report;
mod revocation;
mod socket_identity;
mod syscalls;
mod tamper;
mod upgrade;

use libtest_mimic::{Arguments, Trial};

fn main() {
    imdsguard_testlab::probe::run_if_probe();
    let mut args = Arguments::from_args();
    // The tests share the machine's cgroup hooks and are heavy on processes:
    // run them one at a time.
    args.test_threads = Some(1);
    let mut trials = Vec::new();
    trials.extend(enforcement::trials());
    trials.extend(modes::trials());
    trials.extend(lifecycle::trials());
    trials.extend(refusals::trials());
    trials.extend(kubernetes::trials());
    trials.extend(hardening::trials());
    trials.extend(tamper::trials());
    trials.extend(raw_sockets::trials());
    trials.extend(socket_identity::trials());
    trials.extend(revocation::trials());
    trials.extend(filter::trials());
    trials.extend(endpoints::trials());
    trials.extend(report::trials());
    trials.extend(upgrade::trials());
    trials.extend(first_sync::trials());
    libtest_mimic::run(&args, trials).exit();
}

/// Wraps a test body that panics on failure.
pub fn trial(name: &'static str, body: fn()) -> Trial {
    Trial::test(name, move || {
        body();
        Ok(())
    })
}
