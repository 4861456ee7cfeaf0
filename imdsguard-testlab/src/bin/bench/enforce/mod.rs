//! Time to enforce: how long the node agent takes to turn a Kubernetes
//! change into an allow-map change, against a real kube-apiserver and the
//! real `imdsguard node` on this kernel (`imdsguard-bench enforce`). Run
//! with `cargo xtask bench-enforce` (add `-- --iterations N
//! --background-pods N` to change sizes).
//!
//! - **label patch -> map:** a pod of namespace `imds` whose cgroup exists is
//!   relabelled app=test -> app=prod (merge patch, admin client); t0 is taken
//!   just before the patch is sent, t1 when the pinned allow map holds an
//!   allow entry for its cgroup id. Then back to app=test, until the entry
//!   is no longer an allow entry (the deny rule makes it an enforce entry).
//! - **pod cgroup mkdir -> map:** an app=prod pod is created first and the
//!   agent given `--settle-ms` to see it; t0 is taken just before kubelet's
//!   mkdir of the pod cgroup (played by this process), t1 when the new
//!   cgroup id has an allow entry.
//!
//! The map is read through the pin with bpf(2) lookups every 100 µs, from a
//! thread that is already polling when t0 is taken. Nothing is asserted.

mod allow_map;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use imdsguard::bpf::pins::PinLayout;
use imdsguard_testlab::{
    cgroups::TestCgroup,
    cluster::{Cluster, NODE},
    cluster::{SEED_POLICY, start_agent},
    daemon,
    kube_apiserver::KubeApiserver,
    lab::Lab,
};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::ListParams};

use allow_map::AllowMap;

/// `imdsguard_common::map_names::ALLOWED` (that crate is not a dependency
/// of the testlab).
const ALLOWED_MAP: &str = "IMDSG_ALLOWED";
/// `imdsguard_common::action::ALLOW`: the first u32 of the map value.
const ACTION_ALLOW: u32 = 1;
const POLL: Duration = Duration::from_micros(100);
const CAP: Duration = Duration::from_secs(10);
const QOS_DIR: &str = "kubepods-besteffort.slice";

/// `imdsguard-bench enforce`: time from a Kubernetes change to the map.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// Timed changes per metric.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    iterations: u32,
    /// Other pods on the node, with their cgroups.
    #[arg(long, default_value_t = 20)]
    background_pods: u32,
    /// Untimed changes before the timed ones.
    #[arg(long, default_value_t = 2)]
    warmup: u32,
    /// Time the agent is given to see a new pod before its cgroup is made.
    #[arg(long, default_value_t = 200)]
    settle_ms: u32,
}

