//! `imdsguard report`: who used the metadata service in the last N
//! minutes, and what enforce would have done, from one agent or every
//! agent of a cluster ([`fetch`](super::report_fetch)), as a table or JSON.

use std::{
    fmt::Write as _,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use crate::{
    Result,
    bpf::enforcer::Counters,
    cli::{args::ReportArgs, output, report_fetch},
    usage::{Counts, NOTE, Report, Row},
};

/// What one agent answered, without its rows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AgentSummary {
    /// The agent's URL, or its pod (`namespace/name`) through the API server.
    pub source: String,
    pub node: Option<String>,
    /// The kernel's totals on that node since the programs were loaded;
    /// allowed connects are only counted there.
    pub kernel_counters: Option<Counters>,
    pub dropped_events: u64,
}

/// An agent that could not be asked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Unreachable {
    pub source: String,
    pub node: Option<String>,
    pub error: String,
}

/// The report of every agent asked, rows merged and sorted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClusterReport {
    pub minutes: u32,
    pub agents: Vec<AgentSummary>,
    pub unreachable: Vec<Unreachable>,
    pub rows: Vec<Row>,
    pub note: &'static str,
}

/// One agent's answer, or why there is none.
pub type Answer = (String, Option<String>, Result<Report, String>);

/// Merges the agents' answers: each row keeps its node (from the report,
/// or from the pod the CLI asked), rows are sorted by namespace, pod,
/// container, destination, kind and node.
pub fn merge(minutes: u32, answers: Vec<Answer>) -> ClusterReport {
    let mut out = ClusterReport {
        minutes,
        agents: Vec::new(),
        unreachable: Vec::new(),
        rows: Vec::new(),
        note: NOTE,
    };
    for (source, node, answer) in answers {
        match answer {
            Ok(report) => {
                let node = report.node.or(node);
                out.rows.extend(report.rows.into_iter().map(|mut r| {
                    r.node = r.node.or_else(|| node.clone());
                    r
                }));
                out.agents.push(AgentSummary {
                    source,
                    node,
                    kernel_counters: report.kernel_counters,
                    dropped_events: report.dropped_events,
                });
            }
            Err(error) => out.unreachable.push(Unreachable {
                source,
                node,
                error,
            }),
        }
    }
    out.rows.sort_by(|a, b| {
        let key = |r: &Row| {
            (
                r.namespace.clone(),
                r.pod.clone(),
                r.container.clone(),
                r.cgroup.clone(),
                r.destination.clone(),
                r.kind.clone(),
                r.node.clone(),
            )
        };
        key(a).cmp(&key(b))
    });
    out
}

/// How long ago `then` was, in the largest whole unit.
fn ago(now: u64, then: u64) -> String {
    let s = now.saturating_sub(then);
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        _ => format!("{}h ago", s / 3600),
    }
}

fn or_dash(v: Option<&str>) -> &str {
    v.filter(|s| !s.is_empty()).unwrap_or("-")
}

fn paths(r: &Row) -> String {
    if r.paths.is_empty() && r.paths_dropped == 0 {
        return "-".into();
    }
    let mut s = r.paths.keys().cloned().collect::<Vec<_>>().join(",");
    if r.paths_dropped > 0 {
        let _ = write!(s, ",+{} more", r.paths_dropped);
    }
    s
}

const HEADER: [&str; 12] = [
    "NAMESPACE",
    "POD",
    "CONTAINER",
    "DESTINATION",
    "HOOK/KIND",
    "AUDITED",
    "DENIED",
    "FILTER-ALLOWED",
    "FILTER-DENIED",
    "PATHS",
    "IMDS",
    "LAST-SEEN",
];

