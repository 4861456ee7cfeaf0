//! Scale, footprint, a denial flood and the iptables approach peers use,
//! against a real kube-apiserver and the real `imdsguard node` on this
//! kernel. Run with `cargo xtask bench-scale` (add `-- --help` for the
//! flags). Nothing is asserted: every figure is printed as a markdown table.
//!
//! - **Start-up:** for each `--pods` size, that many pods exist in the API
//!   (`spec.nodeName` = this node, half app=prod allowed by the seed policy,
//!   half app=test denied) with their kubelet-style cgroups. The agent is
//!   started `--repeats` times from no pins (cold) and over the pins of a
//!   killed agent (restart); the time runs from just before the spawn to
//!   the timestamp of its `ready` log line.
//! - **Footprint:** for each size, the agent's VmRSS and its CPU time over
//!   `--idle-secs` of idleness, and the kernel memory (`memlock` in fdinfo)
//!   of every BPF map and program it holds. At the first size, a pod churn
//!   of `--soak-secs` (create and delete pods and their cgroups, keeping
//!   `--churn-pods` alive) samples the RSS throughout.
//! - **Denial flood:** at the first size, one `tcp-loop` probe per CPU in a
//!   denied pod connects to 169.254.169.254:80 for `--flood-secs`, while the
//!   overhead worker runs from another pod. Arms: quiet, a control loop
//!   (same probes to an unprotected closed port: CPU contention without
//!   denials), and the flood; interleaved over `--flood-rounds`.
//! - **Comparison:** the overhead worker (TCP connect+close, UDP connect,
//!   UDP sendto to loopback) from a pod, with no rules, with one iptables
//!   REJECT rule, with one iptables DNAT-to-proxy rule, and with imdsguard
//!   attached; interleaved over `--rounds`. The rules live only in the
//!   lab's network namespace and are removed (`nft flush ruleset` there)
//!   between arms, so no netfilter hook stays registered.

use std::{
    collections::{BTreeMap, VecDeque},
    fmt::Write as _,
    fs,
    net::TcpListener,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail, ensure};
use imdsguard::{
    bpf::enforcer::{Attachment, Enforcer, MapState, Mode},
    bpf::pins::PinLayout,
    bpf::uninstall::uninstall,
    cgroup::mount::CgroupDir,
    destinations,
};
use imdsguard_testlab::{
    bench::WorkerReport,
    cgroups::TestCgroup,
    cluster::{Cluster, SEED_POLICY},
    daemon::{self, Daemon},
    kube_apiserver::KubeApiserver,
    lab::Lab,
    netns::NetNs,
    probe::{self, LoopReport, Outcome},
    stats::{median, min_max, ratio_cell},
};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::PostParams};
use procfs::{
    Current as _, LoadAverage, Meminfo,
    process::{FDTarget, Process},
};
use serde_json::Value;

const NS: &str = "imds";
const QOS_DIR: &str = "kubepods-besteffort.slice";
const IMDS: &str = "169.254.169.254:80";
/// Nothing listens there in the lab namespace: connects are refused.
const CLOSED_PORT: &str = "127.0.0.1:9";
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

const USAGE: &str = "\
imdsguard-scale-bench [--imdsguard PATH] [FLAGS]
  --pods A,B,..           pod counts on the node, ascending (110,1000,10000)
  --repeats N             agent starts per size and kind (5)
  --idle-secs N           idle interval for the CPU figure (10)
  --soak-secs N           pod churn at the first size; 0 skips it (60)
  --churn-pods N          churn pods alive at once during the soak (20)
  --flood-secs N          length of each flood arm (10)
  --flood-rounds N        interleaved rounds of the flood arms (3)
  --flood-iterations N    calls per operation of each worker run in a flood arm (5000)
  --rounds N              interleaved rounds of the iptables comparison (7)
  --iterations N          calls per operation in the comparison (20000)
  --create-concurrency N  parallel pod creations against the API server (16)";

struct Options {
    pods: Vec<u32>,
    repeats: u32,
    idle_secs: u64,
    soak_secs: u64,
    churn_pods: usize,
    flood_secs: u64,
    flood_rounds: u32,
    flood_iterations: u32,
    rounds: u32,
    iterations: u32,
    create_concurrency: usize,
}

impl Options {
    fn parse() -> anyhow::Result<Self> {
        let mut o = Self {
            pods: vec![110, 1000, 10_000],
            repeats: 5,
            idle_secs: 10,
            soak_secs: 60,
            churn_pods: 20,
            flood_secs: 10,
            flood_rounds: 3,
            flood_iterations: 5000,
            rounds: 7,
            iterations: 20_000,
            create_concurrency: 16,
        };
        fn num<T: std::str::FromStr>(flag: &str, v: Option<String>) -> anyhow::Result<T> {
            v.with_context(|| format!("{flag}: value missing"))?
                .parse()
                .map_err(|_| anyhow::anyhow!("{flag}: not a number"))
        }
        let mut args = std::env::args().skip(1);
        while let Some(flag) = args.next() {
            let f = flag.as_str();
            match f {
                "--imdsguard" => drop(args.next()),
                "--pods" => {
                    let v: String = num(f, args.next())?;
                    o.pods = v
                        .split(',')
                        .map(|s| s.trim().parse())
                        .collect::<Result<_, _>>()
                        .context("--pods: comma-separated numbers")?;
                }
                "--repeats" => o.repeats = num(f, args.next())?,
                "--idle-secs" => o.idle_secs = num(f, args.next())?,
                "--soak-secs" => o.soak_secs = num(f, args.next())?,
                "--churn-pods" => o.churn_pods = num(f, args.next())?,
                "--flood-secs" => o.flood_secs = num(f, args.next())?,
                "--flood-rounds" => o.flood_rounds = num(f, args.next())?,
                "--flood-iterations" => o.flood_iterations = num(f, args.next())?,
                "--rounds" => o.rounds = num(f, args.next())?,
                "--iterations" => o.iterations = num(f, args.next())?,
                "--create-concurrency" => o.create_concurrency = num(f, args.next())?,
                "--help" | "-h" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other:?}\n{USAGE}"),
            }
        }
        o.pods.sort_unstable();
        o.pods.dedup();
        ensure!(
            o.pods.first().is_some_and(|&n| n > 0),
            "--pods needs at least one count above 0"
        );
        ensure!(o.repeats > 0, "--repeats must be at least 1");
        ensure!(
            o.flood_secs >= 3,
            "--flood-secs must be at least 3 (ramp and drain)"
        );
        ensure!(
            o.rounds > 0 && o.flood_rounds > 0,
            "rounds must be at least 1"
        );
        ensure!(
            o.create_concurrency > 0,
            "--create-concurrency must be at least 1"
        );
        Ok(o)
    }
}

