//! Presets: named sets of rules for the node components of each managed
//! Kubernetes, read from `presets.yaml` (embedded). A policy includes them
//! with `include: [eks]`; the data, with each entry's source, is meant to
//! be checked against the upstream manifests, not read as code.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use super::{
    file::Access,
    selector::LabelSelectorSpec,
    spec::{PolicyError, RuleSpec},
};

const DATA: &str = include_str!("presets.yaml");

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    pub name: String,
    pub description: String,
    pub rules: Vec<PresetRule>,
}

/// One component: a rule, and why it gets that access.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PresetRule {
    pub name: String,
    pub namespaces: Vec<String>,
    pub pod_selector: LabelSelectorSpec,
    pub access: Access,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<String>>,
    /// What the component reads, and so why this access.
    pub needs: String,
    /// The upstream manifest and doc the entry was taken from.
    pub source: String,
}

/// How included filter entries are granted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PresetAccess {
    /// Each component gets the least it needs: filter entries stay filter
    /// rules, which need the agent's filter proxy.
    #[default]
    Least,
    /// Filter entries become allow rules: for agents without the proxy,
    /// where a filter rule would refuse the policy.
    Allow,
}

impl PresetRule {
    /// The rule as a policy file would write it.
    pub(super) fn to_spec(&self, access: PresetAccess) -> RuleSpec {
        let widen = access == PresetAccess::Allow && self.access == Access::Filter;
        RuleSpec {
            name: self.name.clone(),
            namespaces: Some(self.namespaces.clone()),
            namespace_selector: None,
            pod_selector: Some(self.pod_selector.clone()),
            access: if widen { Access::Allow } else { self.access },
            mode: None,
            profile: self.profile.clone().filter(|_| !widen),
            paths: self.paths.clone().filter(|_| !widen),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    presets: Vec<Preset>,
}

/// Every preset, in file order.
pub fn all() -> Result<&'static [Preset], PolicyError> {
    static PRESETS: OnceLock<Vec<Preset>> = OnceLock::new();
    if let Some(p) = PRESETS.get() {
        return Ok(p);
    }
    // The unit tests prove the embedded file parses; the error is for a
    // build that broke it.
    let file: File = serde_saphyr::from_str(DATA)
        .map_err(|source| PolicyError::PresetsData(Box::new(source)))?;
    Ok(PRESETS.get_or_init(|| file.presets))
}

/// The preset called `name`, or None.
pub fn get(name: &str) -> Result<Option<&'static Preset>, PolicyError> {
    Ok(all()?.iter().find(|p| p.name == name))
}

/// The preset names, for error messages.
pub fn names() -> Vec<&'static str> {
    all()
        .map(|all| all.iter().map(|p| p.name.as_str()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
