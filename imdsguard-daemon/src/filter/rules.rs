//! Compiled allow lists, and the table the proxy reads them from.
//!
//! A [`FilterRules`] is built from profile names and `paths:` patterns and
//! refuses, with an error naming the culprit, any pattern that reaches a
//! never-allowed path. [`RulesTable`] maps an entry cgroup id to its rules;
//! the owner replaces the whole map at once, and the proxy looks the entry
//! up on every request, so a policy change applies to kept-alive
//! connections too.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use super::{
    never,
    pattern::Pattern,
    profiles,
    request::{Checked, Dialect},
};
use crate::{Error, Result};

/// What one filter entry allows.
#[derive(Clone, Debug, Default)]
pub struct FilterRules {
    profiles: Vec<String>,
    paths: Vec<String>,
    patterns: Vec<Pattern>,
    /// Some pattern is an AWS-style `/latest/` path, so the IMDSv2 token
    /// PUT is allowed too.
    token: bool,
}

/// Why a checked request was not allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denial {
    /// At or below a never-allowed path (named).
    Never(&'static str),
    /// The response would hold a never-allowed path's contents.
    Recursive(&'static str),
    /// No rule names it.
    NotListed,
}

impl FilterRules {
    /// Compiles `profiles` and `paths`, refusing unknown profiles, patterns
    /// that are not canonical, and patterns that reach a never-allowed path.
    pub fn compile(profile_names: &[String], paths: &[String]) -> Result<Self> {
        let mut patterns = Vec::new();
        for name in profile_names {
            let profile = profiles::get(name)?;
            for p in &profile.paths {
                patterns.push(compile_one(p, &format!("profile {name}"))?);
            }
        }
        for p in paths {
            patterns.push(compile_one(p, "paths")?);
        }
        let token = patterns.iter().any(|p| p.dialect() == Dialect::Aws);
        Ok(Self {
            profiles: profile_names.to_vec(),
            paths: paths.to_vec(),
            patterns,
            token,
        })
    }

    /// The profile names, as given (for `explain`).
    pub fn profiles(&self) -> &[String] {
        &self.profiles
    }

    /// The `paths:` patterns, as given (for `explain`).
    pub fn paths(&self) -> &[String] {
        &self.paths
    }

    /// One line for `status` and `explain`: `profile instance-info, paths
    /// /a, /b`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.profiles.is_empty() {
            parts.push(format!("profile {}", self.profiles.join(", ")));
        }
        if !self.paths.is_empty() {
            parts.push(format!("paths {}", self.paths.join(", ")));
        }
        parts.join("; ")
    }

    /// Whether `req` may be forwarded. The never-allowed list is checked
    /// again here, whatever the patterns say.
    pub fn decide(&self, req: &Checked) -> Result<(), Denial> {
        if let Some(never) = never::blocking(&req.path) {
            return Err(Denial::Never(never));
        }
        if req.recursive
            && let Some(never) = never::covered_by(&req.path)
        {
            return Err(Denial::Recursive(never));
        }
        if req.token_put {
            return if self.token {
                Ok(())
            } else {
                Err(Denial::NotListed)
            };
        }
        if self.patterns.iter().any(|p| p.matches(&req.path)) {
            Ok(())
        } else {
            Err(Denial::NotListed)
        }
    }
}

fn compile_one(source: &str, rule: &str) -> Result<Pattern> {
    let pattern = Pattern::parse(source).map_err(|e| Error::FilterPattern {
        rule: rule.to_owned(),
        pattern: source.to_owned(),
        source: e,
    })?;
    if let Some(never) = never::reached_by(&pattern) {
        return Err(Error::FilterNeverAllowed {
            rule: rule.to_owned(),
            pattern: source.to_owned(),
            never,
        });
    }
    Ok(pattern)
}

/// Entry cgroup id → its rules.
pub type RulesMap = HashMap<u64, Arc<FilterRules>>;

/// The shared [`RulesMap`]. Cheap to clone; all clones share the map.
#[derive(Clone, Default)]
pub struct RulesTable {
    inner: Arc<RwLock<Arc<RulesMap>>>,
}

