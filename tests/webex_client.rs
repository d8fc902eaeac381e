//! The Webex client, token manager and failover against the simulator over real HTTPS on loopback.

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

mod common;

use flowthrough::config::WebexConfig;
use flowthrough::failover::Resolver;
use flowthrough::secret::Secret;
use flowthrough::sim::{SimHandle, SimOptions, Simulator};
use flowthrough::store::{Store, TokenRecord, TokenState};
use flowthrough::webex::{
    SubscriberStatus, TokenManager, Transport, TransportOptions, WebexClient, WebexError,
};
use serde_json::json;

/// Every log line of this test binary, at trace level, to check that no secret ever shows.
fn log_buffer() -> Arc<Mutex<Vec<u8>>> {
    static BUF: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUF.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || LogWriter(writer.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        buf
    })
    .clone()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);
impl Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn assert_no_secret_logged(secrets: &[String]) {
    let log = String::from_utf8_lossy(&log_buffer().lock().unwrap()).into_owned();
    assert!(log.len() > 1000, "the trace capture is live");
    for s in secrets {
        assert!(!s.is_empty());
        assert!(!log.contains(s.as_str()), "a secret leaked into the log");
    }
}

/// The client secret, every refresh token the simulator handed out that we know of, and the
/// stored access token.
async fn secrets_of(sim: &SimHandle, store: &Store) -> Vec<String> {
    let mut out = vec![
        sim.client_secret.expose().to_owned(),
        sim.refresh_token.expose().to_owned(),
    ];
    if let Some(r) = store.token().await.unwrap() {
        out.push(r.refresh_token.expose().to_owned());
        if let Some(a) = r.access_token {
            out.push(a.expose().to_owned());
        }
    }
    out
}

struct Stack {
    client: WebexClient,
    tokens: TokenManager,
    transport: Transport,
    store: Store,
}

fn webex_config(
    dir: &Path,
    api_base: &str,
    token_url: &str,
    sim: &SimHandle,
    extra: &str,
) -> WebexConfig {
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &sim.ca_pem).unwrap();
    let secret = dir.join("client_secret");
    std::fs::write(&secret, format!("{}\n", sim.client_secret.expose())).unwrap();
    let refresh = dir.join("refresh_token");
    std::fs::write(&refresh, sim.refresh_token.expose()).unwrap();
    let extra = if extra.contains("request_timeout_ms") {
        extra.to_owned()
    } else {
        format!("request_timeout_ms = 1000\n{extra}")
    };
    let text = format!(
        r#"
api_base = "{api_base}"
token_url = "{token_url}"
ca_bundle = "{}"
client_id = "{}"
client_secret_file = "{}"
refresh_token_file = "{}"
{extra}
"#,
        ca.display(),
        sim.client_id,
        secret.display(),
        refresh.display()
    );
    toml::from_str(&text).unwrap()
}

fn sim_config(dir: &Path, sim: &SimHandle, extra: &str) -> WebexConfig {
    webex_config(
        dir,
        &sim.base_url,
        &format!("{}/access_token", sim.base_url),
        sim,
        extra,
    )
}

async fn build(cfg: &WebexConfig, store_path: &Path, resolver: Resolver) -> Stack {
    let store = Store::open(store_path).unwrap();
    let transport = Transport::new(TransportOptions::from_config(cfg, resolver).unwrap()).unwrap();
    let tokens = TokenManager::new(cfg, store.clone(), transport.clone(), None)
        .await
        .unwrap();
    let client = WebexClient::new(cfg, transport.clone(), tokens.clone()).unwrap();
    Stack {
        client,
        tokens,
        transport,
        store,
    }
}

