//! Kubernetes name syntax: label keys and values, DNS labels and subdomains.
//!
//! These mirror apimachinery's `validation` package so a policy that loads
//! here would also be accepted by the API server, and a typo that could never
//! match an object is reported instead of silently matching nothing.

/// Why a name is malformed. Messages read after the name they describe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("is empty")]
    Empty,
    #[error("is longer than {max} characters")]
    TooLong { max: usize },
    #[error("must be alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric")]
    NotQualifiedName,
    #[error(
        "must be lowercase alphanumerics, '-' or '.', each dot-separated part starting and ending with an alphanumeric"
    )]
    NotDnsSubdomain,
    #[error("must be lowercase alphanumerics or '-', starting and ending with an alphanumeric")]
    NotDnsLabel,
}

/// Which part of a label key is wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyProblem {
    #[error("has more than one '/'")]
    TooManySlashes,
    #[error("prefix {0}")]
    Prefix(Malformed),
    #[error("name {0}")]
    Name(Malformed),
}

const LABEL_MAX: usize = 63;
const SUBDOMAIN_MAX: usize = 253;

/// A label key: `[prefix/]name`, the prefix a DNS subdomain.
pub fn check_label_key(key: &str) -> Result<(), KeyProblem> {
    let (prefix, name) = match key.split_once('/') {
        Some((_, rest)) if rest.contains('/') => return Err(KeyProblem::TooManySlashes),
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        check_dns_subdomain(prefix).map_err(KeyProblem::Prefix)?;
    }
    if name.is_empty() {
        return Err(KeyProblem::Name(Malformed::Empty));
    }
    check_qualified_part(name).map_err(KeyProblem::Name)
}

/// A label value: empty, or a name part of at most 63 characters.
pub fn check_label_value(value: &str) -> Result<(), Malformed> {
    if value.is_empty() {
        return Ok(());
    }
    check_qualified_part(value)
}

/// An RFC 1123 label, as namespace names are.
pub fn check_dns_label(name: &str) -> Result<(), Malformed> {
    check_len(name, LABEL_MAX)?;
    if !is_dns_label_shaped(name) {
        return Err(Malformed::NotDnsLabel);
    }
    Ok(())
}

fn check_dns_subdomain(name: &str) -> Result<(), Malformed> {
    check_len(name, SUBDOMAIN_MAX)?;
    if !name.split('.').all(is_dns_label_shaped) {
        return Err(Malformed::NotDnsSubdomain);
    }
    Ok(())
}

fn check_qualified_part(name: &str) -> Result<(), Malformed> {
    check_len(name, LABEL_MAX)?;
    let inner_ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if !(starts_and_ends_alphanumeric(name, |c| c.is_ascii_alphanumeric())
        && name.chars().all(inner_ok))
    {
        return Err(Malformed::NotQualifiedName);
    }
    Ok(())
}

fn check_len(name: &str, max: usize) -> Result<(), Malformed> {
    match name.len() {
        0 => Err(Malformed::Empty),
        n if n > max => Err(Malformed::TooLong { max }),
        _ => Ok(()),
    }
}

fn is_dns_label_shaped(part: &str) -> bool {
    let lower_alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    part.len() <= LABEL_MAX
        && starts_and_ends_alphanumeric(part, lower_alnum)
        && part.chars().all(|c| lower_alnum(c) || c == '-')
}

fn starts_and_ends_alphanumeric(s: &str, alnum: impl Fn(char) -> bool) -> bool {
    match (s.chars().next(), s.chars().last()) {
        (Some(first), Some(last)) => alnum(first) && alnum(last),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_keys_follow_apimachinery() {
        for ok in [
            "app",
            "a",
            "app.kubernetes.io/name",
            "example.com/A_b-c.D",
            "x/y",
            &"a".repeat(63),
            &format!(
                "{}/n",
                [
                    "a".repeat(63),
                    "b".repeat(63),
                    "c".repeat(63),
                    "d".repeat(61)
                ]
                .join(".")
            ),
        ] {
            assert_eq!(check_label_key(ok), Ok(()), "{ok:?}");
        }
        for (bad, want) in [
            ("", KeyProblem::Name(Malformed::Empty)),
            ("a/b/c", KeyProblem::TooManySlashes),
            ("/app", KeyProblem::Prefix(Malformed::Empty)),
            ("example.com/", KeyProblem::Name(Malformed::Empty)),
            (
                "Example.com/app",
                KeyProblem::Prefix(Malformed::NotDnsSubdomain),
            ),
            (
                "exa_mple.com/app",
                KeyProblem::Prefix(Malformed::NotDnsSubdomain),
            ),
            (
                "example..com/app",
                KeyProblem::Prefix(Malformed::NotDnsSubdomain),
            ),
            ("-app", KeyProblem::Name(Malformed::NotQualifiedName)),
            ("app-", KeyProblem::Name(Malformed::NotQualifiedName)),
            ("a b", KeyProblem::Name(Malformed::NotQualifiedName)),
            ("app=x", KeyProblem::Name(Malformed::NotQualifiedName)),
            ("ü", KeyProblem::Name(Malformed::NotQualifiedName)),
            (
                &"a".repeat(64),
                KeyProblem::Name(Malformed::TooLong { max: 63 }),
            ),
            (
                &format!("{}/n", "a".repeat(254)),
                KeyProblem::Prefix(Malformed::TooLong { max: 253 }),
            ),
        ] {
            assert_eq!(check_label_key(bad), Err(want), "{bad:?}");
        }
    }

    #[test]
    fn label_values_may_be_empty() {
        for ok in ["", "prod", "v1.2_3-x", &"z".repeat(63)] {
            assert_eq!(check_label_value(ok), Ok(()), "{ok:?}");
        }
        assert_eq!(check_label_value("-x"), Err(Malformed::NotQualifiedName));
        assert_eq!(check_label_value("a/b"), Err(Malformed::NotQualifiedName));
        assert_eq!(
            check_label_value(&"z".repeat(64)),
            Err(Malformed::TooLong { max: 63 })
        );
    }

    #[test]
    fn dns_labels_are_lowercase_without_dots() {
        for ok in ["imds", "kube-system", "a", "0", &"n".repeat(63)] {
            assert_eq!(check_dns_label(ok), Ok(()), "{ok:?}");
        }
        assert_eq!(check_dns_label(""), Err(Malformed::Empty));
        for bad in ["Imds", "a.b", "a_b", "-a", "a-"] {
            assert_eq!(check_dns_label(bad), Err(Malformed::NotDnsLabel), "{bad:?}");
        }
        assert_eq!(
            check_dns_label(&"n".repeat(64)),
            Err(Malformed::TooLong { max: 63 })
        );
    }
}
