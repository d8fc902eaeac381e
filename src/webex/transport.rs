//! HTTPS to the Webex hosts through address failover: one `reqwest::Client` per (host, address),
//! built with `.resolve(host, addr)` so the connection goes to the chosen address while TLS still
//! verifies the host name. Knows nothing about the API's meaning beyond "5xx means try elsewhere".

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::HeaderMap;
use reqwest::{StatusCode, Url};

use crate::config::WebexConfig;
use crate::failover::{Failover, Resolver};

/// How the transport reaches upstream hosts.
#[derive(Debug, Clone)]
pub struct TransportOptions {
    pub resolver: Resolver,
    /// No answer within this blocks the address (SPEC: 2 s).
    pub timeout: Duration,
    /// Tries per request before it counts as failed.
    pub attempts: u32,
    pub block_for: Duration,
    /// Extra CA certificates (PEM) trusted besides the built-in roots.
    pub extra_roots_pem: Vec<u8>,
}

impl TransportOptions {
    /// The options of `[webex]`, reading `ca_bundle` when one is configured.
    pub fn from_config(cfg: &WebexConfig, resolver: Resolver) -> Result<Self, TransportError> {
        let extra_roots_pem = match &cfg.ca_bundle {
            Some(path) => read_bundle(path)?,
            None => Vec::new(),
        };
        Ok(TransportOptions {
            resolver,
            timeout: Duration::from_millis(cfg.request_timeout_ms.max(1)),
            attempts: cfg.attempts.max(1),
            block_for: Duration::from_secs(cfg.block_seconds),
            extra_roots_pem,
        })
    }
}

fn read_bundle(path: &Path) -> Result<Vec<u8>, TransportError> {
    std::fs::read(path).map_err(|e| TransportError::Setup {
        reason: format!(
            "cannot read webex.ca_bundle {}: {e}; fix the path or leave ca_bundle empty to use the built-in roots",
            path.display()
        ),
    })
}

/// A failure below HTTP semantics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    #[error("{reason}")]
    Setup { reason: String },
    #[error("cannot resolve {host}: {reason}; check DNS from this host")]
    Resolve { host: String, reason: String },
    #[error("every try to {host} failed ({attempts} tries, last: {last})")]
    Exhausted {
        host: String,
        attempts: u32,
        last: String,
    },
    #[error("{host} ({addr}) did not answer after the request may have been sent: {reason}")]
    Unknown {
        host: String,
        addr: SocketAddr,
        reason: String,
    },
}

/// An HTTP answer, body read in full.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub addr: SocketAddr,
}

/// Shared by the API client and the token manager; cheap to clone.
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

struct Inner {
    opts: TransportOptions,
    roots: Vec<reqwest::Certificate>,
    routes: Mutex<HashMap<(String, u16), Failover>>,
    /// A client per thread as well: a pooled connection's I/O runs as a task on the runtime
    /// that opened it, so a request sent from another thread's runtime wakes that one twice
    /// (there and back). Each thread keeps its own, and a delivery started on the thread of the
    /// AS's request (`Engine::reserve_here`) wakes no other thread for its Webex call.
    clients: Mutex<HashMap<(String, SocketAddr, std::thread::ThreadId), reqwest::Client>>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("timeout", &self.inner.opts.timeout)
            .field("attempts", &self.inner.opts.attempts)
            .finish()
    }
}

