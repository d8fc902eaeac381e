//! `flowthrough-load`: the load generator of the benchmark harness (`bench/run.sh`).
//!
//! It plays the BroadWorks AS: mutual TLS, hand-written HTTP/1.1, one new user per request (the
//! userId of the body is made unique), keep-alive or new-connection, open-loop fixed rate with
//! latency measured from the scheduled send time (so a stalled server cannot hide its queueing:
//! no coordinated omission) or as fast as possible. It also holds idle connections to measure the
//! server's memory per connection, and reads the server's CPU time and RSS from /proc.
//!
//! Loopback only: any other target is refused before a socket is opened.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A request gets this long for connect + handshake + answer before it counts as a timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response accepted; flowthrough's answers are a few KiB.
const MAX_RESPONSE_BYTES: usize = 4 << 20;
/// Connections opened at once in idle mode (a burst of 1,000 SYNs overflows the accept backlog).
const IDLE_OPEN_PARALLEL: usize = 64;

/// Load generator for flowthrough benchmarks (loopback targets only).
#[derive(Debug, Parser)]
#[command(name = "flowthrough-load", max_term_width = 100)]
struct Args {
    /// Target address (loopback only: 127.0.0.0/8 or ::1). Repeatable: connection i goes to
    /// the (i mod N)-th of N targets, as a balancer spreading connections over nodes would, and
    /// a fixed rate's slots go to whichever connection is free, so a slower node takes fewer.
    #[arg(long, required = true)]
    target: Vec<SocketAddr>,
    /// TLS server name (SNI, and the name the server certificate must carry).
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Request path (the last one given wins).
    #[arg(long, default_value = "/provisioning", overrides_with = "path")]
    path: String,
    /// HTTP method: POST sends a body, GET sends none (the last one given wins).
    #[arg(long, default_value = "POST", overrides_with = "method")]
    method: String,
    /// CA bundle(s) (PEM) the server certificate may chain to (repeatable).
    #[arg(long, required = true)]
    ca: Vec<PathBuf>,
    /// Client certificate (PEM chain) for mutual TLS.
    #[arg(long)]
    cert: PathBuf,
    /// Client private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// Body documents (repeatable; used round-robin). Each must carry a userId (`<userId>…</userId>`
    /// or `"userId":"…"`); every occurrence of that value becomes `load-<run>-<n>@example.com`.
    #[arg(long, default_value = "schemas/samples/user-add-17sp4.xml")]
    body: Vec<PathBuf>,
    #[arg(long, default_value = "text/xml")]
    content_type: String,
    /// Extra request header `Name: value` (repeatable), e.g. an Authorization header.
    #[arg(long)]
    header: Vec<String>,
    /// Cycle through this many userIds instead of a new one per request. With K bodies, each user
    /// gets the K bodies in order before the next user's turn, so `--body user-add.xml --body
    /// user-delete.xml --users 1000` adds and deletes the same 1,000 users over and over: the
    /// store's live data stays bounded, as a soak needs.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    users: Option<u64>,
    /// Run label put in the userIds (default: a random one), so runs never collide.
    #[arg(long)]
    run: Option<String>,
    /// Concurrent connections (keep-alive) or concurrent clients (--new-connection).
    #[arg(long, short = 'c', default_value_t = 16)]
    connections: usize,
    /// Open a new TCP + TLS connection for every request (measures handshakes).
    #[arg(long)]
    new_connection: bool,
    /// Fixed rate in requests/s (open loop); absent = as fast as possible.
    #[arg(long)]
    rate: Option<f64>,
    /// Stop after this many seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Stop after this many requests.
    #[arg(long)]
    requests: Option<u64>,
    /// Idle mode: open this many mTLS connections, hold them (--duration, default 3 s), report
    /// the server's RSS.
    #[arg(long)]
    idle: Option<usize>,
    /// Server process(es) to observe: CPU seconds and RSS (repeatable; summed).
    #[arg(long)]
    server_pid: Vec<u32>,
    /// Append the userId of every acknowledged request (SuccessResponse or warning) to this file.
    #[arg(long)]
    acked_out: Option<PathBuf>,
    /// Runtime threads for the generator.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Why the generator cannot run; each says what to fix.
#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error(
        "the target {0} is not a loopback address; flowthrough-load only sends to 127.0.0.0/8 or ::1"
    )]
    NotLoopback(SocketAddr),
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path}: no userId found; the body needs <userId>…</userId> or \"userId\":\"…\"")]
    NoUserId { path: PathBuf },
    #[error("bad TLS material: {0}; check --ca, --cert and --key")]
    Tls(String),
    #[error("bad --header {0:?}: expected `Name: value`")]
    Header(String),
    #[error("nothing bounds the run: give --duration and/or --requests")]
    Unbounded,
    #[error("--rate must be a positive number of requests per second")]
    Rate,
    #[error("cannot start the async runtime: {0}")]
    Runtime(String),
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
}