/// The node: the lab, the API, the agent's flags, and the pods with their
/// cgroups.
struct Node<'a> {
    bin: PathBuf,
    lab: &'a Lab,
    cluster: &'a Cluster,
    api: &'a KubeApiserver,
    kubepods: &'a TestCgroup,
    policy: PathBuf,
    /// Where the agent's kubeconfig is written.
    scratch: PathBuf,
    /// Pod `pod-N` and its cgroup, in creation order.
    pods: Vec<TestCgroup>,
}

impl Node<'_> {
    fn pod_dir(&self, uid: &str) -> PathBuf {
        self.kubepods.path().join(QOS_DIR).join(format!(
            "kubepods-besteffort-pod{}.slice",
            uid.replace('-', "_")
        ))
    }

    fn pins(&self) -> PinLayout {
        PinLayout::new(self.lab.pin_dir())
    }

    /// Creates pods (API objects, then cgroups) until there are `n`.
    fn grow_to(&mut self, n: u32, concurrency: usize) -> anyhow::Result<Duration> {
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

    /// Starts `imdsguard node` and times it to its `ready` line.
    fn start_agent(&self) -> anyhow::Result<(Daemon, Startup)> {
        let t0 = SystemTime::now();
        let i0 = Instant::now();
        let agent = imdsguard_testlab::cluster::start_agent(
            &self.bin,
            self.api,
            self.lab,
            self.kubepods.path(),
            &self.policy,
            &self.scratch,
            // Loopback, any free port: never the host's 0.0.0.0:9090.
            &["--metrics-addr", "127.0.0.1:0"],
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
            pods: ready["pods"].as_u64().unwrap_or(0),
            entries: ready["entries"].as_u64().unwrap_or(0),
            waiting: ready["waiting_for_cgroup"].as_u64().unwrap_or(0),
        };
        Ok((agent, startup))
    }

    fn counters(&self) -> anyhow::Result<Value> {
        Ok(daemon::status(&self.bin, &self.lab.pin_dir())?["counters"].clone())
    }

    fn allow_entries(&self) -> anyhow::Result<usize> {
        let status = daemon::status(&self.bin, &self.lab.pin_dir())?;
        Ok(status["allowed"].as_array().map_or(0, Vec::len))
    }

    /// The overhead worker from `cg`, in the lab namespace.
    fn worker(&self, cg: &TestCgroup, iterations: u32) -> anyhow::Result<WorkerReport> {
        let it = iterations.to_string();
        let child = self.lab.spawn_probe(Some(cg), &["bench", &it])?;
        probe::wait(child, Duration::from_secs(600))
    }
}

