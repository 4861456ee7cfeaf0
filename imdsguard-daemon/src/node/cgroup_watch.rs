//! Wakes the reconciler when kubelet creates or removes a pod cgroup.
//!
//! A pod's API object usually exists before its cgroup; enforcement is fail
//! closed, so an allowed pod is denied until its cgroup is in the map. inotify
//! on the kubepods root and its QoS directories makes that wait as short as
//! a reconcile, instead of a polling period.
//!
//! Pod directories themselves are not watched. So the empty `pod<uid>`
//! directories that pile up in the unified hierarchy of hybrid hosts (runc
//! creates them, nobody removes them) hold no watch and raise no event
//! once their pod is gone.

use std::{ffi::OsStr, sync::Arc};

use futures::StreamExt as _;
use inotify::{EventMask, Inotify, WatchMask};
use tokio::sync::Notify;
use tracing::warn;

use crate::cgroup::pod::{CgroupDriver, KubepodsLayout};
use crate::{Error, Result};

fn is_qos_dir(layout: &KubepodsLayout, name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    match layout.driver() {
        CgroupDriver::Cgroupfs => name == "burstable" || name == "besteffort",
        CgroupDriver::Systemd => {
            let p = layout.slice_prefix();
            name == format!("{p}-burstable.slice") || name == format!("{p}-besteffort.slice")
        }
    }
}

/// Runs until the inotify stream ends; every directory event below the
/// root or a QoS directory calls `trigger.notify_one()`.
pub async fn watch(layout: KubepodsLayout, trigger: Arc<Notify>) -> Result<()> {
    let err = |source| Error::Syscall {
        call: "inotify",
        source,
    };
    let inotify = Inotify::init().map_err(err)?;
    let mask = WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM
        | WatchMask::ONLYDIR;
    let mut watches = inotify.watches();
    let root_wd = watches.add(layout.root(), mask).map_err(err)?;
    for entry in std::fs::read_dir(layout.root())
        .map_err(Error::io("read", layout.root()))?
        .flatten()
    {
        if is_qos_dir(&layout, &entry.file_name()) {
            watches.add(entry.path(), mask).map_err(err)?;
        }
    }
    let buffer = vec![0u8; 16 * 1024];
    let mut events = inotify.into_event_stream(buffer).map_err(err)?;
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "cgroup watch error");
                continue;
            }
        };
        if event.mask.contains(EventMask::Q_OVERFLOW) {
            warn!("cgroup watch queue overflowed; reconciling from the full tree");
        }
        if event.wd == root_wd
            && event.mask.contains(EventMask::CREATE)
            && let Some(name) = &event.name
            && is_qos_dir(&layout, name)
        {
            events
                .watches()
                .add(layout.root().join(name), mask)
                .map_err(err)?;
        }
        trigger.notify_one();
    }
    Ok(())
}
