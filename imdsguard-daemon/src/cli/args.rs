//! Command-line interface. The standalone flags are a stable interface:
//! systemd units and external acceptance checks drive them.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{bpf::enforcer::Mode, bpf::pins::DEFAULT_PIN_DIR, telemetry::LogFormat};

#[derive(Debug, Parser)]
#[command(
    name = "imdsguard",
    version,
    about = "Keeps pods away from the cloud metadata service with cgroup eBPF hooks"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t)]
    pub log_format: LogFormat,
    /// Log filter, e.g. `info` or `imdsguard=debug` (RUST_LOG overrides it).
    #[arg(long, global = true, env = "IMDSGUARD_LOG", default_value = "info")]
    pub log_level: String,
}

/// The name krew gives the `kubectl imdsguard` plugin's executable: the
/// same binary, linked or copied under that name.
pub const KUBECTL_PLUGIN: &str = "kubectl-imdsguard";

impl Cli {
    /// Parses the process's arguments. Run as [`KUBECTL_PLUGIN`], usage and
    /// errors name the command as the user typed it, `kubectl imdsguard`.
    pub fn parse_args() -> Self {
        use clap::{CommandFactory as _, FromArgMatches as _};
        let plugin = std::env::args_os()
            .next()
            .map(std::path::PathBuf::from)
            .is_some_and(|p| p.file_name().is_some_and(|n| n == KUBECTL_PLUGIN));
        let mut cmd = Self::command();
        if plugin {
            cmd = cmd
                .bin_name("kubectl imdsguard")
                .display_name("kubectl imdsguard");
        }
        Self::from_arg_matches(&cmd.get_matches()).unwrap_or_else(|e| e.exit())
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach (or re-adopt) enforcement and run in the foreground, logging decisions.
    Run(RunArgs),
    /// Run as the Kubernetes node agent: allow pods by policy and labels.
    Node(NodeArgs),
    /// Show what is attached, protected and allowed, from the pins.
    Status(StatusArgs),
    /// Say whether a pod or cgroup may reach each protected destination, and why.
    Explain(ExplainArgs),
    /// Who used the metadata service in the last minutes, and what enforce
    /// would have done: per namespace, pod and container, from the agents.
    ///
    /// Rows count audit hits (would be denied under enforce) and denials,
    /// per destination and hook, and under filter mode the proxy's allowed
    /// and denied requests with their paths and IMDS version. The kernel
    /// reports audit hits and denials one by one; allowed connects are only
    /// counted, so they are no rows: the report prints each node's totals.
    Report(ReportArgs),
    /// Detach every program and remove all pins.
    Uninstall(UninstallArgs),
    /// Print the built-in protected destinations.
    Destinations,
    /// Print the built-in filter profiles and the never-allowed paths.
    Profiles,
    /// Print the presets a policy can include: each cloud's node components and their access.
    Presets(PresetsArgs),
}

#[derive(Clone, Debug, Args)]
pub struct PresetsArgs {
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: Output,
}

/// What is attached and where the pins live: the flags `run` and `node`
/// share.
#[derive(Clone, Debug, Args)]
pub struct EnforcementArgs {
    /// Attach the programs here instead, an ancestor of the judged root
    /// (`--cgroup-root`, or on a node the kubepods cgroup), up to the
    /// hierarchy root itself. Processes outside the judged root stay
    /// unjudged, but a socket they create and hand to a pod (SCM_RIGHTS) is
    /// then judged when the pod uses it. The price: every socket below this
    /// point runs the programs (connect's fast path, and socket()).
    #[arg(long, value_name = "CGROUP")]
    pub attach_at: Option<PathBuf>,
    /// bpffs directory for the pinned maps and links.
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Also enforce unconnected UDP sends (attaches sendmsg4/sendmsg6, which
    /// makes every UDP send on the machine take the socket lock for a check).
    #[arg(long)]
    pub udp: bool,
    /// Also deny raw sockets (SOCK_RAW in AF_INET/AF_INET6) to cgroups
    /// whose action is not allow: socket() fails with EPERM (audit: allowed
    /// and reported). Raw sockets reach protected destinations without any
    /// connect() or sendmsg() check. ICMP ping sockets stay open to everyone.
    /// AF_PACKET sockets are not covered: drop CAP_NET_RAW for those.
    #[arg(long)]
    pub deny_raw_sockets: bool,
    /// Also judge each socket's creator, not only the task that calls
    /// connect()/sendmsg(): a socket created by a cgroup that is not allowed
    /// stays denied in an allowed pod's hands (SCM_RIGHTS). Attaches
    /// sock_create, which then allocates a record on every socket() of every
    /// pod that is not allowed (see BENCHMARKS.md for the cost).
    #[arg(long)]
    pub judge_socket_creators: bool,
    /// Filter mode: where the proxy listens (repeatable: one IPv4 and one
    /// IPv6 address at most, on one port). Filtered callers' metadata
    /// connections are sent there; without it they are denied. `run`
    /// defaults to 127.0.0.1:8169 when it has `--filter-cgroup`s.
    #[arg(long = "proxy-listen", value_name = "ADDR:PORT")]
    pub proxy_listen: Vec<SocketAddr>,
}

/// Closing open connections that lost their allow: the flags `run` and
/// `node` share (`--netns-dir` differs in its default, so each has its own).
#[derive(Clone, Debug, Args)]
pub struct RevokeArgs {
    /// Do not close open connections to protected destinations whose owner
    /// is denied (at start, and after every change that takes an allow
    /// away). Revocation enters the network namespaces of the judged
    /// processes (CAP_SYS_ADMIN) and destroys sockets like `ss -K`
    /// (CAP_NET_ADMIN, CONFIG_INET_DIAG_DESTROY).
    #[arg(long)]
    pub no_revoke: bool,
    /// Seconds between backstop revocation sweeps.
    #[arg(long, default_value_t = 60)]
    pub revoke_interval_secs: u64,
}

#[derive(Clone, Debug, Args)]
pub struct RunArgs {
    /// cgroup v2 directory to attach to; every process below it is judged.
    /// On a node, the kubepods cgroup.
    #[arg(long)]
    pub cgroup_root: PathBuf,
    /// cgroup whose processes (and descendants) may reach protected destinations.
    #[arg(long = "allow-cgroup", value_name = "PATH")]
    pub allow_cgroup: Vec<PathBuf>,
    /// cgroup whose processes are allowed but reported (per-entry audit).
    #[arg(long = "audit-cgroup", value_name = "PATH")]
    pub audit_cgroup: Vec<PathBuf>,
    /// cgroup that is enforced even when the global mode is audit.
    #[arg(long = "enforce-cgroup", value_name = "PATH")]
    pub enforce_cgroup: Vec<PathBuf>,
    /// cgroup whose processes reach the metadata service through the
    /// filtering proxy, for the `--filter-profile`s and `--filter-path`s
    /// only; everything else is denied.
    #[arg(long = "filter-cgroup", value_name = "PATH")]
    pub filter_cgroup: Vec<PathBuf>,
    /// A built-in profile the `--filter-cgroup`s may read (`imdsguard
    /// profiles` lists them).
    #[arg(long = "filter-profile", value_name = "NAME")]
    pub filter_profile: Vec<String>,
    /// A path pattern the `--filter-cgroup`s may read: an exact path, `*`
    /// for one segment, a final `/**` for a subtree. Never-allowed paths
    /// (credentials, user-data) are refused.
    #[arg(long = "filter-path", value_name = "PATTERN")]
    pub filter_path: Vec<String>,
    #[command(flatten)]
    pub enforcement: EnforcementArgs,
    /// What happens to cgroups without an entry.
    #[arg(long, value_enum, default_value_t)]
    pub mode: Mode,
    /// Extra protected destination: `CIDR [tcp|udp|any] [ports=..] [except=..] [name=..]`.
    #[arg(long = "protect", value_name = "SPEC")]
    pub protect: Vec<String>,
    /// Protect only the `--protect` destinations, not the built-in set.
    #[arg(long)]
    pub no_default_destinations: bool,
    /// Seconds between full checks of our pinned links (a pin removed or
    /// replaced). A detached link is caught sooner: the links the agent
    /// holds are checked ten times a second whatever this says.
    #[arg(long, default_value_t = 2)]
    pub check_interval_secs: u64,
    #[command(flatten)]
    pub revoke: RevokeArgs,
    /// Also sweep the network namespaces bind-mounted in this directory
    /// (repeatable).
    #[arg(long = "netns-dir", value_name = "DIR")]
    pub netns_dirs: Vec<PathBuf>,
    /// Address for /metrics, /healthz and /readyz, as for `node` (port 0
    /// picks a free port; the bound address is in the `ready` log line).
    /// Unlike `node`, off unless given: a standalone host has no scraper
    /// by default, and a port bound behind its back would be a surprise.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

#[derive(Clone, Debug, Args)]
pub struct NodeArgs {
    /// This node's name; only its pods are watched (`spec.nodeName`).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Policy file (YAML), usually mounted from a ConfigMap; reloaded on change.
    #[arg(
        long,
        env = "IMDSGUARD_POLICY",
        default_value = "/etc/imdsguard/policy.yaml"
    )]
    pub policy: PathBuf,
    /// The kubepods cgroup; discovered below the cgroup v2 mount when absent.
    #[arg(long)]
    pub kubepods_root: Option<PathBuf>,
    #[command(flatten)]
    pub enforcement: EnforcementArgs,
    /// How often the policy file is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub policy_poll_ms: u64,
    /// Pods per page of the initial pod list (and of every relist). Each
    /// page's response is held whole while it is decoded, so this bounds
    /// the start-up peak; fewer, larger pages list a big node faster.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    pub pod_list_page_size: u32,
    /// Address for /metrics, /healthz and /readyz (port 0 picks a free port;
    /// the bound address is in the `ready` log line).
    #[arg(long, default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,
    #[command(flatten)]
    pub revoke: RevokeArgs,
    /// Also sweep the network namespaces bind-mounted in this directory
    /// (repeatable), where container runtimes keep pod namespaces.
    #[arg(
        long = "netns-dir",
        value_name = "DIR",
        default_value = "/var/run/netns"
    )]
    pub netns_dirs: Vec<PathBuf>,

    /// Remove this node taint (e.g. `imdsguard.io/not-ready`) once ready:
    /// programs attached and the first full sync done. Needs get/patch on nodes.
    #[arg(long, value_name = "KEY")]
    pub remove_startup_taint: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
}

