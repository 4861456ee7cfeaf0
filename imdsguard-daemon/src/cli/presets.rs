//! `imdsguard presets`: the built-in presets a policy can `include`, each
//! component's match and access, why it needs that, and where its labels
//! come from.

use std::fmt::Write as _;

use crate::{
    Error, Result,
    cli::args::Output,
    policy::{
        file::Access,
        presets::{self, Preset, PresetRule},
    },
};

pub fn render(format: Output) -> Result<String> {
    let all = presets::all().map_err(|e| Error::Presets(Box::new(e)))?;
    super::output(format, &all, |all| table(all))
}

fn table(all: &[Preset]) -> String {
    let mut out = String::new();
    for p in all {
        let _ = writeln!(out, "{}: {}", p.name, p.description);
        if p.rules.is_empty() {
            let _ = writeln!(out, "  (no rules)");
        }
        for r in &p.rules {
            let _ = writeln!(out, "  {}/{}", p.name, r.name);
            let _ = writeln!(out, "    match:  {}", matched(r));
            let _ = writeln!(out, "    access: {}", access(r));
            let _ = writeln!(out, "    needs:  {}", r.needs);
            let _ = writeln!(out, "    source: {}", r.source);
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(
        out,
        "A policy adds them after its own rules with `include: [<preset>]`; `presetAccess: allow` grants filter entries the full service (agents without the filter proxy)."
    );
    out
}

fn matched(r: &PresetRule) -> String {
    let labels: Vec<String> = r
        .pod_selector
        .match_labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    format!(
        "namespace {} pods {}",
        r.namespaces.join(","),
        labels.join(",")
    )
}

fn access(r: &PresetRule) -> String {
    match r.access {
        Access::Allow => "allow".into(),
        Access::Deny => "deny".into(),
        Access::Filter => {
            let mut parts: Vec<String> = r.profile.iter().map(|p| format!("profile {p}")).collect();
            if let Some(paths) = &r.paths {
                parts.push(format!("paths {}", paths.join(" ")));
            }
            format!("filter ({})", parts.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lists_every_component_with_its_access_and_source() {
        let out = render(Output::Table).unwrap();
        for want in [
            "eks/aws-node",
            "access: allow",
            "eks/ebs-csi-node",
            "filter (profile instance-info; paths /latest/meta-data/outpost-arn",
            "namespace kube-system pods k8s-app=aws-node",
            "source: aws/amazon-vpc-cni-k8s",
            "gke/gke-metadata-server",
            "aks/cloud-node-manager",
            "generic: ",
            "(no rules)",
        ] {
            assert!(out.contains(want), "{want}\n{out}");
        }
    }

    #[test]
    fn json_is_the_data() {
        let out = render(Output::Json).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v[0]["name"], "eks");
        assert_eq!(
            v[0]["rules"][0]["podSelector"]["matchLabels"]["k8s-app"],
            "aws-node"
        );
        assert_eq!(v[0]["rules"][0]["access"], "allow");
    }
}
