//! Logging set-up: `tracing` to stderr through a writer thread, human-readable or JSON lines,
//! filtered by `[log].level` unless `RUST_LOG` says otherwise; and the count of lines that thread
//! had to drop, for `/metrics`.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::{LogConfig, LogFormat};

/// Bytes of lines waiting for the writer thread before new lines are dropped: about 16,000
/// lines of a provisioning log, seconds of a full-load stall and minutes of a normal one.
const QUEUED_BYTES: usize = 4 * 1024 * 1024;

/// How long the writer thread lets lines gather before it writes them. Waking it for each line
/// cost a thread wake-up per Webex call (one `info` line each): 22,000–28,000 context switches in
/// 7 s at 6,000 requests/s (bench/RESULTS.md, eighth sitting). A line reaches stderr at most this
/// late.
const GATHER: Duration = Duration::from_millis(20);

/// The installed subscriber's queue; set once, by the [`init`] that installs it.
static INSTALLED: OnceLock<Arc<Queue>> = OnceLock::new();

/// Install the global subscriber. A second call (tests, sandbox) keeps the first one.
///
/// Lines are written to stderr by a thread of their own. Under systemd stderr is a pipe to
/// journald, and a journald that falls behind fills it: a write from the request path would then
/// stall provisioning for as long as journald does. Past [`QUEUED_BYTES`] of waiting lines, new
/// ones are dropped and counted ([`dropped_lines`], `flowthrough_log_lines_dropped_total`): the
/// store's audit keeps every command's record, and a stuck log must not stop provisioning (with a
/// blocking queue, a debug-level log stalled it once the queue filled; tests/logging.rs). The
/// returned guard writes out what is still queued when it is dropped, so hold it until the
/// program ends.
#[must_use = "dropping the guard stops the log writer"]
pub fn init(config: &LogConfig) -> LogGuard {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let queue = Arc::new(Queue::default());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(QueueWriter(queue.clone()))
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
    if installed.is_err() || INSTALLED.set(queue.clone()).is_err() {
        return LogGuard { writer: None };
    }
    let writer = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn({
            let queue = queue.clone();
            move || write_out(&queue, &mut std::io::stderr())
        });
    match writer {
        Ok(thread) => LogGuard {
            writer: Some((queue, thread)),
        },
        Err(e) => {
            // Without the thread the queue fills and lines are dropped and counted; the
            // service itself still runs.
            eprintln!(
                "flowthrough: cannot start the log writer thread ({e}); log lines will be \
                 dropped and counted in flowthrough_log_lines_dropped_total. Check the \
                 process limits (ulimit -u, systemd TasksMax)."
            );
            LogGuard { writer: None }
        }
    }
}

/// Log lines dropped since start because the writer thread's queue was full: the log's reader
/// (journald, a collector) has fallen behind.
pub fn dropped_lines() -> u64 {
    INSTALLED
        .get()
        .map_or(0, |q| q.dropped.load(Ordering::Relaxed))
}

/// Stops the writer thread when dropped, after it has written every queued line (or after
/// [`FINAL_WRITE_PATIENCE`], if stderr blocks).
pub struct LogGuard {
    writer: Option<(Arc<Queue>, JoinHandle<()>)>,
}

/// How long the end of the program waits for the writer to write out the queue. A journald that
/// stopped reading would otherwise hold the exit of `serve` (and its exit code) until systemd
/// kills it.
const FINAL_WRITE_PATIENCE: Duration = Duration::from_secs(2);

impl Drop for LogGuard {
    fn drop(&mut self) {
        if let Some((queue, thread)) = self.writer.take() {
            stop_writer(&queue, thread, FINAL_WRITE_PATIENCE);
        }
    }
}

/// Ask the writer thread to write what is queued and stop; wait for it up to `patience`, then
/// leave it behind (its lines are lost with a stderr nobody reads).
fn stop_writer(queue: &Queue, thread: JoinHandle<()>, patience: Duration) {
    lock(&queue.state).stop = true;
    queue.wake_up.notify_one();
    let deadline = std::time::Instant::now() + patience;
    while !thread.is_finished() {
        if std::time::Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = thread.join();
}

/// Lines waiting for the writer thread.
#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
    wake_up: Condvar,
    dropped: AtomicU64,
}

