//! Kubernetes label selectors, with the semantics of `metav1.LabelSelector`.
//!
//! `matchLabels` and every `matchExpressions` entry are ANDed. Operators:
//!
//! - `In`: the key is present and its value is one of `values`;
//! - `NotIn`: the key is absent, or its value is none of `values`;
//! - `Exists` / `DoesNotExist`: the key is present / absent.
//!
//! The empty selector `{}` matches everything. An absent selector is not a
//! [`LabelSelector`] at all: what it means is the caller's decision.
//!
//! [`LabelSelectorSpec`] is the shape as written (what serde reads);
//! [`LabelSelector`] is the validated form that can match.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    str::FromStr,
};

use serde::{Deserialize, Serialize};

use crate::policy::names::{self, KeyProblem, Malformed};

/// A label selector as written, before validation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelectorSpec {
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "unique_keys"
    )]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<RequirementSpec>,
}

/// One `matchExpressions` entry as written. The operator stays a string
/// here so that an unknown one is reported with its field path.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RequirementSpec {
    pub key: String,
    pub operator: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl Operator {
    const fn takes_values(self) -> bool {
        matches!(self, Operator::In | Operator::NotIn)
    }
}

impl fmt::Display for Operator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operator::In => "In",
            Operator::NotIn => "NotIn",
            Operator::Exists => "Exists",
            Operator::DoesNotExist => "DoesNotExist",
        })
    }
}

impl FromStr for Operator {
    type Err = SelectorProblem;
    fn from_str(s: &str) -> Result<Self, SelectorProblem> {
        // Case-sensitive, as the API server is: "in" is a typo, not a synonym.
        match s {
            "In" => Ok(Operator::In),
            "NotIn" => Ok(Operator::NotIn),
            "Exists" => Ok(Operator::Exists),
            "DoesNotExist" => Ok(Operator::DoesNotExist),
            other => Err(SelectorProblem::UnknownOperator {
                found: other.into(),
            }),
        }
    }
}

/// What is wrong with a selector, at [`SelectorError::path`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SelectorProblem {
    #[error("unknown operator {found:?} (expected In, NotIn, Exists, DoesNotExist)")]
    UnknownOperator { found: String },
    #[error("operator {operator} needs at least one value")]
    ValuesRequired { operator: Operator },
    #[error("operator {operator} takes no values")]
    ValuesForbidden { operator: Operator },
    #[error("invalid label key {key:?}: {problem}")]
    InvalidKey { key: String, problem: KeyProblem },
    #[error("invalid label value {value:?}: {problem}")]
    InvalidValue { value: String, problem: Malformed },
}

/// A selector problem and where it is, relative to the selector, e.g.
/// `matchExpressions[0].operator`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct SelectorError {
    pub path: String,
    pub problem: SelectorProblem,
}

impl SelectorError {
    fn at(path: impl Into<String>, problem: SelectorProblem) -> Self {
        Self {
            path: path.into(),
            problem,
        }
    }

    fn within(mut self, parent: &str) -> Self {
        self.path = format!("{parent}.{}", self.path);
        self
    }
}

/// One validated `matchExpressions` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    key: String,
    operator: Operator,
    values: BTreeSet<String>,
}

