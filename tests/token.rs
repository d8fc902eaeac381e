//! `flowthrough token status|set` through the binary, against a tempdir store and the simulator.

use assert_cmd::Command;
use flowthrough::sim::{SimHandle, SimOptions, Simulator};
use std::path::Path;

fn write_config(dir: &Path, sim: &SimHandle) -> std::path::PathBuf {
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &sim.ca_pem).unwrap();
    let cfg = dir.join("flowthrough.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[store]
path = "{}"

[webex]
api_base = "{}"
token_url = "{}/access_token"
ca_bundle = "{}"
client_id = "{}"
"#,
            dir.join("store").display(),
            sim.base_url,
            sim.base_url,
            ca.display(),
            sim.client_id
        ),
    )
    .unwrap();
    cfg
}

fn token_cmd(cfg: &Path, sim: &SimHandle, args: &[&str]) -> Command {
    let mut cmd = Command::cargo_bin("flowthrough").unwrap();
    cmd.arg("token")
        .arg(args[0])
        .arg("--config")
        .arg(cfg)
        .args(&args[1..])
        .env("FLOWTHROUGH_CLIENT_SECRET", sim.client_secret.expose())
        .env_remove("FLOWTHROUGH_REFRESH_TOKEN");
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_set_and_status_via_the_binary() {
    let sim = Simulator::start(SimOptions::default()).await.unwrap();
    sim.control(serde_json::json!({"rotate_refresh_token": true}))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &sim);
    let good = dir.path().join("good");
    std::fs::write(&good, format!("{}\n", sim.refresh_token.expose())).unwrap();
    let bad = dir.path().join("bad");
    std::fs::write(&bad, "not-a-token-the-simulator-issued").unwrap();
    let secret = sim.client_secret.expose().to_owned();
    let refresh = sim.refresh_token.expose().to_owned();

    let empty = token_cmd(&cfg, &sim, &["status", "--json"]);
    let out = tokio::task::spawn_blocking(move || {
        let mut empty = empty;
        empty.output().unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["state"]["state"], "credentials_invalid",
        "empty store: {v}"
    );

    let mut bad_set = token_cmd(&cfg, &sim, &["set", "--file"]);
    bad_set.arg(&bad);
    let out = tokio::task::spawn_blocking(move || bad_set.output().unwrap())
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not installed") && err.contains("invalid_grant"),
        "{err}"
    );

    let mut set = token_cmd(&cfg, &sim, &["set"]);
    set.write_stdin(std::fs::read(&good).unwrap());
    let out = tokio::task::spawn_blocking(move || set.output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sim.counter("refreshes"), 2);

    let status = token_cmd(&cfg, &sim, &["status", "--json"]);
    let out = tokio::task::spawn_blocking(move || {
        let mut status = status;
        status.output().unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"]["state"], "ok");
    assert!(v["access_expires_at"].as_i64().unwrap() > chrono::Utc::now().timestamp());
    assert!(v["refresh_expires_at"].as_i64().is_some());
    assert!(v["last_refresh"].as_i64().is_some());
    assert_eq!(v["refresh_expiring_soon"], false);

    let text = token_cmd(&cfg, &sim, &["status"]);
    let out = tokio::task::spawn_blocking(move || {
        let mut text = text;
        text.output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.contains("state:                 ok"), "{stdout}");
    for s in [&secret, &refresh] {
        assert!(!stdout.contains(s.as_str()));
    }
    sim.stop().await;
}
