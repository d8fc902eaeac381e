//! OCI-P documents end to end: every sample parses to the value SPEC §2 gives it, hostile and
//! broken input is refused with a typed, positioned error, and what flowthrough writes is valid
//! against `schemas/flowthrough-oci.xsd` (checked with xmllint).

use std::path::{Path, PathBuf};
use std::process::Command as Process;

use flowthrough::oci::{
    Change, Command, Document, ErrorClass, ErrorResponse, ParseError, ParseErrorKind, ParseLimits,
    Request, ResponseCommand, Session, Severity, UserChanges, UserProfile, parse, redacted_excerpt,
    write,
};

const SESSION: &str = "b7e3a2c4-0f1d-4c55-9b7e-1a2b3c4d5e6f";
const HEAD: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<BroadsoftDocument xmlns="C" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" protocol="OCI"><sessionId xmlns="">s-1</sessionId>"#;

fn samples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/samples")
}

fn sample(name: &str) -> Vec<u8> {
    std::fs::read(samples_dir().join(name)).unwrap()
}

fn ok(bytes: &[u8]) -> Document {
    match parse(bytes, &ParseLimits::default()) {
        Ok(d) => d,
        Err(e) => panic!("{e}\n{}", String::from_utf8_lossy(bytes)),
    }
}

fn err(bytes: &[u8]) -> ParseError {
    match parse(bytes, &ParseLimits::default()) {
        Ok(d) => panic!("parsed: {d:?}"),
        Err(e) => e,
    }
}

/// A UTF-8 document with the test session and the given commands' XML.
fn doc(commands: &str) -> Vec<u8> {
    format!("{HEAD}{commands}</BroadsoftDocument>").into_bytes()
}

fn one(command: &str) -> Request {
    let mut d = ok(&doc(command));
    assert_eq!(d.commands.len(), 1);
    d.commands.remove(0)
}

fn session() -> Session {
    Session::SessionId(SESSION.to_owned())
}

fn req(name: &str, echo: Option<&str>, command: Command) -> Request {
    Request {
        name: name.to_owned(),
        echo: echo.map(str::to_owned),
        command,
    }
}

fn s(v: &str) -> String {
    v.to_owned()
}

