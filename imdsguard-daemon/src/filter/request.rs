//! Strict checks and normalisation of one proxied request, as pure
//! functions over what hyper parsed. Everything the peers' path filters got
//! wrong (`..`, `%2F`, double encoding, `;` parameters, case, `?recursive`,
//! X-Forwarded-For) is refused here, before any allow list is consulted.
//!
//! Normalising is refusing: a path that is not already in its one
//! canonical form is rejected, never rewritten. No metadata path any
//! profile allows needs percent-encoding, so any `%` is refused; then
//! there is nothing to decode, and no decoding to get wrong.

use hyper::{HeaderMap, Method, Uri, Version, header};

/// The largest request-target we accept (metadata paths are short).
pub const MAX_TARGET: usize = 1024;
/// At most this many request headers (hyper is told the same).
pub const MAX_HEADERS: usize = 32;

/// The metadata dialect a path belongs to, by its first segments. It fixes
/// how case is compared, which query keys exist and which headers the real
/// service requires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// `/latest/...`: AWS IMDS, and Alibaba's service, which copies it.
    Aws,
    /// `/computeMetadata/v1/...`
    Gcp,
    /// `/metadata/...`: Azure IMDS.
    Azure,
    /// `/opc/v1/...`, `/opc/v2/...`: Oracle Cloud.
    Oci,
    /// Anything else (ECS, EKS Pod Identity, legacy GCP): never allowed
    /// by a profile, matched case-sensitively with no query at all.
    Other,
}

impl Dialect {
    pub fn of(path: &str) -> Self {
        if path.starts_with("/latest/") {
            Self::Aws
        } else if path.starts_with("/computeMetadata/v1/") {
            Self::Gcp
        } else if path
            .get(..10)
            .is_some_and(|p| p.eq_ignore_ascii_case("/metadata/"))
        {
            Self::Azure
        } else if path.starts_with("/opc/v1/") || path.starts_with("/opc/v2/") {
            Self::Oci
        } else {
            Self::Other
        }
    }

    /// Azure's IMDS is treated as matching paths case-insensitively (its
    /// JSON keys are camelCase and clients vary); AWS, GCP, OCI and Alibaba
    /// compare them byte for byte. Folding is safe either way: the
    /// never-allowed list is compared case-insensitively for every cloud,
    /// and a case variant that Azure did not accept would only get a 404.
    pub fn case_insensitive(self) -> bool {
        self == Self::Azure
    }

    /// Whether a GET of an inner node returns the contents of its whole
    /// subtree (Azure and OCI answer with the JSON of everything below; an
    /// AWS listing is only names). GCP does so with `?recursive=true`.
    pub fn inner_nodes_recursive(self) -> bool {
        matches!(self, Self::Azure | Self::Oci)
    }

    /// The form of `path` that rules compare: lowercased where the cloud
    /// ignores case.
    pub fn fold(self, path: &str) -> String {
        if self.case_insensitive() {
            path.to_ascii_lowercase()
        } else {
            path.to_owned()
        }
    }
}

/// The IMDSv2 token endpoint (Alibaba's token endpoint has the same path).
pub const TOKEN_PATH: &str = "/latest/api/token";

/// A request that passed every check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checked {
    /// The path as compared by rules (see [`Dialect::fold`]).
    pub path: String,
    /// The request-target to send upstream: the original path and query.
    pub target: String,
    pub dialect: Dialect,
    /// The response covers the whole subtree below `path`.
    pub recursive: bool,
    /// GCP `wait_for_change=true`: the upstream may hold the answer.
    pub waits: bool,
    /// The token PUT (`PUT /latest/api/token`).
    pub token_put: bool,
    /// Carries `X-aws-ec2-metadata-token` (IMDSv2), or Alibaba's
    /// `X-aliyun-ecs-metadata-token` (its hardened mode).
    pub imds_v2: bool,
}

