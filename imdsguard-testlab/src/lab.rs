//! The lab: a cgroup root to attach to, a network namespace with the fake
//! metadata service, and a private bpffs for the pins.

use std::{
    path::{Path, PathBuf},
    process::Child,
};

use anyhow::Context as _;

use crate::{
    bpffs::PrivateBpffs,
    cgroups::TestCgroup,
    fake_imds::{self, FakeImds},
    netns::NetNs,
    probe::{self, Outcome},
    require_root, unique,
};

/// Field order is drop order: the server stops before the namespace goes,
/// processes die with the cgroups, and the bpffs (with any pins) goes last.
pub struct Lab {
    _server: FakeImds,
    root: TestCgroup,
    netns: NetNs,
    bpffs: PrivateBpffs,
    probe_exe: PathBuf,
}

impl Lab {
    /// `name` shows up in the cgroup and mount names.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        require_root()?;
        let id = unique(&format!("imdsguard-{name}"));
        let bpffs = PrivateBpffs::mount(&format!("{id}-bpffs"))?;
        let netns = NetNs::new()?;
        netns.assert_isolated()?;
        for addr in fake_imds::lab_addresses() {
            netns.add_local_address(addr)?;
        }
        netns.assert_local("127.0.0.1".parse()?)?;
        let server = FakeImds::start(&netns, fake_imds::lab_listeners())?;
        let root = TestCgroup::create_top(&id)?;
        let probe_exe = std::env::current_exe().context("current_exe")?;
        Ok(Self {
            _server: server,
            root,
            netns,
            bpffs,
            probe_exe,
        })
    }

    /// The cgroup to attach to (the "kubepods" of the lab).
    pub fn root(&self) -> &TestCgroup {
        &self.root
    }

    /// A cgroup below the root, e.g. `imds/prod-1` (parents created).
    pub fn cgroup(&self, rel: &str) -> anyhow::Result<TestCgroup> {
        self.root.child(rel)
    }

    pub fn netns(&self) -> &NetNs {
        &self.netns
    }

    pub fn pin_dir(&self) -> PathBuf {
        self.bpffs.path().join("imdsguard")
    }

    pub fn bpffs(&self) -> &Path {
        self.bpffs.path()
    }

    /// Probes from `cgroup` (None: from the lab process's own cgroup, which is
    /// outside the attach root) inside the lab namespace.
    pub fn probe(
        &self,
        cgroup: Option<&TestCgroup>,
        kind: &str,
        target: &str,
    ) -> anyhow::Result<Outcome> {
        probe::run(
            &self.probe_exe,
            cgroup.map(TestCgroup::path),
            &self.netns,
            kind,
            target,
        )
    }

    /// Every request line the fake metadata service has answered.
    pub fn imds_seen(&self) -> Vec<String> {
        self._server.seen()
    }

    /// IMDSv2 GET of `path` at `target` from `cgroup`: the detail of a
    /// reached service is `"<status> <body>"`.
    pub fn imds_get(
        &self,
        cgroup: Option<&TestCgroup>,
        target: &str,
        path: &str,
    ) -> anyhow::Result<Outcome> {
        let child = self.spawn_probe(cgroup, &["imds-get", target, path])?;
        probe::wait(child, std::time::Duration::from_secs(20))
    }

    /// Starts a probe without waiting (for loops that span a daemon restart).
    pub fn spawn_probe(&self, cgroup: Option<&TestCgroup>, args: &[&str]) -> anyhow::Result<Child> {
        probe::spawn(
            &self.probe_exe,
            cgroup.map(TestCgroup::path),
            &self.netns,
            args,
        )
    }
}
