//! A lab for testing imdsguard against the real kernel without touching the
//! machine's network or its own cgroups.
//!
//! Safety rules it enforces:
//! - every "pod" runs in a network namespace the lab created, holding only
//!   `lo`; the fake metadata addresses live on that `lo`, and the lab checks
//!   `ip route get` says `local` for each before any probe runs;
//! - programs are only attached to cgroups the lab created;
//! - everything is a Drop guard: processes, cgroups, the namespace and the
//!   private bpffs mount go away even when a test panics.

pub mod bench;
pub mod bench_http;
pub mod bpffs;
pub mod cgroups;
pub mod cluster;
pub mod daemon;
pub mod fake_imds;
pub mod handoff;
pub mod image;
pub mod kube_apiserver;
pub mod lab;
pub mod netns;
pub mod noop;
pub mod probe;
pub mod process;
pub mod raw_bpf;
pub mod real_node;
pub mod scratch;
pub mod stats;
pub mod tamper;

use std::sync::atomic::{AtomicU32, Ordering};

/// A name unique to this process and call, for cgroups and mounts.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{}-{nanos:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Fails unless we are root: the lab needs CAP_SYS_ADMIN and CAP_BPF.
pub fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("the imdsguard lab needs root (cgroups, network namespaces, bpf)");
    }
    Ok(())
}

/// The `imdsguard` binary for lab programs: `explicit` (their
/// `--imdsguard PATH`), else the `imdsguard` next to the running binary
/// (cargo's `target/<profile>/`).
pub fn imdsguard_bin(explicit: Option<std::path::PathBuf>) -> anyhow::Result<std::path::PathBuf> {
    if let Some(path) = explicit {
        return Ok(path);
    }
    let exe = std::env::current_exe()?;
    let sibling = exe.with_file_name("imdsguard");
    anyhow::ensure!(
        sibling.exists(),
        "imdsguard binary not found next to {}; pass --imdsguard PATH",
        exe.display()
    );
    Ok(sibling)
}
