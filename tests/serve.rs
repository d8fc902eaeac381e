//! `serve` end to end, over real mTLS and HTTP on loopback: the AS (an HTTPS client with the
//! BroadWorks client certificate) → flowthrough → the Webex simulator.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use flowthrough::certs::{self, LeafParams};
use flowthrough::sim::SimOptions;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio_rustls::TlsConnector;

const SETTLE: Duration = Duration::from_secs(20);

/// The flows that go through the store run on both of its backends.
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        mod on_sled {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Backend::Sled).await;
                }
            )*
        }
        mod on_postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Backend::Postgres).await;
                }
            )*
        }
    };
}

on_both_backends!(
    the_samples_flow_to_webex_and_back,
    every_error_code_is_reachable,
    a_document_refused_401_leaves_nothing_stored,
    an_upstream_outage_queues_then_delivers_in_per_user_order,
    commands_whose_as_hangs_up_mid_request_are_still_delivered_and_audited,
    a_command_whose_as_hangs_up_while_webex_is_slow_is_audited,
    each_request_is_traced_stage_by_stage,
    sigterm_lets_the_deliveries_on_request_threads_end,
);

struct Server {
    running: flowthrough::server::Running,
    base: String,
    admin: String,
}

impl Server {
    async fn stop(self) {
        self.running.shutdown(Duration::from_secs(5)).await.unwrap();
    }
}

async fn start(world: &World, server_extra: &str, extra: &str) -> Server {
    let running = flowthrough::server::start(world.config(server_extra, extra))
        .await
        .unwrap();
    let base = format!("https://localhost:{}", running.provisioning_addrs[0].port());
    let admin = format!("http://{}", running.admin_addr);
    Server {
        running,
        base,
        admin,
    }
}

async fn post(client: &reqwest::Client, url: &str, body: String) -> (u16, String) {
    post_typed(client, url, body, "text/xml; charset=ISO-8859-1").await
}

async fn post_typed(
    client: &reqwest::Client,
    url: &str,
    body: String,
    content_type: &str,
) -> (u16, String) {
    let response = client
        .post(url)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

fn only(body: &str) -> Answer {
    let all = answers(body);
    assert_eq!(all.len(), 1, "{body}");
    all.into_iter().next().unwrap()
}

async fn the_samples_flow_to_webex_and_back(backend: Backend) {
    let world = World::on(SimOptions::default(), backend).await;
    let server = start(&world, "", "").await;
    let client = world.as_client();
    let url = format!("{}/provisioning", server.base);

    // Add: POST with the template's package and spEnterpriseId, the national number completed.
    let (status, body) = post(&client, &url, sample("user-add-17sp4.xml")).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("<sessionId xmlns=\"\">b7e3a2c4-0f1d-4c55-9b7e-1a2b3c4d5e6f</sessionId>"),
        "{body}"
    );
    assert_eq!(only(&body).kind, "SuccessResponse", "{body}");
    let alice = world
        .subscriber("alice.smith@acme.example")
        .expect("alice was provisioned");
    assert_eq!(alice["firstName"], "Alice");
    assert_eq!(alice["primaryPhoneNumber"], "+12025550101");
    assert_eq!(alice["extension"], "0101");
    assert_eq!(alice["email"], "alice.smith@acme.example");
    assert_eq!(alice["package"], "standard");
    assert_eq!(alice["spEnterpriseId"], "acme-ent");
    assert_eq!(alice["provisioningId"], "prov-acme");
    assert_eq!(alice["language"], "en_US");
    assert_eq!(alice["timezone"], "America/New_York");

    // Modify: a new last name and extension, the phone number cleared.
    let (status, body) = post(&client, &url, sample("user-modify-22.xml")).await;
    assert_eq!(
        (status, only(&body).kind.as_str()),
        (200, "SuccessResponse"),
        "{body}"
    );
    let alice = world.subscriber("alice.smith@acme.example").unwrap();
    assert_eq!(alice["lastName"], "Smith-Lee");
    assert_eq!(alice["extension"], "0111");
    assert!(
        alice["primaryPhoneNumber"].is_null(),
        "the cleared phone is gone: {alice}"
    );

    // IM&P unassigned: the subscriber is removed.
    let (status, body) = post(&client, &url, sample("service-unassign-impp.xml")).await;
    assert_eq!(
        (status, only(&body).kind.as_str()),
        (200, "SuccessResponse"),
        "{body}"
    );
    assert!(world.subscriber("alice.smith@acme.example").is_none());

    // IM&P assigned again: provisioned from the last profile seen (with the modify applied).
    let (status, body) = post(&client, &url, sample("service-assign-impp.xml")).await;
    assert_eq!(
        (status, only(&body).kind.as_str()),
        (200, "SuccessResponse"),
        "{body}"
    );
    let alice = world
        .subscriber("alice.smith@acme.example")
        .expect("provisioned again");
    assert_eq!(alice["lastName"], "Smith-Lee");
    assert_eq!(alice["extension"], "0111");

    // A second user, French, then deleted; deleting again is still a success (idempotent).
    let (status, body) = post(&client, &url, sample("user-add-22v2.xml")).await;
    assert_eq!(
        (status, only(&body).kind.as_str()),
        (200, "SuccessResponse"),
        "{body}"
    );
    let bob = world.subscriber("bob.jones@acme.example").unwrap();
    assert_eq!(
        bob["language"], "fr_FR",
        "French + template country US has no fr_US: the default fr_FR"
    );
    assert_eq!(bob["mobilePhoneNumber"], "+1-514-555-0199");
    for _ in 0..2 {
        let (status, body) = post(&client, &url, sample("user-delete.xml")).await;
        assert_eq!(
            (status, only(&body).kind.as_str()),
            (200, "SuccessResponse"),
            "{body}"
        );
    }
    assert!(world.subscriber("bob.jones@acme.example").is_none());

    // Group add: recorded, no Webex call.
    let calls_before = world.sim.counter("provision");
    assert!(
        calls_before >= 3,
        "the adds and the IM&P assignment were POSTs"
    );
    let (status, body) = post(&client, &url, sample("group-add.xml")).await;
    assert_eq!(
        (status, only(&body).kind.as_str()),
        (200, "SuccessResponse"),
        "{body}"
    );
    assert_eq!(world.sim.counter("provision"), calls_before);

    // The audit has a record per command, with the client certificate.
    let status = get_json(&format!("{}/status", server.admin)).await;
    assert_eq!(status["outbox"]["pending"], 0, "{status}");
    assert_eq!(status["ready"], true, "{status}");

    // Every Webex call counted is also timed.
    let metrics = get_text(&format!("{}/metrics", server.admin)).await;
    let calls: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("flowthrough_webex_calls_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(calls >= 5, "{metrics}");
    assert!(
        metrics.contains(&format!("flowthrough_webex_seconds_count {calls}\n")),
        "{metrics}"
    );
    assert!(
        metrics.contains("flowthrough_token_refreshes_total{outcome=\"ok\"} 1\n"),
        "the one refresh at start is counted: {metrics}"
    );
    let gauge = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{metrics}"))
    };
    match backend {
        // The store's volume, for the alert before it fills up.
        Backend::Sled => {
            let available = gauge("flowthrough_store_volume_available_bytes");
            let size = gauge("flowthrough_store_volume_size_bytes");
            assert!(size > 0 && available <= size, "{available} of {size}");
        }
        // The database's commits and pool.
        Backend::Postgres => {
            assert!(
                gauge("flowthrough_store_commit_seconds_count") >= calls,
                "{metrics}"
            );
            assert_eq!(gauge("flowthrough_store_pool_size"), 8, "{metrics}");
            assert!(gauge("flowthrough_store_pool_in_use") <= 8, "{metrics}");
        }
    }
    server.stop().await;
}

