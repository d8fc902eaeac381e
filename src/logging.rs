//! Logging set-up: `tracing` to stderr through a writer thread, human-readable or JSON lines,
//! filtered by `[log].level` unless `RUST_LOG` says otherwise; and the count of lines that thread
//! had to drop, for `/metrics`.

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Lines queued for the writer thread: seconds of a full-load stall, minutes of a normal one.
/// The queue is allocated whole at start, so its size is resident memory (the default of 128,000
/// lines cost 4 MiB of RSS).
const QUEUED_LINES: usize = 16_384;

/// Lines dropped by the installed subscriber's writer; set once, by the [`init`] that installs it.
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Install the global subscriber. A second call (tests, sandbox) keeps the first one.
///
/// Lines are written to stderr by a thread of their own. Under systemd stderr is a pipe to
/// journald, and a journald that falls behind fills it: a write from the request path would then
/// stall provisioning for as long as journald does. Past [`QUEUED_LINES`] waiting lines, new ones
/// are dropped and counted ([`dropped_lines`], `flowthrough_log_lines_dropped_total`): the store's
/// audit keeps every command's record, and a stuck log must not stop provisioning (with a
/// blocking queue, a debug-level log stalled it once the queue filled; tests/logging.rs). The
/// returned guard writes out what is still queued when it is dropped, so hold it until the
/// program ends.
#[must_use = "dropping the guard stops the log writer"]
pub fn init(config: &LogConfig) -> WorkerGuard {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = NonBlockingBuilder::default()
        .buffered_lines_limit(QUEUED_LINES)
        .lossy(true)
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        // Colour codes only for a person at a terminal, not in journald or a log file.
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let installed = match config.format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
    if installed.is_ok() {
        let _ = DROPPED.set(dropped);
    }
    guard
}

/// Log lines dropped since start because the writer thread's queue was full: the log's reader
/// (journald, a collector) has fallen behind.
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}
