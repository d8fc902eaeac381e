//! Tunnel mode end to end over real sockets on loopback: the tunnel started the way `serve` starts
//! it (bind, settings from the config, the shared reloadable TLS config, store and metrics), an AS
//! client speaking CONNECT over mTLS or plain TCP, and destinations that are tiny loopback servers.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use flowthrough::certs::{self, DevPki, DevPkiFiles, LeafParams};
use flowthrough::failover::Resolver;
use flowthrough::metrics::Metrics;
use flowthrough::store::{AuditEvent, AuditQuery, Store};
use flowthrough::tunnel::{self, Tunnel, TunnelSettings, TunnelShared};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bound on anything that could hang, generous: never a timing assertion.
const LIMIT: Duration = Duration::from_secs(30);

/// An Argon2 PHC hash of `password`, as `flowthrough hash-password` makes it.
fn hash(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &SaltString::generate(&mut OsRng))
        .unwrap()
        .to_string()
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

struct World {
    dir: tempfile::TempDir,
    pki: DevPki,
    files: DevPkiFiles,
    /// The destination's own CA and server certificate: the client trusts them end to end,
    /// the tunnel never sees them.
    dest_ca: certs::Ca,
    dest_server: certs::Issued,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let (pki, files) = DevPki::generate(&dir.path().join("pki")).unwrap();
        let dest_ca = certs::new_ca(&certs::CaParams::new("destination CA")).unwrap();
        let dest_server =
            certs::issue_leaf(&dest_ca, &LeafParams::server(&["dest.test".into()], 30)).unwrap();
        World {
            dir,
            pki,
            files,
            dest_ca,
            dest_server,
        }
    }

    fn config(&self, tunnel: &str) -> flowthrough::config::Config {
        let p = |path: &Path| path.display().to_string();
        let text = format!(
            "[server]\nlisten = []\ncertificate = \"{}\"\nprivate_key = \"{}\"\nclient_ca = \"{}\"\n\n[tunnel]\nlisten = [\"127.0.0.1:0\"]\n{tunnel}\n",
            p(&self.files.server_cert),
            p(&self.files.server_key),
            p(&self.files.ca_cert),
        );
        flowthrough::config::Config::parse(&text, Path::new("tunnel-test.toml")).unwrap()
    }

    /// A TLS client config presenting `cert`/`key`, trusting `ca`.
    fn client_tls(ca: &CertificateDer<'static>, cert: &certs::Issued) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone()).unwrap();
        let key = PrivateKeyDer::from_pem_slice(cert.key_pem.expose().as_bytes()).unwrap();
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![cert.cert_der.clone()], key)
        .unwrap()
    }

    /// The AS toward the tunnel: the good BroadWorks client certificate.
    fn as_tls(&self) -> rustls::ClientConfig {
        World::client_tls(&self.pki.ca.cert.cert_der, &self.pki.client)
    }
}

struct Running {
    tunnel: Tunnel,
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    store: Store,
    tls: flowthrough::listener::CurrentTls,
    tls_enabled: Option<rustls::ClientConfig>,
}

/// Start the tunnel exactly as `serve` will: bind, settings from `[tunnel]`, the shared TLS config.
fn start(world: &World, tunnel_toml: &str, names: &[(&str, Vec<IpAddr>)]) -> Running {
    let config = world.config(tunnel_toml);
    let tcfg = config.tunnel.clone().unwrap();
    let metrics = Arc::new(Metrics::new());
    let observer_metrics = metrics.clone();
    let observer: flowthrough::tls::Observer =
        Arc::new(move |r: &flowthrough::tls::Refusal| observer_metrics.count_refusal(r.label()));
    let loaded = flowthrough::tls::server_config(
        config.server.as_ref().unwrap(),
        &config.client_policy,
        observer,
    )
    .unwrap();
    let tls: flowthrough::listener::CurrentTls = Arc::new(ArcSwap::new(loaded.config));
    let store = Store::open(&world.dir.path().join(format!("store-{}", rand_id()))).unwrap();
    let resolver = Resolver::Static(
        names
            .iter()
            .map(|(n, ips)| ((*n).to_owned(), ips.clone()))
            .collect::<HashMap<_, _>>(),
    );
    let listeners = tunnel::bind(&tcfg.listen).unwrap();
    let settings = TunnelSettings::from_config(&tcfg, resolver).unwrap();
    let tunnel = tunnel::start(
        listeners,
        settings,
        TunnelShared {
            tls: Some(tls.clone()),
            store: Some(store.clone()),
            metrics: metrics.clone(),
        },
    )
    .unwrap();
    let addr = tunnel.local_addrs()[0];
    Running {
        tunnel,
        addr,
        metrics,
        store,
        tls,
        tls_enabled: tcfg.tls.then(|| world.as_tls()),
    }
}

