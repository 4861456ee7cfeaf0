//! The fake's HTTP side: one request head in, the answer each cloud would
//! give out.

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::TcpStream,
    sync::Mutex,
    time::Duration,
};

use super::{Behaviour, INSTANCE_ID, SECRET, Seen, TOKEN};

/// Reads one request head and answers it (see [`respond`]).
pub(super) fn handle_http(mut stream: TcpStream, seen: &Mutex<Vec<Seen>>, behaviour: Behaviour) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 16 * 1024 {
            break;
        }
    }
    let req = String::from_utf8_lossy(&buf);
    if let Ok(mut s) = seen.lock() {
        s.push(Seen {
            line: req.lines().next().unwrap_or("").to_owned(),
            user_agent: user_agent(&req),
        });
    }
    let (status, body) = respond(&req, behaviour);
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(resp.as_bytes());
}

fn user_agent(head: &str) -> Option<String> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("user-agent")
            .then(|| v.trim().to_owned())
    })
}

/// The answer to one request head, as the cloud whose path it is would
/// give it:
/// - AWS (`/latest/`): `PUT api/token` needs the TTL header and is refused
///   (403) with X-Forwarded-For; a GET with a wrong token gets 401, one
///   without a token too when [`Behaviour::tokens_required`];
/// - GCP (`/computeMetadata/v1/`): 403 without `Metadata-Flavor: Google`
///   or with X-Forwarded-For;
/// - Azure (`/metadata/`): 400 without `Metadata: true`.
///
/// Each serves a few paths, credentials among them (with [`SECRET`]); any
/// other path answers `200 fake-metadata`, as the probes expect.
pub fn respond(head: &str, behaviour: Behaviour) -> (&'static str, String) {
    let mut lines = head.lines();
    let first = lines.next().unwrap_or("");
    let mut parts = first.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let h = |k: &str| headers.get(k).map(String::as_str);
    let path = target.split('?').next().unwrap_or("");
    let ok = |body: &str| ("200 OK", body.to_owned());
    let secret = || ("200 OK", format!("{{\"Token\":\"{SECRET}\"}}"));
    let not_found = ("404 Not Found", String::new());
    if let Some(rest) = path.strip_prefix("/latest/") {
        if method == "PUT" && rest == "api/token" {
            return if h("x-forwarded-for").is_some() {
                ("403 Forbidden", String::new())
            } else if h("x-aws-ec2-metadata-token-ttl-seconds").is_none() {
                ("400 Bad Request", String::new())
            } else {
                ok(TOKEN)
            };
        }
        match h("x-aws-ec2-metadata-token") {
            Some(t) if t != TOKEN => return ("401 Unauthorized", String::new()),
            None if behaviour.tokens_required => return ("401 Unauthorized", String::new()),
            _ => {}
        }
        return match rest {
            "meta-data/instance-id" => ok(INSTANCE_ID),
            "meta-data/placement/region" => ok("us-east-1"),
            "meta-data/placement/availability-zone" => ok("us-east-1a"),
            "meta-data/iam/security-credentials/" => ok("lab-role"),
            "meta-data/iam/security-credentials/lab-role" | "user-data" => secret(),
            _ => ok("fake-metadata"),
        };
    }
    if let Some(rest) = path.strip_prefix("/computeMetadata/v1/") {
        if h("metadata-flavor") != Some("Google") || h("x-forwarded-for").is_some() {
            return ("403 Forbidden", String::new());
        }
        return match rest {
            "instance/zone" => ok("projects/1/zones/us-central1-a"),
            "instance/id" => ok("1234567890"),
            "instance/service-accounts/default/token" | "instance/attributes/kube-env" => secret(),
            _ => not_found,
        };
    }
    if path
        .get(..10)
        .is_some_and(|p| p.eq_ignore_ascii_case("/metadata/"))
    {
        if h("metadata") != Some("true") {
            return ("400 Bad Request", String::new());
        }
        return match path.to_ascii_lowercase().as_str() {
            "/metadata/instance/compute/location" => ok("westeurope"),
            "/metadata/identity/oauth2/token" | "/metadata/instance/compute/userdata" => secret(),
            _ => not_found,
        };
    }
    ok("fake-metadata")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(head: &str, tokens_required: bool) -> (&'static str, String) {
        respond(head, Behaviour { tokens_required })
    }

    #[test]
    fn aws_token_rules() {
        let put =
            "PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n";
        assert_eq!(ask(put, true), ("200 OK", TOKEN.to_owned()));
        let xff = "PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n";
        assert_eq!(ask(xff, false).0, "403 Forbidden");
        assert_eq!(
            ask("PUT /latest/api/token HTTP/1.1\r\n\r\n", false).0,
            "400 Bad Request"
        );
        let id = "GET /latest/meta-data/instance-id HTTP/1.1\r\n";
        assert_eq!(ask(&format!("{id}\r\n"), true).0, "401 Unauthorized");
        assert_eq!(
            ask(&format!("{id}\r\n"), false),
            ("200 OK", INSTANCE_ID.to_owned())
        );
        let with = format!("{id}X-aws-ec2-metadata-token: {TOKEN}\r\n\r\n");
        assert_eq!(ask(&with, true), ("200 OK", INSTANCE_ID.to_owned()));
        let bad = format!("{id}X-aws-ec2-metadata-token: nope\r\n\r\n");
        assert_eq!(ask(&bad, false).0, "401 Unauthorized");
        let creds = "GET /latest/meta-data/iam/security-credentials/lab-role HTTP/1.1\r\n\r\n";
        assert!(ask(creds, false).1.contains(SECRET));
        // What the lab's probes expect.
        assert_eq!(
            ask("GET /latest/meta-data/ HTTP/1.1\r\n\r\n", false).1,
            "fake-metadata"
        );
    }

    #[test]
    fn user_agent_is_read_from_the_head() {
        let head = "GET / HTTP/1.1\r\nHost: x\r\nuser-agent:  probe/1 \r\n\r\n";
        assert_eq!(user_agent(head).as_deref(), Some("probe/1"));
        assert_eq!(user_agent("GET / HTTP/1.1\r\n\r\n"), None);
    }

    #[test]
    fn gcp_and_azure_header_rules() {
        let zone = "GET /computeMetadata/v1/instance/zone HTTP/1.1\r\n";
        assert_eq!(ask(&format!("{zone}\r\n"), false).0, "403 Forbidden");
        assert_eq!(
            ask(&format!("{zone}Metadata-Flavor: Google\r\n\r\n"), false).0,
            "200 OK"
        );
        let loc = "GET /metadata/instance/compute/location?api-version=2021-02-01 HTTP/1.1\r\n";
        assert_eq!(ask(&format!("{loc}\r\n"), false).0, "400 Bad Request");
        assert_eq!(
            ask(&format!("{loc}Metadata: true\r\n\r\n"), false).1,
            "westeurope"
        );
    }
}
