//! The byte relay of an established tunnel: both directions at once through one small fixed
//! buffer each (a slow reader slows the writer: back-pressure, no unbounded buffering), half-close
//! passed on, bytes counted as they go, and the tunnel ended on idleness, age or shutdown.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

/// Per direction. Large enough that bulk transfers are not syscall-bound, small enough that
/// thousands of tunnels cost little memory.
const BUFFER_BYTES: usize = 32 * 1024;

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
    mut closing: watch::Receiver<bool>,
) -> End
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    // Milliseconds since `start` of the last byte in either direction.
    let last = AtomicU64::new(0);
    let (mut client_r, mut client_w) = tokio::io::split(client);
    let (mut server_r, mut server_w) = tokio::io::split(server);
    let up = pipe(
        &mut client_r,
        &mut server_w,
        &counts.up,
        &metrics.up,
        &last,
        start,
    );
    let down = pipe(
        &mut server_r,
        &mut client_w,
        &counts.down,
        &metrics.down,
        &last,
        start,
    );
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
            let since = Duration::from_millis(last.load(Ordering::Relaxed));
            let quiet = start.elapsed().saturating_sub(since);
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
async fn pipe<R, W>(
    reader: &mut R,
    writer: &mut W,
    count: &AtomicU64,
    metric: &Counter,
    last: &AtomicU64,
    start: Instant,
) -> std::io::Result<()>
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
        last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        writer.write_all(&buf[..n]).await?;
        writer.flush().await?;
        last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        count.fetch_add(n as u64, Ordering::Relaxed);
        metric.inc_by(n as u64);
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
