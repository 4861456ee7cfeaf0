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
mod tests;
