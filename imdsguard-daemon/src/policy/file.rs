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
//! reported), which defaults to `defaultMode`, and `access: filter` sends
//! the pod's metadata requests through the agent's proxy, which passes only
//! the rule's `profile` and `paths`. A pod no rule applies to gets
//! no entry of its own, so the daemon's global default covers it. An empty
//! document is the empty policy: no rules, `defaultMode: enforce`, and the
//! built-in destinations.
//!
//! Presets (`imdsguard presets`) add the rules for a cloud's node
//! components, named `<preset>/<entry>`, after the file's own rules, so an
//! own rule for the same pods decides first:
//!
//! ```yaml
//! include: [eks]                # eks | gke | aks | generic
//! presetAccess: least           # least (default): filter entries need the
//!                               # agent's proxy; allow: they become allow rules
//! defaultMode: audit
//! ```
//!
//! Mistakes are errors, never a silently different policy: unknown fields
//! (a misspelt `podSelector` would otherwise select every pod), `mode` on an
//! allow rule, duplicate or malformed rule names, names that could never
//! match a namespace, invalid selectors, unknown or repeated presets, and
//! destinations that do not parse or do not fit the kernel's maps. Each error names the rule and the field,
//! e.g. `rules[1] (test-denied).podSelector.matchExpressions[0].operator`.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use super::{
    names,
    presets::{self, PresetAccess},
    selector::{LabelSelector, LabelSelectorSpec},
    spec::{PolicyError, RuleRef, RuleSpec, parse_spec},
};
use crate::{
    bpf::enforcer::Mode,
    destinations::{self, Destination},
    filter::rules::FilterRules,
    vocabulary::Action,
};

/// What a matching rule grants.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    #[default]
    Allow,
    Deny,
    /// Reach the metadata service through the proxy, for the rule's
    /// profile and paths only.
    Filter,
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
    /// The compiled allow list of a filter rule.
    filter: Option<Arc<FilterRules>>,
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
        self.namespaces
            .as_ref()
            .is_none_or(|names| names.contains(namespace))
            && self
                .namespace_selector
                .as_ref()
                .is_none_or(|s| s.matches(namespace_labels))
            && self
                .pod_selector
                .as_ref()
                .is_none_or(|s| s.matches(pod_labels))
    }

    /// The action for pods this rule decides.
    pub fn action(&self, default_mode: Mode) -> Action {
        match self.access {
            Access::Allow => Action::Allow,
            Access::Deny => self.mode.unwrap_or(default_mode).action(),
            Access::Filter => Action::Filter,
        }
    }

    /// What a filter rule's pods may read; None for allow and deny rules.
    pub fn filter(&self) -> Option<&Arc<FilterRules>> {
        self.filter.as_ref()
    }

    fn from_spec(
        index: usize,
        spec: RuleSpec,
        seen: &mut BTreeMap<String, usize>,
    ) -> Result<Self, PolicyError> {
        let name_problem = names::check_dns_label(&spec.name).err();
        let rule = RuleRef {
            index,
            name: if name_problem.is_none() {
                spec.name.clone()
            } else {
                String::new()
            },
        };
        if let Some(problem) = name_problem {
            return Err(PolicyError::InvalidRuleName {
                rule,
                name: spec.name,
                problem,
            });
        }
        if let Some(&first) = seen.get(&spec.name) {
            return Err(PolicyError::DuplicateRuleName { rule, first });
        }
        seen.insert(spec.name.clone(), index);
        if spec.access != Access::Deny && spec.mode.is_some() {
            return Err(match spec.access {
                Access::Allow => PolicyError::ModeOnAllowRule { rule },
                _ => PolicyError::ModeOnFilterRule { rule },
            });
        }
        let filter = compile_filter(&rule, spec.access, spec.profile, spec.paths)?;
        let namespaces = spec
            .namespaces
            .map(|list| validate_namespaces(&rule, list))
            .transpose()?;
        let selector = |field: &'static str, spec: Option<LabelSelectorSpec>| {
            spec.map(|s| LabelSelector::try_from(&s))
                .transpose()
                .map_err(|error| PolicyError::Selector {
                    rule: rule.clone(),
                    field,
                    error,
                })
        };
        Ok(Rule {
            namespace_selector: selector("namespaceSelector", spec.namespace_selector)?,
            pod_selector: selector("podSelector", spec.pod_selector)?,
            name: spec.name,
            namespaces,
            access: spec.access,
            mode: spec.mode.map(Mode::from),
            filter,
        })
    }
}

