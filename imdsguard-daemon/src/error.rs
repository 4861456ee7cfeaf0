//! The library's error type. Messages are lowercase and name the thing that
//! is wrong; causes are attached as `#[source]`, not repeated in the text.

use std::{io, path::PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cgroup path {path} does not exist")]
    CgroupMissing { path: PathBuf },

    #[error(
        "{path} is not a cgroup v2 directory (filesystem magic {magic:#x}); imdsguard needs the unified hierarchy"
    )]
    NotCgroup2 { path: PathBuf, magic: u64 },

    #[error(
        "no cgroup v2 filesystem is mounted (looked in /proc/self/mountinfo); imdsguard needs the unified hierarchy"
    )]
    NoCgroup2Mount,

    #[error("{path} is not below any cgroup v2 mount point")]
    NotBelowCgroup2Mount { path: PathBuf },

    #[error(
        "allowed cgroup {allowed} is not inside the cgroup root {root}; the programs never see its sockets"
    )]
    AllowedOutsideRoot { allowed: PathBuf, root: PathBuf },

    #[error(
        "the cgroup root {path} is the root of the cgroup v2 hierarchy; attach to the pods' subtree (e.g. kubepods) so host processes stay untouched"
    )]
    RootIsHierarchyRoot { path: PathBuf },

    #[error(
        "--attach-at {attach_at} is not an ancestor of (or equal to) the judged cgroup root {root}"
    )]
    AttachBelowRoot { attach_at: PathBuf, root: PathBuf },

    #[error(
        "allow entries span cgroup levels {min}..={max}, more than the {span} levels the kernel walks"
    )]
    LevelSpanTooWide { min: u32, max: u32, span: u32 },

    #[error(
        "{path} is not on a bpf filesystem (magic {magic:#x}); mount bpffs there, e.g. `mount -t bpf bpf /sys/fs/bpf`"
    )]
    NotBpffs { path: PathBuf, magic: u64 },

    #[error("pin directory {path} does not hold an imdsguard installation")]
    NotInstalled { path: PathBuf },

    #[error(
        "pinned link {path} is attached to cgroup id {found}, not to the cgroup root {root} (id {want}); run `imdsguard uninstall --pin-dir` first to move the attach point"
    )]
    LinkOnOtherCgroup {
        path: PathBuf,
        found: u64,
        root: PathBuf,
        want: u64,
    },

    #[error(
        "this binary was built without its eBPF object (AYA_BUILD_SKIP was set); rebuild it with bpf-linker installed"
    )]
    EbpfObjectMissing,

    #[error("the kernel does not support {what}")]
    KernelUnsupported {
        what: &'static str,
        #[source]
        source: io::Error,
    },

    #[error("invalid protected destination {spec:?}: {reason}")]
    InvalidDestination { spec: String, reason: String },

    #[error("protected prefix {prefix} needs {count} port ranges, at most {max} fit")]
    TooManyPortRanges {
        prefix: String,
        count: usize,
        max: usize,
    },

    #[error("too many {what}: {count}, the map holds {max}")]
    MapFull {
        what: &'static str,
        count: usize,
        max: u32,
    },

    #[error("program {name} is missing from the eBPF object")]
    ProgramMissing { name: &'static str },

    #[error("map {name} is missing from the eBPF object")]
    MapMissing { name: &'static str },

    #[error("failed to load the eBPF object")]
    Load(#[source] aya::EbpfError),

    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },

    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },

    #[error("pin {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },

    #[error("link {path}")]
    Link {
        path: PathBuf,
        #[source]
        source: aya::programs::links::LinkError,
    },

    #[error("{call} failed")]
    Syscall {
        call: &'static str,
        #[source]
        source: io::Error,
    },

    #[error("the enforcer task has stopped")]
    EnforcerStopped,

    #[error("policy {path} is invalid")]
    Policy {
        path: PathBuf,
        #[source]
        source: Box<crate::policy::spec::PolicyError>,
    },

    #[error(
        "the kubepods cgroup {root} does not exist yet, and its nearest existing ancestor {ancestor} is not on cgroup v2 (filesystem magic {magic:#x}), so it can never appear there; name the kubepods directory below the cgroup v2 mount (on hybrid hosts usually /sys/fs/cgroup/unified)"
    )]
    KubepodsNotOnCgroup2 {
        root: PathBuf,
        ancestor: PathBuf,
        magic: u64,
    },

    #[error("cannot find the pods' cgroups")]
    PodCgroup(#[source] crate::cgroup::pod::PodCgroupError),

    #[error("kubernetes client")]
    Kube(#[source] kube::Error),

    #[error("kubernetes client configuration (KUBECONFIG or in-cluster)")]
    KubeConfig(#[source] kube::config::InferConfigError),

    #[error("read {path}")]
    Procfs {
        path: &'static str,
        #[source]
        source: procfs::ProcError,
    },

    #[error(
        "the policy has filter rules ({rules:?}) but the agent has no proxy: start it with --proxy-listen (chart: filter.enabled=true), or those pods would be denied everything; rules from `include` become allow rules with `presetAccess: allow`"
    )]
    FilterWithoutProxy { rules: Vec<String> },

    #[error("filter flags: {problem}")]
    FilterFlags { problem: &'static str },

    #[error("--proxy-listen {addrs:?}: {problem}")]
    ProxyListen {
        addrs: Vec<String>,
        problem: &'static str,
    },

    #[error("filter profile {name:?} does not exist (`imdsguard profiles` lists them)")]
    UnknownProfile { name: String },

    #[error("list the built-in presets")]
    Presets(#[source] Box<crate::policy::spec::PolicyError>),

    #[error("the built-in filter profiles (profiles.yaml) do not parse")]
    ProfilesData(#[source] Box<serde_saphyr::Error>),

    #[error("filter path pattern {pattern:?} in {rule} is invalid")]
    FilterPattern {
        rule: String,
        pattern: String,
        #[source]
        source: crate::filter::pattern::PatternError,
    },

    #[error("filter path pattern {pattern:?} in {rule} reaches {never}, which is never allowed")]
    FilterNeverAllowed {
        rule: String,
        pattern: String,
        never: &'static str,
    },

    #[error("--agent {url:?}: {problem}")]
    AgentUrl { url: String, problem: &'static str },

    #[error("connect to the agent at {url}")]
    AgentConnect {
        url: String,
        #[source]
        source: io::Error,
    },

    #[error("GET {url}")]
    AgentHttp {
        url: String,
        #[source]
        source: hyper::Error,
    },

    #[error("GET {url}: no answer within {secs}s")]
    AgentTimeout { url: String, secs: u64 },

    #[error("GET {url}: HTTP {status}: {body}")]
    AgentStatus {
        url: String,
        status: u16,
        body: String,
    },

    #[error("the report from {from} does not parse")]
    ReportDecode {
        from: String,
        #[source]
        source: serde_json::Error,
    },

    #[error("no imdsguard agent pods (label {selector}) in namespace {namespace}{on_node}")]
    NoAgents {
        namespace: String,
        selector: &'static str,
        on_node: String,
    },

    #[error("encode the output as JSON")]
    Json(#[source] serde_json::Error),

    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { op, path, source }
    }
}
