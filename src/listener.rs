//! The mTLS listener pipeline below both `server` and `tunnel`: the client-address allow-list
//! checked *before* TLS and the TLS server config current at each handshake ([`CurrentTls`],
//! swapped whole on reload) serve both; for the provisioning and admin apps it also builds the
//! HTTPS listener in front of an actix-web app:
//! `TCP_NODELAY`, a TLS handshake with whatever server config is current (so a reload applies to
//! the next handshake without touching live connections), the client identity handed to request
//! handlers, and a maximum connection age.
//!
//! actix-web's `HttpServer` binds a fixed rustls config and has no hook before the handshake, so
//! this builds the same pipeline from actix-server and actix-http with those steps added.

use std::fmt;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_http::body::MessageBody;
use actix_http::{Extensions, HttpService, Protocol, Request, Response};
use actix_server::ServerBuilder;
use actix_service::{
    IntoServiceFactory, Service, ServiceFactory, ServiceFactoryExt, fn_service, map_config,
};
use actix_web::dev::AppConfig;
use arc_swap::ArcSwap;
use ipnet::IpNet;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::tls::ClientIdentity;

/// How long a client gets to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS server config in force; swapped as a whole on reload.
pub type CurrentTls = Arc<ArcSwap<rustls::ServerConfig>>;

/// When a connection was accepted; stored in the connection's extensions.
#[derive(Debug, Clone, Copy)]
pub struct ConnectedAt(pub Instant);

/// Why a connection was closed before any request, for the log and metrics.
pub type RefusalHook = Arc<dyn Fn(SocketAddr, &'static str) + Send + Sync>;

/// The settings one listener needs.
#[derive(Clone)]
pub struct ListenerSettings {
    pub tls: CurrentTls,
    /// Client networks allowed to connect; empty = any.
    pub allowed_networks: Arc<Vec<IpNet>>,
    pub on_refused: RefusalHook,
}

impl fmt::Debug for ListenerSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListenerSettings")
            .field("allowed_networks", &self.allowed_networks)
            .finish_non_exhaustive()
    }
}

/// True when `addr` may connect. IPv4-mapped IPv6 addresses are matched as IPv4.
pub fn address_allowed(allowed: &[IpNet], addr: SocketAddr) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let ip = match addr.ip() {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr.ip(), std::net::IpAddr::V4),
        ip => ip,
    };
    allowed.iter().any(|net| net.contains(&ip))
}

/// Add one HTTPS listener running `app` to an actix-server builder.
pub fn listen<F, I, S, B>(
    builder: ServerBuilder,
    name: &str,
    listener: TcpListener,
    settings: ListenerSettings,
    app: F,
) -> std::io::Result<ServerBuilder>
where
    F: Fn() -> I + Send + Clone + 'static,
    I: IntoServiceFactory<S, Request>,
    S: ServiceFactory<Request, Config = AppConfig> + 'static,
    S::Error: Into<actix_web::Error> + 'static,
    S::InitError: fmt::Debug,
    S::Response: Into<Response<B>> + 'static,
    <S::Service as Service<Request>>::Future: 'static,
    S::Service: 'static,
    B: MessageBody + 'static,
{
    let shutdown = builder.graceful_shutdown_signal();
    builder.listen(name, listener, move || {
        let settings = settings.clone();
        let shutdown = shutdown.clone();
        let accept = fn_service(move |io: TcpStream| {
            let settings = settings.clone();
            async move { accept(io, &settings).await }
        });
        let http = HttpService::build()
            // Closes idle keep-alive connections as soon as a graceful shutdown starts.
            .graceful_shutdown_signal(move || {
                let signal = shutdown.clone();
                async move { signal.notified().await }
            })
            .client_request_timeout(Duration::from_secs(10))
            .on_connect_ext(|io: &TlsStream<TcpStream>, ext: &mut Extensions| {
                ext.insert(ConnectedAt(Instant::now()));
                if let Some(identity) = io
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(crate::tls::identity)
                {
                    ext.insert(identity);
                }
            })
            .finish(map_config(
                app().into_factory().map_err(|e| e.into().error_response()),
                |_| AppConfig::default(),
            ));
        accept.and_then(http)
    })
}

async fn accept(
    io: TcpStream,
    settings: &ListenerSettings,
) -> Result<(TlsStream<TcpStream>, Protocol, Option<SocketAddr>), actix_http::error::DispatchError>
{
    let peer = io.peer_addr().ok();
    if let Some(addr) = peer
        && !address_allowed(&settings.allowed_networks, addr)
    {
        (settings.on_refused)(addr, "network_not_allowed");
        return Err(refused("client address not in allowed_networks"));
    }
    // actix-web leaves Nagle on; a request/response protocol pays for it in latency.
    let _ = io.set_nodelay(true);
    let acceptor = tokio_rustls::TlsAcceptor::from(settings.tls.load_full());
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
        Ok(Ok(stream)) => Ok((stream, Protocol::Http1, peer)),
        Ok(Err(e)) => {
            // Policy refusals are counted by the verifier itself with their precise reason; a
            // missing certificate is refused by rustls before the verifier runs, so count it here.
            if let Some(addr) = peer
                && crate::tls::refusals_in_io(&e).contains(&crate::tls::Refusal::NoCertificate)
            {
                (settings.on_refused)(addr, crate::tls::Refusal::NoCertificate.label());
            }
            tracing::debug!(peer = ?peer, error = %e, "TLS handshake failed");
            Err(actix_http::error::DispatchError::Io(e))
        }
        Err(_) => {
            if let Some(addr) = peer {
                (settings.on_refused)(addr, "handshake_timeout");
            }
            Err(refused("TLS handshake timed out"))
        }
    }
}

fn refused(why: &'static str) -> actix_http::error::DispatchError {
    actix_http::error::DispatchError::Io(std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        why,
    ))
}

/// The identity of the client certificate of the connection a request came on.
pub fn client_identity(req: &actix_web::HttpRequest) -> Option<&ClientIdentity> {
    req.conn_data::<ClientIdentity>()
}

/// True when the connection of this request is older than `max_age`: the response then carries
/// `Connection: close`, so long keep-alive connections re-handshake and pick up revocations.
pub fn connection_too_old(req: &actix_web::HttpRequest, max_age: Duration) -> bool {
    req.conn_data::<ConnectedAt>()
        .is_some_and(|at| at.0.elapsed() >= max_age)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_matches_v4_v6_and_mapped_addresses() {
        let nets: Vec<IpNet> = vec![
            "192.0.2.0/24".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ];
        let ok = |s: &str| address_allowed(&nets, s.parse().unwrap());
        assert!(ok("192.0.2.7:1000"));
        assert!(ok("[2001:db8::1]:1000"));
        assert!(ok("[::ffff:192.0.2.9]:1000"));
        assert!(!ok("198.51.100.1:1000"));
        assert!(!ok("[::1]:1000"));
        assert!(address_allowed(&[], "198.51.100.1:1".parse().unwrap()));
    }
}