/// Creates BestEffort pods `names` on the node, `concurrency` at a time, in
/// namespace [`NS`], app=prod for even indexes and app=test for odd ones.
/// Returns their UIDs in order.
fn create_pods(
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
fn app_of(name: &str) -> &'static str {
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

/// One agent start.
#[derive(Clone, Copy, Debug)]
struct Startup {
    attached: Option<Duration>,
    ready: Duration,
    /// From the ready line: pods in the store, map entries, pods whose
    /// cgroup was missing.
    pods: u64,
    entries: u64,
    waiting: u64,
}

struct StartupRow {
    pods: u32,
    kind: &'static str,
    runs: Vec<Startup>,
}

struct FootprintRow {
    pods: u32,
    entries: u64,
    rss: u64,
    hwm: u64,
    cpu_pct: f64,
    idle: Duration,
    objects: Vec<BpfObject>,
}

fn main() -> anyhow::Result<()> {
    probe::run_if_probe();
    let bin = imdsguard_testlab::imdsguard_bin_arg()?;
    let o = Options::parse()?;
    let started = Instant::now();
    let load_at_start = loadavg();

    // Declaration order is the reverse of drop order: pod cgroups go first
    // (after the agent, which lives inside the phases), then the apiserver
    // and etcd, then the lab with its namespace and bpffs.
    let lab = Lab::new("scale-bench").context("set up the lab (run as root)")?;
    let api = KubeApiserver::start()
        .context("start kube-apiserver (run `cargo xtask kubernetes` once)")?;
    let dir = imdsguard_testlab::scratch::ScratchDir::new("imdsguard-scale-bench")?;
    let cluster = Cluster::new(&api, &dir.join("admin.kubeconfig"));
    cluster.apply_rbac();
    cluster.create_namespace(NS);
    let kubepods = lab.cgroup("kubepods.slice")?;
    let _besteffort = lab.cgroup(&format!("kubepods.slice/{QOS_DIR}"))?;
    let policy = dir.join("policy.yaml");
    fs::write(&policy, SEED_POLICY)?;
    let mut node = Node {
        bin,
        lab: &lab,
        cluster: &cluster,
        api: &api,
        kubepods: &kubepods,
        policy,
        scratch: dir.path().to_path_buf(),
        pods: Vec::new(),
    };

    let mut out = String::new();
    header(&mut out, &o, &node, &load_at_start)?;

    eprintln!("comparison: {} rounds", o.rounds);
    let cmp = comparison(&node, &o)?;

    let mut startups = Vec::new();
    let mut footprints = Vec::new();
    let mut flood_out = None;
    let mut soak_out = None;
    let mut creation = Vec::new();
    for (i, &size) in o.pods.iter().enumerate() {
        eprintln!("pods: growing to {size}");
        let took = node.grow_to(size, o.create_concurrency)?;
        creation.push((size, took));
        eprintln!("pods: {size} in the API with cgroups ({took:.1?}); start-up runs");
        startups.extend(startup(&node, size, o.repeats)?);
        eprintln!("footprint at {size} pods");
        let (agent, start) = node.start_agent()?;
        footprints.push(footprint(&agent, size, start.entries, o.idle_secs)?);
        if i == 0 {
            eprintln!("denial flood: {} rounds", o.flood_rounds);
            flood_out = Some(flood(&node, &agent, &o)?);
            if o.soak_secs > 0 {
                eprintln!("soak: {} s of pod churn", o.soak_secs);
                soak_out = Some(soak(&node, &agent, &o)?);
            }
        }
        drop(agent);
    }

    print_startup(&mut out, &startups, &creation, o.create_concurrency);
    print_footprint(&mut out, &footprints, o.idle_secs);
    if let Some(f) = &flood_out {
        out.push_str(f);
    }
    if let Some(s) = &soak_out {
        out.push_str(s);
    }
    out.push_str(&cmp);
    writeln!(
        out,
        "\nload average at the end: {}; whole run {:.0} s",
        loadavg(),
        started.elapsed().as_secs_f64()
    )?;
    print!("{out}");

    drop(node);
    drop(_besteffort);
    drop(kubepods);
    drop(cluster);
    drop(dir);
    drop(api);
    drop(lab);
    println!(
        "\ncleaned up: node agent, pod cgroups, kube-apiserver and etcd, lab namespace (with its netfilter rules), bpffs pins, temp files"
    );
    Ok(())
}

fn header(out: &mut String, o: &Options, node: &Node, load: &str) -> anyhow::Result<()> {
    // The whole string: procfs's KernelVersion keeps only major.minor.patch.
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem = Meminfo::current().map_or_else(
        |_| "?".into(),
        |m| format!("{:.0} GiB", m.mem_total as f64 / GIB),
    );
    let args: Vec<String> = std::env::args().skip(1).collect();
    writeln!(out, "# imdsguard scale bench\n")?;
    writeln!(
        out,
        "kernel {}, {} CPUs, {mem} RAM; load average at the start: {load}",
        kernel.trim(),
        std::thread::available_parallelism().map_or(0, usize::from)
    )?;
    writeln!(
        out,
        "agent: {} node (real kube-apiserver on 127.0.0.1, seed policy); pods in namespace {NS}, \
         half app=prod (allowed), half app=test (denied)",
        node.bin.display()
    )?;
    writeln!(out, "arguments: {}", args.join(" "))?;
    writeln!(
        out,
        "sizes: {:?} pods; {} start-ups per size and kind; idle {} s; soak {} s; flood {} x {} s",
        o.pods, o.repeats, o.idle_secs, o.soak_secs, o.flood_rounds, o.flood_secs
    )?;
    Ok(())
}

// ---------------------------------------------------------------- start-up

fn startup(node: &Node, size: u32, repeats: u32) -> anyhow::Result<[StartupRow; 2]> {
    let mut cold = Vec::new();
    let mut restart = Vec::new();
    for _ in 0..repeats {
        // Cold: nothing pinned, as on a fresh node.
        drop(uninstall(&node.pins())?);
        let (agent, s) = node.start_agent()?;
        cold.push(s);
        // SIGKILL: the pins stay, as after a crash or a rolling update.
        agent.kill();
        let (agent, s) = node.start_agent()?;
        restart.push(s);
        agent.kill();
    }
    Ok([
        StartupRow {
            pods: size,
            kind: "cold (no pins)",
            runs: cold,
        },
        StartupRow {
            pods: size,
            kind: "restart (pins adopted)",
            runs: restart,
        },
    ])
}

fn print_startup(
    out: &mut String,
    rows: &[StartupRow],
    creation: &[(u32, Duration)],
    concurrency: usize,
) {
    let _ = writeln!(
        out,
        "\n## Start-up: process start to the `ready` log line\n\n\
         `ready` comes after the programs are attached, both watches have listed, and \
         the allow map holds every pod. Times run from just before the spawn to the \
         timestamp of the log line; median (max) of the runs. Issue target: under 1 s at 110 pods.\n"
    );
    let _ = writeln!(
        out,
        "| pods on the node | start | runs | programs in place | ready: median | ready: max | pods seen / map entries / waiting for cgroup |\n|---|---|---|---|---|---|---|"
    );
    for r in rows {
        let ready: Vec<f64> = r.runs.iter().map(|s| ms(s.ready)).collect();
        let attached: Vec<f64> = r.runs.iter().filter_map(|s| s.attached.map(ms)).collect();
        let last = r.runs.last().copied();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.0} ms | {:.0} ms | {} |",
            r.pods,
            r.kind,
            r.runs.len(),
            if attached.is_empty() {
                "-".into()
            } else {
                format!("{:.0} ms ({:.0})", median(attached.clone()), max(&attached))
            },
            median(ready.clone()),
            max(&ready),
            last.map_or_else(
                || "-".into(),
                |s| format!("{} / {} / {}", s.pods, s.entries, s.waiting)
            )
        );
    }
    let _ = writeln!(
        out,
        "\nSetting the node up (pods created through the API, {concurrency} at a time, then their cgroups): {}",
        creation
            .iter()
            .map(|(n, d)| format!("{n} pods in {:.1} s", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join("; ")
    );
}

// --------------------------------------------------------------- footprint

fn footprint(
    agent: &Daemon,
    size: u32,
    entries: u64,
    idle_secs: u64,
) -> anyhow::Result<FootprintRow> {
    let pid = agent.pid();
    // Let the start-up's allocations and the first watch events settle.
    std::thread::sleep(Duration::from_secs(2));
    let (c0, t0) = (cpu_ticks(pid)?, Instant::now());
    std::thread::sleep(Duration::from_secs(idle_secs));
    let (c1, idle) = (cpu_ticks(pid)?, t0.elapsed());
    Ok(FootprintRow {
        pods: size,
        entries,
        rss: rss_kib(pid)?,
        hwm: hwm_kib(pid)?,
        cpu_pct: cpu_pct(c1 - c0, idle),
        idle,
        objects: bpf_objects(pid)?,
    })
}

fn print_footprint(out: &mut String, rows: &[FootprintRow], idle_secs: u64) {
    let _ = writeln!(
        out,
        "\n## Footprint while idle\n\n\
         VmRSS and VmHWM from /proc/PID/status after start-up and {idle_secs} s idle; \
         CPU is utime+stime over that interval (100% = one CPU); kernel memory is the \
         `memlock` of each BPF map and program the agent holds (fdinfo). Issue target: \
         VmRSS under 20 MiB at 110 pods.\n"
    );
    let _ = writeln!(
        out,
        "| pods on the node | allow-map entries | VmRSS | VmHWM (peak) | idle CPU | BPF maps | BPF programs |\n|---|---|---|---|---|---|---|"
    );
    for r in rows {
        let sum = |kind: &str| -> u64 {
            r.objects
                .iter()
                .filter(|o| o.kind == kind)
                .map(|o| o.memlock)
                .sum()
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} MiB | {:.1} MiB | {:.2}% over {:.0} s | {:.1} KiB | {:.1} KiB |",
            r.pods,
            r.entries,
            r.rss as f64 / 1024.0,
            r.hwm as f64 / 1024.0,
            r.cpu_pct,
            r.idle.as_secs_f64(),
            sum("map") as f64 / 1024.0,
            sum("prog") as f64 / 1024.0,
        );
    }
    // Per map, one column per size.
    let mut names: Vec<(String, String, u32)> = Vec::new();
    for r in rows {
        for m in r.objects.iter().filter(|o| o.kind == "map") {
            let key = (m.name.clone(), map_type_name(m.map_type), m.max_entries);
            if !names.contains(&key) {
                names.push(key);
            }
        }
    }
    let _ = writeln!(
        out,
        "\nPer map (memlock KiB):\n\n| map | type | max_entries |{}\n|---|---|---|{}",
        rows.iter()
            .map(|r| format!(" {} pods |", r.pods))
            .collect::<String>(),
        "---|".repeat(rows.len())
    );
    for (name, ty, max_entries) in &names {
        let cells: String = rows
            .iter()
            .map(|r| {
                r.objects
                    .iter()
                    .find(|o| o.kind == "map" && &o.name == name)
                    .map_or_else(
                        || " - |".to_string(),
                        |o| format!(" {:.1} |", o.memlock as f64 / 1024.0),
                    )
            })
            .collect();
        let _ = writeln!(out, "| {name} | {ty} | {max_entries} |{cells}");
    }
}

