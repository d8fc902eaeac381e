//! Property tests for OCI-P documents: the parser never panics on any bytes or on damaged samples,
//! and whatever the writer produces is well-formed XML that reads back to what was written.

use std::path::Path;

use flowthrough::oci::{
    ErrorClass, ErrorResponse, ParseLimits, ResponseCommand, Session, Severity, parse,
    redacted_excerpt, write,
};
use proptest::prelude::*;
use quick_xml::events::Event;

fn samples() -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/samples");
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect()
}

/// Parses and checks the invariants every outcome must hold.
fn parse_checked(bytes: &[u8]) {
    match parse(bytes, &ParseLimits::default()) {
        Ok(doc) => {
            assert!((1..=15).contains(&doc.commands.len()));
            assert!(!doc.session.value().is_empty());
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            if e.class() == ErrorClass::NotOci {
                assert!(
                    e.session().is_none(),
                    "a session means the document was OCI-P"
                );
            }
        }
    }
    let excerpt = redacted_excerpt(bytes, 1024);
    assert!(excerpt.chars().count() <= 1024);
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (
            any::<usize>(),
            prop_oneof![
                prop::collection::vec(any::<u8>(), 1..8),
                prop::sample::select(vec![
                    b"<x>".to_vec(),
                    b"</command>".to_vec(),
                    b"<command xmlns=\"\" xsi:type=\"UserDeleteRequest\">".to_vec(),
                    b"&amp;".to_vec(),
                    b"&#0;".to_vec(),
                    b"&#x110000;".to_vec(),
                    b"<!DOCTYPE x>".to_vec(),
                    b"<![CDATA[".to_vec(),
                    b" xsi:nil=\"true\"".to_vec(),
                    b"\xFC".to_vec(),
                ]),
            ]
        )
            .prop_map(|(i, v)| Mutation::Insert(i, v)),
        (any::<usize>(), 1usize..20).prop_map(|(i, n)| Mutation::Delete(i, n)),
    ]
}

fn apply(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len().max(1);
        match m {
            Mutation::Flip(i, b) => {
                if !bytes.is_empty() {
                    bytes[i % len] ^= b;
                }
            }
            Mutation::Truncate(i) => bytes.truncate(i % len),
            Mutation::Insert(i, v) => {
                let at = i % (bytes.len() + 1);
                bytes.splice(at..at, v.iter().copied());
            }
            Mutation::Delete(i, n) => {
                let at = i % len;
                let end = (at + n).min(bytes.len());
                if at < end {
                    bytes.drain(at..end);
                }
            }
        }
    }
    bytes
}

/// Text without the characters XML 1.0 cannot carry (the writer replaces those; see write.rs).
fn xml_text(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            8 => any::<char>().prop_filter("XML char", |c| !c.is_control() && *c != '\u{FFFE}' && *c != '\u{FFFF}'),
            1 => prop::sample::select(vec!['<', '>', '&', '"', '\'', '\t', '\n', '\r', ']', ';']),
        ],
        0..max,
    )
    .prop_map(|v| v.into_iter().collect())
}

fn response() -> impl Strategy<Value = ResponseCommand> {
    prop_oneof![
        prop::option::of(xml_text(20)).prop_map(|echo| ResponseCommand::Success { echo }),
        (
            prop::option::of(xml_text(20)),
            any::<bool>(),
            any::<u16>(),
            xml_text(60),
            xml_text(60),
            prop::option::of(xml_text(60))
        )
            .prop_map(|(echo, warning, code, summary, summary_english, detail)| {
                ResponseCommand::Error(ErrorResponse {
                    echo,
                    severity: if warning {
                        Severity::Warning
                    } else {
                        Severity::Error
                    },
                    code,
                    summary,
                    summary_english,
                    detail,
                })
            }),
    ]
}

/// Reads a response document with quick-xml directly (independent of flowthrough's parser): the
/// text of every `summary`, `summaryEnglish` and `detail`, in order.
fn response_texts(bytes: &[u8]) -> Vec<String> {
    let mut reader = quick_xml::Reader::from_reader(bytes);
    let mut texts = Vec::new();
    let mut current: Option<String> = None;
    loop {
        match reader.read_event().unwrap() {
            Event::Start(e)
                if matches!(
                    e.local_name().as_ref(),
                    b"summary" | b"summaryEnglish" | b"detail"
                ) =>
            {
                current = Some(String::new());
            }
            Event::Text(t) => {
                if let Some(c) = current.as_mut() {
                    c.push_str(&t.decode().unwrap());
                }
            }
            Event::GeneralRef(r) => {
                if let Some(c) = current.as_mut() {
                    let ch = match r.resolve_char_ref().unwrap() {
                        Some(ch) => ch,
                        None => match &*r {
                            b"amp" => '&',
                            b"lt" => '<',
                            b"gt" => '>',
                            b"quot" => '"',
                            b"apos" => '\'',
                            other => panic!("unexpected entity {other:?}"),
                        },
                    };
                    c.push(ch);
                }
            }
            Event::End(_) => {
                if let Some(c) = current.take() {
                    texts.push(c);
                }
            }
            Event::Eof => return texts,
            _ => {}
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        parse_checked(&bytes);
    }

    #[test]
    fn xml_like_noise_never_panics(parts in prop::collection::vec(prop::sample::select(vec![
        "<", ">", "/", "BroadsoftDocument", " xmlns=\"C\"", " protocol=\"OCI\"", "sessionId", "command",
        " xsi:type=\"UserAddRequest17sp4\"", " xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\"",
        "userId", "x", "&amp;", "&#252;", "\"", "=", " ", "<?xml version='1.0' encoding='ISO-8859-1'?>",
    ]), 0..80)) {
        parse_checked(parts.concat().as_bytes());
    }

    #[test]
    fn mutated_samples_never_panic(
        which in any::<prop::sample::Index>(),
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let all = samples();
        let original = all[which.index(all.len())].clone();
        parse_checked(&apply(original, &mutations));
    }

    #[test]
    fn writer_output_reads_back(
        session in xml_text(40).prop_filter("non-empty, trimmed", |s| !s.trim().is_empty() && s.trim() == s),
        legacy in any::<bool>(),
        responses in prop::collection::vec(response(), 1..=15),
    ) {
        let session = if legacy { Session::UserId(session) } else { Session::SessionId(session) };
        let out = write(&session, &responses);
        let text = std::str::from_utf8(&out).expect("UTF-8");
        prop_assert!(text.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>"));

        let doc = parse(&out, &ParseLimits::default()).expect("the writer's output is a valid OCI-P document");
        prop_assert_eq!(&doc.session, &session);
        prop_assert_eq!(doc.commands.len(), responses.len());
        for (request, response) in doc.commands.iter().zip(&responses) {
            let (echo, name) = match response {
                ResponseCommand::Success { echo } => (echo, "SuccessResponse"),
                ResponseCommand::Error(e) => (&e.echo, "ErrorResponse"),
            };
            prop_assert_eq!(request.echo.as_deref(), Some(echo.as_deref().unwrap_or_default()));
            prop_assert_eq!(request.name.as_str(), name);
        }

        let expected: Vec<String> = responses
            .iter()
            .flat_map(|r| match r {
                ResponseCommand::Success { .. } => vec![],
                ResponseCommand::Error(e) => {
                    let mut v = vec![e.summary.clone(), e.summary_english.clone()];
                    v.extend(e.detail.clone());
                    v
                }
            })
            .collect();
        prop_assert_eq!(response_texts(&out), expected);
    }
}