#[test]
fn every_sample_parses_to_what_the_spec_says() {
    let alice = UserProfile {
        service_provider_id: s("acme-ent"),
        group_id: s("acme-hq"),
        user_id: s("alice.smith@acme.example"),
        first_name: s("Alice"),
        last_name: s("Smith"),
        phone_number: Some(s("2025550101")),
        extension: Some(s("0101")),
        mobile_phone_number: None,
        email_address: Some(s("alice.smith@acme.example")),
        language: Some(s("English")),
        time_zone: Some(s("America/New_York")),
        alternate_user_id: None,
        is_enterprise: None,
    };
    let bob = UserProfile {
        service_provider_id: s("acme-ent"),
        group_id: s("acme-hq"),
        user_id: s("bob.jones@acme.example"),
        first_name: s("Bob"),
        last_name: s("Jones"),
        phone_number: None,
        extension: Some(s("0102")),
        mobile_phone_number: Some(s("+1-514-555-0199")),
        email_address: Some(s("bob.jones@acme.example")),
        language: Some(s("French")),
        time_zone: Some(s("America/Montreal")),
        alternate_user_id: None,
        is_enterprise: None,
    };
    let juergen = UserProfile {
        service_provider_id: s("acme-ent"),
        group_id: s("acme-hq"),
        user_id: s("juergen.mueller@acme.example"),
        first_name: s("Jürgen"),
        last_name: s("Müller"),
        phone_number: Some(s("2025550102")),
        extension: None,
        mobile_phone_number: None,
        email_address: Some(s("juergen.mueller@acme.example")),
        language: Some(s("German")),
        time_zone: Some(s("Europe/Berlin")),
        alternate_user_id: None,
        is_enterprise: None,
    };
    let zoe = UserProfile {
        service_provider_id: s("acme-ent"),
        group_id: s("acme-hq"),
        user_id: s("zoe.mueller@acme.example"),
        first_name: s("Zoë"),
        last_name: s("Müller"),
        phone_number: None,
        extension: None,
        mobile_phone_number: Some(s("+49-30-5550199")),
        email_address: Some(s("zoe.mueller@acme.example")),
        language: None,
        time_zone: None,
        alternate_user_id: Some(s("zoe@legacy.example")),
        is_enterprise: Some(true),
    };
    let cases: Vec<(&str, Vec<Request>)> = vec![
        (
            "error-response.xml",
            vec![req("ErrorResponse", Some(""), Command::Unsupported)],
        ),
        (
            "success-response.xml",
            vec![req("SuccessResponse", Some(""), Command::Unsupported)],
        ),
        (
            "group-add.xml",
            vec![req(
                "GroupAddRequest",
                None,
                Command::GroupAdd {
                    service_provider_id: s("acme-ent"),
                    group_id: s("acme-hq"),
                    group_name: Some(s("Acme HQ")),
                },
            )],
        ),
        (
            "service-assign-impp.xml",
            vec![req(
                "UserServiceAssignListRequest",
                None,
                Command::ServiceAssign {
                    user_id: s("alice.smith@acme.example"),
                    services: vec![s("Integrated IM&P"), s("Call Forwarding Always")],
                },
            )],
        ),
        (
            "service-unassign-impp.xml",
            vec![req(
                "UserServiceUnassignListRequest",
                None,
                Command::ServiceUnassign {
                    user_id: s("alice.smith@acme.example"),
                    services: vec![s("Integrated IM&P")],
                },
            )],
        ),
        (
            "user-add-17sp4.xml",
            vec![req("UserAddRequest17sp4", None, Command::UserAdd(alice))],
        ),
        (
            "user-add-22v2.xml",
            vec![req("UserAddRequest22V2", None, Command::UserAdd(bob))],
        ),
        (
            "user-delete.xml",
            vec![req(
                "UserDeleteRequest",
                None,
                Command::UserDelete {
                    user_id: s("bob.jones@acme.example"),
                },
            )],
        ),
        (
            "user-modify-22.xml",
            vec![req(
                "UserModifyRequest22",
                None,
                Command::UserModify(UserChanges {
                    user_id: s("alice.smith@acme.example"),
                    last_name: Change::Set(s("Smith-Lee")),
                    phone_number: Change::Clear,
                    extension: Change::Set(s("0111")),
                    ..UserChanges::default()
                }),
            )],
        ),
        (
            "user-modify-nil.xml",
            vec![req(
                "UserModifyRequest17sp4",
                None,
                Command::UserModify(UserChanges {
                    user_id: s("alice.smith@acme.example"),
                    new_user_id: Change::Set(s("alice.lee@acme.example")),
                    first_name: Change::Set(s("Alicia")),
                    extension: Change::Clear,
                    language: Change::Set(s("Spanish")),
                    mobile_phone_number: Change::Clear,
                    email_address: Change::Clear,
                    ..UserChanges::default()
                }),
            )],
        ),
        (
            "user-add-latin1-mueller.xml",
            vec![req(
                "UserAddRequest17sp4",
                Some("add-1"),
                Command::UserAdd(juergen),
            )],
        ),
        (
            "user-add-utf8-mueller.xml",
            vec![req("UserAddRequest22V2", None, Command::UserAdd(zoe))],
        ),
        (
            "impp-modify.xml",
            vec![
                req(
                    "UserIntegratedIMPModifyRequest",
                    Some("imp"),
                    Command::IntegratedImpModify {
                        user_id: s("alice.smith@acme.example"),
                        is_active: Some(true),
                    },
                ),
                req(
                    "UserIntegratedIMPModifyRequest",
                    None,
                    Command::IntegratedImpModify {
                        user_id: s("bob.jones@acme.example"),
                        is_active: Some(false),
                    },
                ),
            ],
        ),
        (
            "sp-add-enterprise.xml",
            vec![req(
                "ServiceProviderAddRequest13mp2",
                None,
                Command::ServiceProviderAdd {
                    service_provider_id: s("acme-ent"),
                    name: Some(s("Acme & Sons")),
                    is_enterprise: true,
                },
            )],
        ),
        (
            "group-delete.xml",
            vec![req(
                "GroupDeleteRequest",
                None,
                Command::GroupDelete {
                    service_provider_id: s("acme-ent"),
                    group_id: s("acme-hq"),
                },
            )],
        ),
        (
            "sp-delete.xml",
            vec![req(
                "ServiceProviderDeleteRequest",
                None,
                Command::ServiceProviderDelete {
                    service_provider_id: s("acme-ent"),
                },
            )],
        ),
    ];
    let mut names: Vec<String> = std::fs::read_dir(samples_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut covered: Vec<String> = cases.iter().map(|(n, _)| n.to_string()).collect();
    covered.sort();
    assert_eq!(
        names, covered,
        "every file in schemas/samples has an expected value here"
    );
    for (name, commands) in cases {
        assert_eq!(
            ok(&sample(name)),
            Document {
                session: session(),
                commands
            },
            "{name}"
        );
    }
}

#[test]
fn latin1_mueller_survives_the_round_trip() {
    let bytes = sample("user-add-latin1-mueller.xml");
    assert!(
        bytes.windows(6).any(|w| w == b"M\xFCller"),
        "the sample really is Latin-1"
    );
    let d = ok(&bytes);
    let Command::UserAdd(profile) = &d.commands[0].command else {
        panic!("{d:?}")
    };
    assert_eq!(profile.last_name, "Müller");

    // Back to the AS: the name travels in a response, as UTF-8.
    let out = write(
        &d.session,
        &[ResponseCommand::Error(ErrorResponse {
            echo: d.commands[0].echo.clone(),
            severity: Severity::Warning,
            code: 7021,
            summary: format!(
                "{} {} added; language not carried",
                profile.first_name, profile.last_name
            ),
            summary_english: "language not carried".to_owned(),
            detail: None,
        })],
    );
    assert!(out.windows(7).any(|w| w == "Müller".as_bytes()));
    assert!(!out.contains(&0xFC));

    // And forward again: the same user re-sent as UTF-8 parses to the same profile.
    let reencoded: String = bytes
        .iter()
        .map(|&b| char::from(b))
        .collect::<String>()
        .replace("ISO-8859-1", "UTF-8");
    let again = ok(reencoded.as_bytes());
    assert_eq!(again.commands[0].command, d.commands[0].command);
    let reparsed = ok(&out);
    assert_eq!(reparsed.session, d.session);
    assert_eq!(reparsed.commands[0].echo.as_deref(), Some("add-1"));
}

#[test]
fn prefixed_xsi_type_names_the_command() {
    let r = one(
        r#"<command xmlns="" xmlns:c="C" echo="7" xsi:type="c:UserDeleteRequest"><userId>u1</userId></command>"#,
    );
    assert_eq!(
        r,
        req(
            "UserDeleteRequest",
            Some("7"),
            Command::UserDelete { user_id: s("u1") }
        )
    );
    // Another prefix for the XSI namespace works too.
    let r = one(
        r#"<command xmlns="" xmlns:i="http://www.w3.org/2001/XMLSchema-instance" i:type="UserDeleteRequest"><userId>u2</userId></command>"#,
    );
    assert_eq!(r.command, Command::UserDelete { user_id: s("u2") });
}

#[test]
fn release_suffixes_match_and_lookalikes_do_not() {
    let body = "<serviceProviderId>sp</serviceProviderId><groupId>g</groupId><userId>u</userId><lastName>L</lastName><firstName>F</firstName>";
    for name in [
        "UserAddRequest",
        "UserAddRequest14sp9",
        "UserAddRequest17sp4",
        "UserAddRequest22",
        "UserAddRequest22V2",
    ] {
        let r = one(&format!(
            r#"<command xmlns="" xsi:type="{name}">{body}</command>"#
        ));
        assert!(matches!(r.command, Command::UserAdd(_)), "{name}: {r:?}");
        assert_eq!(r.name, name);
    }
    for name in [
        "UserAddRequestFoo",
        "UserAddRequest17sp",
        "UserAddRequestV2",
        "UserAddRequest22v2",
        "XUserAddRequest",
        "GroupDnGetListRequest",
    ] {
        let r = one(&format!(
            r#"<command xmlns="" xsi:type="{name}">{body}</command>"#
        ));
        assert_eq!(r.command, Command::Unsupported, "{name}");
    }
}

#[test]
fn nil_clears_on_modify_and_means_absent_on_add() {
    let r = one(
        r#"<command xmlns="" xsi:type="UserModifyRequest22"><userId>u</userId><emailAddress xsi:nil="true"/><language>French</language><phoneNumber></phoneNumber></command>"#,
    );
    let Command::UserModify(c) = r.command else {
        panic!()
    };
    assert_eq!(c.email_address, Change::Clear);
    assert_eq!(c.language, Change::Set(s("French")));
    assert_eq!(
        c.phone_number,
        Change::Clear,
        "an empty element blanks the field"
    );
    assert_eq!(c.first_name, Change::Absent);
    assert!(c.mobile_phone_number.is_absent());

    let r = one(
        r#"<command xmlns="" xsi:type="UserAddRequest17sp4"><serviceProviderId>sp</serviceProviderId><groupId>g</groupId><userId>u</userId><lastName>L</lastName><firstName>F</firstName><phoneNumber xsi:nil="true"/><emailAddress xsi:nil="false">a@b.example</emailAddress></command>"#,
    );
    let Command::UserAdd(p) = r.command else {
        panic!()
    };
    assert_eq!(p.phone_number, None);
    assert_eq!(p.email_address.as_deref(), Some("a@b.example"));
}

#[test]
fn entities_and_character_references_are_unescaped() {
    let r = one(
        r#"<command xmlns="" echo="a&amp;b&quot;" xsi:type="UserServiceAssignListRequest"><userId> M&#252;ller&#xE9;&lt;x&gt; </userId><serviceName>Integrated IM&amp;P</serviceName><serviceName><![CDATA[A&B <raw>]]></serviceName></command>"#,
    );
    assert_eq!(r.echo.as_deref(), Some("a&b\""));
    assert_eq!(
        r.command,
        Command::ServiceAssign {
            user_id: s("Mülleré<x>"),
            services: vec![s("Integrated IM&P"), s("A&B <raw>")]
        }
    );
}

#[test]
fn unknown_elements_are_skipped_however_deep() {
    let deep = "<x>".repeat(20) + "<userId>not-me</userId>" + &"</x>".repeat(20);
    let r = one(&format!(
        r#"<command xmlns="" xsi:type="UserDeleteRequest"><foo a="1">{deep}</foo><userId>real</userId><bar/></command>"#
    ));
    assert_eq!(r.command, Command::UserDelete { user_id: s("real") });
    // Unknown envelope children are skipped too.
    let d = ok(&doc(
        r#"<extra><command xsi:type="UserDeleteRequest"/></extra><command xmlns="" xsi:type="UserDeleteRequest"><userId>u</userId></command>"#,
    ));
    assert_eq!(d.commands.len(), 1);
}

#[test]
fn complex_alternate_user_id_takes_the_inner_id() {
    let base = r#"<serviceProviderId>sp</serviceProviderId><groupId>g</groupId><userId>u</userId><lastName>L</lastName><firstName>F</firstName>"#;
    for (alt, want) in [
        (
            "<alternateUserId><alternateUserId>alt1</alternateUserId><description>d</description></alternateUserId>",
            Some("alt1"),
        ),
        (
            "<alternateUserId><description>d</description><alternateUserId>alt2</alternateUserId></alternateUserId>",
            Some("alt2"),
        ),
        ("<alternateUserId>plain</alternateUserId>", Some("plain")),
        (
            "<alternateUserId><description>only</description></alternateUserId>",
            None,
        ),
    ] {
        let r = one(&format!(
            r#"<command xmlns="" xsi:type="UserAddRequest22V2">{base}{alt}</command>"#
        ));
        let Command::UserAdd(p) = r.command else {
            panic!("{alt}")
        };
        assert_eq!(p.alternate_user_id.as_deref(), want, "{alt}");
    }
}

#[test]
fn a_bad_command_is_invalid_and_the_others_still_parse() {
    let d = ok(&doc(concat!(
        r#"<command xmlns="" echo="1" xsi:type="UserAddRequest17sp4"><serviceProviderId>sp</serviceProviderId><groupId>g</groupId><lastName>L</lastName><firstName>F</firstName></command>"#,
        r#"<command xmlns="" echo="2" xsi:type="UserIntegratedIMPModifyRequest"><userId>u</userId><isActive>yes</isActive></command>"#,
        r#"<command xmlns="" echo="3" xsi:type="UserDeleteRequest"><userId>a</userId><userId>b</userId></command>"#,
        r#"<command xmlns="" echo="4" xsi:type="UserDeleteRequest"><userId>  </userId></command>"#,
        r#"<command xmlns="" echo="5" xsi:type="UserDeleteRequest"><userId>ok</userId></command>"#,
    )));
    let reasons: Vec<String> = d.commands[..4]
        .iter()
        .map(|r| match &r.command {
            Command::Invalid { reason } => reason.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(
        reasons[0].contains("`UserAddRequest17sp4` has no `userId`"),
        "{}",
        reasons[0]
    );
    assert!(
        reasons[1].contains("`isActive` is `yes`, not an XML boolean"),
        "{}",
        reasons[1]
    );
    assert!(
        reasons[2].contains("`userId` more than once"),
        "{}",
        reasons[2]
    );
    assert!(reasons[3].contains("has no `userId`"), "{}", reasons[3]);
    assert_eq!(
        d.commands[4].command,
        Command::UserDelete { user_id: s("ok") }
    );
    let echoes: Vec<_> = d
        .commands
        .iter()
        .map(|r| r.echo.as_deref().unwrap())
        .collect();
    assert_eq!(echoes, ["1", "2", "3", "4", "5"]);
}

#[test]
fn legacy_user_id_envelope() {
    let bytes = br#"<BroadsoftDocument xmlns="C" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" protocol="OCI"><userId xmlns="">admin</userId><command xmlns="" xsi:type="UserDeleteRequest"><userId>u</userId></command></BroadsoftDocument>"#;
    let d = ok(bytes);
    assert_eq!(d.session, Session::UserId(s("admin")));
    let out = String::from_utf8(write(
        &d.session,
        &[ResponseCommand::Success { echo: None }],
    ))
    .unwrap();
    assert!(out.contains(r#"<userId xmlns="">admin</userId>"#), "{out}");
}

fn kind(bytes: &[u8]) -> (ParseErrorKind, ErrorClass, Option<Session>) {
    let e = err(bytes);
    (e.kind().clone(), e.class(), e.session().cloned())
}

#[test]
fn more_than_fifteen_commands_are_refused() {
    let c = r#"<command xmlns="" xsi:type="UserDeleteRequest"><userId>u</userId></command>"#;
    assert_eq!(ok(&doc(&c.repeat(15))).commands.len(), 15);
    let (k, class, sess) = kind(&doc(&c.repeat(16)));
    assert!(
        matches!(k, ParseErrorKind::TooManyCommands { max: 15, .. }),
        "{k:?}"
    );
    assert_eq!(class, ErrorClass::Malformed);
    assert_eq!(sess, Some(Session::SessionId(s("s-1"))));
    assert!(k.to_string().contains("more than 15 commands"), "{k}");
}

#[test]
fn no_command_is_refused() {
    let (k, class, sess) = kind(&doc(""));
    assert!(matches!(k, ParseErrorKind::NoCommands { .. }), "{k:?}");
    assert_eq!(class, ErrorClass::Malformed);
    assert_eq!(sess, Some(Session::SessionId(s("s-1"))));
}

#[test]
fn missing_xsi_type_names_line_and_column() {
    let bytes = doc("\n  <command xmlns=\"\"><userId>u</userId></command>");
    let e = err(&bytes);
    assert_eq!(
        e.to_string().lines().next().unwrap().split(':').next(),
        Some("line 3, column 3"),
        "{e}"
    );
    assert!(
        e.to_string()
            .starts_with("line 3, column 3: `command` has no xsi:type"),
        "{e}"
    );
    assert_eq!(e.class(), ErrorClass::Malformed);
}

#[test]
fn doctype_xxe_and_billion_laughs_are_refused_unexpanded() {
    let xxe = br#"<?xml version="1.0"?>
<!DOCTYPE BroadsoftDocument [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<BroadsoftDocument xmlns="C" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" protocol="OCI"><sessionId xmlns="">&xxe;</sessionId><command xmlns="" xsi:type="UserDeleteRequest"><userId>u</userId></command></BroadsoftDocument>"#;
    let e = err(xxe);
    assert!(
        matches!(e.kind(), ParseErrorKind::DocType { at } if at.line == 2 && at.column == 1),
        "{e:?}"
    );
    assert_eq!(e.class(), ErrorClass::NotOci);
    assert!(
        !e.to_string().contains("root:"),
        "nothing was read from /etc/passwd"
    );

    let laughs = format!(
        "<?xml version=\"1.0\"?><!DOCTYPE lolz [<!ENTITY lol \"lol\">{}]><lolz>&lol9;</lolz>",
        (1..10)
            .map(|i| format!(
                "<!ENTITY lol{i} \"{}\">",
                format!("&lol{};", i - 1).repeat(10)
            ))
            .collect::<String>()
    );
    assert!(matches!(
        err(laughs.as_bytes()).kind(),
        ParseErrorKind::DocType { .. }
    ));

    // An entity reference without any DTD is an unknown entity, never a fetch.
    let (k, class, _) = kind(&doc(
        r#"<command xmlns="" xsi:type="UserDeleteRequest"><userId>&xxe;</userId></command>"#,
    ));
    assert!(
        matches!(&k, ParseErrorKind::UnknownEntity { name, .. } if name == "xxe"),
        "{k:?}"
    );
    assert_eq!(class, ErrorClass::Malformed);
}

#[test]
fn truncated_documents_are_malformed_with_the_session() {
    let full = sample("user-add-17sp4.xml");
    for cut in [full.len() - 1, full.len() - 20, full.len() / 2] {
        let e = err(&full[..cut]);
        assert_eq!(e.class(), ErrorClass::Malformed, "cut {cut}: {e}");
        assert_eq!(e.session(), Some(&session()), "cut {cut}");
    }
    let e = err(&full[..full.len() - 20]);
    assert!(
        matches!(
            e.kind(),
            ParseErrorKind::Truncated { .. } | ParseErrorKind::Syntax { .. }
        ),
        "{e:?}"
    );
    // Cut inside the prolog: not (yet) an OCI document.
    assert_eq!(err(&full[..30]).class(), ErrorClass::NotOci);
}

/// A document and the check its error kind must pass.
type Case = (&'static [u8], fn(&ParseErrorKind) -> bool);

#[test]
fn not_oci_documents_are_refused_as_such() {
    let cases: [Case; 8] = [
        (b"", |k| matches!(k, ParseErrorKind::Empty)),
        (b"   \n", |k| matches!(k, ParseErrorKind::Empty)),
        (b"hello, world", |k| matches!(k, ParseErrorKind::Syntax { .. })),
        (b"{\"json\": true}", |k| matches!(k, ParseErrorKind::Syntax { .. })),
        (br#"<Other xmlns="C" protocol="OCI"/>"#, |k| matches!(k, ParseErrorKind::WrongRoot { .. })),
        (
            br#"<BroadsoftDocument xmlns="urn:other" protocol="OCI"><sessionId>s</sessionId></BroadsoftDocument>"#,
            |k| matches!(k, ParseErrorKind::WrongRoot { namespace, .. } if namespace == "`urn:other`"),
        ),
        (br#"<BroadsoftDocument protocol="OCI"/>"#, |k| matches!(k, ParseErrorKind::WrongRoot { namespace, .. } if namespace == "none")),
        (br#"<BroadsoftDocument xmlns="C" protocol="NSOCI"/>"#, |k| matches!(k, ParseErrorKind::WrongProtocol { .. })),
    ];
    for (bytes, expected) in cases {
        let e = err(bytes);
        assert!(
            expected(e.kind()),
            "{}: {e:?}",
            String::from_utf8_lossy(bytes)
        );
        assert_eq!(e.class(), ErrorClass::NotOci, "{e}");
        assert_eq!(e.session(), None);
    }
    let e = err(br#"<BroadsoftDocument xmlns="C"/>"#);
    assert!(
        e.to_string().contains("protocol missing, expected `OCI`"),
        "{e}"
    );
}

#[test]
fn encodings_other_than_utf8_and_latin1_are_refused() {
    let e = err(b"<?xml version='1.0' encoding='Shift_JIS'?><BroadsoftDocument/>");
    assert!(
        e.to_string().contains("`Shift_JIS`") && e.to_string().contains("UTF-8 and ISO-8859-1"),
        "{e}"
    );
    assert_eq!(e.class(), ErrorClass::NotOci);
    let utf16: Vec<u8> = "\u{FEFF}<BroadsoftDocument/>"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    assert!(matches!(
        err(&utf16).kind(),
        ParseErrorKind::UnsupportedEncoding { .. }
    ));
    // Latin-1 bytes in a document that says UTF-8: positioned, and malformed once inside OCI.
    let bytes = doc(
        "<command xmlns=\"\" xsi:type=\"UserDeleteRequest\"><userId>M\u{1}ller</userId></command>",
    );
    let bytes: Vec<u8> = bytes
        .into_iter()
        .map(|b| if b == 1 { 0xFC } else { b })
        .collect();
    let e = err(&bytes);
    assert!(
        matches!(e.kind(), ParseErrorKind::InvalidBytes { encoding: "UTF-8", at } if at.line == 2),
        "{e:?}"
    );
    assert_eq!(e.class(), ErrorClass::Malformed);
    // A UTF-8 BOM is fine.
    let mut bom = b"\xEF\xBB\xBF".to_vec();
    bom.extend(sample("user-delete.xml"));
    assert_eq!(ok(&bom).commands.len(), 1);
}

#[test]
fn limits_are_enforced() {
    let limits = ParseLimits {
        max_bytes: 100,
        ..ParseLimits::default()
    };
    let e = parse(&sample("user-delete.xml"), &limits).unwrap_err();
    assert_eq!(e.class(), ErrorClass::TooLarge);
    assert!(matches!(
        e.kind(),
        ParseErrorKind::TooLarge { max: 100, .. }
    ));

    let deep = "<x>".repeat(40) + &"</x>".repeat(40);
    let (k, class, _) = kind(&doc(&format!(
        r#"<command xmlns="" xsi:type="UserDeleteRequest">{deep}</command>"#
    )));
    assert!(
        matches!(k, ParseErrorKind::TooDeep { max: 32, .. }),
        "{k:?}"
    );
    assert_eq!(class, ErrorClass::Malformed);

    let long = "a".repeat(ParseLimits::default().max_text_len + 1);
    let (k, _, _) = kind(&doc(&format!(
        r#"<command xmlns="" xsi:type="UserDeleteRequest"><userId>{long}</userId></command>"#
    )));
    assert!(matches!(k, ParseErrorKind::TextTooLong { .. }), "{k:?}");
    // Long text in an element nobody reads is not collected, so not limited beyond max_bytes.
    let d = ok(&doc(&format!(
        r#"<command xmlns="" xsi:type="UserDeleteRequest"><note>{long}</note><userId>u</userId></command>"#
    )));
    assert_eq!(
        d.commands[0].command,
        Command::UserDelete { user_id: s("u") }
    );
}

#[test]
fn content_outside_the_root_is_refused() {
    let mut bytes = sample("user-delete.xml");
    bytes.extend_from_slice(b"<again/>");
    assert!(matches!(
        err(&bytes).kind(),
        ParseErrorKind::TrailingContent { .. }
    ));
    let mut bytes = sample("user-delete.xml");
    bytes.extend_from_slice(b"\n<!-- a comment is fine -->\n");
    assert_eq!(ok(&bytes).commands.len(), 1);
}

#[test]
fn session_must_come_first_and_be_present() {
    let bytes = br#"<BroadsoftDocument xmlns="C" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" protocol="OCI"><command xmlns="" xsi:type="UserDeleteRequest"><userId>u</userId></command></BroadsoftDocument>"#;
    let e = err(bytes);
    assert!(
        matches!(e.kind(), ParseErrorKind::MissingSession { .. }),
        "{e:?}"
    );
    assert_eq!(e.class(), ErrorClass::Malformed);
    assert_eq!(e.session(), None);
}

#[test]
fn redacted_excerpt_hides_passwords_of_real_samples() {
    let out = redacted_excerpt(&sample("user-add-17sp4.xml"), 64 * 1024);
    assert!(!out.contains("S3cret!x"), "{out}");
    assert!(out.contains("<password>[redacted]</password>"), "{out}");
    assert!(out.contains("alice.smith@acme.example"));
    let latin = redacted_excerpt(&sample("user-add-latin1-mueller.xml"), 64 * 1024);
    assert!(
        latin.contains("Müller") && !latin.contains("Geh31m!"),
        "{latin}"
    );
    assert_eq!(
        redacted_excerpt(&sample("user-add-17sp4.xml"), 40)
            .chars()
            .count(),
        40
    );
}

#[test]
fn writer_output_is_exact() {
    let out = write(
        &Session::SessionId(s("s<1>")),
        &[
            ResponseCommand::Success {
                echo: Some(s("e\"1&")),
            },
            ResponseCommand::Error(ErrorResponse {
                echo: None,
                severity: Severity::Warning,
                code: 7020,
                summary: s("a < b & c"),
                summary_english: s("x"),
                detail: Some(s("outbox 42")),
            }),
            ResponseCommand::Error(ErrorResponse {
                echo: Some(s("3")),
                severity: Severity::Error,
                code: 7002,
                summary: s("unsupported command"),
                summary_english: s("unsupported command"),
                detail: None,
            }),
        ],
    );
    let expected = concat!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n",
        "<BroadsoftDocument xmlns=\"C\" xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" protocol=\"OCI\">",
        "<sessionId xmlns=\"\">s&lt;1&gt;</sessionId>",
        "<command xmlns=\"\" echo=\"e&quot;1&amp;\" xsi:type=\"SuccessResponse\"/>",
        "<command xmlns=\"\" type=\"Warning\" echo=\"\" xsi:type=\"ErrorResponse\"><errorCode>7020</errorCode>",
        "<summary>a &lt; b &amp; c</summary><summaryEnglish>x</summaryEnglish><detail>outbox 42</detail></command>",
        "<command xmlns=\"\" type=\"Error\" echo=\"3\" xsi:type=\"ErrorResponse\"><errorCode>7002</errorCode>",
        "<summary>unsupported command</summary><summaryEnglish>unsupported command</summaryEnglish></command>",
        "</BroadsoftDocument>\n",
    );
    assert_eq!(String::from_utf8(out.clone()).unwrap(), expected);
    // Our own parser reads it back: same session, one command per response, echo copied.
    let d = ok(&out);
    assert_eq!(d.session, Session::SessionId(s("s<1>")));
    let echoes: Vec<_> = d.commands.iter().map(|r| r.echo.clone()).collect();
    assert_eq!(echoes, [Some(s("e\"1&")), Some(s("")), Some(s("3"))]);
}

/// Validates with xmllint. libxml2 (2.9) resolves an unprefixed `xsi:type` under `xmlns=""` to
/// the namespace "" instead of "no namespace" and then finds no type; rewriting the default
/// namespace declarations as a prefix keeps every expanded name identical and sidesteps that bug.
fn xmllint_validate(name: &str, bytes: &[u8]) -> Result<(), String> {
    let mut text = bytes.to_vec();
    for (from, to) in [
        (
            &b"<BroadsoftDocument xmlns=\"C\""[..],
            &b"<ocins:BroadsoftDocument xmlns:ocins=\"C\""[..],
        ),
        (b"</BroadsoftDocument>", b"</ocins:BroadsoftDocument>"),
        (b" xmlns=\"\"", b""),
    ] {
        text = replace_bytes(&text, from, to);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, &text).unwrap();
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/flowthrough-oci.xsd");
    let output = match Process::new("xmllint")
        .arg("--noout")
        .arg("--schema")
        .arg(&schema)
        .arg(&path)
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            panic!("cannot run xmllint ({e}): install it with `apt-get install -y libxml2-utils`")
        }
    };
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

fn replace_bytes(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
}

#[test]
fn samples_and_written_responses_validate_against_the_schema() {
    for entry in std::fs::read_dir(samples_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if let Err(e) = xmllint_validate(&name, &std::fs::read(&path).unwrap()) {
            panic!("{name} does not validate:\n{e}");
        }
    }
    let responses = [
        ResponseCommand::Success { echo: None },
        ResponseCommand::Success {
            echo: Some(s("x&y")),
        },
        ResponseCommand::Error(ErrorResponse {
            echo: Some(s("2")),
            severity: Severity::Warning,
            code: 7020,
            summary: s("Müller <pending> & co"),
            summary_english: s("pending"),
            detail: Some(s("outbox 17\nline two\u{1}")),
        }),
        ResponseCommand::Error(ErrorResponse {
            echo: None,
            severity: Severity::Error,
            code: 7001,
            summary: s("malformed"),
            summary_english: s("malformed"),
            detail: None,
        }),
    ];
    for session in [session(), Session::UserId(s("admin"))] {
        let out = write(&session, &responses);
        if let Err(e) = xmllint_validate("response.xml", &out) {
            panic!(
                "written response does not validate:\n{e}\n{}",
                String::from_utf8_lossy(&out)
            );
        }
    }
}

#[test]
fn the_schema_rejects_what_it_should() {
    // Guards against a schema (or the libxml2 workaround) that accepts anything.
    let bad = [
        (
            "no-user-id.xml",
            doc(r#"<command xmlns="" xsi:type="UserDeleteRequest"><groupId>g</groupId></command>"#),
        ),
        (
            "unknown-type.xml",
            doc(r#"<command xmlns="" xsi:type="UserAddRequestFoo"/>"#),
        ),
        (
            "sixteen.xml",
            doc(
                &r#"<command xmlns="" xsi:type="UserDeleteRequest"><userId>u</userId></command>"#
                    .repeat(16),
            ),
        ),
        (
            "bad-protocol.xml",
            replace_bytes(
                &sample("user-delete.xml"),
                b"protocol=\"OCI\"",
                b"protocol=\"NSOCI\"",
            ),
        ),
        (
            "bad-error-type.xml",
            doc(
                r#"<command xmlns="" type="Fatal" echo="" xsi:type="ErrorResponse"><summary>s</summary><summaryEnglish>s</summaryEnglish></command>"#,
            ),
        ),
        (
            "not-boolean.xml",
            doc(
                r#"<command xmlns="" xsi:type="UserIntegratedIMPModifyRequest"><userId>u</userId><isActive>yes</isActive></command>"#,
            ),
        ),
    ];
    for (name, bytes) in bad {
        assert!(
            xmllint_validate(name, &bytes).is_err(),
            "{name} validated but must not"
        );
    }
}

/// Found by `cargo fuzz run oci_parse`: a NUL byte inside the sessionId parsed, but the writer
/// cannot carry it (XML 1.0 forbids it), so the answer named another session. Such characters
/// are now refused where they are read, raw or as character references, in text and attributes.
#[test]
fn characters_xml_forbids_are_refused_raw_or_referenced() {
    let doc = |session: &str, echo: &str| {
        format!(
            r#"<?xml version="1.0" encoding="UTF-8"?><BroadsoftDocument protocol="OCI" xmlns="C" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><sessionId xmlns="">{session}</sessionId><command xsi:type="UserDeleteRequest" xmlns="" echo="{echo}"><userId>u</userId></command></BroadsoftDocument>"#
        )
    };
    for (session, echo, code) in [
        ("b7e3\u{0}a2", "", 0x0),
        ("s&#1;", "", 0x1),
        ("s&#xFFFE;", "", 0xFFFE),
        ("s", "e&#x1F;", 0x1F),
        ("s\u{0B}", "", 0xB),
    ] {
        let e = parse(doc(session, echo).as_bytes(), &ParseLimits::default()).unwrap_err();
        assert!(
            matches!(e.kind(), ParseErrorKind::ForbiddenCharacter { code: c, .. } if *c == code),
            "{session:?}/{echo:?}: {e}"
        );
        assert_eq!(
            e.class(),
            ErrorClass::Malformed,
            "inside an OCI document: 7001"
        );
        assert!(
            e.to_string().contains("not allowed in an XML 1.0 document"),
            "{e}"
        );
    }
    // Tab, line feed, carriage return and everything printable pass, and survive the answer.
    let ok = parse(
        doc("s&#9;x\u{e9}\u{1F600}", "e&#10;").as_bytes(),
        &ParseLimits::default(),
    )
    .unwrap();
    assert_eq!(ok.session.value(), "s\tx\u{e9}\u{1F600}");
    let answered = write(
        &ok.session,
        &[ResponseCommand::Success {
            echo: ok.commands[0].echo.clone(),
        }],
    );
    let again = parse(&answered, &ParseLimits::default()).unwrap();
    assert_eq!(again.session, ok.session);
}
