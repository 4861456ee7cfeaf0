//! The policy file as written: the serde shapes, the YAML parse, and
//! errors that point at the line, the field and the rule.

use serde::Deserialize;
use serde_path_to_error::Segment;

use super::file::Access;
use super::{
    names::Malformed,
    presets::PresetAccess,
    selector::{LabelSelectorSpec, SelectorError},
};
use crate::bpf::enforcer::Mode;

/// [`Mode`] as the policy spells it; `Mode` itself has no `Deserialize`.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum ModeSpec {
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
pub(super) struct PolicySpec {
    #[serde(default)]
    pub(super) default_mode: ModeSpec,
    #[serde(default)]
    pub(super) rules: Vec<RuleSpec>,
    pub(super) destinations: Option<Vec<String>>,
    /// Presets whose rules follow the file's own (`imdsguard presets`).
    #[serde(default)]
    pub(super) include: Vec<String>,
    #[serde(default)]
    pub(super) preset_access: PresetAccess,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RuleSpec {
    pub(super) name: String,
    pub(super) namespaces: Option<Vec<String>>,
    pub(super) namespace_selector: Option<LabelSelectorSpec>,
    pub(super) pod_selector: Option<LabelSelectorSpec>,
    #[serde(default)]
    pub(super) access: Access,
    pub(super) mode: Option<ModeSpec>,
    /// `access: filter` only: a built-in profile (`imdsguard profiles`).
    pub(super) profile: Option<String>,
    /// `access: filter` only: more path patterns the pods may read.
    pub(super) paths: Option<Vec<String>>,
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
    /// document itself), `line` and `column` are the parser's, 1-based.
    #[error("{}invalid policy yaml{}", path_prefix(.path), at_line(*.line, *.column))]
    Yaml {
        path: String,
        line: Option<usize>,
        column: Option<usize>,
        /// Boxed: serde-saphyr's error is large, and every other variant
        /// small.
        #[source]
        source: Box<serde_saphyr::Error>,
    },

    #[error("{rule}.name: invalid rule name {name:?}: {problem}")]
    InvalidRuleName {
        rule: RuleRef,
        name: String,
        problem: Malformed,
    },

    #[error("{rule}.name: rule name is already used by rules[{first}]")]
    DuplicateRuleName { rule: RuleRef, first: usize },

    #[error("{rule}.mode: only deny rules take a mode; an allow rule never denies")]
    ModeOnAllowRule { rule: RuleRef },

    #[error("{rule}.mode: only deny rules take a mode; a filter rule's profile and paths decide")]
    ModeOnFilterRule { rule: RuleRef },

    #[error("{rule}.{field}: only filter rules (`access: filter`) take a {field}")]
    FilterFieldOnOtherRule { rule: RuleRef, field: &'static str },

    #[error(
        "{rule}: a filter rule needs a profile or paths (or both); with neither it would allow nothing, so use `access: deny`"
    )]
    FilterWithoutPaths { rule: RuleRef },

    /// A profile that does not exist, a pattern that does not parse, or one
    /// that reaches a never-allowed path (credentials, user-data, ...).
    /// Boxed: `crate::Error` is large and every other variant small.
    #[error("{rule}: {error}")]
    Filter {
        rule: RuleRef,
        error: Box<crate::Error>,
    },

