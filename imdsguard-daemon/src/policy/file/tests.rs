use super::*;
use crate::policy::names::Malformed;

/// The example in this module's documentation, so it cannot rot.
fn seed() -> String {
    let doc: Vec<&str> = include_str!("../file.rs")
        .lines()
        .map_while(|l| l.strip_prefix("//!"))
        .collect();
    let start = doc.iter().position(|l| l.trim() == "```yaml").unwrap() + 1;
    let len = doc[start..].iter().position(|l| l.trim() == "```").unwrap();
    doc[start..start + len]
        .iter()
        .map(|l| format!("{}\n", l.strip_prefix(' ').unwrap_or(l)))
        .collect()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn action_of(
    p: &PolicyFile,
    ns: &str,
    ns_labels: &[(&str, &str)],
    pod: &[(&str, &str)],
) -> Option<Action> {
    p.evaluate(ns, &labels(ns_labels), &labels(pod))
        .map(|d| d.action)
}

fn err(yaml: &str) -> PolicyError {
    PolicyFile::from_yaml(yaml).unwrap_err()
}

#[test]
fn seed_example_decides_as_documented() {
    let p = PolicyFile::from_yaml(&seed()).unwrap();
    assert_eq!(p.default_mode(), Mode::Enforce);
    assert_eq!(p.rules().len(), 2);
    let prod = p
        .evaluate("imds", &labels(&[]), &labels(&[("app", "prod")]))
        .unwrap();
    assert_eq!(
        prod,
        RuleMatch {
            action: Action::Allow,
            rule_index: 0,
            rule_name: "prod-reads-imds",
            filter: None,
        }
    );
    let test = p
        .evaluate("imds", &labels(&[]), &labels(&[("app", "test")]))
        .unwrap();
    assert_eq!(
        test,
        RuleMatch {
            action: Action::Enforce,
            rule_index: 1,
            rule_name: "test-denied",
            filter: None,
        }
    );
    assert_eq!(action_of(&p, "default", &[], &[("app", "prod")]), None);
    assert_eq!(action_of(&p, "imds", &[], &[("app", "other")]), None);
    assert_eq!(action_of(&p, "imds", &[], &[]), None);
    let d = p.destinations().unwrap();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].name, "aws-imds");
}

#[test]
fn deny_mode_overrides_default_mode() {
    let p = PolicyFile::from_yaml(&seed().replace("mode: enforce ", "mode: audit ")).unwrap();
    assert_eq!(
        action_of(&p, "imds", &[], &[("app", "test")]),
        Some(Action::Audit)
    );
    let p = PolicyFile::from_yaml(
        "defaultMode: audit\n\
         rules:\n\
         - {name: follows-default, access: deny}\n",
    )
    .unwrap();
    assert_eq!(p.default_mode(), Mode::Audit);
    assert_eq!(action_of(&p, "any", &[], &[]), Some(Action::Audit));
    let p = PolicyFile::from_yaml(
        "defaultMode: audit\nrules: [{name: strict, access: deny, mode: enforce}]",
    )
    .unwrap();
    assert_eq!(action_of(&p, "any", &[], &[]), Some(Action::Enforce));
}

#[test]
fn empty_policy_decides_nothing() {
    let p = PolicyFile::from_yaml("{}").unwrap();
    assert_eq!(p.default_mode(), Mode::Enforce);
    assert!(p.rules().is_empty());
    assert!(p.destinations().is_none());
    assert_eq!(action_of(&p, "imds", &[], &[("app", "prod")]), None);
    let p = PolicyFile::from_yaml("# only a comment\nrules: []\n").unwrap();
    assert!(p.rules().is_empty());
    // An empty ConfigMap key is the empty policy: every pod falls to the
    // global default, which fails closed unless configured otherwise.
    let p = PolicyFile::from_yaml("").unwrap();
    assert!(p.rules().is_empty() && p.destinations().is_none());
}

#[test]
fn namespace_conditions_combine() {
    let p = PolicyFile::from_yaml(
        "rules:\n\
         - name: both\n  namespaces: [a, b]\n  namespaceSelector: {matchLabels: {team: x}}\n\
         - name: by-name\n  namespaces: [c]\n\
         - name: by-labels\n  namespaceSelector: {matchExpressions: [{key: team, operator: In, values: [y]}]}\n",
    )
    .unwrap();
    let rule = |ns: &str, ns_labels: &[(&str, &str)]| {
        p.evaluate(ns, &labels(ns_labels), &labels(&[]))
            .map(|d| d.rule_name)
    };
    assert_eq!(rule("a", &[("team", "x")]), Some("both"));
    assert_eq!(
        rule("a", &[("team", "z")]),
        None,
        "name matches, labels do not"
    );
    assert_eq!(
        rule("z", &[("team", "x")]),
        None,
        "labels match, name does not"
    );
    assert_eq!(rule("c", &[]), Some("by-name"));
    assert_eq!(rule("d", &[("team", "y")]), Some("by-labels"));
    assert_eq!(rule("b", &[("team", "y")]), Some("by-labels"));
}

