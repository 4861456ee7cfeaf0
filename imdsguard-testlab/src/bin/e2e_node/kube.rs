//! The cluster as the test drives it: kubectl and helm against the real
//! node's API server, and waits on what kubelet really does.

use std::{
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use imdsguard_testlab::real_node::RealNode;
use serde_json::Value;

use crate::probes::{self, Burst, Verdicts};

pub struct Kube<'a> {
    pub node: &'a RealNode,
    pub helm: PathBuf,
}

/// A pod as `kubectl get -o json` shows it.
#[derive(Debug, Clone)]
pub struct PodInfo {
    pub name: String,
    pub phase: String,
    pub ready: bool,
    pub deleting: bool,
    pub images: Vec<String>,
    /// `status.podIP`: the node's own for hostNetwork pods.
    pub ip: String,
}

impl Kube<'_> {
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.node.kubectl_out(args)
    }

    /// `kubectl apply -f -` of one object.
    pub fn apply(&self, object: &Value) -> anyhow::Result<()> {
        let mut child = self
            .node
            .kubectl()
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("start kubectl apply")?;
        child
            .stdin
            .take()
            .context("kubectl stdin")?
            .write_all(object.to_string().as_bytes())?;
        let out = child.wait_with_output()?;
        ensure!(
            out.status.success(),
            "kubectl apply: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    pub fn helm(&self, args: &[&str]) -> anyhow::Result<String> {
        imdsguard_testlab::process::run(
            Command::new(&self.helm)
                .args(args)
                .arg("--kubeconfig")
                .arg(self.node.admin_kubeconfig()),
        )
    }

    pub fn pods(&self, ns: &str, selector: &str) -> anyhow::Result<Vec<PodInfo>> {
        let mut args = vec!["-n", ns, "get", "pods", "-o", "json"];
        if !selector.is_empty() {
            args.extend(["-l", selector]);
        }
        let list: Value = serde_json::from_str(&self.kubectl(&args)?)?;
        let items = list["items"].as_array().cloned().unwrap_or_default();
        Ok(items
            .iter()
            .map(|p| PodInfo {
                name: p["metadata"]["name"].as_str().unwrap_or_default().into(),
                phase: p["status"]["phase"].as_str().unwrap_or_default().into(),
                ready: p["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                }),
                deleting: !p["metadata"]["deletionTimestamp"].is_null(),
                images: p["spec"]["containers"]
                    .as_array()
                    .map(|cs| {
                        cs.iter()
                            .filter_map(|c| c["image"].as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default(),
                ip: p["status"]["podIP"].as_str().unwrap_or_default().into(),
            })
            .collect())
    }

    /// Waits until exactly `n` pods match and all are Running and Ready,
    /// none of them being deleted.
    pub fn wait_ready(
        &self,
        ns: &str,
        selector: &str,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<PodInfo>> {
        let deadline = Instant::now() + timeout;
        loop {
            let pods = self.pods(ns, selector)?;
            if pods.len() == n && pods.iter().all(|p| p.ready && !p.deleting) {
                return Ok(pods);
            }
            if Instant::now() > deadline {
                bail!(
                    "{ns}/{selector}: want {n} ready pods after {timeout:?}, have {:?}\n{}",
                    pods.iter()
                        .map(|p| format!(
                            "{} {} ready={} deleting={}",
                            p.name, p.phase, p.ready, p.deleting
                        ))
                        .collect::<Vec<_>>(),
                    self.kubectl(&["-n", ns, "get", "events", "--sort-by=.lastTimestamp"])
                        .unwrap_or_default()
                );
            }
            self.node.check_alive()?;
            thread::sleep(Duration::from_millis(300));
        }
    }

    pub fn logs(&self, ns: &str, pod: &str) -> anyhow::Result<String> {
        self.kubectl(&["-n", ns, "logs", pod])
    }

    /// How many of the pod's probes were denied, over its whole log.
    pub fn denied_probes(&self, ns: &str, pod: &str) -> anyhow::Result<usize> {
        Ok(probes::parse_log(&self.logs(ns, pod)?)
            .iter()
            .filter(|l| !l.summary && l.verdict() == Some("denied"))
            .count())
    }

    pub fn verdicts(&self, ns: &str, pod: &str) -> anyhow::Result<Verdicts> {
        Ok(probes::verdicts(&self.logs(ns, pod)?))
    }

    /// Waits until the pod has probed at least once and returns its
    /// verdicts.
    pub fn wait_first_probe(&self, ns: &str, pod: &str) -> anyhow::Result<Verdicts> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.verdicts(ns, pod).unwrap_or_default();
            if v.first.is_some() {
                return Ok(v);
            }
            ensure!(
                Instant::now() < deadline,
                "{ns}/{pod} printed no probe line in 30 s"
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until a probe that started after now gives `want`; returns how
    /// long that took.
    pub fn wait_verdict(
        &self,
        ns: &str,
        pod: &str,
        want: &str,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let seen = self.verdicts(ns, pod)?.probes;
        loop {
            let log = self.logs(ns, pod)?;
            let lines: Vec<_> = probes::parse_log(&log)
                .into_iter()
                .filter(|l| !l.summary)
                .collect();
            // The first new line may have started before `start`: skip it.
            if lines.len() > seen + 1 && lines.last().and_then(|l| l.verdict()) == Some(want) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!(
                    "{ns}/{pod}: no `{want}` verdict after {timeout:?}; latest {:?}",
                    lines.last().and_then(|l| l.verdict())
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn burst(&self, ns: &str, pod: &str) -> anyhow::Result<Burst> {
        Ok(probes::burst(&self.logs(ns, pod)?))
    }

    /// Waits for the next burst summary after now; returns the totals.
    pub fn burst_after_next_summary(&self, ns: &str, pod: &str) -> anyhow::Result<Burst> {
        let before = self.burst(ns, pod)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            thread::sleep(Duration::from_millis(300));
            let now = self.burst(ns, pod)?;
            if now.attempts > before.attempts {
                return Ok(now);
            }
            ensure!(
                Instant::now() < deadline,
                "{ns}/{pod} printed no burst summary in 10 s"
            );
        }
    }
}
