//! The built-in filter profiles, read from `profiles.yaml` (embedded): the
//! lists are data a reviewer can check against the providers' docs, not
//! code.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

const DATA: &str = include_str!("profiles.yaml");

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    pub description: String,
    pub paths: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    profiles: Vec<Profile>,
}

/// Every built-in profile, in file order.
pub fn all() -> Result<&'static [Profile]> {
    static PROFILES: OnceLock<Vec<Profile>> = OnceLock::new();
    if let Some(p) = PROFILES.get() {
        return Ok(p);
    }
    // The unit tests prove the embedded file parses; the error is for a
    // build that broke it.
    let file: File =
        serde_saphyr::from_str(DATA).map_err(|source| Error::ProfilesData(Box::new(source)))?;
    Ok(PROFILES.get_or_init(|| file.profiles))
}

/// The profile called `name`.
pub fn get(name: &str) -> Result<&'static Profile> {
    all()?
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| Error::UnknownProfile {
            name: name.to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::{never, pattern::Pattern};

    #[test]
    fn data_parses_and_names_are_unique() {
        let all = all().unwrap();
        let mut names: Vec<_> = all.iter().map(|p| p.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all.len());
        for want in ["instance-info", "node-lifecycle", "imdsv2-token", "region"] {
            get(want).unwrap();
        }
        assert!(matches!(get("nope"), Err(Error::UnknownProfile { .. })));
    }

    #[test]
    fn every_path_is_canonical_and_reaches_nothing_never_allowed() {
        for p in all().unwrap() {
            for path in &p.paths {
                let pattern = Pattern::parse(path).unwrap_or_else(|e| panic!("{path}: {e}"));
                assert_eq!(never::reached_by(&pattern), None, "{} {path}", p.name);
            }
        }
    }
}
