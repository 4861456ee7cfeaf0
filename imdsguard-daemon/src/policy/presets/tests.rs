use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::{
    bpf::enforcer::Mode,
    policy::{file::PolicyFile, names},
    vocabulary::Action,
};

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn policy(yaml: &str) -> PolicyFile {
    PolicyFile::from_yaml(yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"))
}

#[test]
fn data_parses_with_unique_names_and_every_cloud() {
    let all = all().unwrap();
    let names: BTreeSet<_> = all.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names.len(), all.len(), "preset names repeat");
    assert_eq!(names, BTreeSet::from(["aks", "eks", "generic", "gke"]));
    for p in all {
        let entries: BTreeSet<_> = p.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            entries.len(),
            p.rules.len(),
            "{}: entry names repeat",
            p.name
        );
        for r in &p.rules {
            names::check_dns_label(&r.name)
                .unwrap_or_else(|e| panic!("{}/{}: {e}", p.name, r.name));
            assert!(!r.needs.trim().is_empty(), "{}/{}: needs", p.name, r.name);
            assert!(!r.source.trim().is_empty(), "{}/{}: source", p.name, r.name);
            assert_ne!(
                r.access,
                Access::Deny,
                "{}/{}: a preset grants",
                p.name,
                r.name
            );
        }
    }
}

/// Every entry compiles as a rule, both ways: its filter profile and paths
/// are valid and reach no never-allowed path.
#[test]
fn every_preset_compiles_in_both_access_modes() {
    for p in all().unwrap() {
        for access in ["least", "allow"] {
            let file = policy(&format!("include: [{}]\npresetAccess: {access}\n", p.name));
            assert_eq!(file.rules().len(), p.rules.len());
            for (rule, entry) in file.rules().iter().zip(&p.rules) {
                assert_eq!(rule.name(), format!("{}/{}", p.name, entry.name));
                let want = match (access, entry.access) {
                    ("allow", _) => Access::Allow,
                    (_, a) => a,
                };
                assert_eq!(rule.access(), want, "{}", rule.name());
                assert_eq!(rule.filter().is_some(), want == Access::Filter);
            }
        }
    }
}

#[test]
fn included_rules_follow_the_files_own_so_own_rules_override() {
    let aws_node = [("k8s-app", "aws-node")];
    let ebs = [
        ("app", "ebs-csi-node"),
        ("app.kubernetes.io/name", "aws-ebs-csi-driver"),
    ];
    let p = policy("include: [eks]\ndefaultMode: audit\n");
    assert_eq!(p.default_mode(), Mode::Audit);
    let m = p
        .evaluate("kube-system", &labels(&[]), &labels(&aws_node))
        .unwrap();
    assert_eq!((m.action, m.rule_name), (Action::Allow, "eks/aws-node"));
    let m = p
        .evaluate("kube-system", &labels(&[]), &labels(&ebs))
        .unwrap();
    assert_eq!(
        (m.action, m.rule_name),
        (Action::Filter, "eks/ebs-csi-node")
    );
    assert!(m.filter.is_some());
    // The same labels elsewhere, and other pods, are left to defaultMode.
    assert!(
        p.evaluate("default", &labels(&[]), &labels(&aws_node))
            .is_none()
    );
    assert!(
        p.evaluate("kube-system", &labels(&[]), &labels(&[]))
            .is_none()
    );

    let own = policy(
        "include: [eks]\nrules:\n  - name: no-ebs\n    namespaces: [kube-system]\n    podSelector: {matchLabels: {app: ebs-csi-node}}\n    access: deny\n",
    );
    let m = own
        .evaluate("kube-system", &labels(&[]), &labels(&ebs))
        .unwrap();
    assert_eq!(
        (m.action, m.rule_index, m.rule_name),
        (Action::Enforce, 0, "no-ebs")
    );
    // Indexes go on after the own rules.
    let m = own
        .evaluate("kube-system", &labels(&[]), &labels(&aws_node))
        .unwrap();
    assert_eq!((m.rule_index, m.rule_name), (1, "eks/aws-node"));
}

#[test]
fn allow_access_widens_filter_entries_only() {
    let p = policy("include: [eks]\npresetAccess: allow\n");
    assert!(
        p.rules()
            .iter()
            .all(|r| r.access() == Access::Allow && r.filter().is_none())
    );
    assert!(p.rules().iter().any(|r| r.name() == "eks/ebs-csi-node"));
}

#[test]
fn several_presets_and_the_empty_one() {
    let p = policy("include: [generic]\n");
    assert!(p.rules().is_empty());
    let p = policy("include: [gke, aks]\n");
    let names: Vec<_> = p.rules().iter().map(|r| r.name()).collect();
    assert!(names.first().unwrap().starts_with("gke/"));
    assert!(names.last().unwrap().starts_with("aks/"));
}

#[test]
fn unknown_and_repeated_presets_are_errors_naming_them() {
    let e = PolicyFile::from_yaml("include: [eks, ecs]\n").unwrap_err();
    assert_eq!(
        e.to_string(),
        "include[1]: unknown preset \"ecs\"; the presets are eks, gke, aks, generic"
    );
    let e = PolicyFile::from_yaml("include: [eks, gke, eks]\n").unwrap_err();
    assert_eq!(
        e.to_string(),
        "include[2]: preset \"eks\" is already included by include[0]"
    );
    let e = PolicyFile::from_yaml("include: eks\n").unwrap_err();
    assert!(
        e.to_string().starts_with("include: invalid policy yaml"),
        "{e}"
    );
    let e = PolicyFile::from_yaml("include: [eks]\npresetAccess: some\n").unwrap_err();
    assert!(
        e.to_string()
            .starts_with("presetAccess: invalid policy yaml"),
        "{e}"
    );
}
