//! The operator commands through the real binary: `sandbox --demo`, `doctor`, `outbox` against a
//! stopped store and against a running server, and `serve`'s signals (SIGHUP reloads, SIGTERM
//! drains and exits 0).

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use flowthrough::sim::SimOptions;
use flowthrough::store::{Call, EntryState, NewEntry, Origin, Store};

#[test]
fn sandbox_demo_sends_every_sample_and_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = dir.path().join("sbx");
    let (code, stdout, stderr) = flowthrough(&[
        "sandbox",
        "--demo",
        "--dir",
        path(&sandbox),
        "--port",
        "0",
        "--admin-port",
        "0",
        "--tunnel-port",
        "0",
    ]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("SIMULATOR"),
        "the simulator is named as such: {stdout}"
    );
    assert!(
        stdout.contains("curl --cacert"),
        "a ready-to-paste curl line: {stdout}"
    );
    for command in [
        "UserAddRequest17sp4",
        "UserModifyRequest22",
        "UserServiceUnassignListRequest",
        "UserDeleteRequest",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.contains(command))
            .unwrap_or_else(|| panic!("{command} missing: {stdout}"));
        assert!(line.ends_with("SuccessResponse"), "{line}");
    }
    assert!(sandbox.join("pki/client.pem").exists() && sandbox.join("flowthrough.toml").exists());
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(sandbox.join("pki/client.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_passes_a_good_deployment_and_names_the_fix_for_a_bad_one() {
    let world = World::new(SimOptions::default()).await;
    let config = world.path("flowthrough.toml");
    std::fs::write(&config, world.config_text("", "")).unwrap();
    let cfg = path(&config).to_owned();
    let (code, stdout, stderr) =
        tokio::task::spawn_blocking(move || flowthrough(&["doctor", "--config", &cfg]))
            .await
            .unwrap();
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("✓ server name"), "{stdout}");
    assert!(
        !world.path("store").exists(),
        "a check changes nothing: doctor does not create the store"
    );
    assert!(
        stdout.contains("✓ Webex token: none stored yet"),
        "{stdout}"
    );
    assert!(
        stdout.contains(" store volume: ") && stdout.contains(" GiB free of "),
        "{stdout}"
    );
    assert!(
        stdout.contains("✓ Webex API reachable"),
        "the simulator answered over verified TLS: {stdout}"
    );

    // A world-readable key and a public name missing from the certificate: each ✗ with its fix.
    std::fs::set_permissions(
        &world.pki.server_key,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let text = world.config_text("", "").replace(
        "public_name = \"localhost\"",
        "public_name = \"prov.example.net\"",
    );
    std::fs::write(&config, text).unwrap();
    let cfg = path(&config).to_owned();
    let (code, stdout, _) = tokio::task::spawn_blocking(move || {
        flowthrough(&["doctor", "--config", &cfg, "--offline"])
    })
    .await
    .unwrap();
    assert_eq!(code, 2, "{stdout}");
    assert!(
        stdout.contains("✗ private key permissions") && stdout.contains("chmod 600"),
        "{stdout}"
    );
    assert!(
        stdout.contains("✗ server name") && stdout.contains("--dns prov.example.net"),
        "{stdout}"
    );

    // A config that does not load: exit 1.
    std::fs::write(&config, "nonsense = [").unwrap();
    let (code, stdout, _) = flowthrough(&["doctor", "--config", path(&config)]);
    assert_eq!(code, 1);
    assert!(stdout.contains("✗ config"), "{stdout}");
}

fn entry(user: &str) -> NewEntry {
    NewEntry {
        user_id: user.to_owned(),
        template: "acme".to_owned(),
        command: "UserDeleteRequest".to_owned(),
        call: Call::Remove,
        client: "test".to_owned(),
        origin: Origin::Live,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_commands_work_on_a_stopped_store_and_through_a_running_server() {
    let world = World::new(SimOptions::default()).await;
    let admin = format!("127.0.0.1:{}", free_port());
    let text = world.config_text("", "").replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        &format!("[admin]\nlisten = \"{admin}\""),
    );
    let config = world.path("flowthrough.toml");
    std::fs::write(&config, text).unwrap();
    let cfg = path(&config).to_owned();

    // A stopped instance: the store opened directly.
    let ids = {
        let store = Store::open(&world.path("store")).unwrap();
        let ids = store
            .enqueue(
                vec![entry("dead@acme.example"), entry("gone@acme.example")],
                flowthrough::store::now_ms(),
            )
            .await
            .unwrap();
        store
            .finish(
                ids[0],
                EntryState::Dead {
                    at_ms: 1,
                    reason: "HTTP 400: bad".into(),
                },
                None,
                None,
            )
            .await
            .unwrap();
        store.flush().await.unwrap();
        ids
    };
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            flowthrough(&refs)
        })
    };
    let args = |rest: &[&str]| -> Vec<String> {
        let mut v = vec!["outbox".to_owned(), "--config".to_owned(), cfg.clone()];
        v.extend(rest.iter().map(|s| s.to_string()));
        v
    };
    let (code, stdout, stderr) = run(args(&["list", "--dead", "--json"])).await.unwrap();
    assert_eq!(code, 0, "{stderr}");
    let dead: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(dead.as_array().unwrap().len(), 1);
    assert_eq!(dead[0]["user_id"], "dead@acme.example");
    let (code, stdout, _) = run(args(&["list"])).await.unwrap();
    assert_eq!(code, 0);
    assert!(
        stdout.contains("HTTP 400: bad") && stdout.contains("gone@acme.example"),
        "{stdout}"
    );
    let (code, _, stderr) = run(args(&["retry", &ids[1].to_string()])).await.unwrap();
    assert_eq!(code, 1, "a pending entry is not retried");
    assert!(stderr.contains("not dead"), "{stderr}");
    let (code, _, _) = run(args(&["drop", &ids[1].to_string()])).await.unwrap();
    assert_eq!(code, 0);
    let (code, _, stderr) = run(args(&["show", &ids[1].to_string()])).await.unwrap();
    assert_eq!(code, 1);
    assert!(stderr.contains("no outbox entry"), "{stderr}");

    // A running instance holds the store: the same commands go through its admin listener, and
    // the retried entry is delivered (a remove of an unknown user is a success).
    let mut child = Command::new(env!("CARGO_BIN_EXE_flowthrough"))
        .args(["serve", "--config", &cfg])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(30), || std::net::TcpStream::connect(
            &admin
        )
        .is_ok())
        .await
    );
    let (code, stdout, stderr) = run(args(&["retry", "--dead"])).await.unwrap();
    assert_eq!(code, 0, "{stdout}{stderr}");
    let mut delivered = false;
    for _ in 0..100 {
        let (_, stdout, _) = run(args(&["show", &ids[0].to_string()])).await.unwrap();
        if stdout.contains("\"delivered\"") {
            delivered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(delivered, "the retried entry is delivered");
    let (code, stdout, stderr) = run(args(&["audit", "--user", "dead@acme.example"]))
        .await
        .unwrap();
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("UserDeleteRequest") && stdout.contains("delivered"),
        "{stdout}"
    );

    // SIGHUP reloads (counted), SIGTERM drains and exits 0.
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let reloaded = {
        let mut seen = false;
        for _ in 0..100 {
            let metrics = get_text(&format!("http://{admin}/metrics")).await;
            if metrics.contains("flowthrough_reloads_total{outcome=\"ok\"} 1") {
                seen = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        seen
    };
    assert!(reloaded, "SIGHUP reloads the certificates");
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM drains and exits 0");
}
