//! `flowthrough translate` on the shared samples, through the real binary: the JSON of SPEC §9, the
//! text output and the exit codes. Expected values come from reading SPEC §2–§4 and §9.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn sample(name: &str) -> PathBuf {
    root().join("schemas/samples").join(name)
}

fn config() -> PathBuf {
    root().join("deploy/flowthrough.example.toml")
}

fn translate(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_flowthrough"))
        .arg("translate")
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

fn translate_json(files: &[PathBuf], extra: &[&str]) -> (i32, Value) {
    let mut args: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    args.extend([
        "--config".to_owned(),
        config().display().to_string(),
        "--json".to_owned(),
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, stdout, stderr) = translate(&refs);
    (
        code,
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout} {stderr}")),
    )
}

const PROVISIONING_ID: &str = "ZjViMzYxODctYzhkZC00NzI3LThiMmYtZjljNDQ3ZjI5MDQ2OjQyODVmNTk0LTViNTEtNDdiZS05Mzk2LTZjMzZlMmFkODNhNQ";

#[test]
fn user_add_17sp4_becomes_the_post_of_spec_section_4() {
    let (code, out) = translate_json(&[sample("user-add-17sp4.xml")], &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out["template"], "acme");
    let c = &out["commands"][0];
    assert_eq!(c["index"], 0);
    assert_eq!(c["command"], "UserAddRequest17sp4");
    assert_eq!(c["userId"], "alice.smith@acme.example");
    assert_eq!(c["action"], "provision");
    assert_eq!(c["webex"]["method"], "POST");
    assert_eq!(c["webex"]["path"], "/broadworks/subscribers");
    assert_eq!(
        c["webex"]["body"],
        json!({
            "provisioningId": PROVISIONING_ID,
            "userId": "alice.smith@acme.example",
            // Enterprise mode: {serviceProviderId}.
            "spEnterpriseId": "acme-ent",
            "firstName": "Alice",
            "lastName": "Smith",
            "package": "standard",
            // A national number gets the template's calling code.
            "primaryPhoneNumber": "+12025550101",
            "extension": "0101",
            // Trusted-email template: sent.
            "email": "alice.smith@acme.example",
            // "English" → en → en_US with the template country US.
            "language": "en_US",
            "timezone": "America/New_York"
        })
    );
    assert_eq!(c["response"], json!({"type": "Success"}));
}

#[test]
fn french_without_a_us_locale_takes_the_sensible_default() {
    let (code, out) = translate_json(&[sample("user-add-22v2.xml")], &[]);
    assert_eq!(code, 0, "{out}");
    let body = &out["commands"][0]["webex"]["body"];
    assert_eq!(
        body["language"], "fr_FR",
        "fr + US is not supported: fr's default"
    );
    assert_eq!(
        body["mobilePhoneNumber"], "+1-514-555-0199",
        "a + number passes as is"
    );
    assert_eq!(body["extension"], "0102");
    assert_eq!(body["timezone"], "America/Montreal");
    assert!(body.get("primaryPhoneNumber").is_none());
    assert_eq!(out["commands"][0]["command"], "UserAddRequest22V2");
}

#[test]
fn a_modify_is_a_put_that_clears_the_phone_with_an_empty_string() {
    let (code, out) = translate_json(&[sample("user-modify-22.xml")], &["--template", "acme"]);
    assert_eq!(code, 0, "{out}");
    let c = &out["commands"][0];
    assert_eq!(c["action"], "update");
    assert_eq!(c["webex"]["method"], "PUT");
    assert_eq!(c["webex"]["path"], "/broadworks/subscribers/{id}");
    assert_eq!(
        c["webex"]["body"],
        json!({"lastName": "Smith-Lee", "primaryPhoneNumber": "", "extension": "0111"})
    );
}

#[test]
fn imp_assignment_uses_the_profile_seen_earlier_in_the_run_or_is_refused() {
    // Alone: the user was never seen → 7005, exit 2.
    let (code, out) = translate_json(&[sample("service-assign-impp.xml")], &[]);
    assert_eq!(code, 2);
    let c = &out["commands"][0];
    assert_eq!(c["action"], "reject");
    assert_eq!(c["webex"], Value::Null);
    assert_eq!(c["response"]["type"], "Error");
    assert_eq!(c["response"]["errorCode"], 7005);

    // After the add (and the modify) in the same run: provisioned from that profile.
    let files = [
        sample("user-add-17sp4.xml"),
        sample("user-modify-22.xml"),
        sample("service-assign-impp.xml"),
    ];
    let (code, out) = translate_json(&files, &[]);
    assert_eq!(code, 0, "{out}");
    let assign = &out[2]["commands"][0];
    assert_eq!(assign["action"], "provision");
    assert_eq!(assign["webex"]["body"]["lastName"], "Smith-Lee");
    assert!(
        assign["webex"]["body"].get("primaryPhoneNumber").is_none(),
        "cleared by the modify"
    );
}

#[test]
fn unassign_delete_and_group_add() {
    let files = [
        sample("service-unassign-impp.xml"),
        sample("user-delete.xml"),
        sample("group-add.xml"),
    ];
    let (code, out) = translate_json(&files, &["--template", "acme"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out[0]["commands"][0]["action"], "remove");
    assert_eq!(out[0]["commands"][0]["webex"]["method"], "DELETE");
    assert_eq!(out[1]["commands"][0]["action"], "remove");
    assert_eq!(
        out[1]["commands"][0]["webex"]["path"],
        "/broadworks/subscribers/{id}"
    );
    assert_eq!(out[2]["commands"][0]["action"], "record");
    assert_eq!(out[2]["commands"][0]["webex"], Value::Null);
}

#[test]
fn unsupported_commands_and_responses_are_rejected_with_exit_2() {
    let (code, out) = translate_json(&[sample("success-response.xml")], &[]);
    assert_eq!(code, 2);
    assert_eq!(out["commands"][0]["action"], "reject");
    assert_eq!(out["commands"][0]["response"]["errorCode"], 7002);
}

#[test]
fn text_output_names_the_call_and_the_answer() {
    let (code, stdout, _) = translate(&[
        &sample("user-add-17sp4.xml").display().to_string(),
        "--config",
        &config().display().to_string(),
    ]);
    assert_eq!(code, 0);
    assert!(stdout.contains("POST /broadworks/subscribers"), "{stdout}");
    assert!(
        stdout.contains("\"primaryPhoneNumber\": \"+12025550101\""),
        "{stdout}"
    );
    assert!(stdout.contains("AS gets: SuccessResponse"), "{stdout}");
}

#[test]
fn usage_and_io_errors_exit_1_with_a_specific_message() {
    let (code, _, stderr) = translate(&[
        "/nonexistent.xml",
        "--config",
        &config().display().to_string(),
    ]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("/nonexistent.xml") && stderr.contains("cannot read"),
        "{stderr}"
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[templates.x]\nprovisioning_id = 1\n").unwrap();
    let (code, _, stderr) = translate(&[
        &sample("user-delete.xml").display().to_string(),
        "--config",
        &bad.display().to_string(),
    ]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("bad.toml:2"),
        "the error names file and line: {stderr}"
    );

    let (code, _, _) = translate(&["--config"]);
    assert_eq!(code, 1, "clap usage errors exit 1, not 2");
}

#[test]
fn a_malformed_document_is_reported_with_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("doc.xml");
    std::fs::write(
        &doc,
        r#"<?xml version="1.0"?><BroadsoftDocument protocol="OCI" xmlns="C"><sessionId>s</sessionId><command><userId>u</userId></command></BroadsoftDocument>"#,
    )
    .unwrap();
    let (code, stdout, _) = translate(&[
        &doc.display().to_string(),
        "--config",
        &config().display().to_string(),
    ]);
    assert_eq!(code, 2);
    assert!(stdout.contains("line 1, column"), "{stdout}");
    assert!(stdout.contains("xsi:type"), "{stdout}");
}