async fn sim_and_stack(extra: &str) -> (SimHandle, Stack, tempfile::TempDir) {
    log_buffer();
    let sim = Simulator::start(SimOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = sim_config(dir.path(), &sim, extra);
    let stack = build(&cfg, &dir.path().join("store"), Resolver::System).await;
    (sim, stack, dir)
}

fn body(user: &str) -> serde_json::Value {
    json!({
        "provisioningId": "prov-1", "userId": user, "spEnterpriseId": "ent-1",
        "firstName": "Ada", "lastName": "Lovelace", "package": "standard",
        "primaryPhoneNumber": "+15551234567", "email": format!("{user}.mail@example.com")
    })
}

/// An access token that expired an hour ago, with the valid refresh token beside it.
fn expired_an_hour_ago(sim: &SimHandle) -> TokenRecord {
    let now = chrono::Utc::now().timestamp();
    TokenRecord {
        access_token: Some(Secret::new("stale-access-token-value")),
        access_expires_at: Some(now - 3600),
        refresh_token: sim.refresh_token.clone(),
        refresh_expires_at: None,
        last_refresh: Some(now - 7200),
        state: TokenState::Ok,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_concurrent_calls_with_an_expired_token_cause_one_refresh() {
    log_buffer();
    let sim = Simulator::start(SimOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("store");
    let stale = expired_an_hour_ago(&sim);
    Store::open(&store_path)
        .unwrap()
        .put_token(&stale)
        .await
        .unwrap();
    let stack = build(
        &sim_config(dir.path(), &sim, ""),
        &store_path,
        Resolver::System,
    )
    .await;
    let calls = (0..500).map(|i| {
        let c = stack.client.clone();
        tokio::spawn(async move { c.get(&format!("missing-{i}")).await })
    });
    let results = futures_util::future::join_all(calls).await;
    for r in results {
        let outcome = r.unwrap();
        assert!(outcome.tracking_id.starts_with("FLOWTHROUGH_"));
        assert_eq!(outcome.result, Err(WebexError::NotFound));
    }
    assert_eq!(sim.counter("refreshes"), 1);
    assert_eq!(sim.counter("get"), 500);
    assert_eq!(sim.counter("sent_401"), 0, "the stale token was never sent");
    assert_eq!(stack.tokens.state(), TokenState::Ok);
    assert_no_secret_logged(&secrets_of(&sim, &stack.store).await);
    sim.stop().await;
}

/// Two nodes on one PostgreSQL store, both holding the same expired access token: 500 calls
/// spread over them cause one refresh between them. The second node waits for the token row,
/// finds the record the first committed and uses it; with rotation on, a refresh by the second
/// with its own, now rotated, refresh token would show as a rejected refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_sharing_a_postgres_store_refresh_once_between_them() {
    log_buffer();
    let sim = Simulator::start(SimOptions::default()).await.unwrap();
    sim.control(json!({"rotate_refresh_token": true})).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pg = common::pg::PgCluster::shared();
    let store_config = pg.store_config(&pg.database());
    let stale = expired_an_hour_ago(&sim);
    Store::open_configured(&store_config)
        .await
        .unwrap()
        .put_token(&stale)
        .await
        .unwrap();
    // Generous: 500 calls on two cores, a lock wait and a refresh must not time out into
    // retries, which would count calls twice.
    let cfg = sim_config(dir.path(), &sim, "request_timeout_ms = 10000");
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let store = Store::open_configured(&store_config).await.unwrap();
        let transport =
            Transport::new(TransportOptions::from_config(&cfg, Resolver::System).unwrap()).unwrap();
        let tokens = TokenManager::new(&cfg, store.clone(), transport.clone(), None)
            .await
            .unwrap();
        nodes.push(WebexClient::new(&cfg, transport, tokens).unwrap());
    }
    let calls = (0..500).map(|i| {
        let c = nodes[i % 2].clone();
        tokio::spawn(async move { c.get(&format!("missing-{i}")).await })
    });
    for r in futures_util::future::join_all(calls).await {
        assert_eq!(r.unwrap().result, Err(WebexError::NotFound));
    }
    assert_eq!(sim.counter("refreshes"), 1);
    assert_eq!(sim.counter("refresh_rejected"), 0);
    assert_eq!(sim.counter("get"), 500);
    assert_eq!(sim.counter("sent_401"), 0, "the stale token was never sent");
    sim.stop().await;
}

#[tokio::test]
async fn a_401_refreshes_once_and_retries_once() {
    let (sim, stack, _dir) = sim_and_stack("").await;
    let created = stack
        .client
        .provision(&body("u401@example.com"))
        .await
        .result
        .unwrap();
    assert_eq!(sim.counter("refreshes"), 1);
    sim.expire_access_tokens();
    let got = stack.client.get(&created.id).await.result.unwrap();
    assert_eq!(got.id, created.id);
    assert_eq!(sim.counter("refreshes"), 2);
    assert_eq!(sim.counter("sent_401"), 1);
    assert_no_secret_logged(&secrets_of(&sim, &stack.store).await);
    sim.stop().await;
}

#[tokio::test]
async fn rotated_refresh_token_is_used_next_also_after_a_restart() {
    let (sim, stack, dir) = sim_and_stack("").await;
    sim.control(json!({"rotate_refresh_token": true})).unwrap();
    assert_eq!(
        stack.client.get("nobody").await.result,
        Err(WebexError::NotFound)
    );
    let first = stack.store.token().await.unwrap().unwrap();
    assert_ne!(
        first.refresh_token, sim.refresh_token,
        "the rotated token was persisted"
    );
    assert!(first.refresh_expires_at.is_some() && first.access_expires_at.is_some());
    // A second rotation in the same process: the simulator killed the first token's predecessor,
    // so success proves the rotated one was sent.
    sim.expire_access_tokens();
    assert_eq!(
        stack.client.get("nobody").await.result,
        Err(WebexError::NotFound)
    );
    let second = stack.store.token().await.unwrap().unwrap();
    assert_ne!(second.refresh_token, first.refresh_token);
    assert_eq!(sim.counter("refresh_rejected"), 0);
    let mut secrets = secrets_of(&sim, &stack.store).await;
    secrets.push(first.refresh_token.expose().to_owned());

    // Restart: reopen the store. A still-valid access token is reused without a refresh.
    drop(stack);
    let restarted = build(
        &sim_config(dir.path(), &sim, ""),
        &dir.path().join("store"),
        Resolver::System,
    )
    .await;
    let refreshes = sim.counter("refreshes");
    assert_eq!(
        restarted.client.get("nobody").await.result,
        Err(WebexError::NotFound)
    );
    assert_eq!(
        sim.counter("refreshes"),
        refreshes,
        "the stored access token was reused"
    );
    // The next refresh uses the rotated token from the store (the older ones are dead).
    sim.expire_access_tokens();
    assert_eq!(
        restarted.client.get("nobody").await.result,
        Err(WebexError::NotFound)
    );
    assert_eq!(sim.counter("refreshes"), refreshes + 1);
    assert_eq!(sim.counter("refresh_rejected"), 0);
    secrets.extend(secrets_of(&sim, &restarted.store).await);
    assert_no_secret_logged(&secrets);
    sim.stop().await;
}

#[tokio::test]
async fn a_revoked_refresh_token_makes_credentials_invalid_and_is_persisted() {
    let (sim, stack, dir) = sim_and_stack("").await;
    assert_eq!(
        stack.client.get("x").await.result,
        Err(WebexError::NotFound)
    );
    let tokens = stack.tokens.clone();
    let rejection = tokio::spawn(async move { tokens.credentials_rejected().await });
    sim.control(json!({"refresh_token_revoked": true})).unwrap();
    sim.expire_access_tokens();
    tokio::task::yield_now().await;
    assert!(
        !rejection.is_finished(),
        "nothing has been rejected yet: a waiting request must not be told otherwise"
    );
    let err = stack.client.get("x").await.result.unwrap_err();
    assert!(
        matches!(&err, WebexError::CredentialsInvalid { reason } if reason.contains("invalid_grant")),
        "{err:?}"
    );
    tokio::time::timeout(Duration::from_secs(10), rejection)
        .await
        .expect("whoever waits for a rejection hears of it")
        .expect("the waiting task ends cleanly");
    assert!(err.to_string().contains("flowthrough token set"));
    assert!(matches!(
        stack.tokens.state(),
        TokenState::CredentialsInvalid { .. }
    ));
    // No refresh storm: further calls fail at once without asking the token endpoint again.
    let refreshes = sim.counter("refreshes");
    assert!(matches!(
        stack.client.get("x").await.result,
        Err(WebexError::CredentialsInvalid { .. })
    ));
    assert_eq!(sim.counter("refreshes"), refreshes);
    let secrets = secrets_of(&sim, &stack.store).await;
    drop(stack);
    let restarted = build(
        &sim_config(dir.path(), &sim, ""),
        &dir.path().join("store"),
        Resolver::System,
    )
    .await;
    assert!(matches!(
        restarted.tokens.state(),
        TokenState::CredentialsInvalid { .. }
    ));
    assert_no_secret_logged(&secrets);
    sim.stop().await;
}

#[tokio::test]
async fn rate_limits_locks_and_server_errors_map_to_retry_outcomes() {
    let (sim, stack, _dir) = sim_and_stack("attempts = 1").await;
    assert_eq!(
        stack.client.get("warm-up").await.result,
        Err(WebexError::NotFound)
    );
    for (mode, secs) in [
        ("numeric", 7u64),
        ("http-date", 60),
        ("malformed", 7),
        ("absent", 7),
    ] {
        sim.control(json!({"rate_limit_per_s": 1, "retry_after": mode, "retry_after_s": secs}))
            .unwrap();
        let mut after = None;
        for _ in 0..5 {
            if let Err(WebexError::RetryAfter {
                status: 429,
                after: a,
            }) = stack.client.get("x").await.result
            {
                after = Some(a);
                break;
            }
        }
        let after = after.expect("the simulator rate-limited within five calls");
        match mode {
            "numeric" => assert_eq!(after, Duration::from_secs(7)),
            "http-date" => assert!(
                after > Duration::from_secs(50) && after <= Duration::from_secs(60),
                "{after:?}"
            ),
            _ => assert!(
                after >= Duration::from_millis(500) && after <= Duration::from_secs(1),
                "{mode}: {after:?}"
            ),
        }
    }
    assert!(sim.counter("sent_429") >= 4);
    sim.control(json!({"rate_limit_per_s": 0, "locked_ratio": 1.0}))
        .unwrap();
    assert!(matches!(
        stack.client.get("x").await.result,
        Err(WebexError::RetryAfter { status: 423, after }) if !after.is_zero()
    ));
    sim.control(json!({"locked_ratio": 0.0, "server_error_ratio": 1.0}))
        .unwrap();
    let err = stack.client.get("x").await.result.unwrap_err();
    assert!(
        matches!(&err, WebexError::Retryable { reason } if reason.contains("503")),
        "{err:?}"
    );
    sim.control(json!({"server_error_ratio": 0.0, "drop_ratio": 1.0}))
        .unwrap();
    let err = stack.client.get("x").await.result.unwrap_err();
    assert!(matches!(err, WebexError::Retryable { .. }), "{err:?}");
    assert!(sim.counter("dropped") >= 1);
    sim.control(json!({"drop_ratio": 0.0})).unwrap();
    assert_eq!(
        stack.client.get("x").await.result,
        Err(WebexError::NotFound),
        "the address answers again"
    );
    sim.stop().await;
}

#[tokio::test]
async fn bad_requests_are_permanent_with_details_and_duplicates_resolve() {
    let (sim, stack, _dir) = sim_and_stack("").await;
    let mut bad = body("bad@example.com");
    bad.as_object_mut().unwrap().remove("lastName");
    let outcome = stack.client.provision(&bad).await;
    match outcome.result {
        Err(WebexError::Permanent {
            status: 400,
            message,
            errors,
            tracking_id,
        }) => {
            assert!(message.contains("lastName"));
            assert_eq!(errors[0].error_code, 4002);
            assert!(tracking_id.unwrap().starts_with("SIMULATOR_"));
        }
        other => panic!("{other:?}"),
    }
    let first = stack
        .client
        .provision_once("dup@example.com", &body("dup@example.com"))
        .await
        .result
        .unwrap();
    assert_eq!(first.status, SubscriberStatus::Provisioned);
    let plain = stack
        .client
        .provision(&body("dup@example.com"))
        .await
        .result
        .unwrap_err();
    assert!(matches!(plain, WebexError::Duplicate { status: 409, .. }));
    let again = stack
        .client
        .provision_once("dup@example.com", &body("dup@example.com"))
        .await
        .result
        .unwrap();
    assert_eq!(again.id, first.id);
    assert_eq!(sim.state()["subscribers"].as_array().unwrap().len(), 1);
    // update, precheck and remove round out the typed calls.
    let updated = stack
        .client
        .update(&first.id, &json!({"lastName": "Byron"}))
        .await
        .result
        .unwrap();
    assert_eq!(updated.last_name.as_deref(), Some("Byron"));
    let refused = stack
        .client
        .update(&first.id, &json!({"email": "x@example.com"}))
        .await
        .result
        .unwrap_err();
    assert!(matches!(refused, WebexError::Permanent { status: 400, .. }));
    assert!(
        stack
            .client
            .precheck(&body("new@example.com"))
            .await
            .result
            .is_ok()
    );
    stack.client.remove(&first.id).await.result.unwrap();
    assert_eq!(
        stack.client.get(&first.id).await.result,
        Err(WebexError::NotFound)
    );
    sim.stop().await;
}

#[tokio::test]
async fn list_follows_next_links_and_rechecks_a_dropped_filter() {
    let (sim, stack, _dir) = sim_and_stack("").await;
    for u in ["a@example.com", "b@example.com", "c@example.com"] {
        stack.client.provision(&body(u)).await.result.unwrap();
    }
    sim.control(json!({"page_size": 1, "drop_filter_on_next": true}))
        .unwrap();
    let found = stack
        .client
        .list_by_user_id("a@example.com")
        .await
        .result
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].user_id, "a@example.com");
    assert!(
        sim.counter("list") >= 3,
        "the client followed the next links"
    );
    sim.stop().await;
}

