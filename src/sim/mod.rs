//! The Webex API simulator: a real HTTPS server for tests, benchmarks and the sandbox. Never used by `serve`.
//!
//! It answers the subscriber API and the token endpoint like Webex does (validation, duplicates,
//! asynchronous provisioning, paging) and reproduces on demand the upstream behaviour flowthrough
//! must survive (429/423/5xx, slow answers, dropped connections, filter-dropping `next` links,
//! token rotation and revocation), controlled at run time through `POST /_sim/control` (and
//! `POST /_sim/expire_tokens`, which invalidates every access token handed out). `POST /_sim/seed`
//! puts a population in place (tens of thousands of subscribers, any status) for import and
//! reconcile runs; the list filters by `userId`, `provisioningId`, `spEnterpriseId` and `status`.

mod state;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};

use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::Value;

pub use state::{CallRecord, Control, RetryAfterMode};
use state::{Reply, SimState};

use crate::secret::Secret;

/// How to start a simulator.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Addresses to listen on. A port 0 takes the port the first address got, so several
    /// loopback addresses (127.0.0.2, 127.0.0.3 …) share one port, as failover needs.
    pub listen: Vec<SocketAddr>,
    /// Extra DNS names for the server certificate (besides `localhost`).
    pub extra_names: Vec<String>,
    /// Extra IP addresses for the server certificate (besides 127.0.0.1 and the listen addresses).
    pub extra_ips: Vec<IpAddr>,
    /// Credentials to accept; random ones when absent.
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    pub refresh_token: Option<Secret>,
    pub control: Control,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
            extra_names: Vec::new(),
            extra_ips: Vec::new(),
            client_id: None,
            client_secret: None,
            refresh_token: None,
            control: Control::default(),
        }
    }
}

/// Starting the simulator failed.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(
        "the simulator cannot listen on {addr}: {reason}; pick a free loopback address and port"
    )]
    Bind { addr: SocketAddr, reason: String },
    #[error("the simulator cannot create its certificates: {0}")]
    Certificates(String),
    #[error("the simulator needs at least one listen address")]
    NoListen,
}

/// A running simulator.
pub struct SimHandle {
    /// `https://<first listen IP>:<port>/v1`.
    pub base_url: String,
    pub port: u16,
    pub addrs: Vec<SocketAddr>,
    /// The CA that signed the server certificate (trust it as `webex.ca_bundle`).
    pub ca_pem: String,
    pub client_id: String,
    pub client_secret: Secret,
    /// The initial refresh token.
    pub refresh_token: Secret,
    state: Arc<Mutex<SimState>>,
    server: actix_web::dev::ServerHandle,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl std::fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHandle")
            .field("base_url", &self.base_url)
            .field("client_id", &self.client_id)
            .finish()
    }
}

impl SimHandle {
    /// The same JSON as `GET /_sim/state`: subscribers and counters.
    pub fn state(&self) -> Value {
        lock(&self.state).snapshot()
    }

    /// A counter from the state (0 when never counted). Read alone, not from [`SimHandle::state`]:
    /// a benchmark watching a counter every 10 ms held the simulator's lock for a snapshot of all
    /// its subscribers each time, so calls arriving meanwhile were answered in bursts.
    pub fn counter(&self, name: &str) -> u64 {
        lock(&self.state).counter(name)
    }

    /// Change fault settings (same keys as `POST /_sim/control`).
    pub fn control(&self, patch: Value) -> Result<(), String> {
        lock(&self.state).apply_control(patch)
    }

    /// Put subscribers in place without the API (see `SimState::seed`; same as
    /// `POST /_sim/seed` with `{"subscribers": [...]}`).
    pub fn seed(&self, subscribers: &[Value]) -> Result<usize, String> {
        lock(&self.state).seed(subscribers)
    }

    /// Every subscriber-API call so far, in the order the simulator did their work; empty unless
    /// `record_calls` is on.
    pub fn calls(&self) -> Vec<CallRecord> {
        lock(&self.state).calls().to_vec()
    }

    /// Invalidate every access token issued so far (the next call gets 401).
    pub fn expire_access_tokens(&self) {
        lock(&self.state).expire_access_tokens();
    }