impl Requirement {
    /// Validates as the API server does; error paths are relative to the
    /// requirement (`key`, `values`, `values[1]`).
    pub fn new(key: &str, operator: Operator, values: &[String]) -> Result<Self, SelectorError> {
        check_key(key).map_err(|p| SelectorError::at("key", p))?;
        match (operator.takes_values(), values.is_empty()) {
            (true, true) => {
                return Err(SelectorError::at(
                    "values",
                    SelectorProblem::ValuesRequired { operator },
                ));
            }
            (false, false) => {
                return Err(SelectorError::at(
                    "values",
                    SelectorProblem::ValuesForbidden { operator },
                ));
            }
            _ => {}
        }
        for (i, v) in values.iter().enumerate() {
            check_value(v).map_err(|p| SelectorError::at(format!("values[{i}]"), p))?;
        }
        Ok(Self {
            key: key.into(),
            operator,
            values: values.iter().cloned().collect(),
        })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn operator(&self) -> Operator {
        self.operator
    }

    pub fn values(&self) -> &BTreeSet<String> {
        &self.values
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            // An absent key is "not in" any set, as in apimachinery.
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

impl TryFrom<&RequirementSpec> for Requirement {
    type Error = SelectorError;
    fn try_from(spec: &RequirementSpec) -> Result<Self, SelectorError> {
        let operator = spec
            .operator
            .parse()
            .map_err(|p| SelectorError::at("operator", p))?;
        Requirement::new(&spec.key, operator, &spec.values)
    }
}

/// A validated label selector.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "LabelSelectorSpec")]
pub struct LabelSelector {
    match_labels: BTreeMap<String, String>,
    requirements: Vec<Requirement>,
}

impl LabelSelector {
    /// The empty selector, which matches every label set.
    pub fn everything() -> Self {
        Self::default()
    }

    /// This selector with one more requirement ANDed in.
    pub fn and(mut self, requirement: Requirement) -> Self {
        self.requirements.push(requirement);
        self
    }

    pub fn match_labels(&self) -> &BTreeMap<String, String> {
        &self.match_labels
    }

    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    pub fn is_everything(&self) -> bool {
        self.match_labels.is_empty() && self.requirements.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.requirements.iter().all(|r| r.matches(labels))
    }
}

impl TryFrom<&LabelSelectorSpec> for LabelSelector {
    type Error = SelectorError;
    fn try_from(spec: &LabelSelectorSpec) -> Result<Self, SelectorError> {
        for (k, v) in &spec.match_labels {
            check_key(k).map_err(|p| SelectorError::at("matchLabels", p))?;
            check_value(v).map_err(|p| SelectorError::at(format!("matchLabels[{k:?}]"), p))?;
        }
        let requirements = spec
            .match_expressions
            .iter()
            .enumerate()
            .map(|(i, r)| {
                Requirement::try_from(r).map_err(|e| e.within(&format!("matchExpressions[{i}]")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            match_labels: spec.match_labels.clone(),
            requirements,
        })
    }
}

impl TryFrom<LabelSelectorSpec> for LabelSelector {
    type Error = SelectorError;
    fn try_from(spec: LabelSelectorSpec) -> Result<Self, SelectorError> {
        Self::try_from(&spec)
    }
}

/// The `kubectl -l` form, e.g. `app=prod,tier in (a,b),!legacy`; the empty
/// selector prints as nothing, as apimachinery's does.
impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = self
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>();
        for r in &self.requirements {
            let set = || r.values.iter().cloned().collect::<Vec<_>>().join(",");
            parts.push(match r.operator {
                Operator::In => format!("{} in ({})", r.key, set()),
                Operator::NotIn => format!("{} notin ({})", r.key, set()),
                Operator::Exists => r.key.clone(),
                Operator::DoesNotExist => format!("!{}", r.key),
            });
        }
        f.write_str(&parts.join(","))
    }
}

/// A map that refuses repeated keys. YAML forbids them, but a plain map
/// would keep the last one, turning `{app: a, app: b}` into `app=b`.
fn unique_keys<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    struct Unique;
    impl<'de> serde::de::Visitor<'de> for Unique {
        type Value = BTreeMap<String, String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map of label keys to values")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((k, v)) = map.next_entry::<String, String>()? {
                if out.contains_key(&k) {
                    return Err(serde::de::Error::custom(format!(
                        "duplicate label key {k:?}"
                    )));
                }
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_map(Unique)
}

fn check_key(key: &str) -> Result<(), SelectorProblem> {
    names::check_label_key(key).map_err(|problem| SelectorProblem::InvalidKey {
        key: key.into(),
        problem,
    })
}

fn check_value(value: &str) -> Result<(), SelectorProblem> {
    names::check_label_value(value).map_err(|problem| SelectorProblem::InvalidValue {
        value: value.into(),
        problem,
    })
}

#[cfg(test)]
mod tests {
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
        let bad = from_yaml::<LabelSelector>("matchExpressions: [{key: a, operator: Equals}]")
            .unwrap_err();
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
        let typo =
            from_yaml::<LabelSelector>("matchExpressions: [{key: a, operator: In, value: [x]}]");
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
}