#[tokio::test]
async fn a_provision_that_times_out_after_creation_does_not_duplicate() {
    let (sim, stack, _dir) = sim_and_stack("request_timeout_ms = 300").await;
    assert_eq!(
        stack.client.get("warm-up").await.result,
        Err(WebexError::NotFound)
    );
    // A plain POST that times out after the simulator created the user: unknown outcome.
    sim.control(json!({"latency_ms": 1500, "latency_count": 1}))
        .unwrap();
    let plain = stack.client.provision(&body("first@example.com")).await;
    assert!(
        matches!(plain.result, Err(WebexError::UnknownOutcome { .. })),
        "{:?}",
        plain.result
    );
    assert_eq!(sim.state()["subscribers"].as_array().unwrap().len(), 1);
    // provision_once in the same situation looks the user up instead of posting again.
    sim.control(json!({"latency_ms": 1500, "latency_count": 1}))
        .unwrap();
    let sub = stack
        .client
        .provision_once("slow@example.com", &body("slow@example.com"))
        .await
        .result
        .unwrap();
    assert_eq!(sub.user_id, "slow@example.com");
    let state = sim.state();
    assert_eq!(state["subscribers"].as_array().unwrap().len(), 2);
    assert_eq!(
        state["counters"]["provision"], 2,
        "the POST was not repeated after the lookup found the user"
    );
    sim.stop().await;
}

