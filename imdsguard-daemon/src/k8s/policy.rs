//! The policy file: which pods may reach the cloud metadata service. It is
//! YAML, mounted from a ConfigMap:
//!
//! ```yaml
//! # Who may reach the cloud metadata service. First matching rule wins.
//! defaultMode: enforce          # enforce | audit, for pods no rule matches (default enforce)
//! rules:
//!   - name: prod-reads-imds
//!     namespaces: [imds]        # optional list of namespace names, ANDed with namespaceSelector (see below)
//!     podSelector:
//!       matchLabels: {app: prod}
//!     access: allow             # allow | deny (default allow)
//!   - name: test-denied
//!     namespaces: [imds]
//!     podSelector:
//!       matchLabels: {app: test}
//!     access: deny
//!     mode: enforce             # only for deny rules: enforce | audit (default: defaultMode)
//! # Optional: replaces the built-in protected destinations.
//! destinations:
//!   - "169.254.169.254/32 tcp except=53 name=aws-imds"
//! ```
//!
//! A rule applies to a pod when its namespace matches and its pod matches:
//!
//! - `namespaces`: the namespace name is one of these;
//! - `namespaceSelector`: a label selector on the namespace's labels;
//! - with both, both must hold; with neither, every namespace matches;
//! - `podSelector`: a label selector on the pod's labels; absent, every pod.
//!
//! Rules are evaluated in order and the first that applies decides:
//! `access: allow` lets the pod reach the metadata service, `access: deny`
//! denies it in `mode` (`enforce`: EPERM and a report; `audit`: allowed but
//! reported), which defaults to `defaultMode`. A pod no rule applies to gets
//! no entry of its own, so the daemon's global default covers it.
//!
//! Mistakes are errors, never a silently different policy: unknown fields
//! (a misspelt `podSelector` would otherwise select every pod), `mode` on an
//! allow rule, duplicate or malformed rule names, names that could never
//! match a namespace, invalid selectors, and destinations that do not parse
//! or do not fit the kernel's maps. Each error names the rule and the field,
//! e.g. `rules[1] (test-denied).podSelector.matchExpressions[0].operator`.

use std::collections::{BTreeMap, BTreeSet};

use imdsguard_common::action;
use serde::{Deserialize, Serialize};
use serde_path_to_error::Segment;

use super::{
    names::{self, Malformed},
    selector::{LabelSelector, LabelSelectorSpec, SelectorError},
};
use crate::{
    destinations::{self, Destination},
    enforcer::Mode,
};

/// What a matching rule grants.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    #[default]
    Allow,
    Deny,
}

/// [`Mode`] as the policy spells it; `Mode` itself has no `Deserialize`.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ModeSpec {
    #[default]
    Enforce,
    Audit,
}

