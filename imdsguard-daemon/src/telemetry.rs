//! Logging: tracing with an env filter and optional JSON lines. aya's own
//! `log` records are bridged by tracing-subscriber's log feature.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber. `level` is an EnvFilter directive such as
/// `info` or `imdsguard=debug`; `RUST_LOG` overrides it when set.
pub fn init(format: LogFormat, level: &str) -> Result<(), tracing_subscriber::filter::ParseError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::try_new(v)?,
        _ => EnvFilter::try_new(level)?,
    };
    let registry = tracing_subscriber::registry().with(filter);
    // Logs go to stderr; stdout is for command output (status, tables).
    let result = match format {
        LogFormat::Text => registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    // A second init (tests) keeps the first subscriber.
    drop(result);
    Ok(())
}
