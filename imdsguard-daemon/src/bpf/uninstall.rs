//! `imdsguard uninstall`: removing an installation from bpffs.

use std::fs;

use serde::Serialize;

use crate::{
    Error, Result,
    bpf::{bpffs, hook::Hook, maps, migrate, pins::PinLayout},
};

/// What [`uninstall`] removed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct UninstallReport {
    pub links: Vec<String>,
    pub maps: Vec<String>,
}

/// Detaches every link, then unpins the maps and removes the directories.
/// Links go first so no program runs against a half-removed installation.
pub fn uninstall(pins: &PinLayout) -> Result<UninstallReport> {
    let mut report = UninstallReport::default();
    if !pins.dir.exists() {
        return Ok(report);
    }
    bpffs::ensure_on_bpffs(&pins.dir)?;
    for hook in Hook::ALL {
        let pin = pins.link(hook);
        if pin.exists() {
            fs::remove_file(&pin).map_err(Error::io("unpin", &pin))?;
            report.links.push(hook.name().into());
        }
    }
    for name in maps::NAMES {
        let pin = pins.map(name);
        if pin.exists() {
            fs::remove_file(&pin).map_err(Error::io("unpin", &pin))?;
            report.maps.push(name.into());
        }
        // A replacement an upgrade pinned and did not rename (a crash).
        let next = migrate::next_pin(pins, name);
        if next.exists() {
            fs::remove_file(&next).map_err(Error::io("unpin", &next))?;
        }
    }
    for dir in [pins.links_dir(), pins.maps_dir(), pins.dir.clone()] {
        if dir.exists() {
            fs::remove_dir(&dir).map_err(Error::io("remove", &dir))?;
        }
    }
    Ok(report)
}
