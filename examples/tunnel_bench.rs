//! Benchmark client for `bench/tunnel.sh`: bulk throughput through a CONNECT proxy vs direct, and
//! tunnels opened per second. The proxy is either flowthrough's tunnel started in-process the way
//! `serve` starts it (`--proxy builtin`, plain mode on loopback) or any CONNECT proxy at an
//! address (Squid). The destinations (a sink and an echo server) run in-process on loopback, and
//! the same client code measures every case.
//!
//! Output: one line of `key=value` figures on stdout. With the builtin proxy it also gives the
//! CPU time the whole process (client, sink and relay) spent per GiB in each bulk run, and the
//! relay threads' share of it: on a machine where the cores are the limit, throughput follows
//! CPU per byte, and these figures show what the second hop costs.

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

/// CPU time used so far, in clock ticks, by the whole process and by the tunnel's relay threads
/// (named `flowthrough-tunnel`, shortened by the kernel to 15 bytes), from /proc.
fn cpu_ticks() -> (u64, u64) {
    fn ticks(stat: &str) -> Option<(String, u64)> {
        // The name is in parentheses and may hold spaces; the fields after it are fixed.
        let (head, rest) = stat.rsplit_once(')')?;
        let name = head.split_once('(')?.1.to_owned();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        Some((name, utime + stime))
    }
    let process = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| ticks(&s))
        .map_or(0, |(_, t)| t);
    let mut relay = 0;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            if let Some((name, t)) = std::fs::read_to_string(task.path().join("stat"))
                .ok()
                .and_then(|s| ticks(&s))
                && name.starts_with("flowthrough-tun")
            {
                relay += t;
            }
        }
    }
    (process, relay)
}

/// One bulk run's figures.
struct Bulk {
    mib_s: f64,
    /// Process CPU milliseconds per GiB moved (client, sink and, in-process, the relay).
    cpu_ms_per_gib: f64,
    /// The relay threads' part of it.
    relay_ms_per_gib: f64,
}

/// Send `mib` MiB and get the sink's count back: MiB/s and the CPU it cost.
async fn bulk(proxy: Option<SocketAddr>, dest: SocketAddr, mib: usize) -> std::io::Result<Bulk> {
    let mut tcp = open(proxy, dest).await?;
    let chunk = vec![0x5au8; 1024 * 1024];
    let cpu_before = cpu_ticks();
    let started = Instant::now();
    tcp.write_all(&((mib * 1024 * 1024) as u64).to_be_bytes())
        .await?;
    for _ in 0..mib {
        tcp.write_all(&chunk).await?;
    }
    let mut count = [0u8; 8];
    tcp.read_exact(&mut count).await?;
    let secs = started.elapsed().as_secs_f64();
    let cpu_after = cpu_ticks();
    if u64::from_be_bytes(count) != (mib * 1024 * 1024) as u64 {
        return Err(std::io::Error::other("the sink did not get every byte"));
    }
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let per_gib = |ticks: u64| ticks as f64 * 1000.0 / hz / (mib as f64 / 1024.0);
    Ok(Bulk {
        mib_s: mib as f64 / secs,
        cpu_ms_per_gib: per_gib(cpu_after.0 - cpu_before.0),
        relay_ms_per_gib: per_gib(cpu_after.1 - cpu_before.1),
    })
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
    let mut line = format!(
        "direct_mib_s={:.0} proxy_mib_s={:.0} ratio={:.2} tunnels_per_s={per_s:.0}",
        direct.mib_s,
        through.mib_s,
        through.mib_s / direct.mib_s
    );
    // Another proxy's CPU is not in this process: the figures would mislead.
    if args.proxy == "builtin" {
        line += &format!(
            " direct_cpu_ms_per_gib={:.0} proxy_cpu_ms_per_gib={:.0} relay_cpu_ms_per_gib={:.0}",
            direct.cpu_ms_per_gib, through.cpu_ms_per_gib, through.relay_ms_per_gib
        );
        // The most the tunnel could move at that CPU cost with every core busy on it alone.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        if through.cpu_ms_per_gib > 0.0 {
            line += &format!(
                " proxy_cpu_ceiling_mib_s={:.0}",
                cores * 1000.0 / through.cpu_ms_per_gib * 1024.0
            );
        }
    }
    println!("{line}");
    Ok(())
}
