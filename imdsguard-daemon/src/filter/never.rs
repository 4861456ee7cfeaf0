//! Paths that are never allowed, whatever a profile or rule says. The
//! rules loader refuses a pattern that reaches one, and the proxy checks
//! every request against them again before forwarding.
//!
//! Entries are patterns (see [`super::pattern`]); each blocks itself and
//! everything below it. They are compared case-insensitively, after the
//! same canonical-form checks as requests: over-matching a credential path
//! costs nothing, under-matching one is the hole we exist to close.
//!
//! Recursion: Azure and OCI answer a GET of an inner node with the JSON of
//! its whole subtree, and GCP does with `?recursive=true`; such a request,
//! or a rule, that covers a never-allowed path is refused too. An AWS (and
//! Alibaba) listing of an ancestor, such as `/latest/meta-data/`, returns
//! only names, so it is not refused for that; the role name under
//! `iam/security-credentials/` is below a never-allowed entry and is.

use std::sync::OnceLock;

use super::pattern::{Pattern, Segment};

/// The list. Sources: AWS "Instance metadata categories"
/// (docs.aws.amazon.com/AWSEC2/latest/UserGuide/instancedata-data-categories.html),
/// GCP "About VM metadata" (cloud.google.com/compute/docs/metadata/overview)
/// and GKE's metadata concealment, which hides `kube-env` and the legacy
/// `v0.1`/`v1beta1` endpoints that take no `Metadata-Flavor` header,
/// Azure IMDS (learn.microsoft.com/azure/virtual-machines/instance-metadata-service),
/// OCI "Getting Instance Metadata" (docs.oracle.com/iaas/Content/Compute/Tasks/gettingmetadata.htm),
/// Alibaba "Instance metadata" (alibabacloud.com/help/ecs/user-guide/view-instance-metadata),
/// ECS task credentials and EKS Pod Identity.
pub const NEVER: &[(&str, &str)] = &[
    (
        "/latest/meta-data/iam/security-credentials",
        "AWS role credentials",
    ),
    (
        "/latest/meta-data/identity-credentials",
        "AWS instance identity credentials",
    ),
    (
        "/latest/meta-data/ram/security-credentials",
        "Alibaba RAM role credentials",
    ),
    ("/latest/user-data", "AWS and Alibaba user-data"),
    (
        "/computeMetadata/v1/instance/service-accounts/*/token",
        "GCP access tokens",
    ),
    (
        "/computeMetadata/v1/instance/service-accounts/*/identity",
        "GCP identity tokens",
    ),
    (
        "/computeMetadata/v1/instance/attributes/kube-env",
        "GKE kubelet bootstrap credentials",
    ),
    (
        "/computeMetadata/v1/instance/attributes/startup-script",
        "GCP startup script",
    ),
    (
        "/computeMetadata/v1/instance/attributes/user-data",
        "GCP cloud-init user-data",
    ),
    (
        "/computeMetadata/v1/project/attributes/startup-script",
        "GCP project startup script",
    ),
    (
        "/computeMetadata/v1beta1",
        "GCP legacy endpoint without header checks",
    ),
    ("/0.1", "GCP legacy endpoint without header checks"),
    ("/metadata/identity", "Azure managed identity tokens"),
    ("/metadata/instance/compute/userData", "Azure user data"),
    ("/metadata/instance/compute/customData", "Azure custom data"),
    ("/opc/v1/instance/metadata/user_data", "OCI user data"),
    ("/opc/v2/instance/metadata/user_data", "OCI user data"),
    ("/opc/v1/identity", "OCI instance principal keys"),
    ("/opc/v2/identity", "OCI instance principal keys"),
    ("/v2/credentials", "ECS task role credentials"),
    ("/v1/credentials", "EKS Pod Identity credentials"),
];

fn compiled() -> &'static [(Pattern, &'static str)] {
    static LIST: OnceLock<Vec<(Pattern, &'static str)>> = OnceLock::new();
    LIST.get_or_init(|| {
        NEVER
            .iter()
            .map(|(p, what)| {
                let lower = p.to_ascii_lowercase();
                // The list is a constant; `tests::list_parses` proves every entry.
                (
                    Pattern::parse(&lower).unwrap_or_else(|e| unreachable!("{p}: {e}")),
                    *what,
                )
            })
            .collect()
    })
}

fn segments_of(path: &str) -> Vec<Segment> {
    path.strip_prefix('/')
        .unwrap_or(path)
        .split('/')
        .map(|s| Segment::Literal(s.to_ascii_lowercase()))
        .collect()
}

/// The never-allowed entry at or above `path`, if any.
pub fn blocking(path: &str) -> Option<&'static str> {
    let segs = segments_of(path);
    compiled()
        .iter()
        .find(|(never, _)| segment_prefix(never.segments(), &segs))
        .map(|(never, _)| never_source(never))
}