#[derive(Clone, Debug, Args)]
pub struct StatusArgs {
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Also show this policy file's rules.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Resolve allowed pods to namespace/name through the API (KUBECONFIG or in-cluster).
    #[arg(long)]
    pub kubernetes: bool,
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(Clone, Debug, Args)]
pub struct ExplainArgs {
    /// NAMESPACE/NAME of a pod (needs API access: KUBECONFIG or in-cluster).
    #[arg(long, required_unless_present = "cgroup", conflicts_with = "cgroup")]
    pub pod: Option<String>,
    /// A cgroup directory.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// The policy file, to name the rule that matches the pod.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    #[arg(long)]
    pub kubepods_root: Option<PathBuf>,
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: Output,
}

/// The label every agent pod of the chart (and of deploy/manifests) has.
pub const AGENT_SELECTOR: &str = "app.kubernetes.io/name=imdsguard";

/// `report`: from one agent's URL, or through the API server from every
/// agent pod (the default, so that `kubectl imdsguard report` needs no flag).
///
/// The kernel reports audit hits and denials one by one; allowed connects
/// are only counted (the report prints the kernel's totals per node). Under
/// filter mode each request is reported with its path and IMDS version.
#[derive(Clone, Debug, Args)]
pub struct ReportArgs {
    /// How far back to look, in minutes (the agents keep an hour).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..=60))]
    pub minutes: u32,
    #[arg(short = 'o', long, value_enum, default_value_t)]
    pub output: Output,
    /// Ask this agent's endpoint directly, e.g. http://127.0.0.1:9090 after
    /// `kubectl -n imdsguard-system port-forward pod/AGENT 9090`.
    #[arg(long, value_name = "URL", conflicts_with_all = ["kubernetes", "namespace", "node"])]
    pub agent: Option<String>,
    /// Ask every agent pod (label app.kubernetes.io/name=imdsguard) through
    /// the API server's pod proxy (KUBECONFIG or in-cluster). The default
    /// without --agent. Needs `list pods` and `get pods/proxy` in the
    /// agents' namespace.
    #[arg(long)]
    pub kubernetes: bool,
    /// The agents' namespace.
    #[arg(long, default_value = "imdsguard-system")]
    pub namespace: String,
    /// Only the agent on this node.
    #[arg(long)]
    pub node: Option<String>,
}