#[tokio::test]
async fn subscribers_in_error_carry_errors() {
    let (sim, stack, _dir) = sim_and_stack("").await;
    sim.control(json!({"error_user_ids": ["broken"], "provisioning_delay_ms": 200}))
        .unwrap();
    let s = stack
        .client
        .provision(&body("broken@example.com"))
        .await
        .result
        .unwrap();
    assert_eq!(s.status, SubscriberStatus::Provisioning);
    let mut last = s.status;
    for _ in 0..100 {
        let got = stack.client.get(&s.id).await.result.unwrap();
        last = got.status;
        if got.status.is_settled() {
            assert_eq!(got.errors.len(), 1);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(last, SubscriberStatus::Error);
    sim.stop().await;
}

/// 127.0.0.2: nothing listening; .3: answers 503; .4: answers too late; .5: healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_over_loopback_addresses() {
    log_buffer();
    let ip = |n: u8| IpAddr::from([127, 0, 0, n]);
    let with = |n: u8, port: u16, control: serde_json::Value| SimOptions {
        listen: vec![SocketAddr::new(ip(n), port)],
        extra_names: vec!["api.sim.test".into()],
        control: serde_json::from_value(control).unwrap(),
        ..SimOptions::default()
    };
    let healthy = Simulator::start(with(5, 0, json!({}))).await.unwrap();
    let port = healthy.port;
    let failing = Simulator::start(with(3, port, json!({"server_error_ratio": 1.0})))
        .await
        .unwrap();
    let slow = Simulator::start(with(4, port, json!({"latency_ms": 3000})))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let api = format!("https://api.sim.test:{port}/v1");
    let token_url = format!("https://localhost:{port}/v1/access_token");
    let cfg = webex_config(
        dir.path(),
        &api,
        &token_url,
        &healthy,
        "request_timeout_ms = 500\nblock_seconds = 600",
    );
    let bundle = format!("{}{}{}", healthy.ca_pem, failing.ca_pem, slow.ca_pem);
    std::fs::write(cfg.ca_bundle.as_ref().unwrap(), bundle).unwrap();
    let mut map = HashMap::new();
    map.insert("api.sim.test".to_owned(), vec![ip(2), ip(3), ip(4), ip(5)]);
    map.insert("localhost".to_owned(), vec![ip(5)]);
    let stack = build(&cfg, &dir.path().join("store"), Resolver::Static(map)).await;
    let all: Vec<SocketAddr> = (2..=5).map(|n| SocketAddr::new(ip(n), port)).collect();

    // First request: .2 refuses, .3 answers 503, .4 is too slow: three tries, all failed.
    let first = stack.client.get("nobody").await.result.unwrap_err();
    assert!(matches!(first, WebexError::Retryable { .. }), "{first:?}");
    assert_eq!(stack.transport.blocked("api.sim.test", port), all[..3]);
    assert_eq!(failing.counter("sent_5xx"), 1);
    assert_eq!(slow.counter("get"), 1);
    assert_eq!(healthy.counter("get"), 0);
    // The next requests go straight to the healthy address.
    for _ in 0..3 {
        assert_eq!(
            stack.client.get("nobody").await.result,
            Err(WebexError::NotFound)
        );
    }
    assert_eq!(healthy.counter("get"), 3);
    assert_eq!(failing.counter("get"), 1);
    assert_eq!(slow.counter("get"), 1);
    assert_eq!(stack.transport.blocked("api.sim.test", port), all[..3]);

    // All blocked: a random pick, and the address that answers is unblocked. Only the healthy
    // address can answer now (the others are stopped), so picks keep landing on dead addresses
    // until the random choice finds it.
    failing.stop().await;
    slow.stop().await;
    stack.transport.block("api.sim.test", port, all[3]);
    assert_eq!(stack.transport.blocked("api.sim.test", port), all);
    let before = healthy.counter("get");
    let mut answered = false;
    for _ in 0..20 {
        if stack.client.get("nobody").await.result == Err(WebexError::NotFound) {
            answered = true;
            break;
        }
        assert_eq!(stack.transport.blocked("api.sim.test", port), all);
    }
    assert!(answered, "a random pick among blocked addresses answered");
    assert_eq!(healthy.counter("get"), before + 1);
    assert_eq!(
        stack.transport.blocked("api.sim.test", port),
        all[..3],
        "the answering address is unblocked"
    );
    assert_no_secret_logged(&secrets_of(&healthy, &stack.store).await);
    healthy.stop().await;
}