#[test]
fn absent_selectors_match_everything_and_first_rule_wins() {
    let p = PolicyFile::from_yaml(
        "rules:\n\
         - {name: deny-canary, podSelector: {matchLabels: {canary: 'true'}}, access: deny, mode: audit}\n\
         - {name: everyone-in-imds, namespaces: [imds]}\n\
         - {name: deny-rest, access: deny}\n",
    )
    .unwrap();
    let decide = |ns: &str, pod: &[(&str, &str)]| {
        p.evaluate(ns, &labels(&[]), &labels(pod))
            .map(|d| (d.rule_index, d.action))
    };
    assert_eq!(
        decide("imds", &[("canary", "true")]),
        Some((0, Action::Audit))
    );
    assert_eq!(decide("imds", &[("app", "x")]), Some((1, Action::Allow)));
    assert_eq!(decide("other", &[]), Some((2, Action::Enforce)));
    assert_eq!(p.rules()[1].access(), Access::Allow);
    assert!(p.rules()[1].pod_selector().is_none());
}

#[test]
fn unknown_operator_names_rule_and_field() {
    let yaml = seed().replace(
        "matchLabels: {app: test}",
        "matchExpressions: [{key: app, operator: Equals, values: [test]}]",
    );
    let e = err(&yaml);
    assert!(
        matches!(
            e,
            PolicyError::Selector {
                field: "podSelector",
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        r#"rules[1] (test-denied).podSelector.matchExpressions[0].operator: unknown operator "Equals" (expected In, NotIn, Exists, DoesNotExist)"#
    );
}

#[test]
fn selector_errors_say_which_selector() {
    let e = err(
        "rules: [{name: r, namespaceSelector: {matchExpressions: [{key: team, operator: Exists, values: [x]}]}}]",
    );
    assert_eq!(
        e.to_string(),
        "rules[0] (r).namespaceSelector.matchExpressions[0].values: operator Exists takes no values"
    );
    let e = err("rules: [{name: r, podSelector: {matchLabels: {'bad key': x}}}]");
    assert!(
        e.to_string()
            .starts_with("rules[0] (r).podSelector.matchLabels: invalid label key \"bad key\""),
        "{e}"
    );
}

#[test]
fn yaml_syntax_errors_keep_the_location() {
    let e = err("rules:\n  - name: a\n   access: [allow\n");
    let PolicyError::Yaml { line, column, .. } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(*line, Some(3), "{e}");
    assert!(column.is_some());
    assert!(
        e.to_string()
            .contains("invalid policy yaml at line 3 column"),
        "{e}"
    );
}

#[test]
fn unknown_fields_are_errors_naming_the_rule() {
    let yaml = seed().replace(
        "podSelector:\n      matchLabels: {app: test}",
        "podSelectr:\n      matchLabels: {app: test}",
    );
    let e = err(&yaml);
    let PolicyError::Yaml {
        path, line, source, ..
    } = &e
    else {
        panic!("{e:?}")
    };
    assert_eq!(path, "rules[1] (test-denied).podSelectr");
    assert_eq!(*line, Some(11));
    assert!(
        source.to_string().contains("unknown field `podSelectr`"),
        "{source}"
    );
    assert!(
        e.to_string()
            .starts_with("rules[1] (test-denied).podSelectr: invalid policy yaml at line 11"),
        "{e}"
    );

    let e = err("defaultmode: audit\n");
    assert!(
        e.to_string()
            .starts_with("defaultmode: invalid policy yaml at line 1"),
        "{e}"
    );
    let e = err("rules: [{name: r, podSelector: {matchLabel: {app: x}}}]");
    assert!(
        e.to_string()
            .starts_with("rules[0] (r).podSelector.matchLabel: "),
        "{e}"
    );
    let e = err("rules: [{name: r, podSelector: {matchLabels: {app: a, app: b}}}]");
    let PolicyError::Yaml { path, source, .. } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(path, "rules[0] (r).podSelector.matchLabels");
    assert!(
        source.to_string().contains("duplicate label key \"app\""),
        "{source}"
    );
}

#[test]
fn bad_enum_values_are_errors() {
    for (yaml, path, needle) in [
        (
            "defaultMode: block",
            "defaultMode",
            "unknown variant `block`",
        ),
        (
            "rules: [{name: r, access: permit}]",
            "rules[0] (r).access",
            "unknown variant `permit`",
        ),
        (
            "rules: [{name: r, access: deny, mode: Enforce}]",
            "rules[0] (r).mode",
            "unknown variant `Enforce`",
        ),
    ] {
        let e = err(yaml);
        let PolicyError::Yaml {
            path: p, source, ..
        } = &e
        else {
            panic!("{yaml}: {e:?}")
        };
        assert_eq!(p, path, "{yaml}");
        assert!(source.to_string().contains(needle), "{yaml}: {source}");
    }
}

#[test]
fn rule_names_are_required_valid_and_unique() {
    let e = err("rules: [{access: allow}]");
    assert!(
        matches!(&e, PolicyError::Yaml { path, .. } if path == "rules[0]"),
        "{e:?}"
    );
    assert!(
        std::error::Error::source(&e)
            .unwrap()
            .to_string()
            .contains("missing field `name`")
    );

    let e = err("rules: [{name: ''}]");
    assert!(
        matches!(
            e,
            PolicyError::InvalidRuleName {
                problem: Malformed::Empty,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "rules[0].name: invalid rule name \"\": is empty"
    );
    let e = err("rules: [{name: ok}, {name: Prod_Reads}]");
    assert!(
        e.to_string()
            .starts_with("rules[1].name: invalid rule name \"Prod_Reads\": must be lowercase"),
        "{e}"
    );

    let e = err("rules: [{name: a}, {name: b}, {name: a, access: deny}]");
    assert!(
        matches!(e, PolicyError::DuplicateRuleName { first: 0, .. }),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "rules[2] (a).name: rule name is already used by rules[0]"
    );
}

#[test]
fn mode_on_an_allow_rule_is_an_error() {
    for yaml in [
        "rules: [{name: r, mode: audit}]",
        "rules: [{name: r, access: allow, mode: enforce}]",
    ] {
        let e = err(yaml);
        assert!(matches!(e, PolicyError::ModeOnAllowRule { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "rules[0] (r).mode: only deny rules take a mode; an allow rule never denies"
        );
    }
}

#[test]
fn namespace_lists_must_name_namespaces() {
    let e = err("rules: [{name: r, namespaces: []}]");
    assert!(matches!(e, PolicyError::NoNamespaces { .. }), "{e:?}");
    assert!(
        e.to_string()
            .starts_with("rules[0] (r).namespaces: an empty list matches no namespace")
    );
    let e = err("rules: [{name: r, namespaces: [imds, Kube_System]}]");
    assert!(
        matches!(e, PolicyError::InvalidNamespace { index: 1, .. }),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .starts_with("rules[0] (r).namespaces[1]: invalid namespace name \"Kube_System\""),
        "{e}"
    );
}

/// What serde_yaml accepted, and how, before the move to serde-saphyr.
#[test]
fn scalars_read_as_before() {
    let p = PolicyFile::from_yaml(
        "rules: [{name: r, podSelector: {matchLabels: {app: , v: 1.0, n: 012, on: true}}}]",
    )
    .unwrap();
    let selector = p.rules()[0].pod_selector().unwrap();
    assert_eq!(selector.to_string(), "app=,n=012,on=true,v=1.0");
    // One document only.
    let e = err("rules: []\n---\nrules: []\n");
    assert!(
        matches!(&e, PolicyError::Yaml { path, .. } if path.is_empty()),
        "{e:?}"
    );
}

#[test]
fn destinations_are_validated_at_load() {
    let e = err("destinations: []");
    assert!(matches!(e, PolicyError::NoDestinations), "{e:?}");
    let e = err("destinations: ['169.254.169.254', '169.254.169.254/33 tcp']");
    assert!(
        matches!(e, PolicyError::Destination { index: 1, .. }),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .starts_with("destinations[1]: invalid protected destination"),
        "{e}"
    );
    assert!(e.to_string().contains("longer than 32"), "{e}");
    let e = err("destinations: ['10.1.2.3 ports=1,3,5,7,9', '10.1.2.3 ports=11,13,15,17']");
    assert!(matches!(e, PolicyError::DestinationSet { .. }), "{e:?}");
    assert!(
        e.to_string()
            .starts_with("destinations: protected prefix 10.1.2.3/32 needs 9 port ranges"),
        "{e}"
    );
    let e = err("destinations: '169.254.169.254'");
    assert!(
        matches!(&e, PolicyError::Yaml { path, .. } if path == "destinations"),
        "{e:?}"
    );
}
