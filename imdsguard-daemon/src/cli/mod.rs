//! The command line: argument structs ([`args`]), and the commands that
//! inspect or remove an installation, with the text they print.

pub mod args;
pub mod destinations;
pub mod explain;
pub mod presets;
pub mod profiles;
pub mod report;
mod report_fetch;
pub mod status;
pub mod uninstall;

use serde::Serialize;

use crate::{Error, Result, cli::args::Output};

/// `value` as the user asked for it: a table, or pretty JSON.
fn output<T: Serialize>(
    format: Output,
    value: &T,
    table: impl FnOnce(&T) -> String,
) -> Result<String> {
    match format {
        Output::Table => Ok(table(value)),
        Output::Json => serde_json::to_string_pretty(value)
            .map(|json| json + "\n")
            .map_err(Error::Json),
    }
}