/// Why a request was refused; the text is the 403 body.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("only HTTP/1.0 and HTTP/1.1")]
    Version,
    #[error("method not allowed")]
    Method,
    #[error("only origin-form request targets")]
    NotOriginForm,
    #[error("request target too long")]
    TargetTooLong,
    #[error("non-ASCII, control or space byte in the request target")]
    TargetBytes,
    #[error("percent-encoding in the request target")]
    PercentEncoded,
    #[error("backslash in the request target")]
    Backslash,
    #[error("empty path segment")]
    EmptySegment,
    #[error("dot segment")]
    DotSegment,
    #[error("path parameter")]
    PathParameter,
    #[error("query parameter not allowed")]
    Query,
    #[error("too many headers")]
    TooManyHeaders,
    #[error("header value with non-ASCII or control bytes")]
    HeaderBytes,
    #[error("request body not allowed")]
    Body,
    #[error("both content-length and transfer-encoding")]
    ContentLengthAndTransferEncoding,
    #[error("forwarding headers not allowed")]
    Forwarded,
    #[error("upgrade and expect not allowed")]
    Upgrade,
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("path not allowed")]
    NotAllowed,
    #[error("caller has no filter entry")]
    NoIdentity,
}

/// Runs every check on a request head.
pub fn check(
    method: &Method,
    uri: &Uri,
    version: Version,
    headers: &HeaderMap,
) -> Result<Checked, Reject> {
    if version != Version::HTTP_10 && version != Version::HTTP_11 {
        return Err(Reject::Version);
    }
    if uri.scheme().is_some() || uri.authority().is_some() || *method == Method::CONNECT {
        return Err(Reject::NotOriginForm);
    }
    let target = uri.path_and_query().map_or("", |p| p.as_str());
    let (path, query) = split_target(target)?;
    let dialect = Dialect::of(path);
    let token_put = match *method {
        Method::GET | Method::HEAD => false,
        Method::PUT if path == TOKEN_PATH && query.is_none() => true,
        _ => return Err(Reject::Method),
    };
    check_headers(headers)?;
    let q = parse_query(dialect, query)?;
    required_headers(dialect, path, headers)?;
    Ok(Checked {
        path: dialect.fold(path),
        target: target.to_owned(),
        dialect,
        recursive: q.recursive || dialect.inner_nodes_recursive(),
        waits: q.waits,
        token_put,
        imds_v2: headers.contains_key("x-aws-ec2-metadata-token")
            || headers.contains_key("x-aliyun-ecs-metadata-token"),
    })
}

/// Splits an origin-form target into a canonical path and its query.
pub fn split_target(target: &str) -> Result<(&str, Option<&str>), Reject> {
    if target.len() > MAX_TARGET {
        return Err(Reject::TargetTooLong);
    }
    if !target.starts_with('/') {
        return Err(Reject::NotOriginForm);
    }
    if target.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(Reject::TargetBytes);
    }
    if target.contains('%') {
        return Err(Reject::PercentEncoded);
    }
    if target.contains('\\') {
        return Err(Reject::Backslash);
    }
    if target.contains('#') {
        return Err(Reject::TargetBytes);
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    if path.contains(';') {
        return Err(Reject::PathParameter);
    }
    check_segments(path)?;
    Ok((path, query))
}

/// `path` starts with `/`; no segment is `.` or `..`, and only the last
/// may be empty (a trailing slash asks for a listing).
pub fn check_segments(path: &str) -> Result<(), Reject> {
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    for (i, s) in segments.iter().enumerate() {
        if *s == "." || *s == ".." {
            return Err(Reject::DotSegment);
        }
        if s.is_empty() && i != last {
            return Err(Reject::EmptySegment);
        }
    }
    Ok(())
}