// ------------------------------------------------------------ denial flood

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Load {
    Quiet,
    Control,
    Denial,
}

impl Load {
    const ALL: [Load; 3] = [Load::Quiet, Load::Control, Load::Denial];
    fn name(self) -> &'static str {
        match self {
            Load::Quiet => "quiet",
            Load::Control => "control: connect loop to a closed unprotected port",
            Load::Denial => "denial flood: connect loop to 169.254.169.254:80",
        }
    }
}

#[derive(Default)]
struct FloodSamples {
    /// Per round: every worker run of the arm.
    workers: Vec<Vec<WorkerReport>>,
    cpu_pct: Vec<f64>,
    loops: LoopReport,
    secs: f64,
    denied: u64,
    dropped: u64,
    log_lines: usize,
    late: usize,
}

fn flood(node: &Node, agent: &Daemon, o: &Options) -> anyhow::Result<String> {
    let denied_uid = create_pods(node.cluster, vec!["flood-denied-1".into()], 1)?;
    let denied = TestCgroup::create(node.pod_dir(&denied_uid[0]))?;
    let other_uid = create_pods(node.cluster, vec!["flood-bystander-0".into()], 1)?;
    let bystander = TestCgroup::create(node.pod_dir(&other_uid[0]))?;
    // The agent has the deny entry before the flood starts.
    wait_for_entries(node, node.pods.len() + 2)?;
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let mut samples: BTreeMap<Load, FloodSamples> = BTreeMap::new();
    for round in 0..o.flood_rounds {
        let mut order = Load::ALL.to_vec();
        order.rotate_left(round as usize % Load::ALL.len());
        for load in order {
            let s = flood_arm(node, agent, load, &denied, &bystander, cpus, o)?;
            let e = samples.entry(load).or_default();
            e.workers.push(s.workers.into_iter().flatten().collect());
            e.cpu_pct.extend(s.cpu_pct);
            e.loops.reached += s.loops.reached;
            e.loops.eperm += s.loops.eperm;
            e.loops.other += s.loops.other;
            e.secs += s.secs;
            e.denied += s.denied;
            e.dropped += s.dropped;
            e.log_lines += s.log_lines;
            e.late += s.late;
        }
        eprintln!("flood round {}/{} done", round + 1, o.flood_rounds);
    }
    cluster_delete(node.cluster, &["flood-denied-1", "flood-bystander-0"]);
    drop(denied);
    drop(bystander);

    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## Denial flood ({} pods on the node)\n\n\
         {cpus} `tcp-loop` probes (one per CPU) in a denied pod, {} s per arm, {} interleaved rounds. \
         Meanwhile the overhead worker ({} calls per operation, run back to back) runs from \
         another pod to its own loopback listener. Worker cells: median ns per call, then the \
         median [min..max] of the per-round ratios against quiet. The control arm runs the same \
         probes against a closed port that imdsguard does not protect: it shows what CPU \
         contention alone costs on this {cpus}-CPU machine.\n",
        o.pods[0], o.flood_secs, o.flood_rounds, o.flood_iterations
    );
    let _ = writeln!(
        out,
        "| load | agent CPU: median (max) | probe connects/s | denied (kernel counter) | events_dropped | agent log lines | TCP connect+close | UDP connect | UDP sendto |\n|---|---|---|---|---|---|---|---|---|"
    );
    let quiet = &samples[&Load::Quiet];
    for (load, s) in &samples {
        let connects = (s.loops.reached + s.loops.eperm + s.loops.other) as f64 / s.secs.max(1e-9);
        let cell = |f: fn(&WorkerReport) -> f64| {
            let per_round: Vec<f64> = s
                .workers
                .iter()
                .map(|runs| median(runs.iter().map(f).collect()))
                .collect();
            let med = median(per_round.clone());
            if *load == Load::Quiet {
                return format!("{med:.0} ns");
            }
            let ratios: Vec<f64> = per_round
                .iter()
                .zip(&quiet.workers)
                .map(|(r, q)| r / median(q.iter().map(f).collect()))
                .collect();
            ratio_cell(med, &ratios)
        };
        let _ = writeln!(
            out,
            "| {} | {:.1}% ({:.1}%) | {} | {} | {} | {} | {} | {} | {} |",
            load.name(),
            median(s.cpu_pct.clone()),
            max(&s.cpu_pct),
            if *load == Load::Quiet {
                "-".into()
            } else {
                format!("{connects:.0} ({} EPERM)", s.loops.eperm)
            },
            s.denied,
            s.dropped,
            s.log_lines,
            cell(|r| r.tcp_connect_ns),
            cell(|r| r.udp_connect_ns),
            cell(|r| r.udp_sendto_ns),
        );
    }
    let late: usize = samples.values().map(|s| s.late).sum();
    if late > 0 {
        let _ = writeln!(
            out,
            "\nnote: {late} worker runs ended after their arm's window: lower --flood-iterations"
        );
    }
    Ok(out)
}