fn is_loopback(addr: &SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// A body with the userId value to replace.
struct BodyTemplate {
    text: String,
    user_id: String,
}

impl BodyTemplate {
    fn load(path: &Path) -> Result<BodyTemplate, LoadError> {
        let bytes = std::fs::read(path).map_err(|e| LoadError::Read {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        // Latin-1 decoding is lossless for the ASCII samples and never fails on other bytes.
        let text: String = bytes.iter().map(|&b| b as char).collect();
        let user_id = find_user_id(&text).ok_or_else(|| LoadError::NoUserId {
            path: path.to_owned(),
        })?;
        Ok(BodyTemplate { text, user_id })
    }

    fn render(&self, user_id: &str) -> Vec<u8> {
        // Back to Latin-1 bytes, the encoding the document declares.
        self.text
            .replace(&self.user_id, user_id)
            .chars()
            .map(|c| u8::try_from(c).unwrap_or(b'?'))
            .collect()
    }
}

/// The userId value of an OCI-P document or a Webex JSON body.
fn find_user_id(text: &str) -> Option<String> {
    if let Some(start) = text.find("<userId>") {
        let rest = &text[start + "<userId>".len()..];
        let end = rest.find("</userId>")?;
        return Some(rest[..end].to_owned()).filter(|s| !s.is_empty());
    }
    let start = text.find("\"userId\"")?;
    let rest = text[start + "\"userId\"".len()..].trim_start();
    let rest = rest.strip_prefix(':')?.trim_start().strip_prefix('"')?;
    let end = rest.find('"')?;
    Some(rest[..end].to_owned()).filter(|s| !s.is_empty())
}

fn tls_config(args: &Args) -> Result<Arc<rustls::ClientConfig>, LoadError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|e| LoadError::Read {
            path: p.to_owned(),
            reason: e.to_string(),
        })
    };
    let bad = |e: String| LoadError::Tls(e);
    let mut roots = rustls::RootCertStore::empty();
    for ca in &args.ca {
        for cert in CertificateDer::pem_slice_iter(&read(ca)?) {
            roots
                .add(cert.map_err(|e| bad(e.to_string()))?)
                .map_err(|e| bad(e.to_string()))?;
        }
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(&args.cert)?)
        .collect::<Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(&read(&args.key)?).map_err(|e| bad(e.to_string()))?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad(e.to_string()))?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .map_err(|e| bad(e.to_string()))?;
    // Every new connection is a full handshake: resumption would skip the work being measured.
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// One server the connections are spread over, with the request head naming it (Host).
struct Target {
    addr: SocketAddr,
    head: String,
}

/// Everything the workers share, fixed before the run starts.
struct Plan {
    targets: Vec<Target>,
    server_name: ServerName<'static>,
    connector: TlsConnector,
    has_body: bool,
    bodies: Vec<BodyTemplate>,
    run: String,
    users: Option<u64>,
    new_connection: bool,
    interval: Option<Duration>,
    max_requests: u64,
    deadline: Option<Instant>,
}

/// How one exchange ended.
enum Outcome {
    /// An HTTP answer that means success; `warnings` are OCI warning codes (7020, 7021).
    Ok { warnings: Vec<u32> },
    /// Failed, with its kind for the report (connect, tls, io, timeout, http_429, oci_7010 …).
    Failed(String),
}

