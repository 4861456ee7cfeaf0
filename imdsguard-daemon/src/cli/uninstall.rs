//! `imdsguard uninstall`: detach and unpin everything, and say what went.

use std::{fmt::Write as _, path::Path};

use crate::{
    Result,
    bpf::{
        pins::PinLayout,
        uninstall::{UninstallReport, uninstall},
    },
    cli::args::UninstallArgs,
};

/// Runs the command; returns the text to print.
pub fn run(args: &UninstallArgs) -> Result<String> {
    let report = uninstall(&PinLayout::new(&args.pin_dir))?;
    Ok(render(&report, &args.pin_dir))
}

pub fn render(report: &UninstallReport, pin_dir: &Path) -> String {
    let mut out = String::new();
    if report.links.is_empty() && report.maps.is_empty() {
        let _ = writeln!(out, "no imdsguard installation at {}", pin_dir.display());
    } else {
        let _ = writeln!(
            out,
            "detached {} and removed {} pinned maps from {}",
            if report.links.is_empty() {
                "nothing".to_string()
            } else {
                report.links.join(", ")
            },
            report.maps.len(),
            pin_dir.display()
        );
    }
    out
}
