//! The byte relay of an established tunnel: both directions at once through one small fixed
//! buffer each — or, between two plain TCP sockets, one kernel pipe each (64 KiB, growing to at
//! most 1 MiB under bulk traffic) with `splice(2)`, so the bytes never pass through user space —
//! (a slow reader slows the writer: back-pressure, no unbounded buffering), half-close passed on,
//! bytes counted as they go, and the tunnel ended on idleness, age or shutdown.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

/// Per direction. Large enough that bulk transfers are not syscall-bound, small enough that
/// thousands of tunnels cost little memory.
const BUFFER_BYTES: usize = 64 * 1024;

/// Why a relay ended (the audit's `end`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Both sides closed their sending direction.
    Closed,
    Idle,
    MaxDuration,
    Shutdown,
    /// A read or write failed (e.g. a reset); the text says which side and why.
    Error(String),
}

impl End {
    pub fn label(&self) -> String {
        match self {
            End::Closed => "closed".to_owned(),
            End::Idle => "idle_timeout".to_owned(),
            End::MaxDuration => "max_tunnel_seconds".to_owned(),
            End::Shutdown => "shutdown".to_owned(),
            End::Error(why) => format!("error: {why}"),
        }
    }
}

/// When a relay ends besides both sides closing.
pub struct Limits {
    pub idle: Duration,
    /// `None`: no age limit.
    pub max_duration: Option<Duration>,
}

/// Bytes moved so far, readable while the relay runs and after it ends.
#[derive(Debug, Default)]
pub struct Counts {
    pub up: AtomicU64,
    pub down: AtomicU64,
}

/// Prometheus counters the relay adds to as bytes pass.
pub struct ByteCounters {
    pub up: Counter,
    pub down: Counter,
}

/// Relay between `client` and `server` until both directions closed, idleness, age, `closing`
/// turning true, or an error.
pub async fn relay<C, S>(
    client: C,
    server: S,
    limits: &Limits,
    counts: &Counts,
    metrics: &ByteCounters,
    closing: watch::Receiver<bool>,
) -> End
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let clock = Clock::new();
    let (mut client_r, mut client_w) = tokio::io::split(client);
    let (mut server_r, mut server_w) = tokio::io::split(server);
    let up = Meter::new(&counts.up, &metrics.up, &clock);
    let down = Meter::new(&counts.down, &metrics.down, &clock);
    supervise(
        pipe(&mut client_r, &mut server_w, &up),
        pipe(&mut server_r, &mut client_w, &down),
        &clock,
        limits,
        closing,
    )
    .await
}

/// [`relay`] for two plain TCP sockets: the kernel moves the bytes with `splice(2)` through a
/// pipe per direction, so they are never copied through user space (the pipe is the small fixed
/// window; back-pressure is the socket's).
pub async fn relay_tcp(
    client: TcpStream,
    server: TcpStream,
    limits: &Limits,
    counts: &Counts,
    metrics: &ByteCounters,
    closing: watch::Receiver<bool>,
) -> End {
    let clock = Clock::new();
    let pipes = match (splice::Pipe::new(), splice::Pipe::new()) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return End::Error(format!("cannot create a pipe: {e}")),
    };
    let up = Meter::new(&counts.up, &metrics.up, &clock);
    let down = Meter::new(&counts.down, &metrics.down, &clock);
    supervise(
        splice::copy(&client, &server, &pipes.0, &up),
        splice::copy(&server, &client, &pipes.1, &down),
        &clock,
        limits,
        closing,
    )
    .await
}

/// When the relay started and when a byte last moved.
struct Clock {
    start: Instant,
    /// Milliseconds since `start` of the last byte in either direction.
    last: AtomicU64,
}