/// Per-worker results, merged at the end.
struct Tally {
    latency: Histogram<u64>,
    ok: u64,
    errors: BTreeMap<String, u64>,
    warnings: BTreeMap<String, u64>,
    acked: Vec<String>,
    /// Fixed rate: requests whose slot came while every connection was still busy and that the
    /// deadline then cut off (the target could not keep up with the offered rate).
    unsent: u64,
}

impl Tally {
    fn new(latency: Histogram<u64>) -> Tally {
        Tally {
            latency,
            ok: 0,
            errors: BTreeMap::new(),
            warnings: BTreeMap::new(),
            acked: Vec::new(),
            unsent: 0,
        }
    }

    fn merge(&mut self, other: Tally) {
        let _ = self.latency.add(&other.latency);
        self.ok += other.ok;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        for (k, v) in other.warnings {
            *self.warnings.entry(k).or_default() += v;
        }
        self.acked.extend(other.acked);
        self.unsent += other.unsent;
    }
}

/// A parsed HTTP response.
struct Response {
    status: u16,
    body: Vec<u8>,
    close: bool,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Read one HTTP/1.1 response (Content-Length, chunked, or delimited by close).
async fn read_response(stream: &mut TlsStream<TcpStream>) -> Result<Response, String> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 8192];
    let header_end = loop {
        if let Some(p) = find(&buf, b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > 64 * 1024 {
            return Err("io".to_owned());
        }
        let n = stream.read(&mut chunk).await.map_err(|_| "io".to_owned())?;
        if n == 0 {
            return Err("io".to_owned());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| "http_malformed".to_owned())?;
    let mut length = None;
    let mut chunked = false;
    let mut close = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim().to_ascii_lowercase();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => length = value.parse::<usize>().ok(),
            "transfer-encoding" => chunked = value.contains("chunked"),
            "connection" => close = value.contains("close"),
            _ => {}
        }
    }
    let mut body = buf.split_off(header_end);
    if chunked {
        loop {
            if let Some(decoded) = decode_chunked(&body)? {
                return Ok(Response {
                    status,
                    body: decoded,
                    close,
                });
            }
            read_more(stream, &mut body, &mut chunk).await?;
        }
    }
    match length {
        Some(len) => {
            if len > MAX_RESPONSE_BYTES {
                return Err("http_too_large".to_owned());
            }
            while body.len() < len {
                read_more(stream, &mut body, &mut chunk).await?;
            }
            body.truncate(len);
        }
        None if status == 204 || status == 304 => {}
        None => {
            // No length: the body runs to the end of the connection.
            close = true;
            loop {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => body.extend_from_slice(&chunk[..n]),
                }
                if body.len() > MAX_RESPONSE_BYTES {
                    return Err("http_too_large".to_owned());
                }
            }
        }
    }
    Ok(Response {
        status,
        body,
        close,
    })
}

async fn read_more(
    stream: &mut TlsStream<TcpStream>,
    body: &mut Vec<u8>,
    chunk: &mut [u8],
) -> Result<(), String> {
    let n = stream.read(chunk).await.map_err(|_| "io".to_owned())?;
    if n == 0 {
        return Err("io".to_owned());
    }
    body.extend_from_slice(&chunk[..n]);
    if body.len() > MAX_RESPONSE_BYTES {
        return Err("http_too_large".to_owned());
    }
    Ok(())
}

/// The decoded body once every chunk is in, `None` while more bytes are needed.
fn decode_chunked(raw: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let Some(eol) = find(&raw[pos..], b"\r\n") else {
            return Ok(None);
        };
        let size_text = String::from_utf8_lossy(&raw[pos..pos + eol]).into_owned();
        let size_hex = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| "http_bad_chunk".to_owned())?;
        pos += eol + 2;
        if size == 0 {
            // Trailers end with an empty line.
            return Ok(find(&raw[pos..], b"\r\n").map(|_| out));
        }
        if raw.len() < pos + size + 2 {
            return Ok(None);
        }
        out.extend_from_slice(&raw[pos..pos + size]);
        pos += size + 2;
    }
}