/// A plain (no TLS) tunnel whose only allowed destination is `dest`.
fn start_plain_to(world: &World, dest: SocketAddr) -> Running {
    start(
        world,
        &format!(
            "{PLAIN}allowed_destinations = [\"127.0.0.1:{}\"]",
            dest.port()
        ),
        &[],
    )
}

fn rand_id() -> u64 {
    rand::random()
}

fn loopback() -> Vec<IpAddr> {
    vec!["127.0.0.1".parse().unwrap()]
}

/// The answer of the tunnel to a request head.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

/// Connect to the tunnel (with TLS when the tunnel has it), send `head`, read the answer head
/// byte by byte (so no tunnelled byte is consumed); on a refusal, read the body to the end.
async fn request(run: &Running, head: &str) -> (Box<dyn Io>, Answer) {
    request_with(run.addr, run.tls_enabled.clone(), head).await
}

async fn request_with(
    addr: SocketAddr,
    tls: Option<rustls::ClientConfig>,
    head: &str,
) -> (Box<dyn Io>, Answer) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut io: Box<dyn Io> = match tls {
        Some(cfg) => {
            let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
            let name = ServerName::try_from("localhost").unwrap();
            Box::new(connector.connect(name, tcp).await.unwrap())
        }
        None => Box::new(tcp),
    };
    io.write_all(head.as_bytes()).await.unwrap();
    let answer = tokio::time::timeout(LIMIT, read_answer(&mut io))
        .await
        .unwrap();
    (io, answer)
}

async fn read_answer(io: &mut Box<dyn Io>) -> Answer {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        io.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let status: u16 = head[9..12].parse().unwrap();
    let mut body = Vec::new();
    if status != 200 {
        io.read_to_end(&mut body).await.unwrap();
    }
    Answer {
        status,
        head,
        body: String::from_utf8(body).unwrap(),
    }
}

fn connect_head(target: &str) -> String {
    format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n")
}

/// A loopback listener that counts the connections it accepts and echoes them.
struct Echo {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

async fn echo_server() -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Echo { addr, accepted }
}