impl Clock {
    fn new() -> Clock {
        Clock {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// One direction's counters.
struct Meter<'a> {
    count: &'a AtomicU64,
    metric: &'a Counter,
    clock: &'a Clock,
}

impl<'a> Meter<'a> {
    fn new(count: &'a AtomicU64, metric: &'a Counter, clock: &'a Clock) -> Meter<'a> {
        Meter {
            count,
            metric,
            clock,
        }
    }

    fn moved(&self, n: usize) {
        self.clock.touch();
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        self.metric.inc_by(n as u64);
    }
}

/// Run both directions until they are done, the tunnel is idle or too old, or shutdown.
async fn supervise(
    up: impl Future<Output = std::io::Result<()>>,
    down: impl Future<Output = std::io::Result<()>>,
    clock: &Clock,
    limits: &Limits,
    mut closing: watch::Receiver<bool>,
) -> End {
    let both = async {
        tokio::try_join!(
            async { up.await.map_err(|e| format!("client to destination: {e}")) },
            async {
                down.await
                    .map_err(|e| format!("destination to client: {e}"))
            },
        )
    };
    let idle = async {
        loop {
            let since = Duration::from_millis(clock.last.load(Ordering::Relaxed));
            let quiet = clock.start.elapsed().saturating_sub(since);
            if quiet >= limits.idle {
                return;
            }
            tokio::time::sleep(limits.idle - quiet).await;
        }
    };
    let age = async {
        match limits.max_duration {
            Some(max) => tokio::time::sleep(max).await,
            None => std::future::pending().await,
        }
    };
    let shutdown = async {
        // An error means the sender is gone: nobody can ask us to close any more.
        if closing.wait_for(|c| *c).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = both => match result {
            Ok(_) => End::Closed,
            Err(why) => End::Error(why),
        },
        _ = idle => End::Idle,
        _ = age => End::MaxDuration,
        _ = shutdown => End::Shutdown,
    }
}

/// Copy until EOF, then pass the half-close on by shutting the writer's sending side.
async fn pipe<R, W>(reader: &mut R, writer: &mut W, meter: &Meter<'_>) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER_BYTES];
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(n) => n,
            // A TLS peer that closes TCP without close_notify: for a relay that is an EOF.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(e),
        };
        if n == 0 {
            // The other side may already be gone; its own direction reports that.
            let _ = writer.shutdown().await;
            return Ok(());
        }
        meter.clock.touch();
        writer.write_all(&buf[..n]).await?;
        writer.flush().await?;
        meter.moved(n);
    }
}

/// Zero-copy forwarding between TCP sockets with `splice(2)` (Linux).
mod splice {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::Interest;
    use tokio::net::TcpStream;

    use super::Meter;

    /// The most a pipe grows to (if `/proc/sys/fs/pipe-max-size` allows): a bulk transfer moves
    /// a megabyte per pair of splices instead of 64 KiB, which cuts the relay's CPU per byte
    /// (fewer syscalls, wake-ups and window updates), and it is still a small fixed window.
    pub const MAX_PIPE: usize = 1024 * 1024;

    /// A kernel pipe that starts at the default size (64 KiB) and grows, by doubling, only while
    /// the traffic fills it: interactive tunnels keep small pipes, which matters because an
    /// unprivileged user's pipe pages are limited (`/proc/sys/fs/pipe-user-pages-soft`).
    pub struct Pipe {
        read: OwnedFd,
        write: OwnedFd,
        /// The size the kernel granted; `MAX_PIPE` once growing failed, so it is not retried.
        capacity: AtomicUsize,
    }

    impl Pipe {
        pub fn new() -> std::io::Result<Pipe> {
            let mut fds = [0 as RawFd; 2];
            // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
            if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
            let (read, write) =
                unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            // SAFETY: a valid pipe descriptor.
            let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
            if size <= 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(Pipe {
                read,
                write,
                capacity: AtomicUsize::new(size as usize),
            })
        }

        /// Double the capacity after a splice that filled more than half the pipe: the sender
        /// outpaces the window. Failing (the size or the user's pipe pages at their limit) keeps
        /// the size, which still works.
        fn grow_if_filled(&self, moved: usize) {
            let capacity = self.capacity.load(Ordering::Relaxed);
            if capacity >= MAX_PIPE || moved * 2 <= capacity {
                return;
            }
            // SAFETY: a valid pipe descriptor; F_SETPIPE_SZ returns the size the kernel granted.
            let granted = unsafe {
                libc::fcntl(
                    self.write.as_raw_fd(),
                    libc::F_SETPIPE_SZ,
                    (capacity * 2).min(MAX_PIPE) as libc::c_int,
                )
            };
            if granted > 0 {
                self.capacity.store(granted as usize, Ordering::Relaxed);
            } else {
                // Don't retry on every splice.
                self.capacity.store(MAX_PIPE, Ordering::Relaxed);
            }
        }
    }

