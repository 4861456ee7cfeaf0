//! The node: the lab, the API, the agent, and the pods with their cgroups.

use std::{
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use imdsguard::bpf::pins::PinLayout;
use imdsguard_testlab::{
    bench::WorkerReport,
    cgroups::TestCgroup,
    cluster::Cluster,
    daemon::{self, Daemon},
    kube_apiserver::KubeApiserver,
    lab::Lab,
    probe::{self},
};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::PostParams};
use serde_json::Value;

use super::startup::{Startup, parse_timestamp};
use super::{Build, NS, QOS_DIR};

/// The node: the lab, the API, the agent's flags, and the pods with their
/// cgroups.
pub(super) struct Node<'a> {
    pub(super) bin: PathBuf,
    pub(super) lab: &'a Lab,
    pub(super) cluster: &'a Cluster,
    pub(super) api: &'a KubeApiserver,
    pub(super) kubepods: &'a TestCgroup,
    pub(super) policy: PathBuf,
    /// Where the agent's kubeconfig is written.
    pub(super) scratch: PathBuf,
    /// Pod `pod-N` and its cgroup, in creation order.
    pub(super) pods: Vec<TestCgroup>,
}

impl Node<'_> {
    pub(super) fn pod_dir(&self, uid: &str) -> PathBuf {
        self.kubepods.path().join(QOS_DIR).join(format!(
            "kubepods-besteffort-pod{}.slice",
            uid.replace('-', "_")
        ))
    }

    pub(super) fn pins(&self) -> PinLayout {
        PinLayout::new(self.lab.pin_dir())
    }

    /// Creates pods (API objects, then cgroups) until there are `n`.
    pub(super) fn grow_to(&mut self, n: u32, concurrency: usize) -> anyhow::Result<Duration> {
        let t0 = Instant::now();
        let names: Vec<String> = (self.pods.len() as u32..n)
            .map(|i| format!("pod-{i}"))
            .collect();
        let uids = create_pods(self.cluster, names, concurrency)?;
        for uid in uids {
            self.pods.push(TestCgroup::create(self.pod_dir(&uid))?);
        }
        Ok(t0.elapsed())
    }

    /// Starts `imdsguard node` as `build` and times it to its `ready` line.
    pub(super) fn start_agent(&self, build: &Build) -> anyhow::Result<(Daemon, Startup)> {
        let t0 = SystemTime::now();
        let i0 = Instant::now();
        // Loopback, any free port: never the host's 0.0.0.0:9090.
        let mut args = vec!["--metrics-addr", "127.0.0.1:0"];
        args.extend(build.args.iter().map(String::as_str));
        let agent = imdsguard_testlab::cluster::start_agent(
            &build.bin,
            self.api,
            self.lab,
            self.kubepods.path(),
            &self.policy,
            &self.scratch,
            &args,
        )
        .context("start the node agent")?;
        let wall = i0.elapsed();
        let logs = agent.logs();
        let line = |msg: &str| logs.iter().find(|v| daemon::message(v) == Some(msg));
        let since_t0 = |v: &Value| {
            v["timestamp"]
                .as_str()
                .and_then(parse_timestamp)
                .and_then(|t| t.duration_since(t0).ok())
        };
        let ready = line("ready").context("no ready line")?;
        let startup = Startup {
            attached: line("programs in place").and_then(since_t0),
            // Without a parsable timestamp: the wall time, 10 ms coarser.
            ready: since_t0(ready).unwrap_or(wall),
            // Where the time went, when the build logs it.
            phases: ["list_ms", "compute_ms", "write_ms"].map(|k| ready[k].as_u64()),
            pods: ready["pods"].as_u64().unwrap_or(0),
            entries: ready["entries"].as_u64().unwrap_or(0),
            waiting: ready["waiting_for_cgroup"].as_u64().unwrap_or(0),
        };
        Ok((agent, startup))
    }

    pub(super) fn counters(&self) -> anyhow::Result<Value> {
        Ok(daemon::status(&self.bin, &self.lab.pin_dir())?["counters"].clone())
    }

    pub(super) fn allow_entries(&self) -> anyhow::Result<usize> {
        let status = daemon::status(&self.bin, &self.lab.pin_dir())?;
        Ok(status["allowed"].as_array().map_or(0, Vec::len))
    }

    /// The overhead worker from `cg`, in the lab namespace.
    pub(super) fn worker(&self, cg: &TestCgroup, iterations: u32) -> anyhow::Result<WorkerReport> {
        let it = iterations.to_string();
        let child = self.lab.spawn_probe(Some(cg), &["bench", &it])?;
        probe::wait(child, Duration::from_secs(600))
    }
}

/// Creates BestEffort pods `names` on the node, `concurrency` at a time, in
/// namespace [`NS`], app=prod for even indexes and app=test for odd ones.
/// Returns their UIDs in order.
pub(super) fn create_pods(
    cluster: &Cluster,
    names: Vec<String>,
    concurrency: usize,
) -> anyhow::Result<Vec<String>> {
    let mut chunks: Vec<Vec<(usize, String)>> = vec![Vec::new(); concurrency];
    for (i, name) in names.into_iter().enumerate() {
        chunks[i % concurrency].push((i, name));
    }
    let client = cluster.admin.clone();
    cluster.rt.block_on(async move {
        let tasks: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                let api = Api::<Pod>::namespaced(client.clone(), NS);
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    for (i, name) in chunk {
                        let uid = create_pod(&api, &name, app_of(&name)).await?;
                        out.push((i, uid));
                    }
                    anyhow::Ok(out)
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await??);
        }
        all.sort_unstable();
        Ok(all.into_iter().map(|(_, uid)| uid).collect())
    })
}

/// app=prod for pods whose number is even.
pub(super) fn app_of(name: &str) -> &'static str {
    let n: u64 = name
        .rsplit('-')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if n.is_multiple_of(2) { "prod" } else { "test" }
}

async fn create_pod(api: &Api<Pod>, name: &str, app: &str) -> anyhow::Result<String> {
    let pod = imdsguard_testlab::cluster::pod_manifest(name, app, None);
    let created = api
        .create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("create pod {name}"))?;
    created.metadata.uid.context("created pod has no uid")
}

/// Waits (up to 30 s) until the allow map holds `n` entries; returns the
/// count last seen.
pub(super) fn wait_for_entries(node: &Node, n: usize) -> anyhow::Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let entries = node.allow_entries()?;
        if entries == n || Instant::now() > deadline {
            return Ok(entries);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(super) fn cluster_delete(cluster: &Cluster, names: &[&str]) {
    for n in names {
        cluster.delete_pod(NS, n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apps() {
        assert_eq!(app_of("pod-0"), "prod");
        assert_eq!(app_of("churn-7"), "test");
        assert_eq!(app_of("flood-denied-1"), "test");
    }
}
