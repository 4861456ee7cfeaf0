//! Filter mode on the real node. `imds/report` (app=report) may read the
//! region and nothing else: the kernel sends its metadata connections to
//! the agent's proxy on the node's IP, which a pod reaches through the real
//! CNI bridge. Two hostNetwork pods share the node's IP, one filtered
//! (`report-hostnet`) and one denied (`test-hostnet`): the proxy tells them
//! apart by the cgroup the kernel recorded for each connection, not by the
//! source address.

use std::{
    collections::BTreeMap,
    fmt, thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use imdsguard_podprobe::paths::USER_AGENT;
use imdsguard_testlab::{
    fake_imds::{FakeImds, Seen},
    real_node::NODE_IP,
};

use crate::{
    kube::Kube,
    probes::{self, Period},
    workloads::{self, Shape},
};

/// The chart's default `filter.proxyPort`.
pub const PROXY_PORT: u16 = 8169;
pub const REGION: &str = "/latest/meta-data/placement/region";
pub const INSTANCE_ID: &str = "/latest/meta-data/instance-id";
/// A credential: never allowed, whatever a rule says.
pub const CREDENTIALS: &str = "/latest/meta-data/iam/security-credentials/lab-role";
/// What every path-mode pod asks for, each period (podprobe `--path`).
pub const PATHS: [&str; 3] = [REGION, INSTANCE_ID, CREDENTIALS];

/// The seed policy (the chart's default) plus the filter rule.
pub const POLICY: &str = "\
defaultMode: enforce
rules:
  - name: prod-reads-imds
    namespaces: [imds]
    podSelector:
      matchLabels: {app: prod}
    access: allow
  - name: report-reads-region
    namespaces: [imds]
    podSelector:
      matchLabels: {app: report}
    access: filter
    profile: region
  - name: test-denied
    namespaces: [imds]
    podSelector:
      matchLabels: {app: test}
    access: deny
    mode: enforce
";

const POD_TIMEOUT: Duration = Duration::from_secs(120);
/// Two periods of 300 ms each, with room for a slow pod start.
const PERIODS_TIMEOUT: Duration = Duration::from_secs(20);

/// What a path-mode pod of `app` must see for `path`: the proxy's answer
/// for a filtered pod, the kernel's EPERM for a denied one.
fn expected(app: &str, path: &str) -> &'static str {
    match (app, path) {
        ("report", REGION) => "200",
        ("report", _) => "403",
        _ => "EPERM",
    }
}