impl From<ModeSpec> for Mode {
    fn from(m: ModeSpec) -> Self {
        match m {
            ModeSpec::Enforce => Mode::Enforce,
            ModeSpec::Audit => Mode::Audit,
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PolicySpec {
    #[serde(default)]
    default_mode: ModeSpec,
    #[serde(default)]
    rules: Vec<RuleSpec>,
    destinations: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RuleSpec {
    name: String,
    namespaces: Option<Vec<String>>,
    namespace_selector: Option<LabelSelectorSpec>,
    pod_selector: Option<LabelSelectorSpec>,
    #[serde(default)]
    access: Access,
    mode: Option<ModeSpec>,
}

/// Names a rule in error messages: `rules[1] (test-denied)`, or `rules[1]`
/// while the rule has no usable name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleRef {
    pub index: usize,
    pub name: String,
}

impl std::fmt::Display for RuleRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rules[{}]", self.index)?;
        if !self.name.is_empty() {
            write!(f, " ({})", self.name)?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// Not YAML, or not the policy's shape: `path` is where (empty for the
    /// document itself), `line` and `column` are serde_yaml's, 1-based.
    #[error("{}invalid policy yaml{}", path_prefix(.path), at_line(*.line, *.column))]
    Yaml {
        path: String,
        line: Option<usize>,
        column: Option<usize>,
        #[source]
        source: serde_yaml::Error,
    },

    #[error("{rule}.name: invalid rule name {name:?}: {problem}")]
    InvalidRuleName { rule: RuleRef, name: String, problem: Malformed },

    #[error("{rule}.name: rule name is already used by rules[{first}]")]
    DuplicateRuleName { rule: RuleRef, first: usize },

    #[error("{rule}.mode: only deny rules take a mode; an allow rule never denies")]
    ModeOnAllowRule { rule: RuleRef },

    #[error("{rule}.namespaces: an empty list matches no namespace; omit the field to match every namespace")]
    NoNamespaces { rule: RuleRef },

    #[error("{rule}.namespaces[{index}]: invalid namespace name {name:?}: {problem}")]
    InvalidNamespace { rule: RuleRef, index: usize, name: String, problem: Malformed },

    #[error("{rule}.{field}.{error}")]
    Selector { rule: RuleRef, field: &'static str, error: SelectorError },

    #[error("destinations: an empty list protects nothing; omit the field to keep the built-in destinations")]
    NoDestinations,

    #[error("destinations[{index}]: {error}")]
    Destination { index: usize, error: crate::Error },

    /// Each destination parses, but together they do not fit the kernel's maps.
    #[error("destinations: {error}")]
    DestinationSet { error: crate::Error },
}

fn path_prefix(path: &str) -> String {
    if path.is_empty() { String::new() } else { format!("{path}: ") }
}

fn at_line(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(" at line {l} column {c}"),
        _ => String::new(),
    }
}

/// One validated rule.
#[derive(Clone, Debug)]
pub struct Rule {
    name: String,
    namespaces: Option<BTreeSet<String>>,
    namespace_selector: Option<LabelSelector>,
    pod_selector: Option<LabelSelector>,
    access: Access,
    mode: Option<Mode>,
}

impl Rule {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn access(&self) -> Access {
        self.access
    }

    pub fn namespaces(&self) -> Option<&BTreeSet<String>> {
        self.namespaces.as_ref()
    }

    pub fn namespace_selector(&self) -> Option<&LabelSelector> {
        self.namespace_selector.as_ref()
    }

    pub fn pod_selector(&self) -> Option<&LabelSelector> {
        self.pod_selector.as_ref()
    }

    /// The deny mode as written; `None` for allow rules and for deny rules
    /// that follow `defaultMode`.
    pub fn mode(&self) -> Option<Mode> {
        self.mode
    }

    pub fn applies(
        &self,
        namespace: &str,
        namespace_labels: &BTreeMap<String, String>,
        pod_labels: &BTreeMap<String, String>,
    ) -> bool {
        self.namespaces.as_ref().is_none_or(|names| names.contains(namespace))
            && self.namespace_selector.as_ref().is_none_or(|s| s.matches(namespace_labels))
            && self.pod_selector.as_ref().is_none_or(|s| s.matches(pod_labels))
    }

    /// The `imdsguard_common::action` value for pods this rule decides.
    pub fn action(&self, default_mode: Mode) -> u32 {
        match self.access {
            Access::Allow => action::ALLOW,
            Access::Deny => self.mode.unwrap_or(default_mode).action(),
        }
    }

    fn from_spec(index: usize, spec: RuleSpec, seen: &mut BTreeMap<String, usize>) -> Result<Self, PolicyError> {
        let name_problem = names::check_dns_label(&spec.name).err();
        let rule = RuleRef { index, name: if name_problem.is_none() { spec.name.clone() } else { String::new() } };
        if let Some(problem) = name_problem {
            return Err(PolicyError::InvalidRuleName { rule, name: spec.name, problem });
        }
        if let Some(&first) = seen.get(&spec.name) {
            return Err(PolicyError::DuplicateRuleName { rule, first });
        }
        seen.insert(spec.name.clone(), index);
        if spec.access == Access::Allow && spec.mode.is_some() {
            return Err(PolicyError::ModeOnAllowRule { rule });
        }
        let namespaces = spec.namespaces.map(|list| validate_namespaces(&rule, list)).transpose()?;
        let selector = |field: &'static str, spec: Option<LabelSelectorSpec>| {
            spec.map(|s| LabelSelector::try_from(&s))
                .transpose()
                .map_err(|error| PolicyError::Selector { rule: rule.clone(), field, error })
        };
        Ok(Rule {
            namespace_selector: selector("namespaceSelector", spec.namespace_selector)?,
            pod_selector: selector("podSelector", spec.pod_selector)?,
            name: spec.name,
            namespaces,
            access: spec.access,
            mode: spec.mode.map(Mode::from),
        })
    }
}

fn validate_namespaces(rule: &RuleRef, list: Vec<String>) -> Result<BTreeSet<String>, PolicyError> {
    if list.is_empty() {
        return Err(PolicyError::NoNamespaces { rule: rule.clone() });
    }
    for (index, name) in list.iter().enumerate() {
        if let Err(problem) = names::check_dns_label(name) {
            return Err(PolicyError::InvalidNamespace { rule: rule.clone(), index, name: name.clone(), problem });
        }
    }
    Ok(list.into_iter().collect())
}

/// Which rule decided a pod, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision<'p> {
    /// An `imdsguard_common::action` value.
    pub action: u32,
    pub rule_index: usize,
    pub rule_name: &'p str,
}

/// A validated policy. The default policy has no rules and enforces.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    default_mode: Mode,
    rules: Vec<Rule>,
    destinations: Option<Vec<Destination>>,
}