/// Judge a response: HTTP status first, then any OCI-P ErrorResponse in it.
fn judge(response: &Response) -> Outcome {
    if !(200..300).contains(&response.status) {
        return Outcome::Failed(format!("http_{}", response.status));
    }
    let text = String::from_utf8_lossy(&response.body);
    let mut warnings = Vec::new();
    for command in text.split("<command").skip(1) {
        if !command.contains("ErrorResponse") {
            continue;
        }
        let code = command
            .split_once("<errorCode>")
            .and_then(|(_, rest)| rest.split_once("</errorCode>"))
            .and_then(|(code, _)| code.trim().parse::<u32>().ok())
            .unwrap_or(0);
        if command.contains("type=\"Warning\"") {
            warnings.push(code);
        } else {
            return Outcome::Failed(format!("oci_{code}"));
        }
    }
    Outcome::Ok { warnings }
}

async fn connect(plan: &Plan, addr: SocketAddr) -> Result<TlsStream<TcpStream>, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|_| "connect".to_owned())?;
    let _ = tcp.set_nodelay(true);
    plan.connector
        .connect(plan.server_name.clone(), tcp)
        .await
        .map_err(|_| "tls".to_owned())
}

/// One exchange on `conn` (opening it when absent); the connection is kept only when reusable.
async fn exchange(
    plan: &Plan,
    target: &Target,
    conn: &mut Option<TlsStream<TcpStream>>,
    request: &[u8],
) -> Outcome {
    let stream = match conn {
        Some(s) => s,
        None => match connect(plan, target.addr).await {
            Ok(s) => conn.insert(s),
            Err(kind) => return Outcome::Failed(kind),
        },
    };
    if stream.write_all(request).await.is_err() {
        *conn = None;
        return Outcome::Failed("io".to_owned());
    }
    match read_response(stream).await {
        Ok(response) => {
            if (response.close || plan.new_connection)
                && let Some(mut s) = conn.take()
            {
                let _ = s.shutdown().await;
            }
            judge(&response)
        }
        Err(kind) => {
            *conn = None;
            Outcome::Failed(kind)
        }
    }
}

/// Request `n`'s body (an index into `bodies`) and user number.
fn body_and_user(n: u64, bodies: u64, users: Option<u64>) -> (u64, u64) {
    let bodies = bodies.max(1);
    match users {
        None => (n % bodies, n),
        Some(users) => (n % bodies, (n / bodies) % users.max(1)),
    }
}

fn build_request(plan: &Plan, target: &Target, n: u64) -> (Vec<u8>, String) {
    let (body, user) = body_and_user(n, plan.bodies.len() as u64, plan.users);
    let user_id = format!("load-{}-{user}@example.com", plan.run);
    let mut request = target.head.clone().into_bytes();
    if plan.has_body && !plan.bodies.is_empty() {
        let template = &plan.bodies[body as usize];
        let body = template.render(&user_id);
        request.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
        request.extend_from_slice(&body);
    } else {
        request.extend_from_slice(b"\r\n");
    }
    (request, user_id)
}

async fn worker(
    plan: Arc<Plan>,
    target: usize,
    next: Arc<AtomicU64>,
    start: Instant,
    latency: Histogram<u64>,
) -> Tally {
    let target = &plan.targets[target];
    let mut tally = Tally::new(latency);
    let mut conn: Option<TlsStream<TcpStream>> = None;
    loop {
        let n = next.fetch_add(1, Ordering::Relaxed);
        if n >= plan.max_requests {
            break;
        }
        let scheduled = match plan.interval {
            Some(interval) => {
                let at = start + interval.mul_f64(n as f64);
                if plan.deadline.is_some_and(|d| at >= d) {
                    break;
                }
                tokio::time::sleep_until(at.into()).await;
                if plan.deadline.is_some_and(|d| Instant::now() >= d) {
                    tally.unsent += 1;
                    break;
                }
                at
            }
            None => {
                let now = Instant::now();
                if plan.deadline.is_some_and(|d| now >= d) {
                    break;
                }
                now
            }
        };
        let (request, user_id) = build_request(&plan, target, n);
        let outcome = tokio::time::timeout(
            REQUEST_TIMEOUT,
            exchange(&plan, target, &mut conn, &request),
        )
        .await
        .unwrap_or_else(|_| {
            conn = None;
            Outcome::Failed("timeout".to_owned())
        });
        let micros = scheduled.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
        let _ = tally.latency.record(micros.max(1));
        match outcome {
            Outcome::Ok { warnings } => {
                tally.ok += 1;
                for w in warnings {
                    *tally.warnings.entry(format!("oci_{w}")).or_default() += 1;
                }
                tally.acked.push(user_id);
            }
            Outcome::Failed(kind) => *tally.errors.entry(kind).or_default() += 1,
        }
    }
    tally
}