#[derive(Clone, Debug, Args)]
pub struct UninstallArgs {
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    /// The long flags of a subcommand (without the global ones), sorted.
    fn flags(sub: &str) -> Vec<String> {
        let cli = Cli::command();
        let cmd = cli.find_subcommand(sub).unwrap();
        let mut v: Vec<String> = cmd
            .get_arguments()
            .filter_map(|a| a.get_long().map(str::to_string))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_parser_is_consistent() {
        Cli::command().debug_assert();
    }

    /// The flag names are a stable interface (systemd units, acceptance
    /// checks): sharing them between `run` and `node` must not rename any.
    #[test]
    fn flag_names_are_stable() {
        assert_eq!(
            flags("run"),
            [
                "allow-cgroup",
                "attach-at",
                "audit-cgroup",
                "cgroup-root",
                "check-interval-secs",
                "deny-raw-sockets",
                "enforce-cgroup",
                "filter-cgroup",
                "filter-path",
                "filter-profile",
                "judge-socket-creators",
                "metrics-addr",
                "mode",
                "netns-dir",
                "no-default-destinations",
                "no-revoke",
                "pin-dir",
                "protect",
                "proxy-listen",
                "revoke-interval-secs",
                "udp",
            ]
        );
        assert_eq!(
            flags("node"),
            [
                "attach-at",
                "deny-raw-sockets",
                "judge-socket-creators",
                "kubepods-root",
                "metrics-addr",
                "netns-dir",
                "no-revoke",
                "node-name",
                "pin-dir",
                "pod-list-page-size",
                "policy",
                "policy-poll-ms",
                "proxy-listen",
                "remove-startup-taint",
                "revoke-interval-secs",
                "udp",
            ]
        );
    }

    #[test]
    fn report_asks_the_cluster_unless_given_an_agent() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(["imdsguard", "report"].iter().chain(args)).map(|c| {
                match c.command {
                    Command::Report(r) => r,
                    _ => panic!("not report"),
                }
            })
        };
        let r = parse(&[]).unwrap();
        assert_eq!((r.minutes, r.agent, r.output), (60, None, Output::Table));
        assert_eq!(r.namespace, "imdsguard-system");
        let r = parse(&[
            "--agent",
            "http://127.0.0.1:9090",
            "--minutes",
            "5",
            "-o",
            "json",
        ])
        .unwrap();
        assert_eq!(r.agent.as_deref(), Some("http://127.0.0.1:9090"));
        assert_eq!((r.minutes, r.output), (5, Output::Json));
        assert!(parse(&["--agent", "http://x:1", "--node", "n"]).is_err());
        assert!(parse(&["--agent", "http://x:1", "--kubernetes"]).is_err());
        assert!(parse(&["--minutes", "0"]).is_err());
        assert!(parse(&["--minutes", "61"]).is_err());
        assert!(parse(&["--kubernetes", "--node", "n", "--namespace", "x"]).is_ok());
    }

    #[test]
    fn run_defaults_leave_the_metrics_endpoints_off() {
        let Command::Run(a) = Cli::parse_from(["imdsguard", "run", "--cgroup-root", "/r"]).command
        else {
            panic!("not run")
        };
        assert_eq!(a.metrics_addr, None);
        assert_eq!(a.enforcement.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
        assert!(a.netns_dirs.is_empty());
        assert_eq!(a.revoke.revoke_interval_secs, 60);
        assert!(!a.revoke.no_revoke);
    }

    #[test]
    fn shared_flags_parse_the_same_in_both_modes() {
        let shared = [
            "--attach-at",
            "/a",
            "--pin-dir",
            "/p",
            "--udp",
            "--deny-raw-sockets",
            "--judge-socket-creators",
            "--no-revoke",
            "--revoke-interval-secs",
            "7",
            "--netns-dir",
            "/n",
            "--metrics-addr",
            "127.0.0.1:0",
        ];
        let run = ["imdsguard", "run", "--cgroup-root", "/r"];
        let node = ["imdsguard", "node", "--node-name", "n"];
        let Command::Run(r) = Cli::parse_from(run.iter().chain(&shared)).command else {
            panic!("not run")
        };
        let Command::Node(n) = Cli::parse_from(node.iter().chain(&shared)).command else {
            panic!("not node")
        };
        for (e, rv) in [(&r.enforcement, &r.revoke), (&n.enforcement, &n.revoke)] {
            assert_eq!(e.attach_at.as_deref(), Some(std::path::Path::new("/a")));
            assert_eq!(e.pin_dir, PathBuf::from("/p"));
            assert!(e.udp && e.deny_raw_sockets && e.judge_socket_creators);
            assert!(rv.no_revoke);
            assert_eq!(rv.revoke_interval_secs, 7);
        }
        assert_eq!(r.netns_dirs, [PathBuf::from("/n")]);
        assert_eq!(n.netns_dirs, [PathBuf::from("/n")]);
        assert_eq!(r.metrics_addr, Some("127.0.0.1:0".parse().unwrap()));
        assert_eq!(n.metrics_addr, "127.0.0.1:0".parse().unwrap());
    }
}