impl Transport {
    pub fn new(opts: TransportOptions) -> Result<Self, TransportError> {
        let roots = if opts.extra_roots_pem.is_empty() {
            Vec::new()
        } else {
            reqwest::Certificate::from_pem_bundle(&opts.extra_roots_pem).map_err(|e| {
                TransportError::Setup {
                    reason: format!(
                        "webex.ca_bundle holds no usable PEM certificate ({e}); give a PEM CA bundle"
                    ),
                }
            })?
        };
        Ok(Transport {
            inner: Arc::new(Inner {
                opts,
                roots,
                routes: Mutex::new(HashMap::new()),
                clients: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The addresses of `host:port` blocked right now (for status, metrics and tests).
    pub fn blocked(&self, host: &str, port: u16) -> Vec<SocketAddr> {
        lock(&self.inner.routes)
            .get(&(host.to_owned(), port))
            .map(|f| f.blocked(Instant::now()))
            .unwrap_or_default()
    }

    /// Block an address by hand (the admin surface and tests use it).
    pub fn block(&self, host: &str, port: u16, addr: SocketAddr) {
        if let Some(f) = lock(&self.inner.routes).get_mut(&(host.to_owned(), port)) {
            f.block(addr, Instant::now());
        }
    }

    /// Send a request built by `build` for the URL's host, with failover: each try goes to the
    /// first address not blocked; a network/TLS error, a 5xx or no answer in time blocks the
    /// address. After `attempts` tries, the last 5xx answer is returned (or `Exhausted`). A request
    /// that is not `idempotent` stops at the first failure that may have happened after sending.
    pub async fn send(
        &self,
        url: &Url,
        idempotent: bool,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<RawResponse, TransportError> {
        let host = url.host_str().unwrap_or_default().to_owned();
        let port = url.port_or_known_default().unwrap_or(443);
        self.ensure_route(&host, port).await?;
        let opts = &self.inner.opts;
        let mut last = String::from("no try made");
        let mut last_5xx = None;
        for _ in 0..opts.attempts {
            let picked = lock(&self.inner.routes)
                .get_mut(&(host.clone(), port))
                .and_then(|f| f.pick(Instant::now()));
            let Some(addr) = picked else {
                break;
            };
            let client = self.client_for(&host, addr)?;
            let attempt = async {
                let resp = build(&client).send().await?;
                let status = resp.status();
                let headers = resp.headers().clone();
                let body = resp.bytes().await?;
                Ok::<_, reqwest::Error>(RawResponse {
                    status,
                    headers,
                    body,
                    addr,
                })
            };
            let failure = match tokio::time::timeout(opts.timeout, attempt).await {
                Ok(Ok(resp)) if resp.status.is_server_error() => {
                    last = format!("{addr} answered HTTP {}", resp.status.as_u16());
                    last_5xx = Some(resp);
                    (false, last.clone())
                }
                Ok(Ok(resp)) => {
                    self.with_route(&host, port, |f| f.succeeded(addr));
                    return Ok(resp);
                }
                Ok(Err(e)) => {
                    let sent = !e.is_connect();
                    (sent, format!("{addr}: {}", error_chain(&e.without_url())))
                }
                Err(_) => (true, format!("{addr}: no answer within {:?}", opts.timeout)),
            };
            let (maybe_sent, reason) = failure;
            tracing::warn!(host = %host, %addr, reason = %reason, "upstream address failed; blocking it");
            self.with_route(&host, port, |f| f.block(addr, Instant::now()));
            if maybe_sent && !idempotent {
                return Err(TransportError::Unknown { host, addr, reason });
            }
            last = reason;
        }
        match last_5xx {
            Some(resp) => Ok(resp),
            None => Err(TransportError::Exhausted {
                host,
                attempts: opts.attempts,
                last,
            }),
        }
    }

    async fn ensure_route(&self, host: &str, port: u16) -> Result<(), TransportError> {
        let key = (host.to_owned(), port);
        if lock(&self.inner.routes).contains_key(&key) {
            return Ok(());
        }
        let addrs = self
            .inner
            .opts
            .resolver
            .resolve(host, port)
            .await
            .map_err(|e| TransportError::Resolve {
                host: host.to_owned(),
                reason: e.to_string(),
            })?;
        lock(&self.inner.routes)
            .entry(key)
            .or_insert_with(|| Failover::new(addrs, self.inner.opts.block_for));
        Ok(())
    }

    fn with_route(&self, host: &str, port: u16, f: impl FnOnce(&mut Failover)) {
        if let Some(route) = lock(&self.inner.routes).get_mut(&(host.to_owned(), port)) {
            f(route);
        }
    }

    fn client_for(&self, host: &str, addr: SocketAddr) -> Result<reqwest::Client, TransportError> {
        let key = (host.to_owned(), addr, std::thread::current().id());
        if let Some(c) = lock(&self.inner.clients).get(&key) {
            return Ok(c.clone());
        }
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(true)
            .resolve(host, addr)
            .tcp_nodelay(true)
            .connect_timeout(self.inner.opts.timeout)
            .redirect(reqwest::redirect::Policy::none());
        for root in &self.inner.roots {
            builder = builder.add_root_certificate(root.clone());
        }
        let client = builder.build().map_err(|e| TransportError::Setup {
            reason: format!("cannot build the HTTPS client: {}", error_chain(&e)),
        })?;
        lock(&self.inner.clients).insert(key, client.clone());
        Ok(client)
    }
}

/// The error with its sources, since reqwest's own message hides the useful part.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// A poisoned lock only means another task panicked while holding plain data; the data is
/// still consistent (every critical section is a single map operation), so keep going.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
