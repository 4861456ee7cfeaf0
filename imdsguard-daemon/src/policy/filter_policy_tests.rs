//! `access: filter` rules in the policy file: what they compile to, and the
//! errors that name what is wrong.

use super::{file::PolicyFile, spec::PolicyError};
use crate::vocabulary::Action;

fn load(rules: &str) -> Result<PolicyFile, PolicyError> {
    PolicyFile::from_yaml(&format!("rules:\n{rules}"))
}

fn error(rules: &str) -> String {
    match load(rules) {
        Ok(_) => panic!("accepted:\n{rules}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_filter_rule_gives_its_pods_the_filter_action_and_its_rules() {
    let p = load(
        "- name: report
  namespaces: [imds]
  podSelector: {matchLabels: {app: report}}
  access: filter
  profile: instance-info
  paths: [/latest/meta-data/tags/instance/team]
",
    )
    .unwrap();
    let labels = [("app".to_string(), "report".to_string())].into();
    let d = p.evaluate("imds", &Default::default(), &labels).unwrap();
    assert_eq!(d.action, Action::Filter);
    let rules = d.filter.expect("a filter rule carries its allow list");
    assert_eq!(rules.profiles(), ["instance-info"]);
    assert_eq!(rules.paths(), ["/latest/meta-data/tags/instance/team"]);
}

#[test]
fn filter_fields_belong_to_filter_rules_only() {
    assert_eq!(
        error("- name: a\n  access: allow\n  profile: instance-info\n"),
        "rules[0] (a).profile: only filter rules (`access: filter`) take a profile"
    );
    assert_eq!(
        error("- name: a\n  access: deny\n  paths: [/latest/meta-data/instance-id]\n"),
        "rules[0] (a).paths: only filter rules (`access: filter`) take a paths"
    );
    // A filter rule never denies what its list allows: no mode either.
    assert!(
        error("- name: a\n  access: filter\n  mode: audit\n  profile: instance-info\n")
            .starts_with("rules[0] (a).mode: only deny rules take a mode"),
    );
    assert!(
        error("- name: a\n  access: filter\n").contains("needs a profile or paths"),
        "a filter rule without paths"
    );
}

#[test]
fn never_allowed_paths_and_unknown_profiles_are_refused_with_the_rule() {
    for (rules, want) in [
        (
            "- name: creds\n  access: filter\n  paths: [/latest/meta-data/iam/security-credentials/role]\n",
            "rules[0] (creds): ",
        ),
        (
            "- name: ud\n  access: filter\n  paths: [/latest/user-data]\n",
            "rules[0] (ud): ",
        ),
        (
            "- name: gke\n  access: filter\n  paths: [/computeMetadata/v1/instance/attributes/kube-env]\n",
            "rules[0] (gke): ",
        ),
        (
            "- name: everything\n  access: filter\n  paths: [/latest/meta-data/**]\n",
            "rules[0] (everything): ",
        ),
        (
            "- name: typo\n  access: filter\n  profile: instance-inf\n",
            "rules[0] (typo): filter profile \"instance-inf\" does not exist",
        ),
    ] {
        let e = error(rules);
        assert!(e.starts_with(want), "{rules}: {e}");
    }
}
