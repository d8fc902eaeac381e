//! The Webex API simulator over real HTTPS: Webex-like validation, bearer checks, control and state.

use flowthrough::sim::{SimHandle, SimOptions, Simulator};
use serde_json::json;

fn client(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap()
}

/// POST a control document to the simulator over HTTP; its answer's status.
/// The refresh grant with the simulator's own credentials.
fn refresh_form(sim: &SimHandle) -> [(&'static str, String); 4] {
    [
        ("grant_type", "refresh_token".to_owned()),
        ("client_id", sim.client_id.clone()),
        ("client_secret", sim.client_secret.expose().to_owned()),
        ("refresh_token", sim.refresh_token.expose().to_owned()),
    ]
}

async fn grant(
    http: &reqwest::Client,
    sim: &SimHandle,
    form: &[(&'static str, String); 4],
) -> serde_json::Value {
    http.post(format!("{}/access_token", sim.base_url))
        .form(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn control(http: &reqwest::Client, root: &str, body: serde_json::Value) -> u16 {
    let r = http
        .post(format!("{root}/_sim/control"))
        .json(&body)
        .send()
        .await
        .unwrap();
    r.status().as_u16()
}

/// The simulator's state document, over HTTP.
async fn sim_state(http: &reqwest::Client, root: &str) -> serde_json::Value {
    http.get(format!("{root}/_sim/state"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn validates_like_webex_and_exposes_control_and_state() {
    let sim = Simulator::start(SimOptions::default()).await.unwrap();
    let http = client(&sim.ca_pem);
    let subs = format!("{}/broadworks/subscribers", sim.base_url);
    let root = sim.base_url.trim_end_matches("/v1").to_owned();

    // No bearer token: 401 with a Webex error body.
    let r = http.get(&subs).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let b: serde_json::Value = r.json().await.unwrap();
    assert!(b["message"].is_string() && b["trackingId"].is_string());

    // The refresh grant, then a wrong secret.
    let form = refresh_form(&sim);
    let tok = grant(&http, &sim, &form).await;
    let access = tok["access_token"].as_str().unwrap().to_owned();
    assert!(tok["expires_in"].as_u64().unwrap() > 0);
    let mut wrong = form;
    wrong[2].1 = "wrong".to_owned();
    let r = http
        .post(format!("{}/access_token", sim.base_url))
        .form(&wrong)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let user = json!({"provisioningId": "p", "userId": "u1@example.com", "spEnterpriseId": "e",
        "firstName": "A", "lastName": "B", "package": "premium", "language": "en"});
    let created: serde_json::Value = http
        .post(&subs)
        .bearer_auth(&access)
        .json(&user)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    // Duplicate userId: 409 with 10022.
    let r = http
        .post(&subs)
        .bearer_auth(&access)
        .json(&user)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let b: serde_json::Value = r.json().await.unwrap();
    assert_eq!(b["errors"][0]["errorCode"], 10022);
    // Bad package: 400.
    let mut bad = user.clone();
    bad["package"] = json!("gold");
    bad["userId"] = json!("u2@example.com");
    let r = http
        .post(&subs)
        .bearer_auth(&access)
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // PUT refuses email and language.
    for field in ["email", "language"] {
        let r = http
            .put(format!("{subs}/{id}"))
            .bearer_auth(&access)
            .json(&json!({ field: "x" }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{field}");
    }
    let r = http
        .put(format!("{subs}/{id}"))
        .bearer_auth(&access)
        .json(&json!({"extension": "1234"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Control over HTTP, then the state document.
    assert_eq!(
        control(&http, &root, json!({"server_error_ratio": 1.0})).await,
        200
    );
    let r = http
        .get(format!("{subs}/{id}"))
        .bearer_auth(&access)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(control(&http, &root, json!({"no_such_knob": 1})).await, 400);
    let state = sim_state(&http, &root).await;
    let subscribers = state["subscribers"].as_array().unwrap();
    assert_eq!(subscribers.len(), 1);
    assert_eq!(subscribers[0]["userId"], "u1@example.com");
    assert_eq!(subscribers[0]["extension"], "1234");
    assert_eq!(subscribers[0]["language"], "en");
    assert_eq!(state["counters"]["sent_5xx"], 1);
    assert_eq!(state["counters"]["refreshes"], 2);

    // Expiring every token over HTTP: the token that worked is refused until refreshed.
    assert_eq!(
        control(&http, &root, json!({"server_error_ratio": 0.0})).await,
        200
    );
    let get = |token: String| http.get(format!("{subs}/{id}")).bearer_auth(token).send();
    assert_eq!(get(access.clone()).await.unwrap().status(), 200);
    let r = http
        .post(format!("{root}/_sim/expire_tokens"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(get(access.clone()).await.unwrap().status(), 401);
    let state = sim_state(&http, &root).await;
    assert_eq!(state["counters"]["tokens_expired"], 1);
    sim.stop().await;
}

#[tokio::test]
async fn several_listen_addresses_share_one_port() {
    let sim = Simulator::start(SimOptions {
        listen: vec![
            "127.0.0.2:0".parse().unwrap(),
            "127.0.0.3:0".parse().unwrap(),
        ],
        ..SimOptions::default()
    })
    .await
    .unwrap();
    assert_eq!(sim.addrs.len(), 2);
    assert_eq!(sim.addrs[0].port(), sim.addrs[1].port());
    let http = client(&sim.ca_pem);
    for addr in &sim.addrs {
        let r = http
            .get(format!("https://{addr}/_sim/state"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{addr}");
    }
    sim.stop().await;
}

/// With `record_calls`, each subscriber-API call is kept in the order its work was done, with
/// the userId it was about (from the body, the addressed subscriber — read before a remove
/// drops it — or the list's filter), its status and body; without, nothing is kept.
#[tokio::test]
async fn records_each_call_per_user_in_order_when_asked() {
    let sim = Simulator::start(SimOptions::default()).await.unwrap();
    let http = client(&sim.ca_pem);
    let subs = format!("{}/broadworks/subscribers", sim.base_url);
    let root = sim.base_url.trim_end_matches("/v1").to_owned();
    let tok = grant(&http, &sim, &refresh_form(&sim)).await;
    let access = tok["access_token"].as_str().unwrap().to_owned();
    let user = json!({"provisioningId": "p", "userId": "r1@example.com", "spEnterpriseId": "e",
        "firstName": "A", "lastName": "B", "package": "basic"});
    let post = || http.post(&subs).bearer_auth(&access).json(&user).send();
    assert_eq!(post().await.unwrap().status(), 200);
    assert!(sim.calls().is_empty(), "off by default");

    assert_eq!(
        control(&http, &root, json!({"record_calls": true})).await,
        200
    );
    assert_eq!(post().await.unwrap().status(), 409);
    let listed: serde_json::Value = http
        .get(format!("{subs}?userId=r1@example.com"))
        .bearer_auth(&access)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = listed["items"][0]["id"].as_str().unwrap().to_owned();
    let put = http
        .put(format!("{subs}/{id}"))
        .bearer_auth(&access)
        .json(&json!({"firstName": "C"}))
        .send();
    assert_eq!(put.await.unwrap().status(), 200);
    let delete = http
        .delete(format!("{subs}/{id}"))
        .bearer_auth(&access)
        .send();
    assert_eq!(delete.await.unwrap().status(), 204);
    let unknown = http
        .delete(format!("{subs}/{id}"))
        .bearer_auth(&access)
        .send();
    assert_eq!(unknown.await.unwrap().status(), 404);

    let calls = sim.calls();
    let seen: Vec<(&str, Option<&str>, u16, bool)> = calls
        .iter()
        .map(|c| (c.kind.as_str(), c.user_id.as_deref(), c.status, c.applied()))
        .collect();
    let r1 = Some("r1@example.com");
    assert_eq!(
        seen,
        [
            ("provision", r1, 409, false),
            ("list", r1, 200, false),
            ("update", r1, 200, true),
            ("remove", r1, 204, true),
            ("remove", None, 404, false),
        ]
    );
    assert_eq!(calls[2].body, json!({"firstName": "C"}));
    assert_eq!(calls[0].body["lastName"], "B");
    assert!(
        calls
            .windows(2)
            .all(|w| w[0].seq < w[1].seq && w[0].at_ms <= w[1].at_ms)
    );
    sim.stop().await;
}