impl Policy {
    pub fn from_yaml(yaml: &str) -> Result<Self, PolicyError> {
        let spec: PolicySpec = serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(yaml))
            .map_err(|e| yaml_error(yaml, e))?;
        let mut seen = BTreeMap::new();
        let rules = spec
            .rules
            .into_iter()
            .enumerate()
            .map(|(i, r)| Rule::from_spec(i, r, &mut seen))
            .collect::<Result<_, _>>()?;
        let destinations = spec.destinations.map(parse_destinations).transpose()?;
        Ok(Self { default_mode: spec.default_mode.into(), rules, destinations })
    }

    /// The first rule that applies to the pod decides; `None` when no rule
    /// does, and the global default applies.
    pub fn evaluate(
        &self,
        namespace: &str,
        namespace_labels: &BTreeMap<String, String>,
        pod_labels: &BTreeMap<String, String>,
    ) -> Option<Decision<'_>> {
        let (rule_index, rule) = self
            .rules
            .iter()
            .enumerate()
            .find(|(_, r)| r.applies(namespace, namespace_labels, pod_labels))?;
        Some(Decision { action: rule.action(self.default_mode), rule_index, rule_name: &rule.name })
    }

    pub fn default_mode(&self) -> Mode {
        self.default_mode
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The destinations that replace the built-in set, if the policy has any.
    pub fn destinations(&self) -> Option<&[Destination]> {
        self.destinations.as_deref()
    }
}

fn parse_destinations(specs: Vec<String>) -> Result<Vec<Destination>, PolicyError> {
    if specs.is_empty() {
        return Err(PolicyError::NoDestinations);
    }
    let parsed = specs
        .iter()
        .enumerate()
        .map(|(index, s)| s.parse::<Destination>().map_err(|error| PolicyError::Destination { index, error }))
        .collect::<Result<Vec<_>, _>>()?;
    // Compile now so a set that cannot fit the maps fails at load, not when
    // the enforcer is about to write it.
    destinations::compile(&parsed).map_err(|error| PolicyError::DestinationSet { error })?;
    Ok(parsed)
}

fn yaml_error(yaml: &str, e: serde_path_to_error::Error<serde_yaml::Error>) -> PolicyError {
    let path = describe_path(yaml, e.path());
    let source = e.into_inner();
    let location = source.location();
    PolicyError::Yaml {
        path,
        line: location.as_ref().map(|l| l.line()),
        column: location.as_ref().map(|l| l.column()),
        source,
    }
}

/// Renders a serde path in the style of the validation errors, naming the
/// rule when the document gives it one: `rules[1] (test-denied).access`.
fn describe_path(yaml: &str, path: &serde_path_to_error::Path) -> String {
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => {
                let in_rules = out == "rules";
                out.push_str(&format!("[{index}]"));
                if in_rules && let Some(name) = rule_name(yaml, *index) {
                    out.push_str(&format!(" ({name})"));
                }
            }
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => out.push_str(".?"),
        }
    }
    out
}

/// The rule's name from a loose parse; only for error messages, so any
/// doubt (not a mapping, no string name) means no name.
fn rule_name(yaml: &str, index: usize) -> Option<String> {
    let doc: serde_yaml::Value = serde_yaml::from_str(yaml).ok()?;
    let name = doc.get("rules")?.get(index)?.get("name")?.as_str()?;
    Some(name.to_string()).filter(|n| !n.is_empty())
}
