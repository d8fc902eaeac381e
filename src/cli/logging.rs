//! Logging set-up: `tracing` to stderr, human-readable or JSON lines, filtered by `[log].level`
//! unless `RUST_LOG` says otherwise.

use std::io::IsTerminal;

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Lines queued for the writer thread: seconds of a full-load stall, minutes of a normal one.
/// The queue is allocated whole at start, so its size is resident memory (the default of 128,000
/// lines cost 4 MiB of RSS).
const QUEUED_LINES: usize = 16_384;

/// Install the global subscriber. A second call (tests, sandbox) keeps the first one.
///
/// Lines are written to stderr by a thread of their own. Under systemd stderr is a pipe to
/// journald, and a journald that falls behind fills it: a write from the request path would then
/// stall provisioning for as long as journald does. Nothing is dropped: when the queue is full,
/// logging blocks as a direct write would. The returned guard writes out what is still queued
/// when it is dropped, so hold it until the program ends.
#[must_use = "dropping the guard stops the log writer"]
pub fn init(config: &LogConfig) -> WorkerGuard {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = NonBlockingBuilder::default()
        .buffered_lines_limit(QUEUED_LINES)
        .lossy(false)
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        // Colour codes only for a person at a terminal, not in journald or a log file.
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let _ = match config.format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
    guard
}
