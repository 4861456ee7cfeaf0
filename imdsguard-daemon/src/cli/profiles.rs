//! `imdsguard profiles`: the built-in filter profiles and the paths each
//! allows, then the paths no profile or rule can ever allow.

use std::fmt::Write as _;

use crate::{Result, filter};

pub fn render() -> Result<String> {
    let mut out = String::new();
    for p in filter::profiles::all()? {
        let _ = writeln!(out, "{}: {}", p.name, p.description);
        for path in &p.paths {
            let _ = writeln!(out, "  {path}");
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(
        out,
        "never allowed (with everything below them, in any case):"
    );
    for (path, what) in filter::never::NEVER {
        let _ = writeln!(out, "  {path:<58} {what}");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn lists_every_profile_and_the_never_list() {
        let out = super::render().unwrap();
        for want in [
            "instance-info:",
            "node-lifecycle:",
            "imdsv2-token:",
            "kube-env",
        ] {
            assert!(out.contains(want), "{want}");
        }
    }
}