/// CPU seconds and memory of the observed server processes.
#[derive(Debug, Clone, Copy, Default)]
struct ProcSample {
    cpu_s: f64,
    rss_kib: u64,
    hwm_kib: u64,
}

fn sample_procs(pids: &[u32]) -> Option<ProcSample> {
    if pids.is_empty() {
        return None;
    }
    // SAFETY: sysconf has no preconditions; it only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut total = ProcSample::default();
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        let after = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = after.split_whitespace().collect();
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        total.cpu_s += (utime + stime) / ticks;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib = |key: &str| {
            status
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        total.rss_kib += kib("VmRSS:");
        total.hwm_kib += kib("VmHWM:");
    }
    Some(total)
}

/// Raise the open-file limit to its hard maximum: 1,000 idle connections need the fds.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the plain struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Each target with its request head: the same but for the Host line, which names the target.
fn targets(args: &Args, method: &str, has_body: bool) -> Result<Vec<Target>, LoadError> {
    let mut rest = String::new();
    if has_body {
        rest.push_str(&format!("Content-Type: {}\r\n", args.content_type));
    }
    for h in &args.header {
        let (name, value) = h
            .split_once(':')
            .filter(|(n, _)| !n.trim().is_empty() && !n.contains(' '))
            .ok_or_else(|| LoadError::Header(h.clone()))?;
        rest.push_str(&format!("{}: {}\r\n", name.trim(), value.trim()));
    }
    if args.new_connection {
        rest.push_str("Connection: close\r\n");
    }
    Ok(args
        .target
        .iter()
        .map(|&addr| {
            let host = match addr.ip() {
                IpAddr::V6(_) => format!("[{}]:{}", args.server_name, addr.port()),
                IpAddr::V4(_) => format!("{}:{}", args.server_name, addr.port()),
            };
            Target {
                addr,
                head: format!("{method} {} HTTP/1.1\r\nHost: {host}\r\n{rest}", args.path),
            }
        })
        .collect())
}

fn make_plan(args: &Args) -> Result<Plan, LoadError> {
    let server_name = ServerName::try_from(args.server_name.clone())
        .map_err(|e| LoadError::Tls(format!("server name {:?}: {e}", args.server_name)))?;
    let method = args.method.to_ascii_uppercase();
    let has_body = method != "GET" && method != "HEAD";
    let bodies = if has_body {
        args.body
            .iter()
            .map(|p| BodyTemplate::load(p))
            .collect::<Result<Vec<_>, _>>()?
    } else {
        Vec::new()
    };
    let interval = match args.rate {
        Some(r) if r > 0.0 && r.is_finite() => Some(Duration::from_secs_f64(1.0 / r)),
        Some(_) => return Err(LoadError::Rate),
        None => None,
    };
    Ok(Plan {
        targets: targets(args, &method, has_body)?,
        server_name,
        connector: TlsConnector::from(tls_config(args)?),
        has_body,
        bodies,
        run: args
            .run
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()),
        users: args.users,
        new_connection: args.new_connection,
        interval,
        max_requests: args.requests.unwrap_or(u64::MAX),
        deadline: None,
    })
}

