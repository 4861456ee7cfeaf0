//! The eBPF object, built by build.rs and embedded in the binary.

use crate::{Error, Result};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/imdsguard-ebpf"));

/// The embedded object, or an error when this binary was built with the
/// eBPF build skipped.
pub fn bytes() -> Result<&'static [u8]> {
    if OBJECT.is_empty() {
        Err(Error::EbpfObjectMissing)
    } else {
        Ok(OBJECT)
    }
}