async fn every_error_code_is_reachable(backend: Backend) {
    let world = World::on(SimOptions::default(), backend).await;
    let server = start(&world, "", "").await;
    let client = world.as_client();
    let url = format!("{}/provisioning", server.base);

    // 7001: a known command without its userId.
    let bad = r#"<command xsi:type="UserAddRequest17sp4" xmlns=""><serviceProviderId>acme-ent</serviceProviderId><groupId>hq</groupId><lastName>A</lastName><firstName>B</firstName></command>"#;
    let (_, body) = post(&client, &url, document(bad)).await;
    let a = only(&body);
    assert_eq!(
        (a.kind.as_str(), a.code),
        ("ErrorResponse", Some(7001)),
        "{body}"
    );

    // 7002: a command flowthrough does not carry; the document is kept for the operator.
    let unknown = r#"<command xsi:type="GroupDnGetListRequest" xmlns=""><serviceProviderId>acme-ent</serviceProviderId><groupId>hq</groupId></command>"#;
    let (_, body) = post(&client, &url, document(unknown)).await;
    assert_eq!(only(&body).code, Some(7002), "{body}");

    // 7003: no email under a trusted-email template.
    let (_, body) = post(
        &client,
        &url,
        document(&user_add("noemail@acme.example", None)),
    )
    .await;
    assert_eq!(only(&body).code, Some(7003), "{body}");

    // 7004: the URL names a template that does not exist.
    let (status, body) = post(
        &client,
        &format!("{url}/nosuch"),
        document(&user_add("x@acme.example", Some("x@acme.example"))),
    )
    .await;
    assert_eq!((status, only(&body).code), (200, Some(7004)), "{body}");

    // 7005: IM&P assigned to a user never seen.
    let assign = r#"<command xsi:type="UserServiceAssignListRequest" xmlns=""><userId>ghost@acme.example</userId><serviceName>Integrated IM&amp;P</serviceName></command>"#;
    let (_, body) = post(&client, &url, document(assign)).await;
    assert_eq!(only(&body).code, Some(7005), "{body}");

    // 7010: Webex refuses renaming a user onto an existing userId (409, 10022).
    for user in ["one@acme.example", "two@acme.example"] {
        let (_, body) = post(&client, &url, document(&user_add(user, Some(user)))).await;
        assert_eq!(only(&body).kind, "SuccessResponse", "{body}");
    }
    let rename = r#"<command xsi:type="UserModifyRequest22" xmlns=""><userId>one@acme.example</userId><newUserId>two@acme.example</newUserId></command>"#;
    let (_, body) = post(&client, &url, document(rename)).await;
    let a = only(&body);
    assert_eq!(a.code, Some(7010), "{body}");
    assert!(
        a.text.contains("10022"),
        "Webex's errorCode is in the detail: {body}"
    );

    // The refused rename is dead and holds its user's lane (SPEC §11): the user's next command
    // waits behind it, and the AS hears why (the deadline's 7020 would say Webex has not
    // answered yet); dropped by the operator, it lets the waiting command through.
    let next = r#"<command xsi:type="UserModifyRequest22" xmlns=""><userId>one@acme.example</userId><firstName>Eins</firstName></command>"#;
    let (_, body) = post(&client, &url, document(next)).await;
    let a = only(&body);
    assert_eq!(a.code, Some(7020), "{body}");
    let dead = get_json(&format!("{}/admin/outbox?state=dead", server.admin)).await;
    let dead_id = dead[0]["id"].as_u64().unwrap();
    assert!(
        a.text
            .contains(&format!("waits behind dead outbox entry {dead_id}")),
        "{body}"
    );
    assert_ne!(
        world.subscriber("one@acme.example").unwrap()["firstName"],
        "Eins"
    );
    let dropped = reqwest::Client::new()
        .delete(format!("{}/admin/outbox/{dead_id}", server.admin))
        .send()
        .await
        .unwrap();
    assert!(dropped.status().is_success(), "{dropped:?}");
    assert!(
        eventually(SETTLE, || world
            .subscriber("one@acme.example")
            .is_some_and(|s| s["firstName"] == "Eins"))
        .await,
        "the held command is delivered once the dead entry is dropped"
    );

    // 7021: an email change cannot be carried by an update.
    let email = r#"<command xsi:type="UserModifyRequest22" xmlns=""><userId>one@acme.example</userId><firstName>Uno</firstName><emailAddress>uno@acme.example</emailAddress></command>"#;
    let (_, body) = post(&client, &url, document(email)).await;
    let a = only(&body);
    assert_eq!(
        (a.code, a.severity.as_deref()),
        (Some(7021), Some("Warning")),
        "{body}"
    );
    assert_eq!(
        world.subscriber("one@acme.example").unwrap()["firstName"],
        "Uno"
    );

    // 7020: Webex slower than the ack deadline; the command is delivered afterwards.
    world.sim.control(json!({"latency_ms": 4000})).unwrap();
    let (_, body) = post(
        &client,
        &url,
        document(&user_add("slow@acme.example", Some("slow@acme.example"))),
    )
    .await;
    world.sim.control(json!({"latency_ms": 0})).unwrap();
    let a = only(&body);
    assert_eq!(
        (a.code, a.severity.as_deref()),
        (Some(7020), Some("Warning")),
        "{body}"
    );
    assert!(
        a.text.contains("outbox entry"),
        "the detail names the outbox entry: {body}"
    );
    assert!(eventually(SETTLE, || world.subscriber("slow@acme.example").is_some()).await);

    // 7030: the refresh token is revoked; readiness turns red and commands stay queued.
    world
        .sim
        .control(json!({"refresh_token_revoked": true}))
        .unwrap();
    world.sim.expire_access_tokens();
    let (_, body) = post(
        &client,
        &url,
        document(&user_add("first@acme.example", Some("first@acme.example"))),
    )
    .await;
    // This request's own delivery finds the token rejected: the answer is 7030 at once, not a
    // 7020 at the deadline.
    let a = only(&body);
    assert_eq!(
        (a.code, a.severity.as_deref()),
        (Some(7030), Some("Error")),
        "the refresh token is rejected while the request waits: {body}"
    );
    assert!(
        a.text.contains("flowthrough token set"),
        "the detail says what the operator must do: {body}"
    );
    let readyz = format!("{}/readyz", server.admin);
    let mut red = false;
    for _ in 0..100 {
        if reqwest::get(&readyz).await.unwrap().status() == 503 {
            red = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(red, "/readyz turns red once the refresh token is rejected");
    let (_, body) = post(
        &client,
        &url,
        document(&user_add(
            "queued@acme.example",
            Some("queued@acme.example"),
        )),
    )
    .await;
    assert_eq!(only(&body).code, Some(7030), "{body}");
    let status = get_json(&format!("{}/status", server.admin)).await;
    assert!(
        status["outbox"]["pending"].as_u64().unwrap() >= 2,
        "both commands stay queued: {status}"
    );
    let metrics = get_text(&format!("{}/metrics", server.admin)).await;
    assert!(metrics.contains("flowthrough_token_valid 0"), "{metrics}");
    assert!(
        metrics.contains("flowthrough_token_refreshes_total{outcome=\"rejected\"} 1\n"),
        "{metrics}"
    );
    server.stop().await;
}

/// A document whose second command needs the provisioning account the AS did not send is refused
/// whole, before anything is stored: the AS sends it again with credentials, and the first
/// command must not be left half-done in the outbox meanwhile.
async fn a_document_refused_401_leaves_nothing_stored(backend: Backend) {
    let world = World::on(SimOptions::default(), backend).await;
    let server = start(&world, "", "").await;
    let client = world.as_client();
    let url = format!("{}/provisioning", server.base);
    let open = user_add("open@acme.example", Some("open@acme.example"));
    let secured = user_add("locked@acme.example", Some("locked@acme.example"))
        .replace("acme-ent", "secure-ent");
    let (status, body) = post(&client, &url, document(&format!("{open}{secured}"))).await;
    assert_eq!(status, 401, "{body}");
    let status = get_json(&format!("{}/status", server.admin)).await;
    assert_eq!(status["outbox"]["pending"], 0, "nothing stored: {status}");
    let audit = get_json(&format!(
        "{}/admin/audit?user=open@acme.example",
        server.admin
    ))
    .await;
    assert_eq!(audit, json!([]), "nothing recorded for the first command");
    // Sent again with the account, both go through, once each.
    let response = client
        .post(&url)
        .header("content-type", "text/xml")
        .basic_auth("bwprov", Some("example"))
        .body(document(&format!("{open}{secured}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.text().await.unwrap();
    let kinds: Vec<_> = answers(&body).into_iter().map(|a| a.kind).collect();
    assert_eq!(kinds, ["SuccessResponse", "SuccessResponse"], "{body}");
    assert_eq!(world.sim.counter("provision"), 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_refusals_basic_auth_413_415_400() {
    let world = World::new(SimOptions::default()).await;
    let server = start(&world, "max_body_bytes = 4096", "").await;
    let client = world.as_client();
    let url = format!("{}/provisioning", server.base);
    let add = || document(&user_add("auth@acme.example", Some("auth@acme.example")));

    // 415: not XML by its content type.
    let (status, body) = post_typed(&client, &url, add(), "application/json").await;
    assert_eq!(status, 415, "{body}");
    // 400: not an OCI document at all; it is kept, redacted, for the operator.
    let (status, body) = post(&client, &url, "hello".to_owned()).await;
    assert_eq!(status, 400, "{body}");
    let foreign = "<Provision><user>u1</user><password>Hunter2!</password></Provision>";
    let (status, _) = post(&client, &url, foreign.to_owned()).await;
    assert_eq!(status, 400);
    let kept = get_text(&format!("{}/admin/audit?documents=true", server.admin)).await;
    assert!(
        kept.contains("<user>u1</user>"),
        "the document is kept: {kept}"
    );
    assert!(!kept.contains("Hunter2!"), "passwords are redacted: {kept}");
    // 413: over max_body_bytes.
    let big = document(&format!(
        "<!-- {} -->{}",
        "x".repeat(8000),
        user_add("big@acme.example", Some("big@acme.example"))
    ));
    let (status, _) = post(&client, &url, big).await;
    assert_eq!(status, 413);

    // 401: the template has a provisioning account.
    let secured = format!("{url}/secured");
    let (status, _) = post(&client, &secured, add()).await;
    assert_eq!(status, 401);
    let response = client
        .post(&secured)
        .header("content-type", "text/xml")
        .basic_auth("bwprov", Some("wrong"))
        .body(add())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert!(
        response
            .headers()
            .get("www-authenticate")
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("Basic")
    );
    let response = client
        .post(&secured)
        .header("content-type", "text/xml")
        .basic_auth("bwprov", Some("example"))
        .body(add())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.text().await.unwrap();
    assert_eq!(only(&body).kind, "SuccessResponse", "{body}");
    let sub = world.subscriber("auth@acme.example").unwrap();
    assert_eq!(sub["package"], "premium");
    assert!(
        sub["email"].is_null(),
        "untrusted-email template never sends the email"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_client_certificates_fail_the_handshake() {
    let world = World::new(SimOptions::default()).await;
    let server = start(&world, "", "").await;
    let url = format!("{}/provisioning", server.base);
    let ca = certs::Ca::load(&world.path("pki")).unwrap();
    let mut no_oid = LeafParams::broadworks_client("bwcticlient.webex.com", 30);
    no_oid.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let issued = certs::issue_leaf(&ca, &no_oid).unwrap();
    let dir = world.path("bad");
    let written = certs::write_files(&dir, &issued.files("bad"), true).unwrap();
    assert_eq!(written.len(), 2);
    let client = world.client_with(&dir.join("bad.pem"), &dir.join("bad.key"));
    let result = client
        .post(&url)
        .header("content-type", "text/xml")
        .body(document(&user_add(
            "x@acme.example",
            Some("x@acme.example"),
        )))
        .send()
        .await;
    assert!(
        result.is_err(),
        "a certificate without the BroadWorks OID is refused at the handshake"
    );
    // No client certificate at all.
    let anonymous = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&world.pki.ca_cert).unwrap()).unwrap(),
        )
        .build()
        .unwrap();
    assert!(anonymous.post(&url).body("x").send().await.is_err());
    let metrics = get_text(&format!("{}/metrics", server.admin)).await;
    assert!(
        metrics.contains("flowthrough_tls_refusals_total{reason="),
        "{metrics}"
    );
    let no_certificate = format!(
        "flowthrough_tls_refusals_total{{reason=\"{}\"}} 1",
        flowthrough::tls::Refusal::NoCertificate.label()
    );
    assert!(metrics.contains(&no_certificate), "{metrics}");
    assert!(world.subscriber("x@acme.example").is_none());
    server.stop().await;
}

async fn an_upstream_outage_queues_then_delivers_in_per_user_order(backend: Backend) {
    let world = World::on(SimOptions::default(), backend).await;
    let server = start(&world, "ack_deadline_ms = 500", "").await;
    let client = world.as_client();
    let url = format!("{}/provisioning", server.base);
    world
        .sim
        .control(json!({"server_error_ratio": 1.0}))
        .unwrap();
    // Per user: add, then a modify that must not overtake it.
    for i in 0..5 {
        let user = format!("outage{i}@acme.example");
        let (status, body) = post(&client, &url, document(&user_add(&user, Some(&user)))).await;
        assert_eq!((status, only(&body).code), (200, Some(7020)), "{body}");
        let modify = format!(
            r#"<command xsi:type="UserModifyRequest22" xmlns=""><userId>{user}</userId><firstName>After{i}</firstName></command>"#
        );
        let (_, body) = post(&client, &url, document(&modify)).await;
        assert_eq!(only(&body).code, Some(7020), "{body}");
    }
    assert!(world.subscribers().is_empty());
    world
        .sim
        .control(json!({"server_error_ratio": 0.0}))
        .unwrap();
    let delivered = eventually(Duration::from_secs(60), || {
        (0..5).all(|i| {
            world
                .subscriber(&format!("outage{i}@acme.example"))
                .is_some_and(|s| s["firstName"] == format!("After{i}"))
        })
    })
    .await;
    assert!(
        delivered,
        "after recovery every add and then its modify is applied: {:?}",
        world.subscribers()
    );
    let status = status_once_drained(&server).await;
    assert_eq!(
        status["outbox"]["pending"], 0,
        "the outbox empties: {status}"
    );
    assert_eq!(world.subscribers().len(), 5, "no duplicates");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_traffic_drops_no_connection() {
    let world = World::new(SimOptions::default()).await;
    let server = start(&world, "", "").await;
    let client = world.as_client();
    let url = format!("{}/provisioning", server.base);
    let traffic = {
        let client = client.clone();
        let url = url.clone();
        tokio::spawn(async move {
            let mut ok = 0;
            for i in 0..40 {
                let user = format!("reload{i}@acme.example");
                let (status, body) =
                    post(&client, &url, document(&user_add(&user, Some(&user)))).await;
                assert_eq!(status, 200, "{body}");
                ok += 1;
            }
            ok
        })
    };
    for _ in 0..5 {
        server.running.reload().unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A reload through the admin listener too.
    let response = reqwest::Client::new()
        .post(format!("{}/admin/reload", server.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(traffic.await.unwrap(), 40);
    // A bad set is refused and the old one stays.
    std::fs::write(&world.pki.server_key, "not a key").unwrap();
    assert!(server.running.reload().is_err());
    let (status, _) = post(
        &client,
        &url,
        document(&user_add("after@acme.example", Some("after@acme.example"))),
    )
    .await;
    assert_eq!(status, 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_their_maximum_age_are_closed_after_the_response() {
    let world = World::new(SimOptions::default()).await;
    let url = |s: &Server| format!("{}/provisioning", s.base);
    let body = || document(&user_add("age@acme.example", Some("age@acme.example")));

    let young = start(&world, "", "").await;
    let response = world
        .as_client()
        .post(url(&young))
        .header("content-type", "text/xml")
        .body(body())
        .send()
        .await
        .unwrap();
    assert!(
        response
            .headers()
            .get("connection")
            .is_none_or(|v| v != "close")
    );
    young.stop().await;

    // A fresh world: the first server's background tasks may still hold its store.
    let world = World::new(SimOptions::default()).await;
    let old = start(&world, "max_connection_age_s = 0", "").await;
    let response = world
        .as_client()
        .post(url(&old))
        .header("content-type", "text/xml")
        .body(body())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers().get("connection").unwrap(),
        "close",
        "the AS reconnects and re-handshakes"
    );
    old.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_only_node_needs_no_webex_and_relays_to_an_allowed_destination() {
    let world = World::new(SimOptions::default()).await;
    let sim_port = world.sim.port;
    // [server] keeps the certificates but no provisioning listener; no [webex] at all.
    let text = world.config_text("", "");
    let webex_at = text.find("[webex]").unwrap();
    let text = format!(
        "{}\n[tunnel]\nlisten = [\"127.0.0.1:0\"]\nallowed_destinations = [\"127.0.0.1:{sim_port}\"]\nallow_private_destinations = true\n",
        &text[..webex_at]
    )
    .replace("listen = [\"127.0.0.1:0\"]\ncertificate", "listen = []\ncertificate");
    let config = flowthrough::config::Config::parse(&text, std::path::Path::new("t.toml")).unwrap();
    assert!(config.webex.is_none());
    let running = flowthrough::server::start(config).await.unwrap();
    assert!(running.provisioning_addrs.is_empty());
    let proxy = format!("https://localhost:{}", running.tunnel_addrs[0].port());
    let pki = &world.pki;
    let p = |path: &std::path::Path| path.display().to_string();
    let output = tokio::process::Command::new("curl")
        .args(["-sS", "--fail", "--proxy", &proxy])
        .args([
            "--proxy-cacert",
            &p(&pki.ca_cert),
            "--proxy-cert",
            &p(&pki.client_cert),
            "--proxy-key",
            &p(&pki.client_key),
        ])
        .args(["--cacert", &p(&world.path("sim-ca.pem"))])
        .arg(format!("https://127.0.0.1:{sim_port}/_sim/state"))
        .output()
        .await
        .expect("curl is installed (.ci/run installs it)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let state: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(
        state["subscribers"].is_array(),
        "the simulator answered through the tunnel: {state}"
    );
    let metrics = get_text(&format!("http://{}/metrics", running.admin_addr)).await;
    assert!(
        metrics.contains("flowthrough_tunnels_total{outcome=\"accepted\"} 1"),
        "{metrics}"
    );
    running.shutdown(Duration::from_secs(2)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_a_config_with_nothing_to_serve() {
    let world = World::new(SimOptions::default()).await;
    let text = world.config_text("", "").replace(
        "listen = [\"127.0.0.1:0\"]\ncertificate",
        "listen = []\ncertificate",
    );
    let config = flowthrough::config::Config::parse(&text, std::path::Path::new("t.toml")).unwrap();
    match flowthrough::server::start(config).await {
        Err(e) => assert!(e.to_string().contains("nothing to serve"), "{e}"),
        Ok(_) => panic!("a node with neither listener must not start"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_outside_allowed_networks_are_refused_before_tls() {
    let world = World::new(SimOptions::default()).await;
    let server = start(&world, "allowed_networks = [\"192.0.2.0/24\"]", "").await;
    let url = format!("{}/provisioning", server.base);
    let result = world
        .as_client()
        .post(&url)
        .header("content-type", "text/xml")
        .body(document(&user_add(
            "net@acme.example",
            Some("net@acme.example"),
        )))
        .send()
        .await;
    assert!(result.is_err(), "127.0.0.1 is not in 192.0.2.0/24");
    let metrics = get_text(&format!("{}/metrics", server.admin)).await;
    assert!(
        metrics.contains("flowthrough_tls_refusals_total{reason=\"network_not_allowed\"} 1"),
        "{metrics}"
    );
    assert!(world.subscriber("net@acme.example").is_none());
    server.stop().await;
}

/// The AS's side of a request it gives up on: sent over mutual TLS, then, after `patience`, the
/// connection reset (SO_LINGER 0), as an AS whose process times out or dies leaves it.
/// A raw TLS connector with the AS's client certificate, for requests cut short on purpose.
fn as_connector(world: &World) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&world.pki.ca_cert).unwrap() {
        roots.add(ca.unwrap()).unwrap();
    }
    let chain: Vec<_> = CertificateDer::pem_file_iter(&world.pki.client_cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(&world.pki.client_key).unwrap();
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
    TlsConnector::from(Arc::new(config))
}

/// The admin listener's status once the outbox has drained, or after 30 s.
async fn status_once_drained(server: &Server) -> serde_json::Value {
    let status_url = format!("{}/status", server.admin);
    let mut status = get_json(&status_url).await;
    for _ in 0..600 {
        if status["outbox"]["pending"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        status = get_json(&status_url).await;
    }
    status
}

/// How many users the simulator holds, and those of them whose command has no audit record,
/// waiting a little for records still being written.
async fn delivered_without_audit(world: &World, server: &Server) -> (usize, Vec<String>) {
    let audit_url = format!("{}/admin/audit?limit=1000", server.admin);
    let mut delivered = Vec::new();
    let mut unaudited = Vec::new();
    for _ in 0..100 {
        delivered = world
            .subscribers()
            .iter()
            .filter_map(|s| s["userId"].as_str().map(str::to_owned))
            .collect::<Vec<_>>();
        let audited: Vec<String> = get_json(&audit_url)
            .await
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["kind"] == "command" && r["outbox_id"].is_u64())
            .filter_map(|r| r["user_id"].as_str().map(str::to_owned))
            .collect();
        unaudited = delivered
            .iter()
            .filter(|user| !audited.contains(user))
            .cloned()
            .collect();
        if unaudited.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (delivered.len(), unaudited)
}

async fn send_then_reset(tls: &TlsConnector, addr: SocketAddr, body: &str, patience: Duration) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut stream = tls.connect(name, tcp).await.unwrap();
    let request = format!(
        "POST /provisioning HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.flush().await.unwrap();
    tokio::time::sleep(patience).await;
    let (tcp, _) = stream.into_inner();
    socket2::SockRef::from(&tcp)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
}

/// `clients` ASes side by side, each sending `per_client` UserAdds one after the other (users
/// `{prefix}-{client}-{n}@acme.example`) and resetting each connection after `patience(client, n)`.
async fn hang_up_on_user_adds(
    world: &World,
    server: &Server,
    prefix: &'static str,
    clients: u64,
    per_client: u64,
    patience: fn(u64, u64) -> Duration,
) {
    let addr = server.running.provisioning_addrs[0];
    let tls = as_connector(world);
    let mut senders = Vec::new();
    for c in 0..clients {
        let tls = tls.clone();
        senders.push(tokio::spawn(async move {
            for n in 0..per_client {
                let user = format!("{prefix}-{c}-{n}@acme.example");
                let body = document(&user_add(&user, Some(&user)));
                send_then_reset(&tls, addr, &body, patience(c, n)).await;
            }
        }));
    }
    for sender in senders {
        sender.await.unwrap();
    }
}

/// An AS that gives up on a request after flowthrough stored its command: the command is
/// delivered all the same, not left pending until a restart.
async fn commands_whose_as_hangs_up_mid_request_are_still_delivered_and_audited(backend: Backend) {
    let world = World::on(SimOptions::default(), backend).await;
    let server = start(&world, "", "").await;
    const SENT: u64 = 240;
    // Given up at moments spread over the request's life in a debug build (mostly the
    // handshake's verification), the flush among them.
    hang_up_on_user_adds(&world, &server, "hangup", 4, SENT / 4, |c, n| {
        Duration::from_micros((n * 3331 + c * 711) % 200_000)
    })
    .await;

    let status = status_once_drained(&server).await;
    assert_eq!(
        status["outbox"]["pending"], 0,
        "every stored command is delivered though the AS hung up on each: {status}"
    );
    let (delivered, unaudited) = delivered_without_audit(&world, &server).await;
    assert!(
        delivered > 0 && (delivered as u64) < SENT,
        "some commands were stored, some requests cut before: {delivered} of {SENT} delivered"
    );
    assert!(
        unaudited.is_empty(),
        "{} of {delivered} delivered commands have no audit record, e.g. {:?}",
        unaudited.len(),
        unaudited.first()
    );
    eprintln!("{delivered} of {SENT} commands stored, delivered and audited");
    server.stop().await;
}

/// An AS that hangs up while Webex does not answer in time: the answer (7020 at the ack
/// deadline) has nobody to go to, but the command's audit record is written all the same.
async fn a_command_whose_as_hangs_up_while_webex_is_slow_is_audited(backend: Backend) {
    let world = World::on(SimOptions::default(), backend).await;
    // Each Webex call takes 1.5 s, past the test config's 1 s request timeout, so no attempt
    // ends in time; the AS gives up 0.3 s into its request, after flowthrough stored the
    // command. (With calls that succeed within the deadline the old handler finished before
    // actix dropped it; with these, 8 of 8 audit records were missing.)
    world.sim.control(json!({"latency_ms": 1500})).unwrap();
    let server = start(&world, "", "").await;
    const SENT: usize = 8;
    hang_up_on_user_adds(&world, &server, "gone", SENT as u64, 1, |_, _| {
        Duration::from_millis(300)
    })
    .await;
    let (delivered, unaudited) = delivered_without_audit(&world, &server).await;
    assert_eq!(
        delivered, SENT,
        "every command was stored and reached Webex before its AS hung up"
    );
    assert!(
        unaudited.is_empty(),
        "{} of {delivered} delivered commands have no audit record: {unaudited:?}",
        unaudited.len()
    );
    server.stop().await;
}

/// `/debug/stages` cuts each request into its stages on one clock: a Webex that takes 150 ms
/// shows in the Webex stage (not in the queue or the wait around it), a request answered without
/// Webex has no delivery stages, and clearing starts a new measurement.
async fn each_request_is_traced_stage_by_stage(backend: Backend) {
    let world = World::on(SimOptions::default(), backend).await;
    let server = start(&world, "", "").await;
    let client = world.as_client();
    let url = format!("{}/provisioning", server.base);
    let admin = reqwest::Client::new();
    let stages_url = format!("{}/debug/stages", server.admin);
    let summary = || async {
        let body = admin.get(&stages_url).send().await.unwrap();
        assert_eq!(body.status().as_u16(), 200);
        body.json::<serde_json::Value>().await.unwrap()
    };
    let stage = |summary: &serde_json::Value, name: &str| {
        summary["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["stage"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no stage {name} in {summary}"))
    };
    // Whatever start-up sent (nothing, today) is not part of the measurement.
    let cleared = admin.delete(&stages_url).send().await.unwrap();
    assert_eq!(cleared.status().as_u16(), 204);

    world.sim.control(json!({"latency_ms": 150})).unwrap();
    for n in 0..3 {
        let user = format!("traced{n}@acme.example");
        let (status, body) = post(&client, &url, document(&user_add(&user, Some(&user)))).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(only(&body).kind, "SuccessResponse", "{body}");
    }
    world.sim.control(json!({"latency_ms": 0})).unwrap();
    // Answered without a Webex call: a group is only recorded.
    let (status, body) = post(&client, &url, sample("group-add.xml")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(only(&body).kind, "SuccessResponse", "{body}");

    let traced = summary().await;
    assert_eq!(traced["requests"], 4, "{traced}");
    assert_eq!(traced["tail_requests"], 1, "{traced}");
    let webex = stage(&traced, "webex");
    assert_eq!(webex["count"], 3, "{traced}");
    let webex_p50 = webex["p50_us"].as_u64().unwrap();
    assert!(
        webex_p50 >= 150_000,
        "the simulator's 150 ms is not in the webex stage: {traced}"
    );
    // The slowest request waited for Webex: its Webex stage is most of its total.
    let tail_webex = webex["tail_mean_us"].as_u64().unwrap();
    assert!(tail_webex >= 150_000, "{traced}");
    let total_max = traced["total"]["max_us"].as_u64().unwrap();
    let others: u64 = traced["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["stage"] != "webex")
        .filter_map(|s| s["tail_mean_us"].as_u64())
        .sum();
    // Each stage is rounded down to a microsecond: eleven stages lose less than 11 µs.
    let unaccounted = total_max
        .checked_sub(others + tail_webex)
        .unwrap_or_else(|| panic!("the stages add up to more than the total: {traced}"));
    assert!(
        unaccounted < 11,
        "the tail request's stages do not add up to its total ({unaccounted} µs apart): {traced}"
    );
    for name in ["parse", "map", "accept", "flush", "audit", "reply"] {
        assert_eq!(stage(&traced, name)["count"], 4, "{name}: {traced}");
    }
    for name in ["queue", "claim", "notify", "wake"] {
        assert_eq!(stage(&traced, name)["count"], 3, "{name}: {traced}");
    }

    let cleared = admin.delete(&stages_url).send().await.unwrap();
    assert_eq!(cleared.status().as_u16(), 204);
    let empty = summary().await;
    assert_eq!(empty["requests"], 0, "{empty}");
    assert_eq!(empty["total"]["p99_us"], serde_json::Value::Null, "{empty}");
    server.stop().await;
}

/// A live command starts on its request's thread (`Engine::reserve_here`); SIGTERM stops those
/// threads, and lets the deliveries under way there end first rather than drop them half done:
/// commands answered 7020 while Webex is slow are delivered, and stored as delivered, by the
/// time `serve` exits, so the next start has nothing to send again.
async fn sigterm_lets_the_deliveries_on_request_threads_end(backend: Backend) {
    let world = World::on(SimOptions::default(), backend).await;
    let served = serve_config(&world, "ack_deadline_ms = 100");
    let mut child = spawn(&served.config, "warn", std::process::Stdio::inherit());
    wait_ready(&served.admin).await;
    world.sim.control(json!({"latency_ms": 800})).unwrap();
    let client = world.as_client();
    let users: Vec<String> = (0..4).map(|i| format!("drain{i}@acme.example")).collect();
    for user in &users {
        let (status, body) =
            post(&client, &served.url, document(&user_add(user, Some(user)))).await;
        assert_eq!((status, only(&body).code), (200, Some(7020)), "{body}");
    }
    let status = get_json(&format!("http://{}/status", served.admin)).await;
    assert_ne!(
        status["outbox"]["pending"], 0,
        "deliveries are under way at the SIGTERM: {status}"
    );
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let exited = child.wait().unwrap();
    assert_eq!(exited.code(), Some(0), "SIGTERM drains and exits 0");
    for user in &users {
        assert!(world.subscriber(user).is_some(), "{user} was not delivered");
    }
    let store = flowthrough::store::Store::open_configured(&world.config("", "").store)
        .await
        .unwrap();
    let pending = store
        .list(flowthrough::store::Filter::Pending, 10)
        .await
        .unwrap();
    assert!(
        pending.is_empty(),
        "left pending, to be sent again: {pending:?}"
    );
}
