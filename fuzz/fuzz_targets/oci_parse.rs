//! Fuzzes the OCI-P parser and the audit excerpt: any input must return, never panic, and a
//! parsed document must survive being answered (the writer's output parses again).
#![no_main]

use flowthrough::oci::{ParseLimits, ResponseCommand, parse, redacted_excerpt, write};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = redacted_excerpt(data, 64 * 1024);
    match parse(data, &ParseLimits::default()) {
        Ok(doc) => {
            let responses: Vec<ResponseCommand> = doc
                .commands
                .iter()
                .map(|c| ResponseCommand::Success { echo: c.echo.clone() })
                .collect();
            let out = write(&doc.session, &responses);
            let again = parse(&out, &ParseLimits::default()).expect("the writer's output parses");
            assert_eq!(again.session, doc.session);
            assert_eq!(again.commands.len(), doc.commands.len());
        }
        Err(e) => {
            let _ = (e.to_string(), e.class(), e.session());
        }
    }
});
