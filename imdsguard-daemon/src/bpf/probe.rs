//! Probing the kernel for what the programs need before loading them.

use crate::{Error, Result};

/// Names the missing piece when the kernel cannot run us, instead of
/// failing later with a bare EINVAL from the loader.
pub(super) fn check_kernel_support() -> Result<()> {
    use aya::{
        maps::MapType,
        programs::ProgramType,
        sys::{is_map_supported, is_program_supported},
    };
    let unsupported = |what, source| Error::KernelUnsupported { what, source };
    match is_program_supported(ProgramType::CgroupSockAddr) {
        Ok(true) => {}
        Ok(false) => {
            return Err(unsupported(
                "cgroup sock_addr programs (CONFIG_CGROUP_BPF)",
                std::io::ErrorKind::Unsupported.into(),
            ));
        }
        Err(e) => {
            return Err(unsupported(
                "cgroup sock_addr programs (probe failed)",
                std::io::Error::other(e),
            ));
        }
    }
    for (map, what) in [
        (MapType::RingBuf, "ring buffer maps (Linux 5.8+)"),
        (MapType::LpmTrie, "LPM trie maps"),
    ] {
        if !is_map_supported(map).map_err(|e| unsupported(what, std::io::Error::other(e)))? {
            return Err(unsupported(what, std::io::ErrorKind::Unsupported.into()));
        }
    }
    Ok(())
}