/// A filter rule's allow list; refuses `profile`/`paths` on other rules,
/// a filter rule with neither, and anything `FilterRules` refuses (unknown
/// profiles, bad patterns, never-allowed paths).
fn compile_filter(
    rule: &RuleRef,
    access: Access,
    profile: Option<String>,
    paths: Option<Vec<String>>,
) -> Result<Option<Arc<FilterRules>>, PolicyError> {
    if access != Access::Filter {
        let field = match (&profile, &paths) {
            (Some(_), _) => "profile",
            (None, Some(_)) => "paths",
            (None, None) => return Ok(None),
        };
        return Err(PolicyError::FilterFieldOnOtherRule {
            rule: rule.clone(),
            field,
        });
    }
    let profiles: Vec<String> = profile.into_iter().collect();
    let paths = paths.unwrap_or_default();
    if profiles.is_empty() && paths.is_empty() {
        return Err(PolicyError::FilterWithoutPaths { rule: rule.clone() });
    }
    FilterRules::compile(&profiles, &paths)
        .map(|r| Some(Arc::new(r)))
        .map_err(|error| PolicyError::Filter {
            rule: rule.clone(),
            error: Box::new(error),
        })
}

fn validate_namespaces(rule: &RuleRef, list: Vec<String>) -> Result<BTreeSet<String>, PolicyError> {
    if list.is_empty() {
        return Err(PolicyError::NoNamespaces { rule: rule.clone() });
    }
    for (index, name) in list.iter().enumerate() {
        if let Err(problem) = names::check_dns_label(name) {
            return Err(PolicyError::InvalidNamespace {
                rule: rule.clone(),
                index,
                name: name.clone(),
                problem,
            });
        }
    }
    Ok(list.into_iter().collect())
}

/// Which rule decided a pod, and how. (Not a kernel verdict: those are
/// [`crate::decisions::Decision`].)
#[derive(Clone, Copy, Debug)]
pub struct RuleMatch<'p> {
    pub action: Action,
    pub rule_index: usize,
    pub rule_name: &'p str,
    /// A filter rule's allow list.
    pub filter: Option<&'p Arc<FilterRules>>,
}

/// Equal when decided by the same rule the same way; a filter rule's list
/// is the same list, not an equal one.
impl PartialEq for RuleMatch<'_> {
    fn eq(&self, other: &Self) -> bool {
        (self.action, self.rule_index, self.rule_name)
            == (other.action, other.rule_index, other.rule_name)
            && match (self.filter, other.filter) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (a, b) => a.is_none() && b.is_none(),
            }
    }
}

impl Eq for RuleMatch<'_> {}

/// The policy file, parsed and validated. The default policy has no rules and enforces.
#[derive(Clone, Debug, Default)]
pub struct PolicyFile {
    default_mode: Mode,
    rules: Vec<Rule>,
    destinations: Option<Vec<Destination>>,
}

impl PolicyFile {
    /// Reads and parses a policy file; returns its text too. Errors name
    /// the file.
    pub fn load(path: &std::path::Path) -> crate::Result<(String, Self)> {
        let text = std::fs::read_to_string(path).map_err(crate::Error::io("read policy", path))?;
        let policy = Self::from_yaml(&text).map_err(|source| crate::Error::Policy {
            path: path.into(),
            source: Box::new(source),
        })?;
        Ok((text, policy))
    }

    pub fn from_yaml(yaml: &str) -> Result<Self, PolicyError> {
        let spec = parse_spec(yaml)?;
        let mut seen = BTreeMap::new();
        let mut rules = spec
            .rules
            .into_iter()
            .enumerate()
            .map(|(i, r)| Rule::from_spec(i, r, &mut seen))
            .collect::<Result<Vec<_>, _>>()?;
        // After the own rules, so that an own rule matching the same pods
        // decides first: a preset is a default, the file is the operator's word.
        rules.extend(included_rules(&spec.include, spec.preset_access)?);
        let destinations = spec.destinations.map(parse_destinations).transpose()?;
        Ok(Self {
            default_mode: spec.default_mode.into(),
            rules,
            destinations,
        })
    }