/// One flood arm: the probes for `flood_secs`, the worker back to back
/// inside that window, the agent's CPU time and the counters around it.
fn flood_arm(
    node: &Node,
    agent: &Daemon,
    load: Load,
    denied: &TestCgroup,
    bystander: &TestCgroup,
    cpus: usize,
    o: &Options,
) -> anyhow::Result<FloodSamples> {
    let pid = agent.pid();
    let window = Duration::from_secs(o.flood_secs);
    let c_before = node.counters()?;
    let logs_before = agent.logs().len();
    let (cpu0, t0) = (cpu_ticks(pid)?, Instant::now());
    let millis = window.as_millis().to_string();
    let target = match load {
        Load::Quiet => None,
        Load::Control => Some(CLOSED_PORT),
        Load::Denial => Some(IMDS),
    };
    let probes = match target {
        Some(t) => (0..cpus)
            .map(|_| {
                node.lab
                    .spawn_probe(Some(denied), &["tcp-loop", t, &millis])
            })
            .collect::<anyhow::Result<Vec<_>>>()?,
        None => Vec::new(),
    };
    // The probes start looping; the last half second is left for the worker
    // to finish before they stop.
    std::thread::sleep(Duration::from_millis(300));
    let end = t0 + window - Duration::from_millis(500);
    let mut workers = Vec::new();
    let mut last = Duration::ZERO;
    let mut late = 0;
    loop {
        let s = Instant::now();
        if !workers.is_empty() && s + last > end {
            break;
        }
        workers.push(node.worker(bystander, o.flood_iterations)?);
        last = s.elapsed();
        if Instant::now() > t0 + window {
            late += 1;
        }
    }
    if let Some(rest) = (t0 + window).checked_duration_since(Instant::now()) {
        std::thread::sleep(rest);
    }
    let mut loops = LoopReport::default();
    for p in probes {
        let r: LoopReport = probe::wait(p, window + Duration::from_secs(30))?;
        loops.reached += r.reached;
        loops.eperm += r.eperm;
        loops.other += r.other;
    }
    let (cpu1, secs) = (cpu_ticks(pid)?, t0.elapsed());
    let c_after = node.counters()?;
    let delta = |k: &str| {
        c_after[k]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(c_before[k].as_u64().unwrap_or(0))
    };
    Ok(FloodSamples {
        workers: vec![workers],
        cpu_pct: vec![cpu_pct(cpu1 - cpu0, secs)],
        loops,
        secs: secs.as_secs_f64(),
        denied: delta("denied"),
        dropped: delta("events_dropped"),
        log_lines: agent.logs().len() - logs_before,
        late,
    })
}