/// The never-allowed entry at, above or below `path`: what a response
/// holding the whole subtree of `path` could contain.
pub fn covered_by(path: &str) -> Option<&'static str> {
    let segs = segments_of(path);
    let fake = Pattern::parse(path).ok();
    compiled()
        .iter()
        .find(|(never, _)| match &fake {
            Some(p) => p.reaches(never.segments(), true),
            None => segment_prefix(never.segments(), &segs),
        })
        .map(|(never, _)| never_source(never))
}

/// The never-allowed entry that `pattern` reaches: one it can match a path
/// at or below, or one whose subtree its responses hold (`/**`, or a
/// recursive dialect).
pub fn reached_by(pattern: &Pattern) -> Option<&'static str> {
    let covers = pattern.dialect().inner_nodes_recursive();
    compiled()
        .iter()
        .find(|(never, _)| pattern.reaches(never.segments(), covers))
        .map(|(never, _)| never_source(never))
}

/// `prefix` (with `*`) matches the first segments of `path`, case folded.
fn segment_prefix(prefix: &[Segment], path: &[Segment]) -> bool {
    prefix.len() <= path.len()
        && prefix.iter().zip(path).all(|(a, b)| match (a, b) {
            (Segment::Any, Segment::Literal(l)) => !l.is_empty(),
            (Segment::Literal(a), Segment::Literal(b)) => a.eq_ignore_ascii_case(b),
            _ => false,
        })
}

fn never_source(p: &Pattern) -> &'static str {
    NEVER
        .iter()
        .find(|(s, _)| s.eq_ignore_ascii_case(p.as_str()))
        .map_or("(never-allowed)", |(s, _)| s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_parses() {
        assert_eq!(compiled().len(), NEVER.len());
    }

    #[test]
    fn blocks_credentials_in_any_case_and_below() {
        for path in [
            "/latest/meta-data/iam/security-credentials",
            "/latest/meta-data/iam/security-credentials/",
            "/latest/meta-data/iam/security-credentials/role",
            "/LATEST/meta-data/IAM/security-credentials/role",
            "/latest/user-data",
            "/latest/user-data/",
            "/computeMetadata/v1/instance/service-accounts/default/token",
            "/computemetadata/V1/instance/service-accounts/x@y/identity",
            "/computeMetadata/v1/instance/attributes/kube-env",
            "/Metadata/Identity/oauth2/token",
            "/metadata/instance/compute/userdata",
            "/opc/v2/identity/key.pem",
            "/v2/credentials/abc",
            "/v1/credentials",
        ] {
            assert!(blocking(path).is_some(), "{path}");
        }
        for path in [
            "/latest/meta-data/iam/info",
            "/latest/meta-data/",
            "/latest/user-data-x",
            "/computeMetadata/v1/instance/service-accounts/default/email",
            "/computeMetadata/v1/instance/service-accounts//token",
            "/metadata/instance/compute/location",
        ] {
            assert!(blocking(path).is_none(), "{path}");
        }
    }

    #[test]
    fn recursion_covers_ancestors() {
        for path in [
            "/computeMetadata/v1/",
            "/computeMetadata/v1/instance",
            "/computeMetadata/v1/instance/service-accounts/default/",
            "/metadata/instance",
            "/metadata",
            "/",
        ] {
            assert!(covered_by(path).is_some(), "{path}");
        }
        assert!(covered_by("/computeMetadata/v1/instance/zone").is_none());
        assert!(covered_by("/metadata/instance/compute/location").is_none());
    }

    #[test]
    fn patterns_that_reach_a_never_entry() {
        let reach = |s: &str| reached_by(&Pattern::parse(s).unwrap());
        assert!(reach("/latest/meta-data/iam/security-credentials/*").is_some());
        assert!(reach("/latest/meta-data/iam/**").is_some());
        assert!(reach("/latest/meta-data/*/security-credentials").is_some());
        assert!(reach("/computeMetadata/v1/instance/service-accounts/*/*").is_some());
        assert!(reach("/metadata/instance/compute").is_some());
        assert!(reach("/opc/v2/instance/").is_some());
        assert!(reach("/**").is_some());
        // An AWS listing is names only.
        assert!(reach("/latest/meta-data/").is_none());
        assert!(reach("/latest/meta-data/iam/info").is_none());
        assert!(reach("/latest/meta-data/placement/**").is_none());
        assert!(reach("/computeMetadata/v1/instance/service-accounts/*/email").is_none());
    }
}
