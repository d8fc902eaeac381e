//! Benchmark client for `bench/tunnel.sh`: bulk throughput through a CONNECT proxy vs direct, and
//! tunnels opened per second. The proxy is either flowthrough's tunnel started in-process the way
//! `serve` starts it (`--proxy builtin`, plain mode on loopback) or any CONNECT proxy at an
//! address (Squid). The destinations (a sink and an echo server) run in-process on loopback, and
//! the same client code measures every case.
//!
//! Output: one line of `key=value` figures on stdout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Args {
    proxy: String,
    mib: usize,
    seconds: u64,
    concurrency: usize,
}

fn args() -> Result<Args, String> {
    let mut out = Args {
        proxy: "builtin".into(),
        mib: 1024,
        seconds: 5,
        concurrency: 16,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let num = || value.parse::<u64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--proxy" => out.proxy = value.clone(),
            "--mib" => out.mib = num()? as usize,
            "--seconds" => out.seconds = num()?,
            "--concurrency" => out.concurrency = num()? as usize,
            _ => {
                return Err(format!(
                    "unknown flag {flag}; use --proxy builtin|ADDR --mib N --seconds S --concurrency C"
                ));
            }
        }
    }
    Ok(out)
}

/// Reads an 8-byte big-endian length, then that many bytes, then answers with the count it got.
/// (No half-close: Squid closes a CONNECT tunnel on the client's half-close.)
async fn sink() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let mut len = [0u8; 8];
                if tcp.read_exact(&mut len).await.is_err() {
                    return;
                }
                let want = u64::from_be_bytes(len);
                let mut buf = vec![0u8; 256 * 1024];
                let mut total: u64 = 0;
                while total < want {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n as u64,
                    }
                }
                let _ = tcp.write_all(&total.to_be_bytes()).await;
            });
        }
    });
    Ok(addr)
}

async fn echo() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(addr)
}

/// Open a tunnel to `dest` through `proxy` (or connect directly without one).
async fn open(proxy: Option<SocketAddr>, dest: SocketAddr) -> std::io::Result<TcpStream> {
    let Some(proxy) = proxy else {
        let tcp = TcpStream::connect(dest).await?;
        tcp.set_nodelay(true)?;
        return Ok(tcp);
    };
    let mut tcp = TcpStream::connect(proxy).await?;
    tcp.set_nodelay(true)?;
    tcp.write_all(format!("CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n\r\n").as_bytes())
        .await?;
    let mut head = Vec::with_capacity(128);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tcp.read_exact(&mut byte).await?;
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 200") && !head.starts_with(b"HTTP/1.0 200") {
        return Err(std::io::Error::other(format!(
            "the proxy refused: {}",
            String::from_utf8_lossy(&head).lines().next().unwrap_or("")
        )));
    }
    Ok(tcp)
}

/// MiB/s of sending `mib` MiB and getting the sink's count back.
async fn bulk(proxy: Option<SocketAddr>, dest: SocketAddr, mib: usize) -> std::io::Result<f64> {
    let mut tcp = open(proxy, dest).await?;
    let chunk = vec![0x5au8; 1024 * 1024];
    let started = Instant::now();
    tcp.write_all(&((mib * 1024 * 1024) as u64).to_be_bytes())
        .await?;
    for _ in 0..mib {
        tcp.write_all(&chunk).await?;
    }
    let mut count = [0u8; 8];
    tcp.read_exact(&mut count).await?;
    let secs = started.elapsed().as_secs_f64();
    if u64::from_be_bytes(count) != (mib * 1024 * 1024) as u64 {
        return Err(std::io::Error::other("the sink did not get every byte"));
    }
    Ok(mib as f64 / secs)
}

/// Tunnels per second: each opens, proves the path with one echoed byte, and closes.
async fn rate(
    proxy: Option<SocketAddr>,
    dest: SocketAddr,
    seconds: u64,
    concurrency: usize,
) -> std::io::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let mut tcp = open(proxy, dest).await?;
                tcp.write_all(b"x").await?;
                let mut b = [0u8; 1];
                tcp.read_exact(&mut b).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            std::io::Result::Ok(())
        }));
    }
    let started = Instant::now();
    for t in tasks {
        t.await.map_err(std::io::Error::other)??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

fn builtin(sink: SocketAddr, echo: SocketAddr) -> Result<flowthrough::tunnel::Tunnel, String> {
    let text = format!(
        "[tunnel]\nlisten = [\"127.0.0.1:0\"]\ntls = false\nallowed_networks = [\"127.0.0.0/8\"]\nallow_private_destinations = true\nmax_tunnels = 4096\nallowed_destinations = [\"{sink}\", \"{echo}\"]\n"
    );
    let config = flowthrough::config::Config::parse(&text, std::path::Path::new("bench.toml"))
        .map_err(|e| e.to_string())?;
    let cfg = config.tunnel.ok_or("no [tunnel]")?;
    let listeners = flowthrough::tunnel::bind(&cfg.listen).map_err(|e| e.to_string())?;
    let settings = flowthrough::tunnel::TunnelSettings::from_config(
        &cfg,
        flowthrough::failover::Resolver::System,
    )
    .map_err(|e| e.to_string())?;
    flowthrough::tunnel::start(
        listeners,
        settings,
        flowthrough::tunnel::TunnelShared {
            tls: None,
            store: None,
            metrics: Arc::new(flowthrough::metrics::Metrics::new()),
        },
    )
    .map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let args = args()?;
    let sink = sink().await.map_err(|e| e.to_string())?;
    let echo = echo().await.map_err(|e| e.to_string())?;
    let (_tunnel, proxy) = if args.proxy == "builtin" {
        let tunnel = builtin(sink, echo)?;
        let addr = tunnel.local_addrs()[0];
        (Some(tunnel), addr)
    } else {
        let addr = args
            .proxy
            .parse::<SocketAddr>()
            .map_err(|e| format!("--proxy: {e}"))?;
        (None, addr)
    };
    let err = |e: std::io::Error| e.to_string();
    // Warm-up, then the measured runs.
    bulk(None, sink, 64).await.map_err(err)?;
    bulk(Some(proxy), sink, 64).await.map_err(err)?;
    let direct = bulk(None, sink, args.mib).await.map_err(err)?;
    let through = bulk(Some(proxy), sink, args.mib).await.map_err(err)?;
    let per_s = rate(Some(proxy), echo, args.seconds, args.concurrency)
        .await
        .map_err(err)?;
    println!(
        "direct_mib_s={direct:.0} proxy_mib_s={through:.0} ratio={:.2} tunnels_per_s={per_s:.0}",
        through / direct
    );
    Ok(())
}
