//! `imdsguard destinations`: the built-in protected destinations.

use std::fmt::Write as _;

use crate::destinations;

/// One line per default destination: prefix, name, effective port ranges.
pub fn render() -> String {
    let mut out = String::new();
    for d in destinations::defaults() {
        let ranges: Vec<String> = d
            .effective_ranges()
            .iter()
            .map(|(a, b)| format!("{a}-{b}"))
            .collect();
        let _ = writeln!(
            out,
            "{:<24} {:<26} ports {}",
            d.prefix.to_string(),
            d.name,
            ranges.join(",")
        );
    }
    out
}
