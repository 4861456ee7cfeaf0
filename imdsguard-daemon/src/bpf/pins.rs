//! Where the installation lives on bpffs.
//!
//! ```text
//! <pin-dir>/maps/IMDSG_*        every map (state survives the daemon)
//! <pin-dir>/links/<hook>        one cgroup link per attached hook
//! ```

use std::path::{Path, PathBuf};

use crate::bpf::hook::Hook;

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/imdsguard";

#[derive(Clone, Debug)]
pub struct PinLayout {
    pub dir: PathBuf,
}

impl PinLayout {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub fn maps_dir(&self) -> PathBuf {
        self.dir.join("maps")
    }
    pub fn links_dir(&self) -> PathBuf {
        self.dir.join("links")
    }
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }
    pub fn link(&self, hook: Hook) -> PathBuf {
        self.links_dir().join(hook.name())
    }
    pub fn exists(&self) -> bool {
        Path::new(&self.maps_dir()).is_dir()
    }

    /// Opens the pinned map `name` (for `status` and `explain`).
    pub fn open_map(&self, name: &'static str) -> crate::Result<aya::maps::Map> {
        let err = move |source| crate::Error::Map { name, source };
        let data = aya::maps::MapData::from_pin(self.map(name)).map_err(err)?;
        aya::maps::Map::from_map_data(data).map_err(err)
    }
}
