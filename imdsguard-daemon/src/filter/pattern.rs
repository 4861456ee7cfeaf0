//! The path-pattern language of `paths: [...]` rules and of the profiles.
//!
//! Kept small on purpose, so a reader can see what a rule allows:
//!
//! - an exact path in canonical form: `/latest/meta-data/placement/region`
//!   matches that path and nothing else (not `.../region-x`, not
//!   `.../region/`, not `.../region/more`);
//! - `*` as a whole segment matches exactly one non-empty segment:
//!   `/computeMetadata/v1/instance/network-interfaces/*/ip`;
//! - a final `/**` matches the node and everything below it:
//!   `/latest/meta-data/placement/**`. The rules loader refuses one whose
//!   subtree holds a never-allowed path (see [`super::never`]).
//!
//! Patterns obey the same canonical form as requests (no `%`, `.`, `..`,
//! `//`, `;`, `\`, query), so a pattern can only name what a request that
//! passed [`super::request`] can be. Case is folded as the path's cloud
//! folds it.

use super::request::{self, Dialect};

/// One segment of a pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    /// `*`: any one non-empty segment.
    Any,
}

impl Segment {
    /// Whether this segment can match `s` (a literal, or `*` meaning
    /// "some segment", as in a never-allowed entry).
    fn unifies(&self, other: &Self, fold_case: bool) -> bool {
        match (self, other) {
            (Self::Literal(a), Self::Literal(b)) => {
                if fold_case {
                    a.eq_ignore_ascii_case(b)
                } else {
                    a == b
                }
            }
            (Self::Any, Self::Literal(l)) | (Self::Literal(l), Self::Any) => !l.is_empty(),
            (Self::Any, Self::Any) => true,
        }
    }
}

/// A compiled pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    source: String,
    dialect: Dialect,
    segments: Vec<Segment>,
    /// Ends in `/**`.
    subtree: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("not a canonical path")]
    NotCanonical(#[source] request::Reject),
    #[error("a query is not part of a path pattern")]
    Query,
    #[error("`*` and `**` must be whole segments, and `**` only the last")]
    Wildcard,
}

impl Pattern {
    pub fn parse(source: &str) -> Result<Self, PatternError> {
        let (path, query) = request::split_target(source).map_err(PatternError::NotCanonical)?;
        if query.is_some() {
            return Err(PatternError::Query);
        }
        let dialect = Dialect::of(path);
        let folded = dialect.fold(path);
        let mut raw: Vec<&str> = folded[1..].split('/').collect();
        let subtree = raw.last() == Some(&"**");
        if subtree {
            raw.pop();
        }
        let segments = raw
            .iter()
            .map(|s| match *s {
                "*" => Ok(Segment::Any),
                s if s.contains('*') => Err(PatternError::Wildcard),
                s => Ok(Segment::Literal(s.to_owned())),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            source: source.to_owned(),
            dialect,
            segments,
            subtree,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    pub fn is_subtree(&self) -> bool {
        self.subtree
    }

    /// Whether `path` (canonical, folded as its dialect folds) matches.
    pub fn matches(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let got: Vec<&str> = rest.split('/').collect();
        if self.subtree {
            // The node itself, its listing (`.../node/`) and all below.
            let n = self.segments.len();
            let node = if got.last() == Some(&"") && got.len() == n + 1 {
                &got[..n]
            } else {
                &got[..]
            };
            node.len() >= n && self.prefix_matches(&node[..n])
        } else {
            got.len() == self.segments.len() && self.prefix_matches(&got)
        }
    }

    fn prefix_matches(&self, got: &[&str]) -> bool {
        self.segments.iter().zip(got).all(|(p, g)| match p {
            Segment::Any => !g.is_empty(),
            Segment::Literal(l) => l == g,
        })
    }

    /// Whether some path this pattern matches lies at or below `other`
    /// (when `covers` is false), or whether some path it matches is at,
    /// below or above `other` (when `covers`: the pattern's responses hold
    /// their whole subtree). Case is ignored: used against the
    /// never-allowed list, where it is safer to over-match.
    pub fn reaches(&self, other: &[Segment], covers: bool) -> bool {
        let mine = trim_listing(&self.segments);
        let theirs = trim_listing(other);
        let n = mine.len().min(theirs.len());
        let prefix = mine[..n]
            .iter()
            .zip(&theirs[..n])
            .all(|(a, b)| a.unifies(b, true));
        prefix && (mine.len() >= theirs.len() || self.subtree || covers)
    }
}

/// A trailing empty segment asks for a listing of the node before it.
fn trim_listing(s: &[Segment]) -> &[Segment] {
    match s.split_last() {
        Some((Segment::Literal(l), rest)) if l.is_empty() => rest,
        _ => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        Pattern::parse(s).unwrap()
    }

    #[test]
    fn exact_matches_only_itself() {
        let r = p("/latest/meta-data/placement/region");
        assert!(r.matches("/latest/meta-data/placement/region"));
        for other in [
            "/latest/meta-data/placement/region-x",
            "/latest/meta-data/placement/region/",
            "/latest/meta-data/placement/region/x",
            "/latest/meta-data/placement/",
            "/latest/meta-data/placement/Region",
            "/latest/meta-data/placement/regio",
        ] {
            assert!(!r.matches(other), "{other}");
        }
        assert!(!p("/metadata").matches("/metadata-attacker"));
    }

    #[test]
    fn star_is_one_non_empty_segment() {
        let r = p("/computeMetadata/v1/instance/network-interfaces/*/ip");
        assert!(r.matches("/computeMetadata/v1/instance/network-interfaces/0/ip"));
        assert!(!r.matches("/computeMetadata/v1/instance/network-interfaces//ip"));
        assert!(!r.matches("/computeMetadata/v1/instance/network-interfaces/0/1/ip"));
        assert!(!r.matches("/computeMetadata/v1/instance/network-interfaces/0/ip/x"));
    }

    #[test]
    fn subtree() {
        let r = p("/latest/meta-data/placement/**");
        assert!(r.matches("/latest/meta-data/placement"));
        assert!(r.matches("/latest/meta-data/placement/"));
        assert!(r.matches("/latest/meta-data/placement/region"));
        assert!(!r.matches("/latest/meta-data/placement-x"));
        assert!(!r.matches("/latest/meta-data/"));
    }

    #[test]
    fn azure_folds_case() {
        let r = p("/metadata/instance/compute/vmId");
        assert!(r.matches("/metadata/instance/compute/vmid"));
        assert_eq!(r.dialect(), Dialect::Azure);
    }

    #[test]
    fn refuses_non_canonical_patterns() {
        for bad in [
            "latest/meta-data",
            "/latest/../user-data",
            "/latest/./meta-data",
            "/latest//meta-data",
            "/latest/%2e%2e/user-data",
            "/latest/meta-data;x",
            "/latest/meta-data?x=1",
            "/latest/me*ta",
            "/latest/**/x",
            "/latest\\meta-data",
        ] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
    }
}