    /// The first rule that applies to the pod decides; `None` when no rule
    /// does, and the global default applies.
    pub fn evaluate(
        &self,
        namespace: &str,
        namespace_labels: &BTreeMap<String, String>,
        pod_labels: &BTreeMap<String, String>,
    ) -> Option<RuleMatch<'_>> {
        let (rule_index, rule) = self
            .rules
            .iter()
            .enumerate()
            .find(|(_, r)| r.applies(namespace, namespace_labels, pod_labels))?;
        Some(RuleMatch {
            action: rule.action(self.default_mode),
            rule_index,
            rule_name: &rule.name,
            filter: rule.filter.as_ref(),
        })
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

/// The rules of the included presets, in `include` order, named
/// `<preset>/<entry>`: an own rule's name is a DNS label, so it can never
/// clash with one.
fn included_rules(include: &[String], access: PresetAccess) -> Result<Vec<Rule>, PolicyError> {
    let mut first_seen = BTreeMap::new();
    let mut rules = Vec::new();
    for (index, name) in include.iter().enumerate() {
        if let Some(&first) = first_seen.get(name.as_str()) {
            return Err(PolicyError::DuplicateInclude {
                index,
                name: name.clone(),
                first,
            });
        }
        first_seen.insert(name.as_str(), index);
        let preset = presets::get(name)?.ok_or_else(|| PolicyError::UnknownPreset {
            index,
            name: name.clone(),
            known: presets::names().join(", "),
        })?;
        let mut seen = BTreeMap::new();
        for (i, entry) in preset.rules.iter().enumerate() {
            let mut rule =
                Rule::from_spec(i, entry.to_spec(access), &mut seen).map_err(|error| {
                    PolicyError::Preset {
                        index,
                        name: name.clone(),
                        error: Box::new(error),
                    }
                })?;
            rule.name = format!("{}/{}", preset.name, rule.name);
            rules.push(rule);
        }
    }
    Ok(rules)
}

fn parse_destinations(specs: Vec<String>) -> Result<Vec<Destination>, PolicyError> {
    if specs.is_empty() {
        return Err(PolicyError::NoDestinations);
    }
    let parsed = specs
        .iter()
        .enumerate()
        .map(|(index, s)| {
            s.parse::<Destination>()
                .map_err(|error| PolicyError::Destination { index, error })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Compile now so a set that cannot fit the maps fails at load, not when
    // the enforcer is about to write it.
    destinations::compile(&parsed).map_err(|error| PolicyError::DestinationSet { error })?;
    Ok(parsed)
}

#[cfg(test)]
mod tests;

/// Fuzzing the parser with properties: whatever bytes arrive from a
/// ConfigMap, parsing returns a policy or an error, never panics, and a
/// policy that parsed always evaluates without panicking.
#[cfg(test)]
mod fuzz {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::PolicyFile;

    const SEED: &str = "defaultMode: enforce\nrules:\n  - name: prod-reads-imds\n    namespaces: [imds]\n    podSelector:\n      matchLabels: {app: prod}\n      matchExpressions:\n        - {key: tier, operator: In, values: [web]}\n    access: allow\n  - name: test-denied\n    namespaceSelector: {matchLabels: {team: a}}\n    podSelector:\n      matchLabels: {app: test}\n    access: deny\n    mode: audit\ndestinations:\n  - \"169.254.169.254/32 tcp except=53\"\n";

    fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
        proptest::collection::btree_map("[a-z]{1,4}", "[a-z0-9]{0,4}", 0..4)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_text_never_panics(text in ".{0,400}") {
            let _ = PolicyFile::from_yaml(&text);
        }

        /// Single-byte mutations of a valid policy: the parser either
        /// accepts a policy (which then evaluates) or names an error.
        #[test]
        fn mutated_seed_parses_or_errors(pos in 0usize..SEED.len(), byte in any::<u8>(), ns in "[a-z]{1,5}", ns_labels in labels(), pod_labels in labels()) {
            let mut bytes = SEED.as_bytes().to_vec();
            bytes[pos] = byte;
            let text = String::from_utf8_lossy(&bytes);
            match PolicyFile::from_yaml(&text) {
                Ok(p) => {
                    let _ = p.evaluate(&ns, &ns_labels, &pod_labels);
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }
    }
}
