//! Logging: tracing with an env filter and optional JSON lines. aya's own
//! `log` records are bridged by tracing-subscriber's log feature.

use std::io::IsTerminal as _;

use tracing_subscriber::{
    EnvFilter, Layer, fmt, fmt::MakeWriter, prelude::*, registry::LookupSpan,
};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Whether text logs get ANSI colours. Only a terminal shows them: in a log
/// file or `kubectl logs` they are raw escape bytes that break grep and log
/// shippers. `NO_COLOR` (https://no-color.org) turns them off on a terminal
/// too.
pub fn colour(stderr_is_terminal: bool, no_color: Option<&str>) -> bool {
    stderr_is_terminal && no_color.is_none_or(str::is_empty)
}

/// The formatting layer for `format`, writing to `writer`. Every mode of the
/// binary (`run`, `node`, the CLI commands) logs through this.
pub fn layer<S, W>(format: LogFormat, writer: W, ansi: bool) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    match format {
        LogFormat::Text => fmt::layer().with_writer(writer).with_ansi(ansi).boxed(),
        // JSON never carries colour; with_ansi(false) also keeps the
        // fields free of escapes.
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_ansi(false)
            .with_writer(writer)
            .boxed(),
    }
}

/// Installs the global subscriber. `level` is an EnvFilter directive such as
/// `info` or `imdsguard=debug`; `RUST_LOG` overrides it when set.
pub fn init(format: LogFormat, level: &str) -> Result<(), tracing_subscriber::filter::ParseError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::try_new(v)?,
        _ => EnvFilter::try_new(level)?,
    };
    let ansi = colour(
        std::io::stderr().is_terminal(),
        std::env::var("NO_COLOR").ok().as_deref(),
    );
    // Logs go to stderr; stdout is for command output (status, tables).
    let result = tracing_subscriber::registry()
        .with(filter)
        .with(layer(format, std::io::stderr, ansi))
        .try_init();
    // A second init (tests) keeps the first subscriber.
    drop(result);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A writer into a shared buffer: a log file, or a pipe to kubectl logs.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Buffer {
            self.clone()
        }
    }

    fn logged(format: LogFormat, ansi: bool) -> String {
        let buf = Buffer::default();
        let subscriber = tracing_subscriber::registry().with(layer(format, buf.clone(), ansi));
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(pod = "imds/test-1", "metadata access denied");
        });
        String::from_utf8(buf.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some("")));
        assert!(!colour(true, Some("1")));
        assert!(!colour(false, None));
        assert!(!colour(false, Some("")));
    }

    #[test]
    fn text_logs_off_a_terminal_have_no_escapes() {
        let plain = logged(LogFormat::Text, colour(false, None));
        assert!(plain.contains("metadata access denied"), "{plain:?}");
        assert!(plain.contains("pod=\"imds/test-1\""), "{plain:?}");
        assert!(!plain.contains('\x1b'), "{plain:?}");
        // On a terminal the same line is coloured (so the switch is real).
        assert!(logged(LogFormat::Text, true).contains('\x1b'));
        let json = logged(LogFormat::Json, true);
        assert!(!json.contains('\x1b'), "{json:?}");
        let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
        assert_eq!(v["pod"], "imds/test-1");
    }
}
