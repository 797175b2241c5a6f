//! Where log lines go and in which form (`log_format`): tracing's text lines, or one JSON
//! object a line, on stderr. `RUST_LOG` filters as usual (default `info`); each answered
//! request is one `info` line under the target `spillway::access` (silence it with
//! `RUST_LOG=info,spillway::access=off`).

use crate::config::LogFormat;

/// The target of the one line per answered request.
pub const ACCESS: &str = "spillway::access";

/// Installs the process's log writer. Call once, before anything logs.
pub fn init(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let lines = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => lines
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => lines
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
}