fn check_headers(headers: &HeaderMap) -> Result<(), Reject> {
    if headers.len() > MAX_HEADERS {
        return Err(Reject::TooManyHeaders);
    }
    for v in headers.values() {
        if v.as_bytes()
            .iter()
            .any(|b| !(b.is_ascii_graphic() || *b == b' '))
        {
            return Err(Reject::HeaderBytes);
        }
    }
    let te = headers.contains_key(header::TRANSFER_ENCODING);
    let lengths: Vec<_> = headers.get_all(header::CONTENT_LENGTH).iter().collect();
    if te && !lengths.is_empty() {
        return Err(Reject::ContentLengthAndTransferEncoding);
    }
    // No request we forward has a body: the token PUT sends none either.
    if te || lengths.iter().any(|v| v.as_bytes() != b"0") {
        return Err(Reject::Body);
    }
    // GCP's server and AWS's token endpoint refuse these, as signs of a
    // request relayed by something else (SSRF); we refuse them for all.
    for h in ["x-forwarded-for", "forwarded", "x-real-ip", "via"] {
        if headers.contains_key(h) {
            return Err(Reject::Forwarded);
        }
    }
    if headers.contains_key(header::UPGRADE) || headers.contains_key(header::EXPECT) {
        return Err(Reject::Upgrade);
    }
    Ok(())
}

/// The headers the real service itself insists on, checked here so a
/// request the service would refuse never leaves the proxy.
fn required_headers(dialect: Dialect, path: &str, headers: &HeaderMap) -> Result<(), Reject> {
    let has = |name: &str, value: &str| {
        let mut all = headers.get_all(name).iter();
        matches!((all.next(), all.next()), (Some(v), None) if v.as_bytes() == value.as_bytes())
    };
    match dialect {
        Dialect::Gcp if !has("metadata-flavor", "Google") => {
            Err(Reject::MissingHeader("Metadata-Flavor: Google"))
        }
        Dialect::Azure if !has("metadata", "true") => Err(Reject::MissingHeader("Metadata: true")),
        Dialect::Oci if path.starts_with("/opc/v2/") && !has("authorization", "Bearer Oracle") => {
            Err(Reject::MissingHeader("Authorization: Bearer Oracle"))
        }
        _ => Ok(()),
    }
}

#[derive(Default)]
struct Query {
    recursive: bool,
    waits: bool,
}

/// Only the query keys each cloud documents for the paths profiles allow,
/// each at most once, with a value of a known shape.
fn parse_query(dialect: Dialect, query: Option<&str>) -> Result<Query, Reject> {
    let mut q = Query::default();
    let Some(query) = query else { return Ok(q) };
    let mut seen: Vec<&str> = Vec::new();
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').ok_or(Reject::Query)?;
        if seen.contains(&key) {
            return Err(Reject::Query);
        }
        seen.push(key);
        let ok = match (dialect, key) {
            (Dialect::Gcp, "alt") => matches!(value, "json" | "text"),
            (Dialect::Gcp, "recursive") => {
                q.recursive = value == "true";
                matches!(value, "true" | "false")
            }
            (Dialect::Gcp, "wait_for_change") => {
                q.waits = value == "true";
                matches!(value, "true" | "false")
            }
            (Dialect::Gcp, "timeout_sec") => is_digits(value, 5),
            (Dialect::Gcp, "last_etag") => {
                !value.is_empty()
                    && value.len() <= 32
                    && value.bytes().all(|b| b.is_ascii_hexdigit())
            }
            (Dialect::Azure, "api-version") => {
                !value.is_empty()
                    && value.len() <= 32
                    && value
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            }
            (Dialect::Azure, "format") => matches!(value, "json" | "text"),
            (Dialect::Azure, "nonce") => {
                !value.is_empty()
                    && value.len() <= 32
                    && value.bytes().all(|b| b.is_ascii_alphanumeric())
            }
            _ => false,
        };
        if !ok {
            return Err(Reject::Query);
        }
    }
    Ok(q)
}

fn is_digits(v: &str, max: usize) -> bool {
    !v.is_empty() && v.len() <= max && v.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests;