async fn run_load(args: &Args, mut plan: Plan) -> Result<Value, LoadError> {
    let before = sample_procs(&args.server_pid);
    let start = Instant::now();
    plan.deadline = args
        .duration
        .map(|d| start + Duration::from_secs_f64(d.max(0.0)));
    // 1 µs to 10 min at 3 significant digits.
    let empty = Histogram::new_with_bounds(1, 600_000_000, 3)
        .map_err(|e| LoadError::Runtime(format!("latency histogram: {e}")))?;
    let plan = Arc::new(plan);
    let next = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..args.connections.max(1))
        .map(|i| {
            tokio::spawn(worker(
                plan.clone(),
                i % plan.targets.len(),
                next.clone(),
                start,
                empty.clone(),
            ))
        })
        .collect();
    let mut tally = Tally::new(empty);
    for t in tasks {
        if let Ok(part) = t.await {
            tally.merge(part);
        }
    }
    let elapsed = start.elapsed().as_secs_f64().max(1e-9);
    let after = sample_procs(&args.server_pid);
    if let Some(path) = &args.acked_out {
        write_acked(path, &tally.acked)?;
    }
    let failed: u64 = tally.errors.values().sum();
    let completed = tally.ok + failed;
    // Exchanges that got an HTTP answer of any status: in handshake runs every one of them is a
    // completed mutual-TLS handshake.
    let answered = tally.ok
        + tally
            .errors
            .iter()
            .filter(|(k, _)| k.starts_with("http_") || k.starts_with("oci_"))
            .map(|(_, v)| v)
            .sum::<u64>();
    let h = &tally.latency;
    let ms = |v: u64| v as f64 / 1000.0;
    let mut report = json!({
        "mode": if args.new_connection { "new-connection" } else { "keep-alive" },
        "pacing": match args.rate { Some(r) => json!({"fixed_rate_per_s": r}), None => json!("max") },
        "connections": args.connections,
        "target": target_list(args),
        "path": args.path,
        "run": plan.run,
        "elapsed_s": elapsed,
        "requests": completed,
        "ok": tally.ok,
        "failed": failed,
        "requests_per_s": completed as f64 / elapsed,
        "ok_per_s": tally.ok as f64 / elapsed,
        "answered_per_s": answered as f64 / elapsed,
        "latency_ms": {
            "p50": ms(h.value_at_quantile(0.50)),
            "p99": ms(h.value_at_quantile(0.99)),
            "p99_9": ms(h.value_at_quantile(0.999)),
            "max": ms(h.max()),
            "mean": h.mean() / 1000.0,
        },
        "errors": tally.errors,
        "warnings": tally.warnings,
        "unsent_behind_schedule": tally.unsent,
    });
    if let (Some(b), Some(a)) = (before, after) {
        report["server"] = json!({
            "pids": args.server_pid,
            "cpu_s": a.cpu_s - b.cpu_s,
            "cpu_per_request_us": if completed > 0 { (a.cpu_s - b.cpu_s) * 1e6 / completed as f64 } else { 0.0 },
            "rss_mib": a.rss_kib as f64 / 1024.0,
            "peak_rss_mib": a.hwm_kib as f64 / 1024.0,
        });
    }
    Ok(report)
}