    /// Accept one more refresh token (e.g. the one an operator installs with `token set`).
    pub fn add_refresh_token(&self, token: &Secret) {
        lock(&self.state).add_refresh_token(token.expose().to_owned());
    }

    pub async fn stop(self) {
        self.server.stop(true).await;
        let _ = self.task.await;
    }
}

fn lock(m: &Mutex<SimState>) -> std::sync::MutexGuard<'_, SimState> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The simulator's CA and a server certificate signed by it, from the same certificate tooling
/// operators use: `(ca_pem, server_chain_pem, server_key_pem)`.
fn mint_certificates(
    names: &[String],
    ips: &[IpAddr],
) -> Result<(String, String, String), SimError> {
    use crate::certs::{CaParams, LeafParams, issue_leaf, new_ca};
    let err = |e: crate::certs::CertsError| SimError::Certificates(e.to_string());
    let ca = new_ca(&CaParams::new("flowthrough Webex API simulator CA")).map_err(err)?;
    let mut sans = names.to_vec();
    sans.extend(ips.iter().map(IpAddr::to_string));
    let mut leaf = LeafParams::server(&sans, 365);
    leaf.cn = Some("flowthrough Webex API simulator".to_owned());
    let server = issue_leaf(&ca, &leaf).map_err(err)?;
    Ok((
        ca.cert.cert_pem.clone(),
        server.cert_pem.clone(),
        server.key_pem.expose().to_owned(),
    ))
}