impl RulesTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the whole table.
    pub fn replace(&self, rules: RulesMap) {
        let rules = Arc::new(rules);
        // A poisoned lock only means a writer panicked between two
        // pointer writes; the Arc inside is whole either way.
        *self.inner.write().unwrap_or_else(|p| p.into_inner()) = rules;
    }

    /// The rules of entry cgroup `entry`, if it is a filter entry.
    pub fn get(&self, entry: u64) -> Option<Arc<FilterRules>> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&entry)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use hyper::{HeaderMap, Method, Uri, Version};

    use super::*;
    use crate::filter::request::check;

    fn rules(profiles: &[&str], paths: &[&str]) -> FilterRules {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        FilterRules::compile(&s(profiles), &s(paths)).unwrap()
    }

    fn get(path: &str, headers: &[(&'static str, &'static str)]) -> Checked {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(*k, v.parse().unwrap());
        }
        check(
            &Method::GET,
            &path.parse::<Uri>().unwrap(),
            Version::HTTP_11,
            &h,
        )
        .unwrap()
    }

    #[test]
    fn refuses_rules_that_reach_never_allowed_paths() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        for bad in [
            "/latest/meta-data/iam/security-credentials/role",
            "/LATEST/meta-data/iam/security-credentials",
            "/latest/meta-data/**",
            "/computeMetadata/v1/instance/attributes/kube-env",
            "/metadata/instance",
            "/metadata/identity/oauth2/token",
        ] {
            let e = FilterRules::compile(&[], &s(&[bad])).unwrap_err();
            assert!(matches!(e, Error::FilterNeverAllowed { .. }), "{bad}: {e}");
            assert!(e.to_string().contains(bad), "{e}");
        }
        assert!(matches!(
            FilterRules::compile(&[], &s(&["/latest/../user-data"])),
            Err(Error::FilterPattern { .. })
        ));
        assert!(matches!(
            FilterRules::compile(&s(&["nope"]), &[]),
            Err(Error::UnknownProfile { .. })
        ));
    }

    #[test]
    fn allows_listed_paths_only() {
        let r = rules(&[], &["/latest/meta-data/placement/region"]);
        assert_eq!(
            r.decide(&get("/latest/meta-data/placement/region", &[])),
            Ok(())
        );
        assert_eq!(
            r.decide(&get("/latest/meta-data/placement/region-x", &[])),
            Err(Denial::NotListed)
        );
        assert!(matches!(
            r.decide(&get("/latest/meta-data/iam/security-credentials/", &[])),
            Err(Denial::Never(_))
        ));
    }

    #[test]
    fn token_put_follows_any_aws_path() {
        let put = |r: &FilterRules| {
            let c = check(
                &Method::PUT,
                &"/latest/api/token".parse().unwrap(),
                Version::HTTP_11,
                &HeaderMap::new(),
            )
            .unwrap();
            r.decide(&c)
        };
        assert_eq!(put(&rules(&["region"], &[])), Ok(()));
        assert_eq!(
            put(&rules(&[], &["/computeMetadata/v1/instance/zone"])),
            Err(Denial::NotListed)
        );
    }

    #[test]
    fn recursive_requests_that_cover_never_allowed_paths() {
        let r = rules(
            &[],
            &["/computeMetadata/v1/instance/**"
                .replace("/**", "/")
                .as_str()],
        );
        let flavor = [("metadata-flavor", "Google")];
        assert_eq!(
            r.decide(&get("/computeMetadata/v1/instance/", &flavor)),
            Ok(())
        );
        assert!(matches!(
            r.decide(&get(
                "/computeMetadata/v1/instance/?recursive=true",
                &flavor
            )),
            Err(Denial::Recursive(_))
        ));
    }

    #[test]
    fn azure_matches_any_case() {
        let r = rules(&["instance-info"], &[]);
        let md = [("metadata", "true")];
        for p in [
            "/metadata/instance/compute/vmId?api-version=2021-02-01&format=text",
            "/METADATA/instance/compute/VMID?api-version=2021-02-01",
        ] {
            assert_eq!(r.decide(&get(p, &md)), Ok(()), "{p}");
        }
        assert!(
            r.decide(&get(
                "/Metadata/Identity/oauth2/token?api-version=2018-02-01",
                &md
            ))
            .is_err()
        );
    }

    proptest::proptest! {
        /// Whatever request passes the checks and the broadest rules the
        /// loader accepts, its path names no credential, in any case.
        #[test]
        fn nothing_secret_is_ever_allowed(
            segs in proptest::collection::vec(
                proptest::sample::select(vec![
                    "latest", "LATEST", "meta-data", "iam", "IAM", "security-credentials",
                    "Security-Credentials", "user-data", "computeMetadata", "v1", "instance",
                    "service-accounts", "default", "token", "identity", "attributes",
                    "kube-env", "metadata", "Metadata", "compute", "userData", "placement",
                    "region", "..", ".", "", "%2F", "%2e%2e", "%252F", "a;b", "dynamic",
                    "api", "opc", "v2", "credentials", "*",
                ]),
                1..8,
            ),
            query in proptest::sample::select(vec![
                "", "?recursive=true", "?alt=json&recursive=true", "?api-version=1",
            ]),
        ) {
            let target = format!("/{}{query}", segs.join("/"));
            let Ok(uri) = target.parse::<Uri>() else { return Ok(()) };
            let mut h = HeaderMap::new();
            h.insert("metadata-flavor", "Google".parse().unwrap());
            h.insert("metadata", "true".parse().unwrap());
            h.insert("authorization", "Bearer Oracle".parse().unwrap());
            let Ok(c) = check(&Method::GET, &uri, Version::HTTP_11, &h) else { return Ok(()) };
            let r = rules(
                &["instance-info", "node-lifecycle", "region", "imdsv2-token"],
                &[
                    "/latest/meta-data/",
                    "/latest/meta-data/iam/info",
                    "/latest/meta-data/placement/**",
                    "/computeMetadata/v1/instance/",
                    "/computeMetadata/v1/instance/service-accounts/*/email",
                ],
            );
            if r.decide(&c).is_ok() && c.path != crate::filter::request::TOKEN_PATH {
                let lower = c.path.to_ascii_lowercase();
                for secret in ["security-credentials", "user-data", "userdata", "kube-env", "identity", "/token"] {
                    proptest::prop_assert!(!lower.contains(secret), "{target} allowed");
                }
            }
        }
    }

    #[test]
    fn table_replaces_atomically() {
        let t = RulesTable::new();
        assert!(t.get(7).is_none());
        t.replace(HashMap::from([(7, Arc::new(rules(&["region"], &[])))]));
        assert_eq!(t.clone().get(7).unwrap().profiles(), ["region"]);
    }
}