/// The targets as the report names them: one address, or several joined by commas.
fn target_list(args: &Args) -> String {
    args.target
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn write_acked(path: &Path, acked: &[String]) -> Result<(), LoadError> {
    let err = |e: std::io::Error| LoadError::Write {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(err)?;
    let mut out = std::io::BufWriter::new(file);
    for id in acked {
        writeln!(out, "{id}").map_err(err)?;
    }
    out.flush().map_err(err)
}

async fn run_idle(args: &Args, plan: Plan, count: usize) -> Result<Value, LoadError> {
    let before = sample_procs(&args.server_pid);
    let plan = Arc::new(plan);
    let semaphore = Arc::new(tokio::sync::Semaphore::new(IDLE_OPEN_PARALLEL));
    let tasks: Vec<_> = (0..count)
        .map(|i| {
            let plan = plan.clone();
            let semaphore = semaphore.clone();
            tokio::spawn(async move {
                let _permit = semaphore.acquire_owned().await;
                let addr = plan.targets[i % plan.targets.len()].addr;
                tokio::time::timeout(REQUEST_TIMEOUT, connect(&plan, addr))
                    .await
                    .unwrap_or_else(|_| Err("timeout".to_owned()))
            })
        })
        .collect();
    let mut open = Vec::with_capacity(count);
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for t in tasks {
        match t.await {
            Ok(Ok(stream)) => open.push(stream),
            Ok(Err(kind)) => *errors.entry(kind).or_default() += 1,
            Err(_) => *errors.entry("task".to_owned()).or_default() += 1,
        }
    }
    // With TLS 1.3 the client finishes first; the hold lets the server finish verifying every
    // client certificate and settle its buffers before the RSS is read.
    let hold = Duration::from_secs_f64(args.duration.unwrap_or(3.0).max(0.5));
    tokio::time::sleep(hold).await;
    let during = sample_procs(&args.server_pid);
    // A connection the server closed while idle shows as readable EOF: count the survivors.
    let mut alive = 0usize;
    let mut probe = [0u8; 1];
    for stream in &mut open {
        match tokio::time::timeout(Duration::from_millis(1), stream.read(&mut probe)).await {
            Err(_) => alive += 1,
            Ok(Ok(n)) if n > 0 => alive += 1,
            Ok(_) => {}
        }
    }
    let mut report = json!({
        "mode": "idle",
        "target": target_list(args),
        "requested": count,
        "opened": open.len(),
        "alive_after_hold": alive,
        "hold_s": hold.as_secs_f64(),
        "errors": errors,
    });
    if let (Some(b), Some(d)) = (before, during) {
        report["server"] = json!({
            "pids": args.server_pid,
            "rss_before_mib": b.rss_kib as f64 / 1024.0,
            "rss_mib": d.rss_kib as f64 / 1024.0,
            "peak_rss_mib": d.hwm_kib as f64 / 1024.0,
            "rss_per_connection_kib": if open.is_empty() { 0.0 } else { d.rss_kib.saturating_sub(b.rss_kib) as f64 / open.len() as f64 },
        });
    }
    drop(open);
    Ok(report)
}

fn print_text(report: &Value) {
    let get = |k: &str| report.get(k).cloned().unwrap_or(Value::Null);
    if report["mode"] == "idle" {
        println!(
            "idle: {} of {} connections opened, {} alive after {} s",
            get("opened"),
            get("requested"),
            get("alive_after_hold"),
            get("hold_s")
        );
    } else {
        let l = &report["latency_ms"];
        println!(
            "{} {}: {} requests in {:.2} s = {:.1} req/s ({} ok = {:.1}/s)",
            get("mode"),
            get("pacing"),
            get("requests"),
            report["elapsed_s"].as_f64().unwrap_or(0.0),
            report["requests_per_s"].as_f64().unwrap_or(0.0),
            get("ok"),
            report["ok_per_s"].as_f64().unwrap_or(0.0),
        );
        println!(
            "latency ms: p50 {} p99 {} p99.9 {} max {}",
            l["p50"], l["p99"], l["p99_9"], l["max"]
        );
        println!("warnings: {}", get("warnings"));
    }
    println!("errors: {}", get("errors"));
    if let Some(server) = report.get("server") {
        println!("server: {server}");
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(report) => {
            if args.json {
                println!("{report}");
            } else {
                print_text(&report);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(args: &Args) -> Result<Value, LoadError> {
    if let Some(&outside) = args.target.iter().find(|t| !is_loopback(t)) {
        return Err(LoadError::NotLoopback(outside));
    }
    if args.idle.is_none() && args.duration.is_none() && args.requests.is_none() {
        return Err(LoadError::Unbounded);
    }
    raise_fd_limit();
    let plan = make_plan(args)?;
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    }
    .map_err(|e| LoadError::Runtime(e.to_string()))?;
    runtime.block_on(async {
        match args.idle {
            Some(count) => run_idle(args, plan, count).await,
            None => run_load(args, plan).await,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_pool_gives_each_user_every_body_in_order() {
        let picks: Vec<_> = (0..7).map(|n| body_and_user(n, 2, Some(3))).collect();
        assert_eq!(
            picks,
            [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2), (0, 0)]
        );
        let fresh: Vec<_> = (0..3).map(|n| body_and_user(n, 2, None)).collect();
        assert_eq!(fresh, [(0, 0), (1, 1), (0, 2)], "a new user per request");
    }

    #[test]
    fn only_loopback_targets_pass() {
        for ok in [
            "127.0.0.1:1",
            "127.9.8.7:443",
            "[::1]:8443",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(is_loopback(&ok.parse().unwrap()), "{ok}");
        }
        for bad in [
            "10.0.0.1:443",
            "0.0.0.0:443",
            "[::]:1",
            "192.168.1.1:1",
            "[2001:db8::1]:1",
        ] {
            assert!(!is_loopback(&bad.parse().unwrap()), "{bad}");
        }
    }

    #[test]
    fn each_target_is_named_in_its_own_host_line() {
        let args = Args::try_parse_from([
            "flowthrough-load",
            "--target",
            "127.0.0.1:8443",
            "--target",
            "127.0.0.2:9443",
            "--ca",
            "ca.pem",
            "--cert",
            "c.pem",
            "--key",
            "c.key",
            "--header",
            "X-A: 1",
        ])
        .unwrap();
        let heads: Vec<_> = targets(&args, "POST", true)
            .unwrap()
            .into_iter()
            .map(|t| t.head)
            .collect();
        let rest = "Content-Type: text/xml\r\nX-A: 1\r\n";
        assert_eq!(
            heads,
            [
                format!("POST /provisioning HTTP/1.1\r\nHost: localhost:8443\r\n{rest}"),
                format!("POST /provisioning HTTP/1.1\r\nHost: localhost:9443\r\n{rest}"),
            ]
        );
    }

    #[test]
    fn user_id_is_found_in_xml_and_json() {
        assert_eq!(
            find_user_id("<a><userId>bob@x</userId><email>bob@x</email></a>").as_deref(),
            Some("bob@x")
        );
        assert_eq!(
            find_user_id(r#"{"provisioningId":"p","userId" : "al@x","email":"al@x"}"#).as_deref(),
            Some("al@x")
        );
        assert_eq!(find_user_id("<userId></userId>"), None);
        assert_eq!(find_user_id(r#"{"name":"x"}"#), None);
    }

    #[test]
    fn every_occurrence_of_the_user_id_is_replaced() {
        let t = BodyTemplate {
            text: "<userId>a@x</userId><emailAddress>a@x</emailAddress>".to_owned(),
            user_id: "a@x".to_owned(),
        };
        assert_eq!(
            t.render("load-r-7@example.com"),
            b"<userId>load-r-7@example.com</userId><emailAddress>load-r-7@example.com</emailAddress>"
        );
    }

    #[test]
    fn chunked_bodies_decode_only_when_complete() {
        assert_eq!(decode_chunked(b"5\r\nhello\r\n").unwrap(), None);
        assert_eq!(
            decode_chunked(b"5\r\nhello\r\n6;x=1\r\n world\r\n0\r\n\r\n").unwrap(),
            Some(b"hello world".to_vec())
        );
        assert!(decode_chunked(b"zz\r\n").is_err());
    }

    fn response(status: u16, body: &str) -> Response {
        Response {
            status,
            body: body.as_bytes().to_vec(),
            close: false,
        }
    }

    #[test]
    fn responses_are_judged_by_status_then_oci_codes() {
        let ok = r#"<BroadsoftDocument><command echo="" xsi:type="SuccessResponse"/></BroadsoftDocument>"#;
        assert!(
            matches!(judge(&response(200, ok)), Outcome::Ok { warnings } if warnings.is_empty())
        );
        let pending = r#"<command xmlns="" type="Warning" echo="" xsi:type="ErrorResponse"><errorCode>7020</errorCode></command>"#;
        assert!(
            matches!(judge(&response(200, pending)), Outcome::Ok { warnings } if warnings == vec![7020])
        );
        let rejected = r#"<command xmlns="" type="Error" echo="" xsi:type="ErrorResponse"><errorCode>7010</errorCode></command>"#;
        assert!(matches!(judge(&response(200, rejected)), Outcome::Failed(k) if k == "oci_7010"));
        assert!(matches!(judge(&response(429, "")), Outcome::Failed(k) if k == "http_429"));
        assert!(matches!(
            judge(&response(200, r#"{"id":"s"}"#)),
            Outcome::Ok { .. }
        ));
    }
}