    fn splice(from: RawFd, to: RawFd, len: usize) -> std::io::Result<usize> {
        // SAFETY: both descriptors are open for the duration of the call; null offsets mean
        // "current position", as sockets and pipes require.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Move bytes from `from` to `to` through `pipe` until EOF, then half-close `to`. The pipe is
    /// drained completely before the next read, so writing into it never blocks.
    pub async fn copy(
        from: &TcpStream,
        to: &TcpStream,
        pipe: &Pipe,
        meter: &Meter<'_>,
    ) -> std::io::Result<()> {
        loop {
            let n = from
                .async_io(Interest::READABLE, || {
                    splice(from.as_raw_fd(), pipe.write.as_raw_fd(), MAX_PIPE)
                })
                .await?;
            if n == 0 {
                // The other side may already be gone; its own direction reports that.
                let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
                return Ok(());
            }
            meter.clock.touch();
            pipe.grow_if_filled(n);
            let mut left = n;
            while left > 0 {
                left -= to
                    .async_io(Interest::WRITABLE, || {
                        splice(pipe.read.as_raw_fd(), to.as_raw_fd(), left)
                    })
                    .await?;
            }
            meter.moved(n);
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_pipe_grows_only_while_traffic_fills_it_and_stops_at_the_maximum() {
            let pipe = Pipe::new().unwrap();
            let start = pipe.capacity.load(Ordering::Relaxed);
            assert!(start < MAX_PIPE, "starts small: {start}");
            pipe.grow_if_filled(start / 2);
            assert_eq!(
                pipe.capacity.load(Ordering::Relaxed),
                start,
                "half full: no growth"
            );
            let mut last = start;
            while last < MAX_PIPE {
                pipe.grow_if_filled(last);
                let now = pipe.capacity.load(Ordering::Relaxed);
                assert!(now > last, "a full pipe grows: {last} -> {now}");
                last = now;
            }
            assert_eq!(last, MAX_PIPE);
            pipe.grow_if_filled(MAX_PIPE);
            assert_eq!(pipe.capacity.load(Ordering::Relaxed), MAX_PIPE);
            // SAFETY: a valid pipe descriptor.
            let kernel = unsafe { libc::fcntl(pipe.write.as_raw_fd(), libc::F_GETPIPE_SZ) };
            assert_eq!(kernel as usize, MAX_PIPE, "the kernel agrees");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters() -> ByteCounters {
        ByteCounters {
            up: Counter::default(),
            down: Counter::default(),
        }
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_and_half_close_passes_on() {
        let (mut a, a_relay) = tokio::io::duplex(1024);
        let (b_relay, mut b) = tokio::io::duplex(1024);
        let counts = Counts::default();
        let metrics = counters();
        let (_tx, rx) = watch::channel(false);
        let limits = Limits {
            idle: Duration::from_secs(30),
            max_duration: None,
        };
        let relay = relay(a_relay, b_relay, &limits, &counts, &metrics, rx);
        let peers = async {
            a.write_all(b"hello").await.unwrap();
            a.shutdown().await.unwrap();
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"hello", "b sees the data, then EOF");
            // b may still answer after a's half-close.
            b.write_all(b"answer!").await.unwrap();
            b.shutdown().await.unwrap();
            let mut back = Vec::new();
            a.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, b"answer!");
        };
        let (end, ()) = tokio::join!(relay, peers);
        assert_eq!(end, End::Closed);
        assert_eq!(counts.up.load(Ordering::Relaxed), 5);
        assert_eq!(counts.down.load(Ordering::Relaxed), 7);
        assert_eq!(metrics.up.get(), 5);
        assert_eq!(metrics.down.get(), 7);
    }

    /// A connected pair of loopback sockets.
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    #[tokio::test]
    async fn spliced_tcp_relay_moves_bytes_and_half_closes() {
        let (mut a, a_relay) = tcp_pair().await;
        let (b_relay, mut b) = tcp_pair().await;
        let counts = Counts::default();
        let metrics = counters();
        let (_tx, rx) = watch::channel(false);
        let limits = Limits {
            idle: Duration::from_secs(30),
            max_duration: None,
        };
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let relay = relay_tcp(a_relay, b_relay, &limits, &counts, &metrics, rx);
        let peers = async {
            let (_, got) = tokio::join!(
                async {
                    a.write_all(&big).await.unwrap();
                    a.shutdown().await.unwrap();
                },
                async {
                    let mut got = Vec::new();
                    b.read_to_end(&mut got).await.unwrap();
                    got
                }
            );
            assert!(got == big, "b sees every byte in order, then EOF");
            b.write_all(b"answer!").await.unwrap();
            b.shutdown().await.unwrap();
            let mut back = Vec::new();
            a.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, b"answer!");
        };
        let (end, ()) = tokio::join!(relay, peers);
        assert_eq!(end, End::Closed);
        assert_eq!(counts.up.load(Ordering::Relaxed), 3_000_000);
        assert_eq!(counts.down.load(Ordering::Relaxed), 7);
        assert_eq!(metrics.up.get(), 3_000_000);
    }

    /// Bulk traffic grows the splice pipes to their maximum; the relay must still hold no more
    /// than that window: a destination that stops reading stops the client soon after.
    #[tokio::test]
    async fn a_destination_that_stops_reading_stops_the_client_within_a_fixed_window() {
        const SOCKET_BUFFER: usize = 64 * 1024;
        let (mut a, a_relay) = tcp_pair().await;
        let (b_relay, mut b) = tcp_pair().await;
        for s in [&a, &a_relay, &b_relay, &b] {
            let s = socket2::SockRef::from(s);
            s.set_send_buffer_size(SOCKET_BUFFER).unwrap();
            s.set_recv_buffer_size(SOCKET_BUFFER).unwrap();
        }
        let counts = Counts::default();
        let metrics = counters();
        let (_tx, rx) = watch::channel(false);
        let limits = Limits {
            idle: Duration::from_secs(30),
            max_duration: None,
        };
        let relay = relay_tcp(a_relay, b_relay, &limits, &counts, &metrics, rx);
        let peers = async {
            let block: Vec<u8> = (0..SOCKET_BUFFER as u32).map(|i| (i % 241) as u8).collect();
            let mut written = 0usize;
            // b reads nothing: the writes stall once every buffer on the way is full. A relay
            // buffering without bound would let the writer reach the cap instead.
            while written < 64 * 1024 * 1024 {
                let write = a.write(&block[written % block.len()..]);
                match tokio::time::timeout(Duration::from_secs(1), write).await {
                    Ok(n) => written += n.unwrap(),
                    Err(_) => break,
                }
            }
            // Four socket buffers (the kernel doubles what is asked) and the largest pipe, with
            // room for the kernel's rounding; far below the cap.
            let window = 4 * 2 * SOCKET_BUFFER + splice::MAX_PIPE;
            assert!(
                written <= 2 * window,
                "the client wrote {written} bytes into a stalled tunnel; the window is {window}"
            );
            assert!(written > 0, "the first block fits in the buffers");
            a.shutdown().await.unwrap();
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.unwrap();
            assert_eq!(
                got.len(),
                written,
                "every byte arrives once the reader reads"
            );
            assert!(
                got.iter()
                    .enumerate()
                    .all(|(i, byte)| *byte == block[i % block.len()]),
                "in order and intact"
            );
            b.shutdown().await.unwrap();
            written
        };
        let (end, written) = tokio::join!(relay, peers);
        assert_eq!(end, End::Closed);
        assert_eq!(counts.up.load(Ordering::Relaxed), written as u64);
    }

    #[tokio::test(start_paused = true)]
    async fn idleness_age_and_shutdown_end_the_relay() {
        let limits = Limits {
            idle: Duration::from_secs(5),
            max_duration: Some(Duration::from_secs(60)),
        };
        let (_a, a_relay) = tokio::io::duplex(64);
        let (b_relay, _b) = tokio::io::duplex(64);
        let (_tx, rx) = watch::channel(false);
        let end = relay(
            a_relay,
            b_relay,
            &limits,
            &Counts::default(),
            &counters(),
            rx,
        )
        .await;
        assert_eq!(end, End::Idle);

        // Steady traffic keeps it from going idle; the age limit still ends it.
        let (mut a, a_relay) = tokio::io::duplex(64);
        let (b_relay, mut b) = tokio::io::duplex(64);
        let (_tx, rx) = watch::channel(false);
        let counts = Counts::default();
        let metrics = counters();
        let chatter = async {
            let mut buf = [0u8; 1];
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                if a.write_all(b"x").await.is_err() {
                    return;
                }
                if b.read_exact(&mut buf).await.is_err() {
                    return;
                }
            }
        };
        let end = tokio::select! {
            end = relay(a_relay, b_relay, &limits, &counts, &metrics, rx) => end,
            _ = chatter => panic!("the chatter stopped first"),
        };
        assert_eq!(end, End::MaxDuration);
        assert!(counts.up.load(Ordering::Relaxed) >= 25);

        let (_a, a_relay) = tokio::io::duplex(64);
        let (b_relay, _b) = tokio::io::duplex(64);
        let (tx, rx) = watch::channel(false);
        let (counts, metrics) = (Counts::default(), counters());
        let closer = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            tx.send(true).unwrap();
            std::future::pending::<()>().await
        };
        let end = tokio::select! {
            end = relay(a_relay, b_relay, &limits, &counts, &metrics, rx) => end,
            _ = closer => unreachable!(),
        };
        assert_eq!(end, End::Shutdown);
    }
}
