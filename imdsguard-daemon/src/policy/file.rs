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
//! no entry of its own, so the daemon's global default covers it. An empty
//! document is the empty policy: no rules, `defaultMode: enforce`, and the
//! built-in destinations.
//!
//! Mistakes are errors, never a silently different policy: unknown fields
//! (a misspelt `podSelector` would otherwise select every pod), `mode` on an
//! allow rule, duplicate or malformed rule names, names that could never
//! match a namespace, invalid selectors, and destinations that do not parse
//! or do not fit the kernel's maps. Each error names the rule and the field,
//! e.g. `rules[1] (test-denied).podSelector.matchExpressions[0].operator`.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use imdsguard_common::action;
use serde::{Deserialize, Serialize};

use super::{
    names,
    selector::{LabelSelector, LabelSelectorSpec},
    spec::{PolicyError, RuleRef, RuleSpec, parse_spec},
};
use crate::{
    bpf::enforcer::Mode,
    destinations::{self, Destination},
    filter::rules::FilterRules,
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

    /// The `imdsguard_common::action` value for pods this rule decides.
    pub fn action(&self, default_mode: Mode) -> u32 {
        match self.access {
            Access::Allow => action::ALLOW,
            Access::Deny => self.mode.unwrap_or(default_mode).action(),
            Access::Filter => action::FILTER,
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
            error,
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

/// Which rule decided a pod, and how.
#[derive(Clone, Copy, Debug)]
pub struct Decision<'p> {
    /// An `imdsguard_common::action` value.
    pub action: u32,
    pub rule_index: usize,
    pub rule_name: &'p str,
    /// A filter rule's allow list.
    pub filter: Option<&'p Arc<FilterRules>>,
}

/// Equal when decided by the same rule the same way; a filter rule's list
/// is the same list, not an equal one.
impl PartialEq for Decision<'_> {
    fn eq(&self, other: &Self) -> bool {
        (self.action, self.rule_index, self.rule_name)
            == (other.action, other.rule_index, other.rule_name)
            && match (self.filter, other.filter) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (a, b) => a.is_none() && b.is_none(),
            }
    }
}

impl Eq for Decision<'_> {}

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
        let rules = spec
            .rules
            .into_iter()
            .enumerate()
            .map(|(i, r)| Rule::from_spec(i, r, &mut seen))
            .collect::<Result<_, _>>()?;
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
    ) -> Option<Decision<'_>> {
        let (rule_index, rule) = self
            .rules
            .iter()
            .enumerate()
            .find(|(_, r)| r.applies(namespace, namespace_labels, pod_labels))?;
        Some(Decision {
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
mod tests {
    use super::*;
    use crate::policy::names::Malformed;

    /// The example in this module's documentation, so it cannot rot.
    fn seed() -> String {
        let doc: Vec<&str> = include_str!("file.rs")
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
    ) -> Option<u32> {
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
            Decision {
                action: action::ALLOW,
                rule_index: 0,
                rule_name: "prod-reads-imds",
                filter: None
            }
        );
        let test = p
            .evaluate("imds", &labels(&[]), &labels(&[("app", "test")]))
            .unwrap();
        assert_eq!(
            test,
            Decision {
                action: action::ENFORCE,
                rule_index: 1,
                rule_name: "test-denied",
                filter: None
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
            Some(action::AUDIT)
        );
        let p = PolicyFile::from_yaml(
            "defaultMode: audit\n\
             rules:\n\
             - {name: follows-default, access: deny}\n",
        )
        .unwrap();
        assert_eq!(p.default_mode(), Mode::Audit);
        assert_eq!(action_of(&p, "any", &[], &[]), Some(action::AUDIT));
        let p = PolicyFile::from_yaml(
            "defaultMode: audit\nrules: [{name: strict, access: deny, mode: enforce}]",
        )
        .unwrap();
        assert_eq!(action_of(&p, "any", &[], &[]), Some(action::ENFORCE));
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
            Some((0, action::AUDIT))
        );
        assert_eq!(decide("imds", &[("app", "x")]), Some((1, action::ALLOW)));
        assert_eq!(decide("other", &[]), Some((2, action::ENFORCE)));
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
}

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