/// A TLS server for `dest.test` with the destination's own PKI: answers one line.
async fn tls_destination(world: &World) -> SocketAddr {
    let key = PrivateKeyDer::from_pem_slice(world.dest_server.key_pem.expose().as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![world.dest_server.cert_der.clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut line = Vec::new();
                let mut byte = [0u8; 1];
                while !line.ends_with(b"\n") && tls.read_exact(&mut byte).await.is_ok() {
                    line.push(byte[0]);
                }
                let answer = format!("destination got: {}", String::from_utf8_lossy(&line));
                let _ = tls.write_all(answer.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    addr
}

fn metric(run: &Running, outcome: &str) -> u64 {
    let text = run.metrics.render();
    let prefix = format!("flowthrough_tunnels_total{{outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// The tunnel audit records, newest first, waiting (bounded) until `n` are there: a record is
/// written when its tunnel ends, which may be just after the client saw the end.
async fn audits(run: &Running, n: usize) -> Vec<(String, AuditEvent)> {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let all: Vec<_> = run
            .store
            .audit(&AuditQuery {
                limit: 1000,
                ..AuditQuery::default()
            })
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.client, r.event))
            .collect();
        if all.len() >= n || tokio::time::Instant::now() > deadline {
            return all;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn end_of(event: &AuditEvent) -> &str {
    match event {
        AuditEvent::Tunnel { end, .. } => end,
        other => panic!("not a tunnel record: {other:?}"),
    }
}

const PLAIN: &str =
    "tls = false\nallowed_networks = [\"127.0.0.0/8\"]\nallow_private_destinations = true\n";

#[tokio::test]
async fn mtls_tunnel_carries_the_destinations_own_tls_end_to_end() {
    let world = World::new();
    let dest = tls_destination(&world).await;
    let run = start(
        &world,
        &format!(
            "tls = true\nallow_private_destinations = true\nallowed_destinations = [\"dest.test:{}\"]",
            dest.port()
        ),
        &[("dest.test", loopback())],
    );
    let (io, answer) = request(&run, &connect_head(&format!("dest.test:{}", dest.port()))).await;
    assert_eq!(answer.status, 200, "{}", answer.head);
    assert_eq!(answer.head, "HTTP/1.1 200 Connection established\r\n\r\n");

    // TLS inside the tunnel, verified against the destination's CA only: the tunnel's own
    // server certificate would not verify, so this handshake proves the bytes are the destination's.
    let inner = World::client_tls(&world.dest_ca.cert.cert_der, &world.pki.client);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(inner));
    let mut e2e = connector
        .connect(ServerName::try_from("dest.test").unwrap(), io)
        .await
        .unwrap();
    let peer = e2e.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(peer, world.dest_server.cert_der);
    e2e.write_all(b"hello through the tunnel\n").await.unwrap();
    let mut reply = String::new();
    tokio::time::timeout(LIMIT, e2e.read_to_string(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, "destination got: hello through the tunnel\n");
    drop(e2e);

    let records = audits(&run, 1).await;
    assert_eq!(records.len(), 1);
    let (client, event) = &records[0];
    assert!(client.contains("CN=bwcticlient.webex.com"), "{client}");
    assert!(
        client.ends_with(&format!("serial={}", world.pki.client.serial)),
        "{client}"
    );
    let AuditEvent::Tunnel {
        client_address,
        destination,
        address_used,
        bytes_up,
        bytes_down,
        end,
        ..
    } = event
    else {
        panic!("{event:?}")
    };
    assert!(client_address.starts_with("127.0.0.1:"));
    assert_eq!(destination, &format!("dest.test:{}", dest.port()));
    assert_eq!(address_used.as_deref(), Some(dest.to_string().as_str()));
    // The TLS records in both directions (handshake included): more than the plaintext.
    assert!(
        *bytes_up > 25 && *bytes_down > 43,
        "{bytes_up} {bytes_down}"
    );
    assert_eq!(end, "closed");
    assert_eq!(metric(&run, "accepted"), 1);
    let text = run.metrics.render();
    assert!(text.contains(&format!(
        "flowthrough_tunnel_bytes_total{{direction=\"up\"}} {bytes_up}"
    )));
    assert!(text.contains(&format!(
        "flowthrough_tunnel_bytes_total{{direction=\"down\"}} {bytes_down}"
    )));
    assert!(text.contains("flowthrough_tunnel_connect_seconds_count 1"));
    assert!(text.contains("flowthrough_tunnels_open 0"));
}

#[tokio::test]
async fn a_client_certificate_without_the_broadworks_oid_fails_the_handshake() {
    let world = World::new();
    let echo = echo_server().await;
    let run = start(
        &world,
        &format!(
            "allow_private_destinations = true\nallowed_destinations = [\"127.0.0.1:{}\"]",
            echo.addr.port()
        ),
        &[],
    );
    let mut params = LeafParams::broadworks_client("bwcticlient.webex.com", 30);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let bad = certs::issue_leaf(&world.pki.ca, &params).unwrap();
    let cfg = World::client_tls(&world.pki.ca.cert.cert_der, &bad);
    let tcp = TcpStream::connect(run.addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    // With TLS 1.3 the client learns of the refusal on its first read.
    let outcome = async {
        let mut tls = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await?;
        tls.write_all(connect_head(&echo.addr.to_string()).as_bytes())
            .await?;
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await?;
        std::io::Result::Ok(buf)
    };
    let result = tokio::time::timeout(LIMIT, outcome).await.unwrap();
    assert!(
        result.is_err(),
        "the handshake must fail, got {:?}",
        result.map(|b| String::from_utf8_lossy(&b).into_owned())
    );
    let records = audits(&run, 1).await;
    let end = end_of(&records[0].1);
    assert!(
        end.starts_with("tls_refused: client certificate refused: missing_broadworks_oid ("),
        "{end}"
    );
    assert_eq!(metric(&run, "tls_refused"), 1);
    assert!(
        run.metrics
            .render()
            .contains("flowthrough_tls_refusals_total{reason=\"missing_broadworks_oid\"} 1")
    );
    assert_eq!(echo.accepted.load(Ordering::SeqCst), 0);

    // The good certificate passes on the same listener.
    let (_io, answer) = request(&run, &connect_head(&echo.addr.to_string())).await;
    assert_eq!(answer.status, 200);
}

#[tokio::test]
async fn destinations_off_the_list_or_private_are_refused_without_connecting() {
    let world = World::new();
    let echo = echo_server().await;
    let allowed = format!(
        "allowed_destinations = [\"inside.test:{}\"]",
        echo.addr.port()
    );
    // The default refuses private destinations.
    let run = start(&world, &allowed, &[("inside.test", loopback())]);

    let (_, a) = request(&run, &connect_head(&echo.addr.to_string())).await;
    assert_eq!(a.status, 403);
    assert_eq!(
        a.body,
        format!(
            "destination 127.0.0.1:{} is not in tunnel.allowed_destinations\n",
            echo.addr.port()
        )
    );
    let (_, a) = request(
        &run,
        &connect_head(&format!("other.test:{}", echo.addr.port())),
    )
    .await;
    assert_eq!(a.status, 403);
    let (_, a) = request(
        &run,
        &connect_head(&format!("inside.test:{}", echo.addr.port() as u32 + 1)),
    )
    .await;
    assert_eq!(a.status, 403, "the port is part of the allow-list entry");

    let (_, a) = request(
        &run,
        &connect_head(&format!("inside.test:{}", echo.addr.port())),
    )
    .await;
    assert_eq!(a.status, 403);
    assert!(
        a.body.contains("resolves to 127.0.0.1 (loopback)")
            && a.body.contains("allow_private_destinations is false"),
        "{}",
        a.body
    );
    assert_eq!(
        echo.accepted.load(Ordering::SeqCst),
        0,
        "no outbound attempt"
    );
    assert_eq!(metric(&run, "destination_not_allowed"), 3);
    assert_eq!(metric(&run, "private_destination"), 1);
    let records = audits(&run, 4).await;
    assert_eq!(records.len(), 4);
    assert!(end_of(&records[0].1).starts_with("private_destination: destination inside.test:"));
    assert!(end_of(&records[3].1).starts_with("destination_not_allowed: "));

    // The same name with allow_private_destinations reaches the listener.
    let run = start(
        &world,
        &format!("{allowed}\nallow_private_destinations = true"),
        &[("inside.test", loopback())],
    );
    let (mut io, a) = request(
        &run,
        &connect_head(&format!("inside.test:{}", echo.addr.port())),
    )
    .await;
    assert_eq!(a.status, 200);
    io.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    io.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    assert_eq!(echo.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn method_and_proxy_credentials_are_checked_in_order() {
    use base64::Engine as _;
    let world = World::new();
    let echo = echo_server().await;
    let run = start(
        &world,
        &format!(
            "allow_private_destinations = true\nallowed_destinations = [\"127.0.0.1:{}\"]\nproxy_account = {{ user = \"bwproxy\", password_hash = \"{}\" }}",
            echo.addr.port(),
            hash("s3cret-prov")
        ),
        &[],
    );
    let target = echo.addr.to_string();
    let auth = |user: &str, pass: &str| {
        format!(
            "Proxy-Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        )
    };

    let (_, a) = request(&run, &connect_head(&target)).await;
    assert_eq!(a.status, 407);
    assert!(
        a.head
            .contains("\r\nProxy-Authenticate: Basic realm=\"flowthrough\"\r\n"),
        "{}",
        a.head
    );
    assert!(
        a.body.starts_with("proxy credentials required"),
        "{}",
        a.body
    );

    for (user, pass) in [("bwproxy", "wrong"), ("bwproxyx", "s3cret-prov"), ("", "")] {
        let (_, a) = request(
            &run,
            &format!("CONNECT {target} HTTP/1.1\r\n{}\r\n", auth(user, pass)),
        )
        .await;
        assert_eq!(a.status, 407, "{user}:{pass}");
        assert_eq!(
            a.body,
            "proxy credentials rejected: wrong user or password\n"
        );
    }

    // Credentials come before the method: a GET without them is 407, with them 405.
    let (_, a) = request(&run, "GET http://example.test/ HTTP/1.1\r\n\r\n").await;
    assert_eq!(a.status, 407);
    let (_, a) = request(
        &run,
        &format!(
            "GET http://example.test/ HTTP/1.1\r\n{}\r\n",
            auth("bwproxy", "s3cret-prov")
        ),
    )
    .await;
    assert_eq!(a.status, 405);
    assert!(a.head.contains("\r\nAllow: CONNECT\r\n"), "{}", a.head);
    assert_eq!(
        a.body,
        "method GET not allowed: this proxy only opens tunnels with CONNECT\n"
    );

    let (mut io, a) = request(
        &run,
        &format!(
            "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{}\r\n",
            auth("bwproxy", "s3cret-prov")
        ),
    )
    .await;
    assert_eq!(a.status, 200);
    io.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    io.read_exact(&mut b).await.unwrap();
    assert_eq!(metric(&run, "proxy_auth"), 5);
    assert_eq!(metric(&run, "method"), 1);
    assert_eq!(metric(&run, "accepted"), 1);
    assert_eq!(echo.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn unreachable_unresolvable_and_slow_destinations() {
    let world = World::new();
    // A port with nothing listening: bound, then closed.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    // A listener that never accepts, with a backlog of 0, filled by one connection: Linux then
    // drops further SYNs, so a connect to it gets no answer at all — a loopback-only stand-in
    // for a destination that does not answer.
    let silent = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    silent
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    silent.listen(0).unwrap();
    let silent_addr = silent.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..2 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(silent_addr)).await
        {
            fillers.push(s);
        }
    }
    assert!(!fillers.is_empty(), "the backlog holds one connection");

    let run = start(
        &world,
        &format!(
            "{PLAIN}connect_timeout_ms = 300\nallowed_destinations = [\"closed.test:{}\", \"gone.test:443\", \"silent.test:{}\"]",
            closed.port(),
            silent_addr.port()
        ),
        &[
            ("closed.test", loopback()),
            ("gone.test", Vec::new()),
            ("silent.test", loopback()),
        ],
    );
    let (_, a) = request(
        &run,
        &connect_head(&format!("closed.test:{}", closed.port())),
    )
    .await;
    assert_eq!(a.status, 502);
    assert!(
        a.body.starts_with(&format!(
            "cannot connect to closed.test:{}: {closed}: ",
            closed.port()
        )),
        "{}",
        a.body
    );
    let (_, a) = request(&run, &connect_head("gone.test:443")).await;
    assert_eq!(a.status, 502);
    assert!(
        a.body
            .starts_with("destination gone.test:443 does not resolve"),
        "{}",
        a.body
    );
    let (_, a) = request(
        &run,
        &connect_head(&format!("silent.test:{}", silent_addr.port())),
    )
    .await;
    assert_eq!(a.status, 504, "{}", a.body);
    assert!(a.body.contains("no answer within 300 ms"), "{}", a.body);

    assert_eq!(metric(&run, "connect_failed"), 1);
    assert_eq!(metric(&run, "unresolvable"), 1);
    assert_eq!(metric(&run, "connect_timeout"), 1);
    let records = audits(&run, 3).await;
    let ends: Vec<&str> = records.iter().map(|(_, e)| end_of(e)).collect();
    assert!(ends[0].starts_with("connect_timeout: "), "{ends:?}");
    assert!(ends[1].starts_with("unresolvable: "), "{ends:?}");
    assert!(ends[2].starts_with("connect_failed: "), "{ends:?}");
    assert!(records.iter().all(|(client, _)| client == "plain"));
}

#[tokio::test]
async fn failover_moves_past_an_address_that_refuses() {
    let world = World::new();
    let echo = echo_server().await;
    // 127.0.0.2 has nothing on the echo port; 127.0.0.1 has the echo server.
    let run = start(
        &world,
        &format!(
            "{PLAIN}allowed_destinations = [\"multi.test:{}\"]",
            echo.addr.port()
        ),
        &[(
            "multi.test",
            vec!["127.0.0.2".parse().unwrap(), "127.0.0.1".parse().unwrap()],
        )],
    );
    let target = format!("multi.test:{}", echo.addr.port());
    for _ in 0..2 {
        let (mut io, a) = request(&run, &connect_head(&target)).await;
        assert_eq!(a.status, 200, "{}", a.body);
        io.write_all(b"ok").await.unwrap();
        let mut b = [0u8; 2];
        io.read_exact(&mut b).await.unwrap();
    }
    let records = audits(&run, 2).await;
    for (_, event) in &records {
        let AuditEvent::Tunnel { address_used, .. } = event else {
            panic!()
        };
        assert_eq!(
            address_used.as_deref(),
            Some(echo.addr.to_string().as_str())
        );
    }
    assert_eq!(echo.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn slots_are_limited_and_a_network_allow_list_applies_first() {
    let world = World::new();
    let echo = echo_server().await;
    let run = start(
        &world,
        &format!(
            "{PLAIN}max_tunnels = 1\nallowed_destinations = [\"127.0.0.1:{}\"]",
            echo.addr.port()
        ),
        &[],
    );
    let target = echo.addr.to_string();
    let (first, a) = request(&run, &connect_head(&target)).await;
    assert_eq!(a.status, 200);
    let (_, a) = request(&run, &connect_head(&target)).await;
    assert_eq!(a.status, 503);
    assert_eq!(
        a.body,
        "all 1 tunnel slots are in use (tunnel.max_tunnels); retry later\n"
    );
    drop(first);
    // The slot comes back when the first tunnel ends.
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let (_, a) = request(&run, &connect_head(&target)).await;
        if a.status == 200 {
            break;
        }
        assert_eq!(a.status, 503);
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(metric(&run, "no_slot") >= 1);

    // Only 10.0.0.0/8 allowed: a loopback client is refused before anything else.
    let run = start(
        &world,
        &format!(
            "tls = false\nallowed_networks = [\"10.0.0.0/8\"]\nallowed_destinations = [\"127.0.0.1:{}\"]",
            echo.addr.port()
        ),
        &[],
    );
    let (_, a) = request(&run, &connect_head(&target)).await;
    assert_eq!(a.status, 403);
    assert_eq!(a.body, "client address not in tunnel.allowed_networks\n");
    assert_eq!(metric(&run, "network_not_allowed"), 1);
}

#[tokio::test]
async fn malformed_oversized_and_pipelined_requests() {
    let world = World::new();
    let echo = echo_server().await;
    let run = start_plain_to(&world, echo.addr);
    let target = echo.addr.to_string();
    let (_, a) = request(&run, "CONNECT nonsense HTTP/1.1\r\n\r\n").await;
    assert_eq!(a.status, 400);
    let (_, a) = request(
        &run,
        &format!(
            "CONNECT {target} HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(9000)
        ),
    )
    .await;
    assert_eq!(a.status, 431);
    // Bytes right behind the head (a pipelined ClientHello) reach the destination first.
    let (mut io, a) = request(&run, &format!("{}early bytes|", connect_head(&target))).await;
    assert_eq!(a.status, 200);
    io.write_all(b"late").await.unwrap();
    let mut buf = [0u8; 16];
    io.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"early bytes|late");
}

#[tokio::test]
async fn half_close_passes_through_and_idle_tunnels_close() {
    let world = World::new();
    // Reads to EOF, then answers: only works if the client's half-close reached it.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dest = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                tcp.read_to_end(&mut got).await.unwrap();
                tcp.write_all(format!("after EOF you sent {} bytes", got.len()).as_bytes())
                    .await
                    .unwrap();
                tcp.shutdown().await.unwrap();
            });
        }
    });
    let run = start(
        &world,
        &format!(
            "{PLAIN}idle_timeout_s = 1\nallowed_destinations = [\"127.0.0.1:{}\"]",
            dest.port()
        ),
        &[],
    );
    let (io, a) = request(&run, &connect_head(&dest.to_string())).await;
    assert_eq!(a.status, 200);
    let (mut r, mut w) = tokio::io::split(io);
    w.write_all(b"twelve bytes").await.unwrap();
    w.shutdown().await.unwrap();
    let mut reply = String::new();
    tokio::time::timeout(LIMIT, r.read_to_string(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, "after EOF you sent 12 bytes");

    // An idle tunnel: the echo server never speaks first and the client sends nothing.
    let echo = echo_server().await;
    let run = start(
        &world,
        &format!(
            "{PLAIN}idle_timeout_s = 1\nallowed_destinations = [\"127.0.0.1:{}\"]",
            echo.addr.port()
        ),
        &[],
    );
    let (mut io, a) = request(&run, &connect_head(&echo.addr.to_string())).await;
    assert_eq!(a.status, 200);
    let mut rest = Vec::new();
    tokio::time::timeout(LIMIT, io.read_to_end(&mut rest))
        .await
        .expect("the idle tunnel is closed by the proxy")
        .unwrap();
    assert!(rest.is_empty());
    let records = audits(&run, 1).await;
    assert_eq!(end_of(&records[0].1), "idle_timeout");
}

/// 100 MiB each way at once; both sides hash what they send and what they receive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mib_transfer_arrives_byte_identical_both_ways() {
    const MIB: usize = 1024 * 1024;
    const TOTAL: usize = 100;
    fn block(seed: u8) -> Vec<u8> {
        let mut b = vec![0u8; MIB];
        let mut x: u32 = 0x9e37_79b9 ^ u32::from(seed);
        for byte in b.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *byte = x as u8;
        }
        b
    }
    async fn send(w: &mut (impl AsyncWrite + Unpin), seed: u8) -> String {
        let data = block(seed);
        let mut h = Sha256::new();
        for i in 0..TOTAL {
            let mut chunk = data.clone();
            chunk[..8].copy_from_slice(&(i as u64).to_be_bytes());
            h.update(&chunk);
            w.write_all(&chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
        hex::encode(h.finalize())
    }
    async fn receive(r: &mut (impl AsyncRead + Unpin)) -> (usize, String) {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut n = 0;
        loop {
            let got = r.read(&mut buf).await.unwrap();
            if got == 0 {
                return (n, hex::encode(h.finalize()));
            }
            n += got;
            h.update(&buf[..got]);
        }
    }

    let world = World::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dest = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let (mut r, mut w) = tcp.into_split();
        let (sent, received) = tokio::join!(send(&mut w, 2), receive(&mut r));
        (sent, received)
    });
    let run = start_plain_to(&world, dest);
    let (io, a) = request(&run, &connect_head(&dest.to_string())).await;
    assert_eq!(a.status, 200);
    let (mut r, mut w) = tokio::io::split(io);
    let (client_sent, client_received) = tokio::time::timeout(Duration::from_secs(300), async {
        tokio::join!(send(&mut w, 1), receive(&mut r))
    })
    .await
    .unwrap();
    let (server_sent, server_received) = server.await.unwrap();
    assert_eq!(client_received, (TOTAL * MIB, server_sent));
    assert_eq!(server_received, (TOTAL * MIB, client_sent));
    let records = audits(&run, 1).await;
    let AuditEvent::Tunnel {
        bytes_up,
        bytes_down,
        end,
        ..
    } = &records[0].1
    else {
        panic!()
    };
    assert_eq!(
        (*bytes_up, *bytes_down),
        ((TOTAL * MIB) as u64, (TOTAL * MIB) as u64)
    );
    assert_eq!(end, "closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_tunnels() {
    const N: usize = 200;
    let world = World::new();
    let echo = echo_server().await;
    let run = start_plain_to(&world, echo.addr);
    let run = Arc::new(run);
    let target = echo.addr.to_string();
    let barrier = Arc::new(tokio::sync::Barrier::new(N + 1));
    let release = Arc::new(tokio::sync::Barrier::new(N + 1));
    let mut tasks = Vec::new();
    for i in 0..N {
        let (run, target, barrier, release) = (
            run.clone(),
            target.clone(),
            barrier.clone(),
            release.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let (mut io, a) = request(&run, &connect_head(&target)).await;
            assert_eq!(a.status, 200);
            barrier.wait().await;
            release.wait().await;
            let msg = format!("tunnel number {i:04}");
            io.write_all(msg.as_bytes()).await.unwrap();
            let mut back = vec![0u8; msg.len()];
            io.read_exact(&mut back).await.unwrap();
            assert_eq!(back, msg.as_bytes());
        }));
    }
    tokio::time::timeout(LIMIT, barrier.wait()).await.unwrap();
    assert!(
        run.metrics
            .render()
            .contains(&format!("flowthrough_tunnels_open {N}\n")),
        "all {N} tunnels are open at once"
    );
    release.wait().await;
    for t in tasks {
        tokio::time::timeout(LIMIT, t).await.unwrap().unwrap();
    }
    assert_eq!(metric(&run, "accepted"), N as u64);
    assert_eq!(echo.accepted.load(Ordering::SeqCst), N);
}

#[tokio::test]
async fn a_reload_applies_to_new_tunnels_and_keeps_open_ones() {
    let world = World::new();
    let echo = echo_server().await;
    let run = start(
        &world,
        &format!(
            "allow_private_destinations = true\nallowed_destinations = [\"127.0.0.1:{}\"]",
            echo.addr.port()
        ),
        &[],
    );
    let target = echo.addr.to_string();
    let (mut open, a) = request(&run, &connect_head(&target)).await;
    assert_eq!(a.status, 200);

    // Reload: a new server certificate from the same CA, swapped in as SIGHUP does.
    let names = ["localhost".to_owned()];
    let renewed = certs::issue_leaf(&world.pki.ca, &LeafParams::server(&names, 30)).unwrap();
    std::fs::write(&world.files.server_cert, &renewed.cert_pem).unwrap();
    std::fs::write(&world.files.server_key, renewed.key_pem.expose()).unwrap();
    let config = world.config("");
    let loaded = flowthrough::tls::server_config(
        config.server.as_ref().unwrap(),
        &config.client_policy,
        Arc::new(|_: &flowthrough::tls::Refusal| {}),
    )
    .unwrap();
    run.tls.store(loaded.config);

    // The open tunnel still relays.
    open.write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still here");

    // A new tunnel handshakes with the new certificate.
    let tcp = TcpStream::connect(run.addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(world.as_tls()));
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(
        tls.get_ref().1.peer_certificates().unwrap()[0],
        renewed.cert_der
    );
}

#[tokio::test]
async fn shutdown_stops_accepting_and_drains_open_tunnels_until_the_deadline() {
    let world = World::new();
    let echo = echo_server().await;
    let run = start_plain_to(&world, echo.addr);
    let (addr, store) = (run.addr, run.store.clone());
    let (mut open, a) = request(&run, &connect_head(&echo.addr.to_string())).await;
    assert_eq!(a.status, 200);
    let shutdown = tokio::spawn(run.tunnel.shutdown(Duration::from_secs(2)));

    // New connections are refused once the listener is closed.
    let deadline = tokio::time::Instant::now() + LIMIT;
    while TcpStream::connect(addr).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "still accepting");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The open tunnel keeps working during the drain …
    open.write_all(b"draining").await.unwrap();
    let mut buf = [0u8; 8];
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"draining");
    // … and is closed at the deadline, audited as such.
    let mut rest = Vec::new();
    tokio::time::timeout(LIMIT, open.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(LIMIT, shutdown)
        .await
        .unwrap()
        .unwrap();
    let records = store
        .audit(&AuditQuery {
            limit: 10,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(end_of(&records[0].event), "shutdown");
}
