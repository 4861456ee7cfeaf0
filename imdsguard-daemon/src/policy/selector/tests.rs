use proptest::prelude::*;

use super::*;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Parsed as the policy parser parses it.
fn from_yaml<T: serde::de::DeserializeOwned>(yaml: &str) -> Result<T, serde_saphyr::Error> {
    serde_saphyr::from_str_with_options(yaml, crate::policy::spec::yaml_options())
}

fn selector(yaml: &str) -> LabelSelector {
    from_yaml(yaml).unwrap()
}

fn spec_error(yaml: &str) -> SelectorError {
    let spec: LabelSelectorSpec = from_yaml(yaml).unwrap();
    LabelSelector::try_from(&spec).unwrap_err()
}

fn req(key: &str, operator: Operator, values: &[&str]) -> Requirement {
    let values: Vec<String> = values.iter().map(|v| v.to_string()).collect();
    Requirement::new(key, operator, &values).unwrap()
}

#[test]
fn empty_selector_matches_everything() {
    let s = selector("{}");
    assert!(s.is_everything());
    assert!(s.matches(&labels(&[])));
    assert!(s.matches(&labels(&[("app", "x")])));
}

#[test]
fn match_labels_need_every_pair() {
    let s = selector("matchLabels: {app: prod, tier: web}");
    assert!(s.matches(&labels(&[("app", "prod"), ("tier", "web"), ("extra", "1")])));
    assert!(!s.matches(&labels(&[("app", "prod")])));
    assert!(!s.matches(&labels(&[("app", "prod"), ("tier", "db")])));
}

#[test]
fn operators_follow_apimachinery() {
    let none = labels(&[]);
    let a = labels(&[("env", "a")]);
    let c = labels(&[("env", "c")]);
    let cases = [
        (Operator::In, vec!["a", "b"], [false, true, false]),
        (Operator::NotIn, vec!["a", "b"], [true, false, true]),
        (Operator::Exists, vec![], [false, true, true]),
        (Operator::DoesNotExist, vec![], [true, false, false]),
    ];
    for (op, values, want) in cases {
        let r = req("env", op, &values);
        assert_eq!(
            [r.matches(&none), r.matches(&a), r.matches(&c)],
            want,
            "{op}"
        );
    }
}

#[test]
fn match_labels_and_expressions_are_anded() {
    let s = selector(
        "matchLabels: {app: prod}\n\
         matchExpressions:\n\
         - {key: tier, operator: In, values: [web, api]}\n\
         - {key: legacy, operator: DoesNotExist}\n",
    );
    assert!(s.matches(&labels(&[("app", "prod"), ("tier", "api")])));
    assert!(!s.matches(&labels(&[("app", "prod"), ("tier", "api"), ("legacy", "")])));
    assert!(!s.matches(&labels(&[("app", "test"), ("tier", "api")])));
    assert!(!s.matches(&labels(&[("app", "prod")])));
}

#[test]
fn empty_label_values_are_values() {
    let s = selector("matchLabels: {canary: ''}");
    assert!(s.matches(&labels(&[("canary", "")])));
    assert!(!s.matches(&labels(&[])));
}

#[test]
fn validation_errors_name_the_field() {
    for (yaml, path, needle) in [
        (
            "matchExpressions: [{key: app, operator: Equals, values: [x]}]",
            "matchExpressions[0].operator",
            r#"unknown operator "Equals" (expected In, NotIn, Exists, DoesNotExist)"#,
        ),
        (
            "matchExpressions: [{key: app, operator: in, values: [x]}]",
            "matchExpressions[0].operator",
            "unknown operator \"in\"",
        ),
        (
            "matchExpressions: [{key: app, operator: In}]",
            "matchExpressions[0].values",
            "operator In needs at least one value",
        ),
        (
            "matchExpressions: [{key: app, operator: NotIn, values: []}]",
            "matchExpressions[0].values",
            "operator NotIn needs",
        ),
        (
            "matchExpressions: [{key: app, operator: Exists, values: [x]}]",
            "matchExpressions[0].values",
            "operator Exists takes no values",
        ),
        (
            "matchExpressions: [{key: a, operator: DoesNotExist, values: [x]}]",
            "matchExpressions[0].values",
            "DoesNotExist takes no",
        ),
        (
            "matchExpressions: [{key: 'a b', operator: Exists}]",
            "matchExpressions[0].key",
            "invalid label key \"a b\": name must be",
        ),
        (
            "matchExpressions: [{key: a, operator: Exists}, {key: a, operator: In, values: [ok, -bad]}]",
            "matchExpressions[1].values[1]",
            "invalid label value \"-bad\"",
        ),
        (
            "matchLabels: {'Example.com/app': x}",
            "matchLabels",
            "prefix must be lowercase",
        ),
        (
            "matchLabels: {'a/b/c': x}",
            "matchLabels",
            "has more than one '/'",
        ),
        (
            "matchLabels: {app: 'x y'}",
            "matchLabels[\"app\"]",
            "invalid label value \"x y\"",
        ),
    ] {
        let e = spec_error(yaml);
        assert_eq!(e.path, path, "{yaml}");
        assert!(
            e.to_string().starts_with(&format!("{path}: ")),
            "{yaml}: {e}"
        );
        assert!(e.to_string().contains(needle), "{yaml}: {e}");
    }
}