/// Starts the filtered pods and checks what they and `test-hostnet` see,
/// and that the fake IMDS never got a refused request.
pub fn run(k: &Kube, ns: &str, imds: &FakeImds) -> anyhow::Result<()> {
    let started = Instant::now();
    println!(
        "\n== filter mode: app=report reads the region only, through the agent's proxy on {NODE_IP}:{PROXY_PORT}"
    );
    k.apply(&workloads::paths_deployment(ns, "report", 1))?;
    k.apply(&workloads::pod(
        ns,
        "report-hostnet",
        "report",
        Shape::HostNetwork,
    ))?;
    let report = k.wait_ready(ns, "app=report", 2, POD_TIMEOUT)?;
    let test_hostnet = k
        .pods(ns, "app=test")?
        .into_iter()
        .find(|p| p.name == "test-hostnet")
        .context("no test-hostnet pod")?;
    for p in report.iter().filter(|p| p.name == "report-hostnet") {
        ensure!(
            p.ip == NODE_IP && test_hostnet.ip == NODE_IP,
            "the hostNetwork pods should share the node's IP {NODE_IP}: report-hostnet {}, test-hostnet {}",
            p.ip,
            test_hostnet.ip
        );
    }
    println!("report-hostnet and test-hostnet share the node's IP {NODE_IP}");

    println!(
        "{:<26} {:<6} {:<12} {:<52} {:<6} {:<6} {:<6}",
        "POD", "APP", "KIND", "PATH", "EXPECT", "FIRST", "LATEST"
    );
    let mut pods: Vec<(String, &str, &str)> = report
        .iter()
        .map(|p| {
            let kind = if p.name == "report-hostnet" {
                "hostNetwork"
            } else {
                "Burstable"
            };
            (p.name.clone(), "report", kind)
        })
        .collect();
    pods.push(("test-hostnet".into(), "test", "hostNetwork"));
    let mut failures = Vec::new();
    for (pod, app, kind) in &pods {
        let periods = wait_periods(k, ns, pod, 2)?;
        let first = periods.iter().find(|p| p.seq == 1);
        let latest = periods.last().context("no period")?;
        for path in PATHS {
            let first = first
                .and_then(|p| p.path(path))
                .map_or_else(|| "-".to_owned(), probes::answer);
            let latest = latest.path(path).map_or_else(|| "-".into(), probes::answer);
            let expect = expected(app, path);
            println!("{pod:<26} {app:<6} {kind:<12} {path:<52} {expect:<6} {first:<6} {latest:<6}");
            if first != expect || latest != expect {
                failures.push(format!(
                    "{ns}/{pod} {path}: want {expect}, first {first}, latest {latest}"
                ));
            }
        }
    }
    ensure!(failures.is_empty(), "wrong filter verdicts: {failures:?}");
    let region = report_body(k, ns, &report[0].name)?;
    ensure!(
        region == "us-east-1",
        "{ns}/{}: region body {region:?}",
        report[0].name
    );

    // The refused requests never left the proxy. Only the path-mode pods
    // send USER_AGENT, and the proxy passes it on; test-hostnet is denied
    // until the ConfigMap edit later on, so by now every request with it
    // came through the proxy.
    let seen = imds.requests();
    let (mut puts, mut regions, mut others) = (0, 0, Vec::new());
    for r in seen
        .iter()
        .filter(|r| r.user_agent.as_deref() == Some(USER_AGENT))
    {
        let mut parts = r.line.split(' ');
        match (parts.next(), parts.next()) {
            (Some("PUT"), Some("/latest/api/token")) => puts += 1,
            (Some("GET"), Some(REGION)) => regions += 1,
            _ => others.push(r.line.clone()),
        }
    }
    ensure!(
        regions > 0 && puts > 0,
        "the fake IMDS saw no token PUT or region GET from the path probes (User-Agent {USER_AGENT}): \
         does the proxy forward them, with their User-Agent?"
    );
    ensure!(
        others.is_empty(),
        "the fake IMDS saw requests the proxy should have refused: {others:?}"
    );
    // Host processes are not judged, and one of the node's own (its
    // aws-sdk-go, e.g. kubelet's ECR credential provider) does read the
    // credentials: only the probes' requests count here.
    let from_pods = |r: &&Seen| {
        r.user_agent
            .as_deref()
            .is_some_and(|ua| ua.starts_with("imdsguard-podprobe"))
    };
    let credentials: Vec<&str> = seen
        .iter()
        .filter(from_pods)
        .filter(|r| r.line.contains("security-credentials"))
        .map(|r| r.line.as_str())
        .collect();
    ensure!(
        credentials.is_empty(),
        "the fake IMDS saw credential requests from pods: {credentials:?}"
    );
    let mut host: Vec<&str> = seen
        .iter()
        .filter(|r| !from_pods(r))
        .filter_map(|r| r.user_agent.as_deref())
        .collect();
    host.sort_unstable();
    host.dedup();
    println!(
        "fake IMDS: {puts} token PUTs and {regions} region GETs from the filtered pods, nothing else; \
         no credential request from any pod (other clients, host processes: {host:?})"
    );
    println!(
        "  filter mode checked in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The body of the pod's latest region answer.
fn report_body(k: &Kube, ns: &str, pod: &str) -> anyhow::Result<String> {
    let periods = probes::periods(&k.logs(ns, pod)?, &PATHS);
    let line = periods
        .last()
        .and_then(|p| p.path(REGION))
        .context("no region line")?;
    Ok(line.get("body").unwrap_or_default().to_owned())
}

/// Waits until the pod's log holds `n` complete periods.
fn wait_periods(k: &Kube, ns: &str, pod: &str, n: usize) -> anyhow::Result<Vec<Period>> {
    let deadline = Instant::now() + PERIODS_TIMEOUT;
    loop {
        let periods = probes::periods(&k.logs(ns, pod).unwrap_or_default(), &PATHS);
        if periods.len() >= n {
            return Ok(periods);
        }
        ensure!(
            Instant::now() < deadline,
            "{ns}/{pod}: fewer than {n} complete periods in {PERIODS_TIMEOUT:?}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// What the filtered pods saw over the whole run, faults included.
#[derive(Debug, Default)]
pub struct Totals {
    pub periods: u64,
    pub region_ok: u64,
    /// The region answered with another status, by status (the proxy
    /// without the pod's rules yet, say).
    pub region_refused: BTreeMap<String, u64>,
    /// Any other path answered 200: a leak.
    pub leaks: Vec<String>,
    /// Requests that got no answer, by errno (the agent, and so the proxy,
    /// was away: a filtered connect then fails at once).
    pub failed: BTreeMap<String, u64>,
}

impl fmt::Display for Totals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = |m: &BTreeMap<String, u64>, what: &str| {
            let total: u64 = m.values().sum();
            let each: Vec<String> = m.iter().map(|(k, n)| format!("{what} {k}: {n}")).collect();
            match each.is_empty() {
                true => "0".to_owned(),
                false => format!("{total} ({})", each.join(", ")),
            }
        };
        write!(
            f,
            "{} periods; region read {} times, refused {}; \
             requests unanswered {}; {} other paths answered 200",
            self.periods,
            self.region_ok,
            count(&self.region_refused, "status"),
            count(&self.failed, "errno"),
            self.leaks.len()
        )
    }
}

/// Reads every filtered pod's whole log.
pub fn totals(k: &Kube, ns: &str) -> anyhow::Result<Totals> {
    let mut t = Totals::default();
    for p in k.pods(ns, "app=report")? {
        for period in probes::periods(&k.logs(ns, &p.name)?, &PATHS) {
            t.add(&p.name, &period);
        }
    }
    Ok(t)
}

impl Totals {
    fn add(&mut self, pod: &str, period: &Period) {
        self.periods += 1;
        for line in &period.lines {
            let path = line.get("path").unwrap_or_default();
            match (path, line.get("status").unwrap_or("-")) {
                (_, "-") => {
                    let errno = line.get("errno").unwrap_or("-").to_owned();
                    *self.failed.entry(errno).or_default() += 1;
                }
                (REGION, "200") => self.region_ok += 1,
                (REGION, status) => {
                    *self.region_refused.entry(status.to_owned()).or_default() += 1;
                }
                (_, "200") => self.leaks.push(format!("{pod} seq={} {path}", period.seq)),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use imdsguard::{policy::file::PolicyFile, vocabulary::Action};

    use super::*;

    #[test]
    fn the_policy_filters_report_pods_with_the_region_profile() {
        let p = PolicyFile::from_yaml(POLICY).expect("the e2e policy loads");
        let labels = |app: &str| [("app".to_owned(), app.to_owned())].into();
        let d = p
            .evaluate("imds", &Default::default(), &labels("report"))
            .expect("a decision");
        assert_eq!(d.action, Action::Filter);
        assert_eq!(d.filter.expect("filter rules").profiles(), ["region"]);
        for app in ["prod", "test"] {
            let d = p
                .evaluate("imds", &Default::default(), &labels(app))
                .expect("a decision");
            assert_ne!(d.action, Action::Filter, "{app}");
        }
    }

    #[test]
    fn the_configmap_edit_still_turns_test_denied_into_allow() {
        let allowing = crate::scenarios::deny_to_allow(POLICY);
        assert!(allowing.contains("    access: filter\n    profile: region\n"));
        assert!(!allowing.contains("access: deny"));
        PolicyFile::from_yaml(&allowing).expect("the edited policy loads");
    }

    #[test]
    fn totals_count_leaks_refusals_and_failures() {
        let log = format!(
            "imdsguard-probe seq=1 first=1 path={REGION} verdict=ok status=200 step=get errno=-\n\
             imdsguard-probe seq=1 first=1 path={INSTANCE_ID} verdict=http status=403 step=get errno=-\n\
             imdsguard-probe seq=1 first=1 path={CREDENTIALS} verdict=http status=403 step=get errno=-\n\
             imdsguard-probe seq=2 first=0 path={REGION} verdict=error status=- step=put errno=111\n\
             imdsguard-probe seq=2 first=0 path={INSTANCE_ID} verdict=error status=- step=put errno=111\n\
             imdsguard-probe seq=2 first=0 path={CREDENTIALS} verdict=error status=- step=put errno=111\n\
             imdsguard-probe seq=3 first=0 path={REGION} verdict=http status=403 step=get errno=-\n\
             imdsguard-probe seq=3 first=0 path={INSTANCE_ID} verdict=ok status=200 step=get errno=-\n\
             imdsguard-probe seq=3 first=0 path={CREDENTIALS} verdict=http status=403 step=get errno=-\n"
        );
        let mut t = Totals::default();
        for p in probes::periods(&log, &PATHS) {
            t.add("report-x", &p);
        }
        assert_eq!((t.periods, t.region_ok), (3, 1));
        assert_eq!(t.region_refused, [("403".to_owned(), 1)].into());
        assert_eq!(t.failed, [("111".to_owned(), 3)].into());
        assert_eq!(t.leaks, [format!("report-x seq=3 {INSTANCE_ID}")]);
        assert_eq!(
            t.to_string(),
            "3 periods; region read 1 times, refused 1 (status 403: 1); requests unanswered 3 (errno 111: 3); 1 other paths answered 200"
        );
    }

    #[test]
    fn what_each_pod_should_see() {
        assert_eq!(expected("report", REGION), "200");
        assert_eq!(expected("report", CREDENTIALS), "403");
        assert_eq!(expected("test", REGION), "EPERM");
    }
}
