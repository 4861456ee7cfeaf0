//! Part 1: one metadata GET direct against through the proxy, GETs per
//! second each way, and the daemon's memory around the load.

use imdsguard_testlab::{
    bench_http::{Latencies, Throughput},
    cgroups::TestCgroup,
};

use super::{Bench, Options, PATH, TARGET};

/// The nearest-rank percentile `p` (0..=100) of sorted `v`, in µs.
fn percentile_us(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

/// The daemon's resident and peak resident memory in KiB, from procfs.
fn memory_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = procfs::process::Process::new(i32::try_from(pid)?)?.status()?;
    Ok((status.vmrss.unwrap_or(0), status.vmhwm.unwrap_or(0)))
}

pub fn run(bench: &Bench, o: &Options) -> anyhow::Result<()> {
    let daemon = bench.daemon(true)?;
    let arms: [(&str, &TestCgroup); 2] = [
        ("direct (allowed pod)", &bench.allowed),
        ("through the proxy (filtered pod)", &bench.filtered),
    ];
    // Both ways must work before anything is timed.
    for (name, cg) in arms {
        bench
            .worker::<Latencies>(cg, &["http-get", TARGET, PATH, "1"])
            .map_err(|e| e.context(format!("one GET {name}")))?;
    }
    let before = memory_kib(daemon.pid())?;

    let mut samples: [Vec<u64>; 2] = Default::default();
    let n = o.requests.to_string();
    for round in 0..o.rounds {
        // Alternate which arm goes first, so drift hits both alike.
        for i in [0, 1].map(|i| (i + round as usize) % 2) {
            let r: Latencies = bench.worker(arms[i].1, &["http-get", TARGET, PATH, &n])?;
            samples[i].extend(r.ns);
        }
        eprintln!("latency round {}/{} done", round + 1, o.rounds);
    }

    let millis = ((o.rps_secs * 1000.0) as u64).max(1).to_string();
    let clients = o.clients.to_string();
    let mut rps = [0.0; 2];
    let mut proxied = samples[1].len() as u64;
    for (i, (_, cg)) in arms.iter().enumerate() {
        let t: Throughput = bench.worker(cg, &["http-rps", TARGET, PATH, &clients, &millis])?;
        rps[i] = t.requests as f64 / t.secs;
        if i == 1 {
            proxied += t.requests;
        }
    }
    let after = memory_kib(daemon.pid())?;
    drop(daemon);

    println!(
        "\n## Filter mode: one metadata GET (fresh TCP connection, IMDSv2 GET {PATH}), {} interleaved rounds x {} GETs per arm",
        o.rounds, o.requests
    );
    println!(
        "The upstream is the lab's fake IMDS (one thread, one request per connection) for both arms.\n"
    );
    println!("| arm | p50 | p90 | p99 | GETs/s ({} clients) |", o.clients);
    println!("|---|---|---|---|---|");
    let mut pct = [[0.0; 3]; 2];
    for (i, (name, _)) in arms.iter().enumerate() {
        samples[i].sort_unstable();
        pct[i] = [50.0, 90.0, 99.0].map(|p| percentile_us(&samples[i], p));
        println!(
            "| {name} | {:.1} µs | {:.1} µs | {:.1} µs | {:.0} |",
            pct[i][0], pct[i][1], pct[i][2], rps[i]
        );
    }
    println!(
        "| added by the proxy | {:+.1} µs | {:+.1} µs | {:+.1} µs | {:.2}x |",
        pct[1][0] - pct[0][0],
        pct[1][1] - pct[0][1],
        pct[1][2] - pct[0][2],
        rps[1] / rps[0]
    );
    println!(
        "\ndaemon memory (VmRSS): {} KiB before the load, {} KiB after it ({proxied} proxied GETs, token PUTs aside); peak (VmHWM) {} KiB\n",
        before.0, after.0, after.1
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::percentile_us;

    #[test]
    fn nearest_rank() {
        let v: Vec<u64> = (1..=100).map(|x| x * 1000).collect();
        assert_eq!(percentile_us(&v, 50.0), 50.0);
        assert_eq!(percentile_us(&v, 99.0), 99.0);
        assert_eq!(percentile_us(&v, 100.0), 100.0);
        assert_eq!(percentile_us(&[7000], 99.0), 7.0);
        assert!(percentile_us(&[], 50.0).is_nan());
    }
}
