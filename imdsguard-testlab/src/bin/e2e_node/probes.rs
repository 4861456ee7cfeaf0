//! What the workload pods print: `imdsguard-podprobe` lines in their logs,
//! read through `kubectl logs`.

use std::collections::BTreeMap;

/// One probe line: `imdsguard-probe seq=N first=1 verdict=ok ...` or a
/// burst summary `imdsguard-probe summary attempts=N ok=N denied=N ...`.
#[derive(Debug, Clone, Default)]
pub struct Line {
    pub fields: BTreeMap<String, String>,
    pub summary: bool,
}

impl Line {
    pub fn parse(line: &str) -> Option<Self> {
        let rest = line.trim().strip_prefix("imdsguard-probe ")?;
        let mut out = Self::default();
        for word in rest.split_whitespace() {
            match word.split_once('=') {
                Some((k, v)) => {
                    out.fields.insert(k.to_owned(), v.to_owned());
                }
                None if word == "summary" => out.summary = true,
                None => {}
            }
        }
        Some(out)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    pub fn num(&self, key: &str) -> u64 {
        self.get(key).and_then(|v| v.parse().ok()).unwrap_or(0)
    }

    pub fn verdict(&self) -> Option<&str> {
        self.get("verdict")
    }

    pub fn is_first(&self) -> bool {
        self.get("first") == Some("1")
    }
}

/// Every probe line of a log, in order.
pub fn parse_log(log: &str) -> Vec<Line> {
    log.lines().filter_map(Line::parse).collect()
}

/// The verdicts of a pod's log: its first probe's, and its latest.
#[derive(Debug, Clone, Default)]
pub struct Verdicts {
    pub first: Option<String>,
    pub latest: Option<String>,
    pub probes: usize,
}

pub fn verdicts(log: &str) -> Verdicts {
    let lines: Vec<Line> = parse_log(log).into_iter().filter(|l| !l.summary).collect();
    Verdicts {
        first: lines
            .iter()
            .find(|l| l.is_first())
            .and_then(|l| l.verdict().map(str::to_owned)),
        latest: lines.last().and_then(|l| l.verdict().map(str::to_owned)),
        probes: lines.len(),
    }
}

/// Path mode: one period's lines, one per path.
#[derive(Debug, Clone)]
pub struct Period {
    pub seq: u64,
    pub lines: Vec<Line>,
}

impl Period {
    pub fn path(&self, path: &str) -> Option<&Line> {
        self.lines.iter().find(|l| l.get("path") == Some(path))
    }
}

/// Path mode: the periods of a log that have a line for each of `paths`,
/// oldest first (the one being printed is left out).
pub fn periods(log: &str, paths: &[&str]) -> Vec<Period> {
    let mut out: Vec<Period> = Vec::new();
    for line in parse_log(log) {
        if line.get("path").is_none() {
            continue;
        }
        let seq = line.num("seq");
        match out.last_mut() {
            Some(p) if p.seq == seq => p.lines.push(line),
            _ => out.push(Period {
                seq,
                lines: vec![line],
            }),
        }
    }
    out.retain(|p| paths.iter().all(|path| p.path(path).is_some()));
    out
}

/// What a path-mode line says, in one word: the HTTP status (`200`,
/// `403`), `EPERM` or `EACCES` (denied at connect), or the error.
pub fn answer(line: &Line) -> String {
    match (line.get("status"), line.verdict(), line.get("errno")) {
        (Some(status), _, _) if status != "-" => status.to_owned(),
        (_, Some("denied"), Some("1")) => "EPERM".into(),
        (_, Some("denied"), Some("13")) => "EACCES".into(),
        (_, v, errno) => format!(
            "{}({},errno={})",
            v.unwrap_or("?"),
            line.get("step").unwrap_or("?"),
            errno.unwrap_or("?")
        ),
    }
}

/// Burst totals: the latest summary line (each counts since the start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Burst {
    pub attempts: u64,
    pub ok: u64,
    pub denied: u64,
    pub error: u64,
}

pub fn burst(log: &str) -> Burst {
    parse_log(log)
        .iter()
        .rev()
        .find(|l| l.summary)
        .map(|l| Burst {
            attempts: l.num("attempts"),
            ok: l.num("ok"),
            denied: l.num("denied"),
            error: l.num("error"),
        })
        .unwrap_or_default()
}

impl std::ops::Sub for Burst {
    type Output = Burst;
    fn sub(self, o: Burst) -> Burst {
        Burst {
            attempts: self.attempts.saturating_sub(o.attempts),
            ok: self.ok.saturating_sub(o.ok),
            denied: self.denied.saturating_sub(o.denied),
            error: self.error.saturating_sub(o.error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_and_latest() {
        let log = "noise\n\
            imdsguard-probe seq=1 first=1 verdict=denied errno=1\n\
            imdsguard-probe seq=2 first=0 verdict=ok detail=i-1\n";
        let v = verdicts(log);
        assert_eq!(v.first.as_deref(), Some("denied"));
        assert_eq!(v.latest.as_deref(), Some("ok"));
        assert_eq!(v.probes, 2);
    }

    #[test]
    fn periods_and_answers_of_path_mode() {
        let log = "imdsguard-probe seq=1 first=1 path=/a verdict=denied status=- step=put token=0 errno=1 ms=0 detail=x\n\
            imdsguard-probe seq=1 first=1 path=/b verdict=denied status=- step=put token=0 errno=1 ms=0 detail=x\n\
            imdsguard-probe seq=2 first=0 path=/a verdict=ok status=200 step=get token=1 errno=- ms=1 body=us-east-1\n\
            imdsguard-probe seq=2 first=0 path=/b verdict=http status=403 step=get token=1 errno=- ms=1 body=no\n\
            imdsguard-probe seq=3 first=0 path=/a verdict=error status=- step=put token=0 errno=111 ms=1 detail=refused\n";
        let p = periods(log, &["/a", "/b"]);
        assert_eq!(p.iter().map(|p| p.seq).collect::<Vec<_>>(), [1, 2]);
        let answers = |i: usize| ["/a", "/b"].map(|path| answer(p[i].path(path).expect("a line")));
        assert_eq!(answers(0), ["EPERM", "EPERM"]);
        assert_eq!(answers(1), ["200", "403"]);
        let last = parse_log(log).pop().expect("a line");
        assert_eq!(answer(&last), "error(put,errno=111)");
        // The seed table reads path mode's verdicts too.
        assert_eq!(verdicts(log).first.as_deref(), Some("denied"));
    }

    #[test]
    fn burst_is_the_latest_summary() {
        let log = "imdsguard-probe summary attempts=10 ok=0 denied=10 error=0\n\
            imdsguard-probe seq=12 first=0 verdict=ok\n\
            imdsguard-probe summary attempts=15 ok=1 denied=14 error=0\n";
        assert_eq!(
            burst(log),
            Burst {
                attempts: 15,
                ok: 1,
                denied: 14,
                error: 0
            }
        );
    }
}