/// The table, relative to `now` (unix seconds). The pod column holds the
/// cgroup when no pod is named (standalone mode).
pub fn render(r: &ClusterReport, now: u64) -> String {
    // A row with nothing but audit hits from before the first sync says
    // only that the agent did not know the pod yet: footnoted, not listed.
    let (early, rows): (Vec<&Row>, Vec<&Row>) = r.rows.iter().partition(|row| {
        row.counts.audited_before_sync > 0
            && Counts {
                audited_before_sync: 0,
                ..row.counts
            } == Counts::default()
    });
    let cells: Vec<[String; 12]> = rows
        .iter()
        .map(|row| {
            let imds = row.imds.iter().cloned().collect::<Vec<_>>().join(",");
            [
                row.namespace.clone(),
                or_dash(row.pod.as_deref().or(row.cgroup.as_deref())).to_owned(),
                or_dash(row.container.as_deref()).to_owned(),
                row.destination.clone(),
                row.kind.clone(),
                row.counts.audited.to_string(),
                row.counts.denied.to_string(),
                row.counts.filter_allowed.to_string(),
                row.counts.filter_denied.to_string(),
                paths(row),
                or_dash(Some(&imds)).to_owned(),
                ago(now, row.last_seen),
            ]
        })
        .collect();
    let mut widths = HEADER.map(str::len);
    for c in &cells {
        for (w, cell) in widths.iter_mut().zip(c) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut o = String::new();
    let line = |o: &mut String, cols: &[&str]| {
        let mut l = String::new();
        for (i, (cell, w)) in cols.iter().zip(widths).enumerate() {
            if i + 1 == cols.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        o.push_str(l.trim_end());
        o.push('\n');
    };
    let _ = writeln!(
        o,
        "Metadata service use in the last {} minutes, from {} agent(s)",
        r.minutes,
        r.agents.len()
    );
    if rows.is_empty() {
        o.push_str("no audit hits, denials or filtered requests\n");
    } else {
        line(&mut o, &HEADER);
        for c in &cells {
            line(&mut o, &c.each_ref().map(String::as_str));
        }
    }
    let early_hits: u64 = r
        .rows
        .iter()
        .map(|row| row.counts.audited_before_sync)
        .sum();
    if early_hits > 0 {
        let _ = writeln!(
            o,
            "\n{early_hits} audit hits ({} rows not listed above) came before the agent knew the node's pods, in the moment after a fresh install; they say nothing about enforce (-o json: audited_before_sync)",
            early.len()
        );
    }
    o.push_str(
        "\nAUDITED: would be denied under enforce. Allowed connects are not reported one by one,\nonly counted by the kernel since the programs were loaded:\n",
    );
    for a in &r.agents {
        let node = or_dash(a.node.as_deref());
        match a.kernel_counters {
            Some(c) => {
                let _ = writeln!(
                    o,
                    "  {node}: allowed {} audited {} denied {} (events dropped {})",
                    c.allowed, c.audited, c.denied, c.events_dropped
                );
            }
            None => {
                let _ = writeln!(o, "  {node}: programs not attached yet");
            }
        }
        if a.dropped_events > 0 {
            let _ = writeln!(
                o,
                "  {node}: {} events did not fit the report's memory bound",
                a.dropped_events
            );
        }
    }
    for u in &r.unreachable {
        let _ = writeln!(
            o,
            "could not ask {} (node {}): {}",
            u.source,
            or_dash(u.node.as_deref()),
            u.error
        );
    }
    o
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Asks the agent(s) and renders the answer. Fails when `--agent` does
/// not answer or the agent pods cannot be listed; an agent pod that does
/// not answer is listed in the output, so one broken node does not hide
/// the others.
pub async fn run(args: &ReportArgs) -> Result<String> {
    let answers = match &args.agent {
        Some(url) => {
            let report = report_fetch::from_agent(url, args.minutes).await?;
            vec![(url.clone(), None, Ok(report))]
        }
        None => report_fetch::from_cluster(args).await?,
    };
    let merged = merge(args.minutes, answers);
    output(args.output, &merged, |m| render(m, unix_now()))
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    fn row(ns: &str, pod: Option<&str>, kind: &str) -> Row {
        Row {
            node: None,
            namespace: ns.into(),
            pod: pod.map(Into::into),
            container: Some("app".into()),
            cgroup: pod.is_none().then(|| "/sys/fs/cgroup/lab/test".into()),
            destination: "169.254.169.254:80".into(),
            kind: kind.into(),
            counts: Counts {
                denied: 2,
                ..Default::default()
            },
            paths: BTreeMap::new(),
            paths_dropped: 0,
            imds: BTreeSet::new(),
            first_seen: 1000,
            last_seen: 1000,
        }
    }

    fn report(node: Option<&str>, rows: Vec<Row>) -> Report {
        Report {
            node: node.map(Into::into),
            generated_at: 1000,
            minutes: 15,
            since: 120,
            rows,
            dropped_events: 0,
            kernel_counters: Some(Counters {
                allowed: 9,
                denied: 2,
                audited: 1,
                events_dropped: 0,
            }),
            note: NOTE.into(),
        }
    }

    #[test]
    fn hits_from_before_the_first_sync_are_footnoted_not_listed() {
        let mut early = row("kube-system", Some("aws-node"), "connect4");
        early.counts = Counts {
            audited_before_sync: 3,
            ..Default::default()
        };
        let mut both = row("imds", Some("test-1"), "connect4");
        both.counts = Counts {
            audited: 5,
            audited_before_sync: 2,
            ..Default::default()
        };
        let m = merge(
            15,
            vec![("u".into(), None, Ok(report(None, vec![early, both])))],
        );
        let t = render(&m, 1000);
        assert!(!t.contains("aws-node"), "{t}");
        let listed: Vec<&str> = t.lines().filter(|l| l.starts_with("imds ")).collect();
        assert_eq!(listed.len(), 1, "{t}");
        assert!(
            t.contains("5 audit hits (1 rows not listed above) came before the agent knew"),
            "{t}"
        );
    }

    #[test]
    fn merging_keeps_each_rows_node_and_sorts_by_namespace_and_pod() {
        let a = report(Some("node-a"), vec![row("zeta", Some("p"), "connect4")]);
        let b = report(None, vec![row("alpha", Some("q"), "connect6")]);
        let m = merge(
            15,
            vec![
                (
                    "imdsguard-system/agent-a".into(),
                    Some("node-x".into()),
                    Ok(a),
                ),
                (
                    "imdsguard-system/agent-b".into(),
                    Some("node-b".into()),
                    Ok(b),
                ),
                (
                    "imdsguard-system/agent-c".into(),
                    Some("node-c".into()),
                    Err("timed out".into()),
                ),
            ],
        );
        let order: Vec<_> = m
            .rows
            .iter()
            .map(|r| (r.namespace.as_str(), r.node.as_deref()))
            .collect();
        // The agent's own name wins over the pod's node; else the pod's.
        assert_eq!(order, [("alpha", Some("node-b")), ("zeta", Some("node-a"))]);
        assert_eq!(m.agents.len(), 2);
        assert_eq!(m.unreachable[0].error, "timed out");
    }

    #[test]
    fn the_table_has_the_columns_and_says_what_the_kernel_does_not_report() {
        let mut filtered = row("imds", Some("reader"), "filter");
        filtered.counts = Counts {
            filter_allowed: 3,
            filter_denied: 1,
            ..Default::default()
        };
        filtered.paths = BTreeMap::from([
            ("/latest/meta-data/placement/region".into(), 3),
            ("/latest/user-data".into(), 1),
        ]);
        filtered.imds = BTreeSet::from(["v1".into(), "v2".into()]);
        filtered.last_seen = 1000 - 125;
        let standalone = row("(unattributed)", None, "connect4");
        let m = merge(
            15,
            vec![(
                "http://127.0.0.1:9090".into(),
                None,
                Ok(report(None, vec![filtered, standalone])),
            )],
        );
        let t = render(&m, 1000);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].contains("last 15 minutes, from 1 agent"), "{t}");
        let cols: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(cols, HEADER, "{t}");
        let first: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(
            first,
            [
                "(unattributed)",
                "/sys/fs/cgroup/lab/test",
                "app",
                "169.254.169.254:80",
                "connect4",
                "0",
                "2",
                "0",
                "0",
                "-",
                "-",
                "0s",
                "ago"
            ],
            "{t}"
        );
        let second: Vec<&str> = lines[3].split_whitespace().collect();
        assert_eq!(
            &second[4..],
            [
                "filter",
                "0",
                "0",
                "3",
                "1",
                "/latest/meta-data/placement/region,/latest/user-data",
                "v1,v2",
                "2m",
                "ago"
            ],
            "{t}"
        );
        assert!(
            t.contains("Allowed connects are not reported one by one"),
            "{t}"
        );
        assert!(t.contains("-: allowed 9 audited 1 denied 2"), "{t}");
    }

    #[test]
    fn an_empty_report_says_so_and_lists_unreachable_agents() {
        let m = merge(
            5,
            vec![("pod/x".into(), Some("n".into()), Err("refused".into()))],
        );
        let t = render(&m, 0);
        assert!(
            t.contains("no audit hits, denials or filtered requests"),
            "{t}"
        );
        assert!(t.contains("could not ask pod/x (node n): refused"), "{t}");
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["unreachable"][0]["error"], "refused");
    }
}