fn server_tls(chain_pem: &str, key_pem: &str) -> Result<rustls::ServerConfig, SimError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |e: String| SimError::Certificates(e);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .map_err(|e| bad(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

fn random_secret(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// The simulator's entry point.
pub struct Simulator;

impl Simulator {
    /// Bind every listen address, mint certificates and serve until [`SimHandle::stop`].
    /// Must be called inside a tokio runtime.
    pub async fn start(opts: SimOptions) -> Result<SimHandle, SimError> {
        let first = *opts.listen.first().ok_or(SimError::NoListen)?;
        // Nagle off on the listener, which Linux hands to every accepted connection (actix-web
        // leaves it on): a response written in two segments otherwise waits for the client's
        // delayed ACK, and direct calls at 10/s read a 42 ms p99 (bench/run.sh pg, thirteenth
        // sitting) that is TCP's, not the simulator's.
        let bind = |addr: SocketAddr| {
            let listener = TcpListener::bind(addr).map_err(|e| SimError::Bind {
                addr,
                reason: e.to_string(),
            })?;
            socket2::SockRef::from(&listener)
                .set_tcp_nodelay(true)
                .map_err(|e| SimError::Bind {
                    addr,
                    reason: format!("cannot turn Nagle off: {e}"),
                })?;
            Ok(listener)
        };
        let l0 = bind(first)?;
        let port = l0
            .local_addr()
            .map_err(|e| SimError::Bind {
                addr: first,
                reason: e.to_string(),
            })?
            .port();
        let mut listeners = vec![l0];
        for addr in &opts.listen[1..] {
            let addr = if addr.port() == 0 {
                SocketAddr::new(addr.ip(), port)
            } else {
                *addr
            };
            listeners.push(bind(addr)?);
        }
        let addrs: Vec<SocketAddr> = listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect();

        let mut names = vec!["localhost".to_owned()];
        names.extend(opts.extra_names.iter().cloned());
        let mut ips: Vec<IpAddr> = vec![IpAddr::from([127, 0, 0, 1])];
        ips.extend(opts.extra_ips.iter().copied());
        ips.extend(
            addrs
                .iter()
                .map(|a| a.ip())
                .filter(|ip| !ip.is_unspecified()),
        );
        ips.dedup();
        let (ca_pem, chain_pem, key_pem) = mint_certificates(&names, &ips)?;
        let tls = server_tls(&chain_pem, &key_pem)?;

        let client_id = opts
            .client_id
            .clone()
            .unwrap_or_else(|| random_secret("sim-client"));
        let client_secret = opts
            .client_secret
            .clone()
            .unwrap_or_else(|| Secret::new(random_secret("sim-secret")));
        let refresh_token = opts
            .refresh_token
            .clone()
            .unwrap_or_else(|| Secret::new(random_secret("sim-refresh")));
        let state = Arc::new(Mutex::new(SimState::new(
            opts.control.clone(),
            client_id.clone(),
            client_secret.expose().to_owned(),
            refresh_token.expose().to_owned(),
        )));

        let host_ip = if first.ip().is_unspecified() {
            IpAddr::from([127, 0, 0, 1])
        } else {
            first.ip()
        };
        let host = match host_ip {
            IpAddr::V6(v6) => format!("[{v6}]"),
            IpAddr::V4(v4) => v4.to_string(),
        };
        let base_url = format!("https://{host}:{port}/v1");

        let data = web::Data::new(state.clone());
        let mut server = actix_web::HttpServer::new(move || {
            actix_web::App::new()
                .app_data(data.clone())
                .app_data(web::PayloadConfig::new(1 << 20))
                .service(
                    web::scope("/v1")
                        .route("/access_token", web::post().to(access_token))
                        .route("/broadworks/subscribers/validate", web::post().to(validate))
                        .route("/broadworks/subscribers", web::post().to(provision))
                        .route("/broadworks/subscribers", web::get().to(list))
                        .route("/broadworks/subscribers/{id}", web::get().to(get_one))
                        .route("/broadworks/subscribers/{id}", web::put().to(update))
                        .route("/broadworks/subscribers/{id}", web::delete().to(remove)),
                )
                .route("/_sim/control", web::post().to(control))
                .route("/_sim/expire_tokens", web::post().to(expire_tokens))
                .route("/_sim/seed", web::post().to(seed))
                .route("/_sim/state", web::get().to(sim_state))
        })
        .workers(2)
        .disable_signals()
        .shutdown_timeout(1);
        for (l, addr) in listeners.into_iter().zip(&addrs) {
            server = server
                .listen_rustls_0_23(l, tls.clone())
                .map_err(|e| SimError::Bind {
                    addr: *addr,
                    reason: e.to_string(),
                })?;
        }
        let server = server.run();
        let handle = server.handle();
        let task = tokio::spawn(server);
        tracing::info!(%base_url, "Webex API simulator listening");
        Ok(SimHandle {
            base_url,
            port,
            addrs,
            ca_pem,
            client_id,
            client_secret,
            refresh_token,
            state,
            server: handle,
            task,
        })
    }
}

type Shared = web::Data<Arc<Mutex<SimState>>>;

fn respond(reply: Reply) -> HttpResponse {
    match reply {
        Reply::Json {
            status,
            headers,
            body,
        } => {
            let mut b = HttpResponse::build(
                actix_web::http::StatusCode::from_u16(status)
                    .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR),
            );
            for (k, v) in headers {
                b.insert_header((k, v));
            }
            b.json(body)
        }
        Reply::Empty(status) => HttpResponse::build(
            actix_web::http::StatusCode::from_u16(status)
                .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR),
        )
        .finish(),
        // A body stream that fails at once makes actix abort the connection without a
        // complete answer: what a dropped connection looks like to the client.
        Reply::Drop => HttpResponse::Ok().streaming(futures_util::stream::once(async {
            Err::<bytes::Bytes, _>(actix_web::error::ErrorInternalServerError(
                "simulated dropped connection",
            ))
        })),
    }
}

/// Which user a call is about, and its body, for its [`CallRecord`].
#[derive(Clone, Copy)]
enum About<'a> {
    /// A body carrying `userId`.
    Body(&'a Value),
    /// A subscriber id in the path, with the body if there is one; its userId is read before
    /// the work (a remove drops it).
    Subscriber(&'a str, Option<&'a Value>),
    /// A list's `userId` filter.
    Filter(Option<&'a String>),
}

/// The common path of every subscriber-API call: count, faults, bearer check, work, record,
/// latency.
async fn api(
    state: &Shared,
    req: &HttpRequest,
    kind: &str,
    about: About<'_>,
    work: impl FnOnce(&mut SimState) -> Reply,
) -> HttpResponse {
    let (reply, delay) = {
        let mut s = lock(state);
        let user_id = match about {
            About::Body(body) => body["userId"].as_str().map(str::to_owned),
            About::Subscriber(id, _) => s.user_of(id),
            About::Filter(user) => user.cloned(),
        };
        s.count(kind);
        let page_latency = (kind == "list" && s.control.list_latency_ms > 0)
            .then(|| std::time::Duration::from_millis(s.control.list_latency_ms));
        let delay = match (s.take_latency(), page_latency) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        let auth = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let reply = match s.fault() {
            Some(r) => r,
            None => match s.check_auth(auth) {
                Err(r) => r,
                Ok(()) => work(&mut s),
            },
        };
        let body = match about {
            About::Body(body) | About::Subscriber(_, Some(body)) => body.clone(),
            About::Subscriber(_, None) | About::Filter(_) => Value::Null,
        };
        s.record_call(kind, user_id, reply.status(), body);
        (reply, delay)
    };
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    respond(reply)
}

fn json_body(body: &web::Bytes) -> Value {
    serde_json::from_slice(body).unwrap_or(Value::Null)
}

async fn provision(state: Shared, req: HttpRequest, body: web::Bytes) -> HttpResponse {
    let v = json_body(&body);
    api(&state, &req, "provision", About::Body(&v), |s| {
        s.provision(&v)
    })
    .await
}

async fn validate(state: Shared, req: HttpRequest, body: web::Bytes) -> HttpResponse {
    let v = json_body(&body);
    api(&state, &req, "validate", About::Body(&v), |s| {
        s.precheck(&v)
    })
    .await
}

async fn update(
    state: Shared,
    req: HttpRequest,
    id: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    let v = json_body(&body);
    api(
        &state,
        &req,
        "update",
        About::Subscriber(&id, Some(&v)),
        |s| s.update(&id, &v),
    )
    .await
}

async fn remove(state: Shared, req: HttpRequest, id: web::Path<String>) -> HttpResponse {
    api(&state, &req, "remove", About::Subscriber(&id, None), |s| {
        s.remove(&id)
    })
    .await
}

async fn get_one(state: Shared, req: HttpRequest, id: web::Path<String>) -> HttpResponse {
    api(&state, &req, "get", About::Subscriber(&id, None), |s| {
        s.get(&id)
    })
    .await
}

async fn list(
    state: Shared,
    req: HttpRequest,
    q: web::Query<HashMap<String, String>>,
) -> HttpResponse {
    let info = req.connection_info().clone();
    let base = format!("{}://{}{}", info.scheme(), info.host(), req.path());
    api(&state, &req, "list", About::Filter(q.get("userId")), |s| {
        s.list(&q, &base)
    })
    .await
}

async fn access_token(state: Shared, form: web::Form<HashMap<String, String>>) -> HttpResponse {
    let reply = lock(&state).refresh(&form);
    respond(reply)
}

async fn control(state: Shared, body: web::Bytes) -> HttpResponse {
    let patch = match serde_json::from_slice::<Value>(&body) {
        Ok(v) => v,
        Err(e) => return HttpResponse::BadRequest().body(format!("control body is not JSON: {e}")),
    };
    let mut s = lock(&state);
    match s.apply_control(patch) {
        Ok(()) => HttpResponse::Ok().json(&s.control),
        Err(e) => HttpResponse::BadRequest().body(format!("bad control document: {e}")),
    }
}

/// Every access token handed out stops working at once, as after a revocation on Webex's side:
/// the next call of every client is answered 401 (the token storm of `bench/run.sh faults`).
async fn expire_tokens(state: Shared) -> HttpResponse {
    let mut s = lock(&state);
    s.expire_access_tokens();
    s.count("tokens_expired");
    HttpResponse::NoContent().finish()
}

/// `{"subscribers": [...]}`: a population to start from (tests and benchmarks).
async fn seed(state: Shared, body: web::Bytes) -> HttpResponse {
    let items = match serde_json::from_slice::<Value>(&body) {
        Ok(v) => v["subscribers"].as_array().cloned().unwrap_or_default(),
        Err(e) => return HttpResponse::BadRequest().body(format!("seed body is not JSON: {e}")),
    };
    match lock(&state).seed(&items) {
        Ok(added) => HttpResponse::Ok().json(serde_json::json!({ "added": added })),
        Err(e) => HttpResponse::BadRequest().body(format!("cannot seed: {e}")),
    }
}

async fn sim_state(state: Shared) -> HttpResponse {
    HttpResponse::Ok().json(lock(&state).snapshot())
}