#[derive(Default)]
struct QueueState {
    lines: Vec<u8>,
    stop: bool,
}

fn lock(mutex: &Mutex<QueueState>) -> MutexGuard<'_, QueueState> {
    // Nothing run under the lock can panic half-way through a change.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Queue {
    /// Queue one whole line, or drop and count it when the queue is full.
    fn push(&self, line: &[u8]) {
        let mut state = lock(&self.state);
        if state.lines.len() + line.len() > QUEUED_BYTES {
            drop(state);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let was_empty = state.lines.is_empty();
        state.lines.extend_from_slice(line);
        drop(state);
        if was_empty {
            self.wake_up.notify_one();
        }
    }
}

/// The writer thread: wait for a line, let more gather for [`GATHER`], write them all, repeat;
/// at stop, write what is left and return.
fn write_out(queue: &Queue, out: &mut impl Write) {
    let mut batch = Vec::new();
    loop {
        let stop = {
            let mut state = lock(&queue.state);
            while state.lines.is_empty() && !state.stop {
                state = queue
                    .wake_up
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if !state.stop {
                state = queue
                    .wake_up
                    .wait_timeout_while(state, GATHER, |s| !s.stop)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            // The two buffers trade places, so neither is allocated again once grown.
            std::mem::swap(&mut state.lines, &mut batch);
            state.stop
        };
        // A failed write (stderr closed) loses these lines; nothing else can report it.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        if stop {
            return;
        }
    }
}

/// What the subscriber writes each event through: the formatter writes a whole line per event,
/// and the line is queued when the writer is dropped, so lines never interleave.
struct QueueWriter(Arc<Queue>);

struct LineWriter<'a> {
    queue: &'a Queue,
    line: Vec<u8>,
}

impl<'a> MakeWriter<'a> for QueueWriter {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            queue: &self.0,
            line: Vec::new(),
        }
    }
}

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter<'_> {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.queue.push(&self.line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writer_stuck_on_stderr_does_not_hold_up_the_exit() {
        /// Stands for a stderr pipe nobody reads: every write blocks until the test ends.
        struct StuckPipe(std::sync::mpsc::Receiver<()>);
        impl Write for StuckPipe {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                let _ = self.0.recv();
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (release, stuck) = std::sync::mpsc::channel();
        let queue = Arc::new(Queue::default());
        queue.push(b"a line nobody will read\n");
        let thread = std::thread::spawn({
            let queue = queue.clone();
            move || write_out(&queue, &mut StuckPipe(stuck))
        });
        let (stopped, stop_returned) = std::sync::mpsc::channel();
        std::thread::spawn({
            let queue = queue.clone();
            move || {
                stop_writer(&queue, thread, Duration::from_millis(100));
                let _ = stopped.send(());
            }
        });
        assert!(
            stop_returned.recv_timeout(Duration::from_secs(30)).is_ok(),
            "stopping waited for a writer blocked on its pipe"
        );
        drop(release);
    }

    #[test]
    fn lines_past_the_queue_limit_are_dropped_whole_and_counted() {
        let queue = Queue::default();
        let line = vec![b'x'; 1000];
        let fits = QUEUED_BYTES / line.len();
        for _ in 0..fits + 5 {
            queue.push(&line);
        }
        assert_eq!(lock(&queue.state).lines.len(), fits * line.len());
        assert_eq!(queue.dropped.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn the_writer_writes_every_queued_line_in_order_and_stops() {
        let queue = Arc::new(Queue::default());
        let writer = std::thread::spawn({
            let queue = queue.clone();
            move || {
                let mut out = Vec::new();
                write_out(&queue, &mut out);
                out
            }
        });
        let writer_of_lines = QueueWriter(queue.clone());
        for i in 0..1000 {
            let mut line = writer_of_lines.make_writer();
            writeln!(line, "line {i}").unwrap();
            drop(line);
            if i == 500 {
                // Let one batch go out half-way, so the second batch follows a written one.
                std::thread::sleep(GATHER * 2);
            }
        }
        lock(&queue.state).stop = true;
        queue.wake_up.notify_one();
        let out = String::from_utf8(writer.join().unwrap()).unwrap();
        let expected: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(out, expected);
        assert_eq!(queue.dropped.load(Ordering::Relaxed), 0);
    }
}