/// Waits (up to 30 s) until the allow map holds `n` entries; returns the
/// count last seen.
fn wait_for_entries(node: &Node, n: usize) -> anyhow::Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let entries = node.allow_entries()?;
        if entries == n || Instant::now() > deadline {
            return Ok(entries);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn cluster_delete(cluster: &Cluster, names: &[&str]) {
    for n in names {
        cluster.delete_pod(NS, n);
    }
}

// -------------------------------------------------------------------- soak

fn soak(node: &Node, agent: &Daemon, o: &Options) -> anyhow::Result<String> {
    let pid = agent.pid();
    // Every pod of the node has an entry (allow or deny); the flood's pods
    // are gone again.
    let base = node.pods.len();
    wait_for_entries(node, base)?;
    let rss0 = rss_kib(pid)?;
    let interval = Duration::from_secs((o.soak_secs / 12).max(5));
    let (cpu0, t0) = (cpu_ticks(pid)?, Instant::now());
    let end = t0 + Duration::from_secs(o.soak_secs);
    let mut alive: VecDeque<(String, TestCgroup)> = VecDeque::new();
    let mut samples = vec![(Duration::ZERO, rss0)];
    let mut next_sample = t0 + interval;
    let (mut created, mut deleted) = (0u64, 0u64);
    let reconciles = |a: &Daemon| {
        a.logs()
            .iter()
            .filter(|v| daemon::message(v) == Some("allow map reconciled"))
            .count()
    };
    let reconciles0 = reconciles(agent);
    while Instant::now() < end {
        let name = format!("churn-{created}");
        let uid = node.cluster.create_pod(NS, &name, app_of(&name));
        alive.push_back((name, TestCgroup::create(node.pod_dir(&uid))?));
        created += 1;
        if alive.len() > o.churn_pods
            && let Some((name, cg)) = alive.pop_front()
        {
            node.cluster.delete_pod(NS, &name);
            drop(cg);
            deleted += 1;
        }
        if Instant::now() >= next_sample {
            samples.push((t0.elapsed(), rss_kib(pid)?));
            next_sample += interval;
        }
    }
    let churn_secs = t0.elapsed();
    while let Some((name, cg)) = alive.pop_front() {
        node.cluster.delete_pod(NS, &name);
        drop(cg);
        deleted += 1;
    }
    // Converged: the map is back to the pods that stayed.
    let entries = wait_for_entries(node, base)?;
    std::thread::sleep(Duration::from_secs(2));
    let cpu1 = cpu_ticks(pid)?;
    let rss1 = rss_kib(pid)?;
    samples.push((t0.elapsed(), rss1));
    let hwm = hwm_kib(pid)?;

    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## Soak: pod churn at {} pods\n\n\
         For {:.0} s, pods are created (API object, then cgroup) and the oldest deleted \
         (API object, then cgroup) so that {} churn pods stay alive; then the rest are deleted \
         and the agent converges. Issue target: no RSS growth.\n",
        o.pods[0],
        churn_secs.as_secs_f64(),
        o.churn_pods
    );
    let _ = writeln!(
        out,
        "| churn | pods created / deleted | map reconciles | agent CPU | VmRSS before | VmRSS after | VmHWM | allow-map entries before / after |\n|---|---|---|---|---|---|---|---|"
    );
    let _ = writeln!(
        out,
        "| {:.0} s | {created} / {deleted} ({:.0}/s) | {} | {:.1}% | {:.1} MiB | {:.1} MiB | {:.1} MiB | {base} / {entries} |",
        churn_secs.as_secs_f64(),
        created as f64 / churn_secs.as_secs_f64(),
        reconciles(agent) - reconciles0,
        cpu_pct(cpu1 - cpu0, t0.elapsed()),
        rss0 as f64 / 1024.0,
        rss1 as f64 / 1024.0,
        hwm as f64 / 1024.0,
    );
    let _ = writeln!(
        out,
        "\nVmRSS over time (s: MiB): {}",
        samples
            .iter()
            .map(|(t, kib)| format!("{:.0}: {:.1}", t.as_secs_f64(), *kib as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(out)
}

// -------------------------------------------------------------- comparison

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Guard {
    NoRules,
    Reject,
    Dnat,
    Imdsguard,
}

impl Guard {
    const ALL: [Guard; 4] = [Guard::NoRules, Guard::Reject, Guard::Dnat, Guard::Imdsguard];
    fn name(self) -> &'static str {
        match self {
            Guard::NoRules => "no rules, nothing attached",
            Guard::Reject => "iptables REJECT (filter OUTPUT)",
            Guard::Dnat => "iptables DNAT to a proxy (nat OUTPUT, conntrack)",
            Guard::Imdsguard => "imdsguard (connect4/6)",
        }
    }

    /// The arm's iptables rule, if it has one.
    fn rule(self, proxy_port: u16) -> Option<String> {
        match self {
            Guard::Reject => Some("-A OUTPUT -d 169.254.169.254 -p tcp -j REJECT".into()),
            Guard::Dnat => Some(format!(
                "-t nat -A OUTPUT -d 169.254.169.254 -p tcp --dport 80 -j DNAT --to-destination 127.0.0.1:{proxy_port}"
            )),
            Guard::NoRules | Guard::Imdsguard => None,
        }
    }
}

fn comparison(node: &Node, o: &Options) -> anyhow::Result<String> {
    let ns = node.lab.netns();
    let version = netfilter_version(ns)?;
    let proxy = ProxyStub::start(ns)?;
    let pod = TestCgroup::create(node.kubepods.path().join(QOS_DIR).join("comparison-pod"))?;
    let _reset = NetfilterReset(ns);
    let pins = node.pins();
    let attachment = Attachment {
        cgroup_root: CgroupDir::open(node.kubepods.path())?,
        attach_at: None,
        pins: pins.clone(),
        udp: false,
        deny_raw_sockets: false,
        judge_socket_creators: false,
        filter: None,
    };
    let desired = MapState {
        mode: Mode::Enforce,
        allowed: Some(BTreeMap::new()),
        destinations: destinations::compile(&destinations::defaults())?,
    };
    let mut results: BTreeMap<Guard, Vec<WorkerReport>> = BTreeMap::new();
    let mut checks = Vec::new();
    for round in 0..o.rounds {
        let mut order = Guard::ALL.to_vec();
        order.rotate_left(round as usize % Guard::ALL.len());
        for guard in order {
            drop(uninstall(&pins)?);
            netfilter_flush(ns)?;
            let _enforcer: Option<Enforcer> = match guard {
                Guard::Imdsguard => Some(Enforcer::start(attachment.clone(), &desired)?.0),
                _ => {
                    if let Some(rule) = guard.rule(proxy.port) {
                        iptables(ns, &rule)?;
                    }
                    None
                }
            };
            if round == 0 {
                checks.push(check_guard(node, &pod, &proxy, guard)?);
            }
            results
                .entry(guard)
                .or_default()
                .push(node.worker(&pod, o.iterations)?);
        }
        eprintln!("comparison round {}/{} done", round + 1, o.rounds);
    }
    drop(uninstall(&pins)?);
    netfilter_flush(ns)?;

    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## Comparison with the iptables approach ({} interleaved rounds x {} calls)\n\n\
         The overhead worker from a pod cgroup below kubepods, in the lab's network namespace, \
         to its own loopback listener and sink (unprotected destinations). The rules are the \
         ones peers install, in that namespace only ({version}); all tables are removed between \
         arms. Cells: median ns per call, then the median [min..max] of the per-round ratios \
         against no rules.\n",
        o.rounds, o.iterations
    );
    let _ = writeln!(
        out,
        "| arm | TCP connect+close | UDP connect | UDP sendto |\n|---|---|---|---|"
    );
    let base = &results[&Guard::NoRules];
    for (guard, runs) in &results {
        let cell = |f: fn(&WorkerReport) -> f64| {
            let med = median(runs.iter().map(f).collect());
            if *guard == Guard::NoRules {
                return format!("{med:.0} ns");
            }
            let ratios: Vec<f64> = runs.iter().zip(base).map(|(r, b)| f(r) / f(b)).collect();
            ratio_cell(med, &ratios)
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            guard.name(),
            cell(|r| r.tcp_connect_ns),
            cell(|r| r.udp_connect_ns),
            cell(|r| r.udp_sendto_ns)
        );
    }
    let _ = writeln!(out, "\nRules (`iptables ...` in the lab namespace):");
    for guard in Guard::ALL {
        if let Some(rule) = guard.rule(proxy.port) {
            let _ = writeln!(out, "- {}: `iptables {rule}`", guard.name());
        }
    }
    let _ = writeln!(
        out,
        "\nEach arm was checked in round 1 with a TCP connect from the pod to {IMDS}:"
    );
    for c in checks {
        let _ = writeln!(out, "- {c}");
    }
    Ok(out)
}

/// Proves the arm does what it claims, from the pod the worker runs in.
fn check_guard(
    node: &Node,
    pod: &TestCgroup,
    proxy: &ProxyStub,
    guard: Guard,
) -> anyhow::Result<String> {
    let accepted = proxy.accepts();
    let outcome = node.lab.probe(Some(pod), "tcp", IMDS)?;
    let via_proxy = proxy.accepts() > accepted;
    let ok = match guard {
        Guard::NoRules => outcome.reached() && !via_proxy,
        Guard::Reject => matches!(
            outcome,
            Outcome::Failed {
                errno: Some(libc::ECONNREFUSED),
                ..
            }
        ),
        Guard::Dnat => outcome.reached() && via_proxy,
        Guard::Imdsguard => outcome.eperm(),
    };
    ensure!(
        ok,
        "{}: unexpected outcome {outcome:?} (proxy reached: {via_proxy})",
        guard.name()
    );
    Ok(format!(
        "{}: {}",
        guard.name(),
        match guard {
            Guard::NoRules => "reached the fake metadata server".to_string(),
            Guard::Reject => "ECONNREFUSED".to_string(),
            Guard::Dnat => format!("reached the proxy stub on 127.0.0.1:{}", proxy.port),
            Guard::Imdsguard => "EPERM".to_string(),
        }
    ))
}

/// `iptables -V`, which must be the nf_tables backend: its tables can be
/// deleted between arms, where legacy tables stay registered for the life
/// of the namespace.
fn netfilter_version(ns: &NetNs) -> anyhow::Result<String> {
    let out = ns
        .command("iptables")
        .arg("-V")
        .output()
        .context("run iptables (`cargo xtask bench-scale` installs it)")?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    ensure!(
        v.contains("nf_tables"),
        "iptables is {v:?}: the comparison needs the nf_tables backend"
    );
    netfilter_flush(ns)?;
    Ok(v)
}

/// `iptables RULE` in the lab namespace; RULE is split on whitespace.
fn iptables(ns: &NetNs, rule: &str) -> anyhow::Result<()> {
    let out = ns
        .command("iptables")
        .args(rule.split_whitespace())
        .output()
        .context("run iptables")?;
    ensure!(
        out.status.success(),
        "iptables {rule}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Deletes every table in the lab namespace (unregistering their hooks)
/// and checks that nothing is left.
fn netfilter_flush(ns: &NetNs) -> anyhow::Result<()> {
    let run = |args: &[&str]| -> anyhow::Result<String> {
        let out = ns
            .command("nft")
            .args(args)
            .output()
            .context("run nft (`cargo xtask bench-scale` installs nftables)")?;
        ensure!(
            out.status.success(),
            "nft {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    run(&["flush", "ruleset"])?;
    let left = run(&["list", "ruleset"])?;
    ensure!(
        left.trim().is_empty(),
        "tables left in the lab namespace: {left}"
    );
    Ok(())
}

/// Removes the lab namespace's tables on the way out, even on error (the
/// namespace itself goes with the lab anyway).
struct NetfilterReset<'a>(&'a NetNs);

impl Drop for NetfilterReset<'_> {
    fn drop(&mut self) {
        let _ = self.0.command("nft").args(["flush", "ruleset"]).output();
    }
}

/// What the DNAT rule points at: a listener on 127.0.0.1 in the lab
/// namespace that accepts and closes, counting connections.
struct ProxyStub {
    port: u16,
    accepts: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ProxyStub {
    fn start(ns: &NetNs) -> anyhow::Result<Self> {
        let ns_fd = ns.raw_fd();
        let accepts = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel::<anyhow::Result<u16>>();
        let (a, s) = (accepts.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let bound = (|| {
                // SAFETY: moves only this thread into the namespace; the fd
                // outlives the thread, which is joined when the stub drops,
                // before the lab (and its namespace) does.
                if unsafe { libc::setns(ns_fd, libc::CLONE_NEWNET) } != 0 {
                    bail!("setns: {}", std::io::Error::last_os_error());
                }
                let l = TcpListener::bind("127.0.0.1:0")?;
                l.set_nonblocking(true)?;
                Ok(l)
            })();
            let l = match bound {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let _ = tx.send(l.local_addr().map(|a| a.port()).map_err(Into::into));
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok(_) => {
                        a.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        let port = rx.recv().context("proxy stub thread")??;
        Ok(Self {
            port,
            accepts,
            stop,
            thread: Some(thread),
        })
    }

    fn accepts(&self) -> u64 {
        // The stub polls every 2 ms: give it time to see a fresh connection.
        std::thread::sleep(Duration::from_millis(20));
        self.accepts.load(Ordering::Relaxed)
    }
}

impl Drop for ProxyStub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ------------------------------------------------------ /proc and fdinfo

fn process(pid: u32) -> anyhow::Result<Process> {
    Process::new(i32::try_from(pid)?).with_context(|| format!("open /proc/{pid}"))
}

/// Resident set size, in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = process(pid)?.status();
    let status = status.with_context(|| format!("read /proc/{pid}/status"))?;
    status
        .vmrss
        .with_context(|| format!("VmRSS missing from /proc/{pid}/status"))
}

/// Peak resident set size ("high water mark"), in KiB.
fn hwm_kib(pid: u32) -> anyhow::Result<u64> {
    let status = process(pid)?.status();
    let status = status.with_context(|| format!("read /proc/{pid}/status"))?;
    status
        .vmhwm
        .with_context(|| format!("VmHWM missing from /proc/{pid}/status"))
}

/// utime + stime of the whole process, in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = process(pid)?
        .stat()
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    Ok(stat.utime + stat.stime)
}

/// CPU time as a percentage of one CPU over `wall`.
fn cpu_pct(ticks: u64, wall: Duration) -> f64 {
    let hz = procfs::ticks_per_second().max(1) as f64;
    ticks as f64 / hz / wall.as_secs_f64() * 100.0
}

/// A BPF map or program held by a process, from its fdinfo.
#[derive(Clone, Debug)]
struct BpfObject {
    kind: &'static str,
    name: String,
    map_type: u32,
    max_entries: u32,
    memlock: u64,
}

fn bpf_objects(pid: u32) -> anyhow::Result<Vec<BpfObject>> {
    let mut seen: BTreeMap<(&'static str, u32), BpfObject> = BTreeMap::new();
    let process = process(pid)?;
    let fds = process
        .fd()
        .with_context(|| format!("list /proc/{pid}/fd"))?;
    // procfs skips an fd closed since the listing.
    for fd in fds {
        let fd = fd.with_context(|| format!("list /proc/{pid}/fd"))?;
        let kind = match &fd.target {
            FDTarget::AnonInode(k) if k == "bpf-map" => "map",
            FDTarget::AnonInode(k) if k == "bpf-prog" => "prog",
            _ => continue,
        };
        // Hand-parsed: procfs has no reader for fdinfo's BPF keys (map_id,
        // prog_id, map_type, max_entries, memlock).
        let info = process
            .open_relative(format!("fdinfo/{}", fd.fd))
            .ok()
            .and_then(|f| std::io::read_to_string(f).ok());
        let Some(info) = info else {
            continue;
        };
        let field = |k: &str| -> u64 {
            info.lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let id = field(if kind == "map" { "map_id" } else { "prog_id" }) as u32;
        let name = if kind == "map" {
            aya::maps::MapInfo::from_id(id)
                .ok()
                .and_then(|i| i.name_as_str().map(String::from))
        } else {
            aya::programs::loaded_programs()
                .filter_map(Result::ok)
                .find(|p| p.id() == id)
                .and_then(|p| p.name_as_str().map(String::from))
        };
        seen.insert(
            (kind, id),
            BpfObject {
                kind,
                name: name.unwrap_or_else(|| format!("id {id}")),
                map_type: field("map_type") as u32,
                max_entries: field("max_entries") as u32,
                memlock: field("memlock"),
            },
        );
    }
    Ok(seen.into_values().collect())
}

fn map_type_name(t: u32) -> String {
    match t {
        1 => "hash".into(),
        2 => "array".into(),
        5 => "percpu_hash".into(),
        6 => "percpu_array".into(),
        9 => "lru_hash".into(),
        11 => "lpm_trie".into(),
        27 => "ringbuf".into(),
        other => format!("type {other}"),
    }
}

fn loadavg() -> String {
    // As /proc/loadavg prints them.
    LoadAverage::current()
        .map(|l| format!("{:.2} {:.2} {:.2}", l.one, l.five, l.fifteen))
        .unwrap_or_default()
}

/// Parses tracing-subscriber's JSON timestamps, e.g.
/// `2026-11-27T04:49:40.123456Z` (UTC).
fn parse_timestamp(s: &str) -> Option<SystemTime> {
    let (date, time) = s.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<i64>().ok());
    let (h, mi, sec) = (t.next()??, t.next()??, t.next()??);
    let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
    let nanos: u32 = digits.parse().ok()?;
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
    // days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let secs = u64::try_from(days * 86_400 + h * 3600 + mi * 60 + sec).ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

// ------------------------------------------------------------------ stats

fn max(v: &[f64]) -> f64 {
    min_max(v).1
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        let t = parse_timestamp("1970-01-02T00:00:01.5Z").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap(),
            Duration::from_millis(86_401_500)
        );
        let t = parse_timestamp("2024-03-01T12:00:00.000001Z").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap(),
            Duration::new(1_709_294_400, 1000)
        );
        assert!(parse_timestamp("2024-03-01 12:00:00").is_none());
    }

    #[test]
    fn proc_readers_read_this_process() {
        let pid = std::process::id();
        let (rss, hwm) = (rss_kib(pid).unwrap(), hwm_kib(pid).unwrap());
        assert!(rss > 0 && hwm >= rss, "{rss} {hwm}");
        cpu_ticks(pid).unwrap();
        assert!(bpf_objects(pid).unwrap().is_empty());
        assert_eq!(loadavg().split(' ').count(), 3, "{}", loadavg());
        assert!(rss_kib(u32::MAX).is_err());
    }

    #[test]
    fn apps() {
        assert_eq!(app_of("pod-0"), "prod");
        assert_eq!(app_of("churn-7"), "test");
        assert_eq!(app_of("flood-denied-1"), "test");
    }
}
