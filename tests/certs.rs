//! `flowthrough certs` as an operator runs it: the built binary in a temporary directory, and
//! interoperability with openssl in both directions.

use std::path::Path;
use std::process::{Command, Output};
use std::time::SystemTime;

use flowthrough::config::ClientPolicyConfig;
use flowthrough::tls;

fn flowthrough(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flowthrough"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

fn openssl(dir: &Path, args: &[&str]) -> Output {
    match Command::new("openssl").current_dir(dir).args(args).output() {
        Ok(out) => out,
        Err(e) => {
            panic!("cannot run openssl ({e}): install openssl (e.g. apt-get install openssl)")
        }
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[track_caller]
fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn inspect_labels(dir: &Path, file: &str) -> Vec<String> {
    let json: serde_json::Value =
        serde_json::from_str(&ok(flowthrough(dir, &["certs", "inspect", "--json", file]))).unwrap();
    json[0]["certificates"][0]["policy_refusals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["label"].as_str().unwrap().to_owned())
        .collect()
}

fn verify_labels(dir: &Path, args: &[&str]) -> (i32, Vec<String>) {
    let mut all = vec!["certs", "verify"];
    all.extend_from_slice(args);
    let out = flowthrough(dir, &all);
    let labels = stdout(&out)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- ["))
        .map(|l| l.split(']').next().unwrap().to_owned())
        .collect();
    (out.status.code().unwrap(), labels)
}

#[test]
fn ca_server_client_csr_crl_with_openssl_agreeing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    // CA: files listed, key private, never overwritten without --force.
    let out = ok(flowthrough(
        dir,
        &["certs", "ca", "--cn", "Test Internal CA", "--pathlen", "0"],
    ));
    assert!(
        out.contains("certs/ca.pem") && out.contains("certs/ca.key"),
        "{out}"
    );
    #[cfg(unix)]
    assert_eq!(mode(&dir.join("certs/ca.key")), 0o600);
    let ca_before = std::fs::read(dir.join("certs/ca.pem")).unwrap();
    let again = flowthrough(dir, &["certs", "ca", "--cn", "Other"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        stderr(&again).contains("certs/ca.pem") && stderr(&again).contains("--force"),
        "{}",
        stderr(&again)
    );
    assert_eq!(std::fs::read(dir.join("certs/ca.pem")).unwrap(), ca_before);
    ok(flowthrough(
        dir,
        &["certs", "ca", "--cn", "Test Internal CA", "--force"],
    ));
    assert_ne!(std::fs::read(dir.join("certs/ca.pem")).unwrap(), ca_before);

    let text = ok(openssl(
        dir,
        &["x509", "-in", "certs/ca.pem", "-noout", "-text"],
    ));
    assert!(text.contains("CA:TRUE"), "{text}");
    assert!(text.contains("pathlen:1"), "{text}");
    assert!(text.contains("Certificate Sign, CRL Sign"), "{text}");

    // Server and client certificates.
    ok(flowthrough(
        dir,
        &[
            "certs",
            "server",
            "--ca",
            "certs",
            "--dns",
            "prov.dmz.example.net",
            "localhost",
            "--ip",
            "127.0.0.1",
        ],
    ));
    let out = ok(flowthrough(dir, &["certs", "client", "--ca", "certs"]));
    assert!(out.contains("certs/client.pem") && out.contains("certs/client.key"));
    #[cfg(unix)]
    {
        assert_eq!(mode(&dir.join("certs/server.key")), 0o600);
        assert_eq!(mode(&dir.join("certs/client.key")), 0o600);
    }
    for cert in ["certs/server.pem", "certs/client.pem"] {
        let out = ok(openssl(dir, &["verify", "-CAfile", "certs/ca.pem", cert]));
        assert!(out.contains(": OK"), "{out}");
    }
    let text = ok(openssl(
        dir,
        &["x509", "-in", "certs/client.pem", "-noout", "-text"],
    ));
    assert!(text.contains("1.3.6.1.4.1.6431.1.1.8.2.1.3"), "{text}");
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    assert!(
        text.contains("Subject: CN = bwcticlient.webex.com"),
        "{text}"
    );
    assert!(!text.contains("Subject Alternative Name"), "{text}");
    let text = ok(openssl(
        dir,
        &["x509", "-in", "certs/server.pem", "-noout", "-text"],
    ));
    assert!(
        text.contains("DNS:prov.dmz.example.net, DNS:localhost, IP Address:127.0.0.1"),
        "{text}"
    );
    assert!(text.contains("TLS Web Server Authentication"), "{text}");

    // inspect: human and JSON.
    let out = ok(flowthrough(dir, &["certs", "inspect", "certs/client.pem"]));
    assert!(
        out.contains("BroadWorks client (1.3.6.1.4.1.6431.1.1.8.2.1.3)"),
        "{out}"
    );
    assert!(out.contains("BroadWorks client policy: PASS"), "{out}");
    assert!(out.contains("ECDSA P-256"), "{out}");
    let out = ok(flowthrough(dir, &["certs", "inspect", "certs/server.pem"]));
    assert!(
        out.contains("SAN:       DNS:prov.dmz.example.net, DNS:localhost, IP:127.0.0.1"),
        "{out}"
    );
    assert_eq!(
        inspect_labels(dir, "certs/server.pem"),
        [
            "missing_broadworks_oid",
            "missing_client_auth",
            "san_present",
            "common_name_not_allowed"
        ]
    );
    let der = ok(openssl(
        dir,
        &[
            "x509",
            "-in",
            "certs/client.pem",
            "-outform",
            "DER",
            "-out",
            "client.der",
        ],
    ));
    assert!(der.is_empty());
    assert!(inspect_labels(dir, "client.der").is_empty());
    let bad = flowthrough(dir, &["certs", "inspect", "certs/ca.key.missing"]);
    assert_eq!(bad.status.code(), Some(1));

    // verify: 0 pass, 2 policy failure with every reason, 1 usage/I/O.
    assert_eq!(
        verify_labels(dir, &["--ca", "certs/ca.pem", "certs/client.pem"]),
        (0, vec![])
    );
    let (code, labels) = verify_labels(dir, &["--ca", "certs/ca.pem", "certs/server.pem"]);
    assert_eq!(code, 2);
    assert_eq!(
        labels,
        [
            "missing_broadworks_oid",
            "missing_client_auth",
            "san_present",
            "common_name_not_allowed"
        ]
    );
    let (code, _) = verify_labels(
        dir,
        &[
            "--ca",
            "certs/ca.pem",
            "--allow-san",
            "--no-broadworks-oid",
            "--no-client-auth",
            "--cn",
            "prov.dmz.example.net",
            "certs/server.pem",
        ],
    );
    assert_eq!(code, 0);
    assert_eq!(
        verify_labels(dir, &["--ca", "nope.pem", "certs/client.pem"]).0,
        1
    );
    assert_eq!(
        verify_labels(dir, &["--ca", "certs/ca.pem", "certs/server.key"]).0,
        1
    );

    // CRL: revoke the client certificate; verify and openssl both see it.
    let serial = {
        let json: serde_json::Value = serde_json::from_str(&ok(flowthrough(
            dir,
            &["certs", "inspect", "--json", "certs/client.pem"],
        )))
        .unwrap();
        json[0]["certificates"][0]["serial"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    ok(flowthrough(
        dir,
        &["certs", "crl", "--ca", "certs", "--revoke", &serial],
    ));
    let (code, labels) = verify_labels(
        dir,
        &[
            "--ca",
            "certs/ca.pem",
            "--crl",
            "certs/crl.pem",
            "certs/client.pem",
        ],
    );
    assert_eq!((code, labels), (2, vec!["revoked".to_owned()]));
    let out = openssl(
        dir,
        &[
            "verify",
            "-crl_check",
            "-CRLfile",
            "certs/crl.pem",
            "-CAfile",
            "certs/ca.pem",
            "certs/client.pem",
        ],
    );
    assert!(!out.status.success());
    assert!(
        stdout(&out).contains("revoked") || stderr(&out).contains("revoked"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let text = ok(openssl(
        dir,
        &["crl", "-in", "certs/crl.pem", "-noout", "-text"],
    ));
    assert!(
        text.contains(&serial.replace(':', "").to_uppercase()),
        "{text}"
    );
    let crl_again = flowthrough(dir, &["certs", "crl", "--ca", "certs"]);
    assert_eq!(crl_again.status.code(), Some(1));
    assert!(stderr(&crl_again).contains("--force"));

    // RSA keys come from the rsa crate and work with openssl.
    ok(flowthrough(
        dir,
        &[
            "certs",
            "client",
            "--ca",
            "certs",
            "--name",
            "rsa-client",
            "--key-type",
            "rsa2048",
        ],
    ));
    let text = ok(openssl(
        dir,
        &["x509", "-in", "certs/rsa-client.pem", "-noout", "-text"],
    ));
    assert!(text.contains("Public-Key: (2048 bit)"), "{text}");
    assert!(
        ok(openssl(
            dir,
            &["verify", "-CAfile", "certs/ca.pem", "certs/rsa-client.pem"]
        ))
        .contains(": OK")
    );
    assert!(
        ok(openssl(
            dir,
            &["pkey", "-in", "certs/rsa-client.key", "-noout", "-text"]
        ))
        .contains("2048 bit")
    );

    // CSR for an external CA, requesting the BroadWorks EKU.
    let out = ok(flowthrough(
        dir,
        &[
            "certs",
            "csr",
            "--cn",
            "bwcticlient.webex.com",
            "--broadworks-client",
            "--out",
            "csr",
        ],
    ));
    assert!(
        out.contains("csr/client.csr") && out.contains("csr/client.key"),
        "{out}"
    );
    #[cfg(unix)]
    assert_eq!(mode(&dir.join("csr/client.key")), 0o600);
    let req = openssl(
        dir,
        &["req", "-in", "csr/client.csr", "-noout", "-text", "-verify"],
    );
    let text = format!("{}{}", stdout(&req), stderr(&req));
    assert!(req.status.success(), "{text}");
    assert!(text.contains("1.3.6.1.4.1.6431.1.1.8.2.1.3"), "{text}");
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    assert!(text.contains("CN = bwcticlient.webex.com"), "{text}");

    // Usage errors exit 1.
    assert_eq!(flowthrough(dir, &["certs", "ca"]).status.code(), Some(1));
    assert_eq!(
        flowthrough(
            dir,
            &[
                "certs",
                "ca",
                "--cn",
                "x",
                "--key-type",
                "dsa",
                "--out",
                "o"
            ]
        )
        .status
        .code(),
        Some(1)
    );
    assert_eq!(
        flowthrough(
            dir,
            &[
                "certs", "crl", "--ca", "certs", "--revoke", "xyz", "--out", "o2"
            ]
        )
        .status
        .code(),
        Some(1)
    );
}

/// Certificates made by openssl get the same verdict from `certs inspect`, `certs verify` and the
/// policy value the TLS server uses.
#[test]
fn openssl_made_certificates_get_the_same_verdicts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ok(openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=OpenSSL Test CA",
            "-days",
            "30",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    ));
    let cases = [
        (
            "good",
            "extendedKeyUsage = 1.3.6.1.4.1.6431.1.1.8.2.1.3, clientAuth\n",
            vec![],
        ),
        (
            "no-oid",
            "extendedKeyUsage = clientAuth\n",
            vec!["missing_broadworks_oid"],
        ),
        (
            "san",
            "extendedKeyUsage = 1.3.6.1.4.1.6431.1.1.8.2.1.3, clientAuth\nsubjectAltName = DNS:bwcticlient.webex.com\n",
            vec!["san_present"],
        ),
    ];
    let pki_section = format!(
        "certificate = {:?}\nprivate_key = {:?}\nclient_ca = {:?}\n",
        dir.join("good.pem").display().to_string(),
        dir.join("good.key").display().to_string(),
        dir.join("ca.pem").display().to_string()
    );
    for (name, ext, _) in &cases {
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        ok(openssl(
            dir,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                "/CN=bwcticlient.webex.com",
            ],
        ));
        ok(openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "30",
                "-out",
                &format!("{name}.pem"),
                "-extfile",
                &format!("{name}.ext"),
            ],
        ));
    }
    // The TLS server's own policy value, built from files the way `serve` builds it.
    let section: flowthrough::config::ServerConfig = toml::from_str(&pki_section).unwrap();
    let loaded = tls::server_config(
        &section,
        &ClientPolicyConfig::default(),
        std::sync::Arc::new(|_: &tls::Refusal| {}),
    )
    .unwrap();
    for (name, _, expected) in &cases {
        let file = format!("{name}.pem");
        assert_eq!(inspect_labels(dir, &file), *expected, "inspect {name}");
        let (code, labels) = verify_labels(dir, &["--ca", "ca.pem", &file]);
        assert_eq!(labels, *expected, "verify {name}");
        assert_eq!(code, if expected.is_empty() { 0 } else { 2 });
        let chain = tls::read_cert_file(&dir.join(&file)).unwrap();
        let server_labels: Vec<&str> = match loaded.policy.check(&chain, SystemTime::now()) {
            Ok(_) => vec![],
            Err(refusals) => refusals.iter().map(tls::Refusal::label).collect(),
        };
        assert_eq!(server_labels, *expected, "TLS policy {name}");
    }
}