    #[error(
        "{rule}.namespaces: an empty list matches no namespace; omit the field to match every namespace"
    )]
    NoNamespaces { rule: RuleRef },

    #[error("{rule}.namespaces[{index}]: invalid namespace name {name:?}: {problem}")]
    InvalidNamespace {
        rule: RuleRef,
        index: usize,
        name: String,
        problem: Malformed,
    },

    #[error("{rule}.{field}.{error}")]
    Selector {
        rule: RuleRef,
        field: &'static str,
        error: SelectorError,
    },

    #[error(
        "destinations: an empty list protects nothing; omit the field to keep the built-in destinations"
    )]
    NoDestinations,

    #[error("destinations[{index}]: {error}")]
    Destination { index: usize, error: crate::Error },

    #[error("include[{index}]: unknown preset {name:?}; the presets are {known}")]
    UnknownPreset {
        index: usize,
        name: String,
        known: String,
    },

    #[error("include[{index}]: preset {name:?} is already included by include[{first}]")]
    DuplicateInclude {
        index: usize,
        name: String,
        first: usize,
    },

    /// A preset's rule does not compile: a broken build, which the unit
    /// tests catch.
    #[error("include[{index}] ({name}): {error}")]
    Preset {
        index: usize,
        name: String,
        error: Box<PolicyError>,
    },

    #[error("the built-in presets (presets.yaml) do not parse")]
    PresetsData(#[source] Box<serde_saphyr::Error>),

    /// Each destination parses, but together they do not fit the kernel's maps.
    #[error("destinations: {error}")]
    DestinationSet { error: crate::Error },
}

fn path_prefix(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!("{path}: ")
    }
}

fn at_line(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(" at line {l} column {c}"),
        _ => String::new(),
    }
}

/// The parser settings for policies.
pub(crate) fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        // Our errors carry the line and column; a rendered snippet would put
        // a multi-line drawing into one-line (JSON) logs.
        with_snippet: false,
        // Repeated keys reach the visitors as they did with serde_yaml:
        // structs refuse repeated fields and `matchLabels` names the key.
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::PassThrough,
        // As serde_yaml did, `app:` in `matchLabels` is the empty label
        // value rather than an error.
        null_as_string: true,
    }
}

pub(super) fn parse_spec(yaml: &str) -> Result<PolicySpec, PolicyError> {
    // serde-saphyr lends its deserializer to a closure only, so the path
    // tracker is set up by hand where `serde_path_to_error::deserialize`
    // would do it.
    let mut path = None;
    serde_saphyr::with_deserializer_from_str_with_options(yaml, yaml_options(), |de| {
        let mut track = serde_path_to_error::Track::new();
        let spec = PolicySpec::deserialize(serde_path_to_error::Deserializer::new(de, &mut track));
        if spec.is_err() {
            path = Some(track.path());
        }
        spec
    })
    .map_err(|source| {
        // No path: the error lies outside the document (a second one, say).
        let path = path.map(|p| describe_path(yaml, &p)).unwrap_or_default();
        let location = source.location();
        let number = |n: u64| usize::try_from(n).ok();
        PolicyError::Yaml {
            path,
            line: location.and_then(|l| number(l.line())),
            column: location.and_then(|l| number(l.column())),
            source: Box::new(source),
        }
    })
}

/// Renders a serde path in the style of the validation errors, naming the
/// rule when the document gives it one: `rules[1] (test-denied).access`.
fn describe_path(yaml: &str, path: &serde_path_to_error::Path) -> String {
    let mut out = String::new();
    for segment in path.iter() {
        let key = match segment {
            Segment::Seq { index } => {
                let in_rules = out == "rules";
                out.push_str(&format!("[{index}]"));
                if in_rules && let Some(name) = rule_name(yaml, *index) {
                    out.push_str(&format!(" ({name})"));
                }
                continue;
            }
            Segment::Map { key } | Segment::Enum { variant: key } => key.as_str(),
            Segment::Unknown => "?",
        };
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(key);
    }
    out
}

/// The rule's name from a loose parse that ignores everything else, so it
/// works on documents the strict parse refused; only for error messages.
fn rule_name(yaml: &str, index: usize) -> Option<String> {
    #[derive(Deserialize)]
    struct Names {
        rules: Vec<NameOnly>,
    }
    #[derive(Deserialize)]
    struct NameOnly {
        name: Option<serde_json::Value>,
    }
    let options = serde_saphyr::options! {
        // A label key repeated somewhere in the rule leaves its name
        // readable; a repeated `name` does not.
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::PassThrough,
    };
    let names: Names = serde_saphyr::from_str_with_options(yaml, options).ok()?;
    let name = names.rules.into_iter().nth(index)?.name?;
    name.as_str().filter(|n| !n.is_empty()).map(str::to_owned)
}
