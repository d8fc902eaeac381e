//! The floor of flowthrough's crate stack, measured as (d) by `bench/run.sh`: actix-web with
//! rustls on the client side, reqwest with rustls towards the upstream, and nothing in between.
//! It relays each request as nginx does in (c), so set beside (b) it splits flowthrough's cost
//! into what these crates cost on their own and what flowthrough adds (translation, the outbox,
//! delivery). It is the cheapest arrangement of the stack: actix-web's own rustls binding, one
//! reqwest client per worker thread so that a connection's I/O stays on the thread using it, no
//! logging, no metrics. Not a product and not a template for one.
//!
//! Usage: stack_floor LISTEN UPSTREAM_URL SERVER_PEM SERVER_KEY CLIENT_CA UPSTREAM_CA WORKERS

use std::sync::Arc;

use actix_web::{App, HttpRequest, HttpResponse, web};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

struct Upstream {
    client: reqwest::Client,
    base: String,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [
        listen,
        base,
        server_pem,
        server_key,
        client_ca,
        upstream_ca,
        workers,
    ] = args.as_slice()
    else {
        return Err(
            "usage: stack_floor LISTEN UPSTREAM_URL SERVER_PEM SERVER_KEY CLIENT_CA UPSTREAM_CA WORKERS"
                .into(),
        );
    };
    let workers: usize = workers.parse()?;
    let tls = server_tls(server_pem, server_key, client_ca)?;
    let upstream_root = reqwest::Certificate::from_pem(&std::fs::read(upstream_ca)?)?;
    let base = base.trim_end_matches('/').to_owned();
    actix_web::rt::System::new().block_on(async move {
        actix_web::HttpServer::new(move || {
            let client = reqwest::Client::builder()
                .use_rustls_tls()
                .add_root_certificate(upstream_root.clone())
                .tcp_nodelay(true)
                .build()
                .map(|client| {
                    Arc::new(Upstream {
                        client,
                        base: base.clone(),
                    })
                });
            App::new()
                .app_data(web::Data::new(client.map_err(|e| e.to_string())))
                .route("/tls-probe", web::get().to(HttpResponse::NoContent))
                .default_service(web::to(relay))
        })
        .workers(workers)
        .bind_rustls_0_23(listen.as_str(), tls)?
        .run()
        .await
    })?;
    Ok(())
}

async fn relay(
    request: HttpRequest,
    body: web::Bytes,
    upstream: web::Data<Result<Arc<Upstream>, String>>,
) -> HttpResponse {
    let upstream = match upstream.get_ref() {
        Ok(upstream) => upstream,
        Err(reason) => return HttpResponse::InternalServerError().body(reason.clone()),
    };
    let url = format!("{}{}", upstream.base, request.uri());
    // actix-web and reqwest use different major versions of the `http` crate.
    let Ok(method) = reqwest::Method::from_bytes(request.method().as_str().as_bytes()) else {
        return HttpResponse::MethodNotAllowed().finish();
    };
    let mut call = upstream.client.request(method, url).body(body);
    for name in ["authorization", "content-type"] {
        if let Some(value) = request.headers().get(name) {
            call = call.header(name, value.as_bytes());
        }
    }
    let answer = match call.send().await {
        Ok(answer) => answer,
        Err(e) => return HttpResponse::BadGateway().body(e.to_string()),
    };
    let status = answer.status().as_u16();
    let content_type = answer.headers().get("content-type").cloned();
    match answer.bytes().await {
        Ok(bytes) => {
            let mut response = HttpResponse::build(
                actix_web::http::StatusCode::from_u16(status)
                    .unwrap_or(actix_web::http::StatusCode::BAD_GATEWAY),
            );
            if let Some(value) = content_type {
                response.insert_header(("content-type", value.as_bytes()));
            }
            response.body(bytes)
        }
        Err(e) => HttpResponse::BadGateway().body(e.to_string()),
    }
}

/// Mutual TLS as flowthrough's listener asks it: a client certificate chaining to `client_ca`.
fn server_tls(
    pem: &str,
    key: &str,
    client_ca: &str,
) -> Result<rustls::ServerConfig, Box<dyn std::error::Error>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(client_ca)? {
        roots.add(ca?)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()?;
    let chain = CertificateDer::pem_file_iter(pem)?.collect::<Result<Vec<_>, _>>()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, PrivateKeyDer::from_pem_file(key)?)?;
    // As flowthrough and nginx in the comparison: every new connection is a full handshake.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(config)
}