/// Runs the bench against the `imdsguard` binary `bin`.
pub fn run(o: &Options, bin: PathBuf) -> anyhow::Result<()> {
    let (iterations, background, warmup) = (o.iterations, o.background_pods, o.warmup);
    let settle = Duration::from_millis(o.settle_ms.into());

    // Declaration order is the reverse of drop order: the agent dies first,
    // then the cgroups go, then the apiserver and etcd, then the lab.
    let lab = Lab::new("enforce-bench").context("set up the lab (run as root)")?;
    let api = KubeApiserver::start()
        .context("start kube-apiserver (run `cargo xtask kubernetes` once)")?;
    let dir = imdsguard_testlab::scratch::ScratchDir::new("imdsguard-bench-enforce")?;
    let cluster = Cluster::new(&api, &dir.join("admin.kubeconfig"));
    cluster.apply_rbac();
    cluster.create_namespace("imds");
    cluster.create_namespace("other");
    let kubepods = lab.cgroup("kubepods.slice")?;
    // QoS parents exist before any pod, as on a node.
    let _besteffort = lab.cgroup(&format!("kubepods.slice/{QOS_DIR}"))?;
    let pod_dir = |uid: &str| {
        kubepods.path().join(QOS_DIR).join(format!(
            "kubepods-besteffort-pod{}.slice",
            uid.replace('-', "_")
        ))
    };

    // Other pods on the node, with their cgroups: allowed, denied, and not
    // matched by any rule.
    let mut cgroups = Vec::new();
    for i in 0..background {
        let (ns, app) = match i % 4 {
            0 => ("imds", "prod"),
            1 => ("imds", "test"),
            2 => ("other", "prod"),
            _ => ("other", "test"),
        };
        let uid = cluster.create_pod(ns, &format!("background-{i}"), app);
        cgroups.push(TestCgroup::create(pod_dir(&uid))?);
    }
    let label_uid = cluster.create_pod("imds", "bench-label", "test");
    let label_cg = TestCgroup::create(pod_dir(&label_uid))?;

    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, SEED_POLICY)?;
    let agent = start_agent(
        &bin,
        &api,
        &lab,
        kubepods.path(),
        &policy,
        dir.path(),
        &["--policy-poll-ms", "1000"],
    )
    .context("start the node agent")?;
    let map = AllowMap::open(&PinLayout::new(lab.pin_dir()).map(ALLOWED_MAP))?;

    let label_id = label_cg.id();
    // The deny rule gives the app=test pod an enforce entry: the agent has it.
    poll_until(&map, label_id, |a| a.is_some_and(|a| a != ACTION_ALLOW))
        .context("bench-label never got its deny entry")?;
    let store = cluster.rt.block_on(
        Api::<Pod>::all(cluster.admin.clone())
            .list(&ListParams::default().fields(&format!("spec.nodeName={NODE}"))),
    )?;

    println!(
        "\ntime to enforce: real kube-apiserver + `imdsguard node` (pid {}), kernel {}, {} CPUs",
        agent.pid(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    let actions = map.actions()?;
    let allow = actions.iter().filter(|&&a| a == ACTION_ALLOW).count();
    println!(
        "pods on the node (the agent's store): {} ({background} background + bench-label); \
         allow map: {} entries ({allow} allow, {} deny)",
        store.items.len(),
        actions.len(),
        actions.len() - allow
    );
    println!(
        "{iterations} iterations per metric after {warmup} warm-up; map polled every {} µs\n",
        POLL.as_micros()
    );

    // 1. Label patch -> map.
    let mut to_prod = Vec::new();
    let mut to_test = Vec::new();
    for i in 0..warmup + iterations {
        let up = time_patch(&cluster, &map, label_id, "prod", |a| {
            a == Some(ACTION_ALLOW)
        })?;
        let down = time_patch(&cluster, &map, label_id, "test", |a| {
            a.is_some_and(|a| a != ACTION_ALLOW)
        })?;
        if i >= warmup {
            to_prod.push(up);
            to_test.push(down);
        }
    }
    eprintln!("label patches done");

    // 2. Pod cgroup creation -> map.
    let mut created = Vec::new();
    for i in 0..warmup + iterations {
        let name = format!("bench-new-{i}");
        let uid = cluster.create_pod("imds", &name, "prod");
        std::thread::sleep(settle);
        let path = pod_dir(&uid);
        let t0 = Instant::now();
        let cg = TestCgroup::create(path)?;
        let id = cg.id();
        let t1 = poll_until(&map, id, |a| a == Some(ACTION_ALLOW))
            .with_context(|| format!("{name}: no allow entry after its cgroup was created"))?;
        if i >= warmup {
            created.push(t1 - t0);
        }
        cluster.delete_pod("imds", &name);
        drop(cg);
        poll_until(&map, id, |a| a.is_none())
            .with_context(|| format!("{name}: entry left after the pod was deleted"))?;
    }
    eprintln!("pod cgroup creations done");

    // The agent's own time per reconcile (compute + map sync), from its log.
    let reconciles: Vec<Duration> = agent
        .logs()
        .iter()
        .filter(|v| daemon::message(v) == Some("allow map reconciled"))
        .filter_map(|v| v["micros"].as_u64())
        .map(Duration::from_micros)
        .collect();

    println!(
        "{:<44} {:>5} {:>11} {:>11} {:>11}",
        "METRIC", "N", "MEDIAN ms", "P99 ms", "MAX ms"
    );
    for (name, samples) in [
        ("label app=test -> prod: allow entry", &to_prod),
        ("label app=prod -> test: allow entry gone", &to_test),
        ("pod cgroup mkdir: allow entry", &created),
        ("(agent log: each map-changing reconcile)", &reconciles),
    ] {
        row(name, samples);
    }
    let mut both = to_prod.clone();
    both.extend(&to_test);
    row("label patch, both directions", &both);

    drop(agent);
    drop(label_cg);
    drop(cgroups);
    drop(kubepods);
    drop(cluster);
    drop(dir);
    drop(api);
    drop(lab);
    println!("\ncleaned up: node agent, kube-apiserver and etcd, cgroups, bpffs pins, temp files");
    Ok(())
}

/// Merge-patches `bench-label`'s app label; returns the time from just
/// before the patch is sent until `want` holds for its map entry.
fn time_patch(
    cluster: &Cluster,
    map: &AllowMap,
    id: u64,
    app: &str,
    want: fn(Option<u32>) -> bool,
) -> anyhow::Result<Duration> {
    std::thread::scope(|s| {
        // Polls from before t0: the entry may change before the patch
        // response arrives.
        let poller = s.spawn(|| poll_until(map, id, want));
        let t0 = Instant::now();
        cluster.label("imds", "bench-label", app);
        let t1 = poller
            .join()
            .map_err(|_| anyhow::anyhow!("poller panicked"))?
            .with_context(|| format!("relabel to app={app}: map never followed"))?;
        Ok(t1.saturating_duration_since(t0))
    })
}

/// Polls the action of `id` every [`POLL`] until `want` holds; returns when
/// it was seen. Fails after [`CAP`].
fn poll_until(
    map: &AllowMap,
    id: u64,
    want: impl Fn(Option<u32>) -> bool,
) -> anyhow::Result<Instant> {
    let start = Instant::now();
    loop {
        let action = map.action(id)?;
        let now = Instant::now();
        if want(action) {
            return Ok(now);
        }
        if now - start > CAP {
            bail!("cgroup {id}: still {action:?} after {CAP:?}");
        }
        std::thread::sleep(POLL);
    }
}

fn row(name: &str, samples: &[Duration]) {
    if samples.is_empty() {
        println!("{name:<44} {:>5} {:>11} {:>11} {:>11}", 0, "-", "-", "-");
        return;
    }
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let n = ms.len();
    let median = if n % 2 == 1 {
        ms[n / 2]
    } else {
        (ms[n / 2 - 1] + ms[n / 2]) / 2.0
    };
    // Nearest rank.
    let p99 = ms[((n as f64 * 0.99).ceil() as usize).clamp(1, n) - 1];
    println!(
        "{name:<44} {n:>5} {median:>11.3} {p99:>11.3} {:>11.3}",
        ms[n - 1]
    );
}
