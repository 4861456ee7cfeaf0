use hyper::{HeaderMap, Method, Uri, Version};
use proptest::prelude::*;

use super::*;

fn headers(h: &[(&'static str, &str)]) -> HeaderMap {
    let mut m = HeaderMap::new();
    for (k, v) in h {
        m.append(*k, v.parse().unwrap());
    }
    m
}

fn run(method: Method, target: &str, h: &[(&'static str, &str)]) -> Result<Checked, Reject> {
    check(
        &method,
        &target.parse::<Uri>().unwrap(),
        Version::HTTP_11,
        &headers(h),
    )
}

fn get(target: &str) -> Result<Checked, Reject> {
    run(Method::GET, target, &[])
}

#[test]
fn accepts_canonical_requests() {
    let c = get("/latest/meta-data/placement/region").unwrap();
    assert_eq!(c.path, "/latest/meta-data/placement/region");
    assert_eq!(c.dialect, Dialect::Aws);
    assert!(!c.recursive && !c.token_put && !c.imds_v2);
    let c = run(
        Method::GET,
        "/latest/meta-data/",
        &[("x-aws-ec2-metadata-token", "abc")],
    )
    .unwrap();
    assert!(c.imds_v2);
    let c = run(
        Method::PUT,
        "/latest/api/token",
        &[("x-aws-ec2-metadata-token-ttl-seconds", "21600")],
    )
    .unwrap();
    assert!(c.token_put);
    assert!(run(Method::HEAD, "/latest/meta-data/ami-id", &[]).is_ok());
}

#[test]
fn rejects_non_canonical_targets() {
    for (target, want) in [
        ("/latest/meta-data/../user-data", Reject::DotSegment),
        ("/latest/meta-data/./ami-id", Reject::DotSegment),
        ("/latest/meta-data/..", Reject::DotSegment),
        ("/latest//meta-data", Reject::EmptySegment),
        ("//latest/meta-data", Reject::EmptySegment),
        ("/latest/meta-data%2Fiam", Reject::PercentEncoded),
        ("/latest/meta-data/%2e%2e/user-data", Reject::PercentEncoded),
        ("/latest/meta-data/%252F", Reject::PercentEncoded),
        ("/latest/%5Cuser-data", Reject::PercentEncoded),
        ("/latest/meta-data;x=1/iam", Reject::PathParameter),
        ("/latest/meta-data/ami-id;", Reject::PathParameter),
        ("/latest/meta-data/ami-id?x=1", Reject::Query),
        ("/latest/meta-data/ami-id?", Reject::Query),
    ] {
        assert_eq!(get(target), Err(want), "{target}");
    }
    assert_eq!(split_target("/a\\b"), Err(Reject::Backslash));
    assert_eq!(split_target("/a b"), Err(Reject::TargetBytes));
    assert_eq!(split_target("/a\u{e9}"), Err(Reject::TargetBytes));
    assert_eq!(split_target("/a\x01"), Err(Reject::TargetBytes));
    assert_eq!(split_target("*"), Err(Reject::NotOriginForm));
    assert_eq!(
        split_target(&format!("/{}", "a".repeat(MAX_TARGET))),
        Err(Reject::TargetTooLong)
    );
}

#[test]
fn rejects_methods_and_forms() {
    assert_eq!(
        run(Method::POST, "/latest/api/token", &[]),
        Err(Reject::Method)
    );
    assert_eq!(
        run(Method::PUT, "/latest/meta-data/", &[]),
        Err(Reject::Method)
    );
    assert_eq!(
        run(Method::DELETE, "/latest/meta-data/", &[]),
        Err(Reject::Method)
    );
    assert_eq!(
        run(Method::OPTIONS, "/latest/meta-data/", &[]),
        Err(Reject::Method)
    );
    let abs: Uri = "http://169.254.169.254/latest/meta-data/".parse().unwrap();
    assert_eq!(
        check(&Method::GET, &abs, Version::HTTP_11, &HeaderMap::new()),
        Err(Reject::NotOriginForm)
    );
    let authority: Uri = "169.254.169.254:80".parse().unwrap();
    assert_eq!(
        check(
            &Method::CONNECT,
            &authority,
            Version::HTTP_11,
            &HeaderMap::new()
        ),
        Err(Reject::NotOriginForm)
    );
    let p: Uri = "/latest/meta-data/".parse().unwrap();
    for v in [Version::HTTP_09, Version::HTTP_2, Version::HTTP_3] {
        assert_eq!(
            check(&Method::GET, &p, v, &HeaderMap::new()),
            Err(Reject::Version)
        );
    }
    assert!(check(&Method::GET, &p, Version::HTTP_10, &HeaderMap::new()).is_ok());
}

#[test]
fn rejects_bodies_and_smuggling_headers() {
    let t = "/latest/meta-data/";
    assert_eq!(
        run(
            Method::GET,
            t,
            &[("content-length", "5"), ("transfer-encoding", "chunked")]
        ),
        Err(Reject::ContentLengthAndTransferEncoding)
    );
    assert_eq!(
        run(Method::GET, t, &[("content-length", "5")]),
        Err(Reject::Body)
    );
    assert_eq!(
        run(Method::GET, t, &[("transfer-encoding", "chunked")]),
        Err(Reject::Body)
    );
    assert!(run(Method::PUT, "/latest/api/token", &[("content-length", "0")]).is_ok());
    assert_eq!(
        run(Method::PUT, "/latest/api/token", &[("content-length", "1")]),
        Err(Reject::Body)
    );
    for h in ["x-forwarded-for", "forwarded", "x-real-ip", "via"] {
        assert_eq!(
            run(Method::PUT, "/latest/api/token", &[(h, "1.2.3.4")]),
            Err(Reject::Forwarded)
        );
    }
    assert_eq!(
        run(Method::GET, t, &[("upgrade", "h2c")]),
        Err(Reject::Upgrade)
    );
    assert_eq!(
        run(Method::GET, t, &[("expect", "100-continue")]),
        Err(Reject::Upgrade)
    );
    let many: Vec<(&'static str, &str)> = vec![("x-a", "1"); MAX_HEADERS + 1];
    assert_eq!(run(Method::GET, t, &many), Err(Reject::TooManyHeaders));
    let mut h = HeaderMap::new();
    h.insert(
        "x-a",
        hyper::header::HeaderValue::from_bytes(b"\xff").unwrap(),
    );
    assert_eq!(
        check(&Method::GET, &t.parse().unwrap(), Version::HTTP_11, &h),
        Err(Reject::HeaderBytes)
    );
}

#[test]
fn cloud_header_rules() {
    let g = "/computeMetadata/v1/instance/zone";
    assert_eq!(
        get(g),
        Err(Reject::MissingHeader("Metadata-Flavor: Google"))
    );
    assert_eq!(
        run(Method::GET, g, &[("metadata-flavor", "google")]),
        Err(Reject::MissingHeader("Metadata-Flavor: Google"))
    );
    assert_eq!(
        run(
            Method::GET,
            g,
            &[("metadata-flavor", "Google"), ("metadata-flavor", "Google")]
        ),
        Err(Reject::MissingHeader("Metadata-Flavor: Google"))
    );
    assert!(run(Method::GET, g, &[("metadata-flavor", "Google")]).is_ok());
    let a = "/metadata/instance/compute/location?api-version=2021-02-01&format=text";
    assert_eq!(get(a), Err(Reject::MissingHeader("Metadata: true")));
    assert!(run(Method::GET, a, &[("metadata", "true")]).is_ok());
    let o = "/opc/v2/instance/region";
    assert_eq!(
        get(o),
        Err(Reject::MissingHeader("Authorization: Bearer Oracle"))
    );
    assert!(run(Method::GET, o, &[("authorization", "Bearer Oracle")]).is_ok());
}

#[test]
fn queries_per_cloud() {
    let flavor = [("metadata-flavor", "Google")];
    let gcp = |q: &str| {
        run(
            Method::GET,
            &format!("/computeMetadata/v1/instance/{q}"),
            &flavor,
        )
    };
    assert!(gcp("zone?alt=text").is_ok());
    assert!(
        gcp("maintenance-event?wait_for_change=true&timeout_sec=60")
            .unwrap()
            .waits
    );
    assert!(gcp("?recursive=true&alt=json").unwrap().recursive);
    for bad in [
        "zone?alt=xml",
        "zone?alt=json&alt=text",
        "zone?foo=1",
        "zone?recursive",
        "zone?&",
    ] {
        assert_eq!(gcp(bad), Err(Reject::Query), "{bad}");
    }
    let md = [("metadata", "true")];
    let az = |q: &str| run(Method::GET, &format!("/metadata/attested/document{q}"), &md);
    assert!(
        az("?api-version=2021-02-01&nonce=abc123")
            .unwrap()
            .recursive
    );
    assert_eq!(
        az("?api-version=2021-02-01&recursive=true"),
        Err(Reject::Query)
    );
    assert_eq!(az("?api-version=2021-02-01&nonce=a-b"), Err(Reject::Query));
    assert_eq!(get("/latest/meta-data/?recursive=true"), Err(Reject::Query));
}

#[test]
fn dialects_and_case() {
    assert_eq!(Dialect::of("/metadata-attacker"), Dialect::Other);
    assert_eq!(Dialect::of("/METADATA/identity"), Dialect::Azure);
    assert_eq!(Dialect::of("/LATEST/meta-data"), Dialect::Other);
    let md = [("metadata", "true")];
    let c = run(
        Method::GET,
        "/Metadata/Instance/Compute/VMID?api-version=1",
        &md,
    )
    .unwrap();
    assert_eq!(c.path, "/metadata/instance/compute/vmid");
    assert_eq!(c.target, "/Metadata/Instance/Compute/VMID?api-version=1");
}

proptest! {
    /// Whatever passes the checks is already canonical: no dot segments,
    /// no empty inner segment, no escapes, nothing outside visible ASCII.
    #[test]
    fn accepted_paths_are_canonical(target in "/[a-zA-Z0-9./%;\\\\?=&-]{0,40}") {
        if let Ok((path, _)) = split_target(&target) {
            prop_assert!(!path.contains('%') && !path.contains(';') && !path.contains('\\'));
            let segs: Vec<&str> = path[1..].split('/').collect();
            for (i, s) in segs.iter().enumerate() {
                prop_assert!(*s != "." && *s != "..");
                prop_assert!(!s.is_empty() || i == segs.len() - 1);
            }
        }
    }
}
