//! The helpers of the story's steps: waiting for pods and verdicts,
//! relabels, upgrades, policy patches and the burst probes around faults.

use super::*;

pub(super) fn kube<'a>(node: &'a RealNode, args: &Args) -> Kube<'a> {
    Kube {
        node,
        helm: args.helm.clone(),
    }
}

pub(super) fn kind_of(pod: &str) -> &'static str {
    match pod {
        "prod-guaranteed" => "Guaranteed",
        "test-hostnet" => "hostNetwork",
        _ => "Burstable",
    }
}

/// Waits until the pod's log has at least `n` probe lines.
pub(super) fn wait_probes(
    k: &Kube,
    ns: &str,
    pod: &str,
    n: usize,
) -> anyhow::Result<probes::Verdicts> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = k.verdicts(ns, pod)?;
        if v.probes >= n {
            return Ok(v);
        }
        ensure!(
            Instant::now() < deadline,
            "{ns}/{pod}: fewer than {n} probes in 20 s"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

pub(super) fn first_of_deployment(pods: &[PodInfo], prefix: &str) -> anyhow::Result<String> {
    pods.iter()
        .map(|p| p.name.clone())
        .find(|n| n.starts_with(prefix) && n != "test-hostnet")
        .with_context(|| format!("no pod named {prefix}*"))
}

/// `app=<app>` on pod `pod`, replacing its label.
pub(super) fn relabel(k: &Kube, pod: &str, app: &str) -> anyhow::Result<()> {
    k.kubectl(&[
        "-n",
        NS,
        "label",
        "pod",
        pod,
        &format!("app={app}"),
        "--overwrite",
    ])?;
    Ok(())
}

/// Waits until `n` pods match, all Ready, and `gone` is not among them.
pub(super) fn wait_replaced(
    k: &Kube,
    selector: &str,
    n: usize,
    gone: &str,
) -> anyhow::Result<Vec<PodInfo>> {
    let deadline = Instant::now() + POD_TIMEOUT;
    loop {
        let pods = k.pods(NS, selector)?;
        let replaced = pods.len() == n
            && pods.iter().all(|p| p.ready && !p.deleting)
            && !pods.iter().any(|p| p.name == gone);
        if replaced {
            return Ok(pods);
        }
        thread::sleep(Duration::from_millis(300));
        ensure!(
            Instant::now() < deadline,
            "{gone} not replaced in {POD_TIMEOUT:?}"
        );
    }
}

/// `helm upgrade --reuse-values --set SET`, then waits until the agent pod
/// is replaced by a Ready one (running `image`, if given).
pub(super) fn upgrade(k: &Kube, chart: &str, set: &str, image: Option<&str>) -> anyhow::Result<()> {
    let old = k.wait_ready(SYSTEM, AGENT, 1, POD_TIMEOUT)?;
    helm_upgrade(k, chart, set)?;
    wait_agent_replaced(k, &old[0].name, image)
}

/// `helm upgrade --reuse-values --set SET --wait`. A change that leaves the
/// DaemonSet's template alone (a policy value) replaces no agent pod.
pub(crate) fn helm_upgrade(k: &Kube, chart: &str, set: &str) -> anyhow::Result<()> {
    k.helm(&[
        "upgrade",
        "imdsguard",
        chart,
        "-n",
        SYSTEM,
        "--reuse-values",
        "--set",
        set,
        "--wait",
        "--timeout",
        "180s",
    ])?;
    Ok(())
}

/// Waits until the agent pod `old` is gone and a new one (running `image`,
/// if given) is Ready.
pub(super) fn wait_agent_replaced(k: &Kube, old: &str, image: Option<&str>) -> anyhow::Result<()> {
    let deadline = Instant::now() + POD_TIMEOUT;
    loop {
        let pods = k.pods(SYSTEM, AGENT)?;
        let fresh = pods.len() == 1
            && pods[0].name != old
            && pods[0].ready
            && image.is_none_or(|i| pods[0].images.iter().any(|x| x == i));
        if fresh {
            println!(
                "  agent pod {} Ready ({})",
                pods[0].name,
                pods[0].images.join(",")
            );
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "agent pod {old} not replaced in {POD_TIMEOUT:?}: {pods:?}"
        );
        thread::sleep(Duration::from_millis(300));
    }
}

/// The policy with its first deny rule turned into an allow: `access:
/// allow`, and the rule's `mode` line dropped (only deny rules take one; the
/// agent would refuse the edit and keep the last good policy).
pub(crate) fn deny_to_allow(policy: &str) -> String {
    let mut out = Vec::new();
    let mut changed = false;
    let mut drop_mode = false;
    for line in policy.lines() {
        let t = line.trim();
        if drop_mode && t.starts_with("mode:") {
            drop_mode = false;
            continue;
        }
        if !changed && t == "access: deny" {
            out.push(line.replace("access: deny", "access: allow"));
            changed = true;
            drop_mode = true;
            continue;
        }
        if t.starts_with("- ") {
            drop_mode = false;
        }
        out.push(line.to_owned());
    }
    out.join("\n") + "\n"
}

/// The policy file in the chart's ConfigMap.
pub(crate) fn policy_file(k: &Kube) -> anyhow::Result<String> {
    k.kubectl(&[
        "-n",
        SYSTEM,
        "get",
        "configmap",
        "imdsguard-policy",
        "-o",
        "jsonpath={.data.policy\\.yaml}",
    ])
}

pub(super) fn patch_policy(k: &Kube, policy: &str) -> anyhow::Result<()> {
    let patch = json!({"data": {"policy.yaml": policy}}).to_string();
    k.kubectl(&[
        "-n",
        SYSTEM,
        "patch",
        "configmap",
        "imdsguard-policy",
        "--type",
        "merge",
        "-p",
        &patch,
    ])?;
    Ok(())
}

/// Runs `fault` while the `burst` pod probes; returns the probes counted
/// from the summary before the fault to the one after it is over.
pub(super) fn under_burst(
    node: &mut RealNode,
    args: &Args,
    name: &str,
    fault: impl FnOnce(&mut RealNode) -> anyhow::Result<()>,
) -> anyhow::Result<(String, Burst)> {
    println!("\n== {name}, while pod burst (app=test) probes at full rate");
    let before = kube(node, args).burst(NS, "burst")?;
    fault(node).with_context(|| name.to_owned())?;
    // Kubelet may have been away: the burst pod's logs are read again once
    // it answers.
    let after = retry(|| kube(node, args).burst_after_next_summary(NS, "burst"))?;
    let delta = after - before;
    println!(
        "  {} attempts, {} denied, {} got through, {} errors",
        delta.attempts, delta.denied, delta.ok, delta.error
    );
    Ok((name.to_owned(), delta))
}

pub(super) fn retry<T>(mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// Waits until the holder pod's latest `hold=` line says `state`; returns
/// its detail.
pub(super) fn wait_hold(k: &Kube, state: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = k.logs(NS, "holder")?;
        if let Some(line) = probes::parse_log(&log)
            .into_iter()
            .rev()
            .find(|l| l.get("hold").is_some())
            && line.get("hold") == Some(state)
        {
            return Ok(line.get("detail").unwrap_or_default().to_owned());
        }
        if Instant::now() > deadline {
            bail!("holder: no hold={state} line in 30 s; log:\n{log}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn deny_rule_becomes_allow_without_its_mode() {
        let p = "rules:\n  - name: a\n    access: allow\n  - name: t\n    access: deny\n    mode: enforce\n  - name: u\n    access: deny\n    mode: audit\n";
        assert_eq!(
            super::deny_to_allow(p),
            "rules:\n  - name: a\n    access: allow\n  - name: t\n    access: allow\n  - name: u\n    access: deny\n    mode: audit\n"
        );
    }
}
