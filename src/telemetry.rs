//! The tracing subscriber: human-readable or JSON lines on stderr, filtered by `RUST_LOG` (default `info`).

use crate::config::LogFormat;
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Lines queued for stderr before new ones are dropped: a stalled log pipe must never stall
/// requests, and a line per request at tens of thousands of requests a second needs room.
const QUEUED_LINES: usize = 64 * 1024;

/// Installs the global subscriber once, at start-up. Lines are formatted on the thread that logs and written
/// by a thread of their own, so no request waits on stderr. Keep the guard until exit: dropping it flushes.
pub fn init(format: LogFormat) -> WorkerGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a terminal: log collectors (and kubectl logs) would show the escape codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = NonBlockingBuilder::default()
        .buffered_lines_limit(QUEUED_LINES)
        .lossy(true)
        .thread_name("wharf-log")
        // Buffered: the writer thread flushes whenever its queue runs empty, so a burst of lines costs a few
        // writes rather than one each.
        .finish(std::io::BufWriter::with_capacity(64 * 1024, std::io::stderr()));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    guard
}

/// An error and its sources on one line, joined with `: ` (a source whose text the line already ends with
/// is skipped): what logs and error answers show, since many errors say little without their causes.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out = format!("{out}: {text}");
        }
        source = s.source();
    }
    out
}