#[test]
fn deserialize_validates_and_rejects_unknown_fields() {
    let bad =
        from_yaml::<LabelSelector>("matchExpressions: [{key: a, operator: Equals}]").unwrap_err();
    assert!(
        bad.to_string()
            .contains("matchExpressions[0].operator: unknown operator"),
        "{bad}"
    );
    let dup = from_yaml::<LabelSelector>("matchLabels: {app: a, tier: b, app: c}").unwrap_err();
    assert!(
        dup.to_string().contains("duplicate label key \"app\""),
        "{dup}"
    );
    let typo = from_yaml::<LabelSelector>("matchLabel: {app: x}").unwrap_err();
    assert!(
        typo.to_string().contains("unknown field `matchLabel`"),
        "{typo}"
    );
    let typo = from_yaml::<LabelSelector>("matchExpressions: [{key: a, operator: In, value: [x]}]");
    assert!(
        typo.unwrap_err()
            .to_string()
            .contains("unknown field `value`")
    );
}

#[test]
fn displays_like_kubectl() {
    let s = selector(
        "matchLabels: {app: prod}\n\
         matchExpressions:\n\
         - {key: tier, operator: In, values: [web, api]}\n\
         - {key: env, operator: NotIn, values: [dev]}\n\
         - {key: team, operator: Exists}\n\
         - {key: legacy, operator: DoesNotExist}\n",
    );
    assert_eq!(
        s.to_string(),
        "app=prod,tier in (api,web),env notin (dev),team,!legacy"
    );
    assert_eq!(LabelSelector::everything().to_string(), "");
}

const KEYS: [&str; 5] = ["app", "tier", "env", "example.com/team", "x"];
const VALUES: [&str; 4] = ["a", "b", "c", ""];

// Few keys and values, so that generated selectors and label sets
// overlap often enough for the properties to say something.
fn label_set() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(
        prop::sample::select(&KEYS[..]).prop_map(String::from),
        prop::sample::select(&VALUES[..]).prop_map(String::from),
        0..5,
    )
}

fn value_list() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(
        prop::sample::select(&VALUES[..]).prop_map(String::from),
        1..4,
    )
}

fn requirement() -> impl Strategy<Value = Requirement> {
    let ops = [
        Operator::In,
        Operator::NotIn,
        Operator::Exists,
        Operator::DoesNotExist,
    ];
    (
        prop::sample::select(&KEYS[..]),
        prop::sample::select(ops.to_vec()),
        value_list(),
    )
        .prop_map(|(k, op, vs)| {
            let vs = if op.takes_values() { vs } else { Vec::new() };
            Requirement::new(k, op, &vs).unwrap()
        })
}

fn any_selector() -> impl Strategy<Value = LabelSelector> {
    (
        prop::collection::vec(requirement(), 0..4),
        label_set().prop_map(|l| l.into_iter().take(2).collect()),
    )
        .prop_map(|(requirements, match_labels)| LabelSelector {
            match_labels,
            requirements,
        })
}

proptest! {
    #[test]
    fn a_label_sets_own_labels_select_it(own in label_set(), extra in label_set()) {
        let spec = LabelSelectorSpec { match_labels: own.clone(), ..Default::default() };
        let s = LabelSelector::try_from(&spec).unwrap();
        prop_assert!(s.matches(&own));
        // Extra labels on the object never stop a match.
        let mut more = extra;
        more.extend(own.clone());
        prop_assert!(s.matches(&more));
    }

    #[test]
    fn not_in_is_the_negation_of_in(l in label_set(), key in prop::sample::select(&KEYS[..]), vs in value_list()) {
        let vs: Vec<&str> = vs.iter().map(String::as_str).collect();
        let r_in = req(key, Operator::In, &vs);
        let r_not_in = req(key, Operator::NotIn, &vs);
        prop_assert_eq!(r_not_in.matches(&l), !r_in.matches(&l));
        // In particular when the key is present: then exactly one holds.
        let mut present = l.clone();
        present.entry(key.to_string()).or_insert_with(|| "a".into());
        prop_assert!(r_in.matches(&present) ^ r_not_in.matches(&present));
    }

    #[test]
    fn does_not_exist_is_the_negation_of_exists(l in label_set(), key in prop::sample::select(&KEYS[..])) {
        prop_assert_eq!(
            req(key, Operator::DoesNotExist, &[]).matches(&l),
            !req(key, Operator::Exists, &[]).matches(&l)
        );
    }

    #[test]
    fn adding_a_requirement_never_widens(s in any_selector(), r in requirement(), l in label_set()) {
        let narrower = s.clone().and(r);
        prop_assert!(!narrower.matches(&l) || s.matches(&l));
    }

    #[test]
    fn match_label_is_in_with_one_value(l in label_set(), key in prop::sample::select(&KEYS[..]), v in prop::sample::select(&VALUES[..])) {
        let spec = LabelSelectorSpec {
            match_labels: [(key.to_string(), v.to_string())].into(),
            ..Default::default()
        };
        let s = LabelSelector::try_from(&spec).unwrap();
        prop_assert_eq!(s.matches(&l), req(key, Operator::In, &[v]).matches(&l));
    }
}
