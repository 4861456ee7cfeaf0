//! Reading the chart's renderings and the seccomp profile: the agent's
//! arguments and capabilities, and the check that the binary knows every flag.

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::test::output;

use super::deploy_dir;

/// The arguments of the agent container in a rendering: the items of the
/// first `args:` list. The chart writes one item per line.
pub(super) fn daemon_args(rendering: &str) -> Vec<String> {
    let mut lines = rendering
        .lines()
        .skip_while(|l| l.trim() != "args:")
        .skip(1)
        .peekable();
    let Some(first) = lines.peek() else {
        return Vec::new();
    };
    let indent = first.len() - first.trim_start().len();
    lines
        .take_while(|l| l.trim().starts_with("- ") && l.len() - l.trim_start().len() == indent)
        .map(|l| l.trim().trim_start_matches("- ").to_owned())
        .collect()
}

/// Every flag the manifests pass must be one `imdsguard node` accepts:
/// otherwise the pods crash-loop on an argument error.
pub(super) fn check_flags(binary: &Path) -> anyhow::Result<()> {
    let help = output(Command::new(binary).args(["node", "--help"]))?;
    let flags_file = deploy_dir().join("daemon-flags.txt");
    let flags = fs::read_to_string(&flags_file)
        .with_context(|| format!("read {}", flags_file.display()))?;
    if !flags.lines().any(|f| f == "--policy") {
        bail!(
            "found no agent arguments in the renderings ({})",
            flags_file.display()
        );
    }
    let unknown: Vec<&str> = flags
        .lines()
        .filter(|f| {
            !help
                .split(|c: char| c.is_whitespace() || c == ',' || c == '=' || c == '<')
                .any(|w| w == *f)
        })
        .collect();
    if !unknown.is_empty() {
        bail!(
            "the manifests pass {} but `imdsguard node --help` does not list {}",
            unknown.join(" "),
            if unknown.len() == 1 { "it" } else { "them" }
        );
    }
    eprintln!(
        "xtask: `imdsguard node` accepts every flag the manifests pass: {}",
        flags.lines().collect::<Vec<_>>().join(" ")
    );
    Ok(())
}

/// The `add: [A, B]` list of the agent container (the chart writes it in
/// flow style; the deploy_manifests test checks the plain manifests match).
pub(super) fn rendered_capabilities(rendering: &str) -> anyhow::Result<Vec<&str>> {
    let Some(line) = rendering
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("add: ["))
    else {
        bail!("no `add: [...]` capability list in the rendering");
    };
    let list = line
        .trim_start_matches("add: [")
        .trim_end_matches(']')
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    Ok(list)
}

/// The profile with its `"names": ["bpf"]` rule taken out: what a runtime
/// default profile that allows bpf(2) only with CAP_SYS_ADMIN amounts to here.
pub(super) fn profile_without_bpf(profile: &str) -> anyhow::Result<String> {
    let rule_start = profile
        .find("\"bpf\"")
        .and_then(|at| profile[..at].rfind('{'))
        .context("the seccomp profile has no bpf rule")?;
    let rule_end = rule_start
        + profile[rule_start..]
            .find('}')
            .context("unterminated bpf rule")?;
    // The rule and the comma after it.
    let after = profile[rule_end + 1..].trim_start();
    let Some(rest) = after.strip_prefix(',') else {
        bail!("the bpf rule must not be the profile's last rule");
    };
    Ok(format!("{}{}", &profile[..rule_start], rest.trim_start()))
}
