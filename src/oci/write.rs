//! Writing OCI-P response documents: one `SuccessResponse`/`ErrorResponse` per request command,
//! in order, as UTF-8, in the shape the AS expects (the same as BroadWorks' own responses).
//!
//! On the hot path: one exact-ish allocation, no intermediate strings. Every command carries an
//! `echo` attribute, empty when the request had none, as BroadWorks' own responses do.

use super::model::{ErrorResponse, ResponseCommand, Session};

const HEAD: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<BroadsoftDocument xmlns=\"C\" \
xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" protocol=\"OCI\">";

/// The response document for `responses`, under the request's session element.
pub fn write(session: &Session, responses: &[ResponseCommand]) -> Vec<u8> {
    let estimate = HEAD.len()
        + 64
        + session.value().len()
        + responses
            .iter()
            .map(|r| match r {
                ResponseCommand::Success { echo } => 80 + echo.as_deref().map_or(0, str::len),
                ResponseCommand::Error(e) => {
                    220 + e.echo.as_deref().map_or(0, str::len)
                        + e.summary.len()
                        + e.summary_english.len()
                        + e.detail.as_deref().map_or(0, str::len)
                }
            })
            .sum::<usize>();
    let mut out = String::with_capacity(estimate);
    out.push_str(HEAD);
    let tag = match session {
        Session::SessionId(_) => "sessionId",
        Session::UserId(_) => "userId",
    };
    out.push('<');
    out.push_str(tag);
    out.push_str(" xmlns=\"\">");
    escape_into(&mut out, session.value(), false);
    out.push_str("</");
    out.push_str(tag);
    out.push('>');
    for response in responses {
        match response {
            ResponseCommand::Success { echo } => {
                out.push_str("<command xmlns=\"\" echo=\"");
                escape_into(&mut out, echo.as_deref().unwrap_or_default(), true);
                out.push_str("\" xsi:type=\"SuccessResponse\"/>");
            }
            ResponseCommand::Error(e) => write_error(&mut out, e),
        }
    }
    out.push_str("</BroadsoftDocument>\n");
    out.into_bytes()
}

fn write_error(out: &mut String, e: &ErrorResponse) {
    out.push_str("<command xmlns=\"\" type=\"");
    out.push_str(e.severity.as_str());
    out.push_str("\" echo=\"");
    escape_into(out, e.echo.as_deref().unwrap_or_default(), true);
    out.push_str("\" xsi:type=\"ErrorResponse\"><errorCode>");
    // u16 formatting without an intermediate String.
    let mut digits = [0u8; 5];
    let mut n = e.code;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    digits[i..].iter().for_each(|&d| out.push(char::from(d)));
    out.push_str("</errorCode><summary>");
    escape_into(out, &e.summary, false);
    out.push_str("</summary><summaryEnglish>");
    escape_into(out, &e.summary_english, false);
    out.push_str("</summaryEnglish>");
    if let Some(detail) = &e.detail {
        out.push_str("<detail>");
        escape_into(out, detail, false);
        out.push_str("</detail>");
    }
    out.push_str("</command>");
}

/// Escapes for element text or a double-quoted attribute. Characters XML 1.0 cannot carry at
/// all (most C0 controls, U+FFFE/U+FFFF) become U+FFFD so the document is always well-formed,
/// whatever a Webex error message contains; in attributes, whitespace controls become character
/// references so attribute normalisation does not change them.
fn escape_into(out: &mut String, s: &str, attribute: bool) {
    let mut plain = 0;
    for (i, c) in s.char_indices() {
        let replacement = match c {
            '&' => "&amp;",
            '<' => "&lt;",
            '>' => "&gt;",
            '"' if attribute => "&quot;",
            '\t' if attribute => "&#9;",
            '\n' if attribute => "&#10;",
            '\r' => "&#13;",
            '\t' | '\n' => continue,
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => "\u{FFFD}",
            _ => continue,
        };
        out.push_str(&s[plain..i]);
        out.push_str(replacement);
        plain = i + c.len_utf8();
    }
    out.push_str(&s[plain..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(s: &str, attribute: bool) -> String {
        let mut out = String::new();
        escape_into(&mut out, s, attribute);
        out
    }

    #[test]
    fn escaping() {
        assert_eq!(
            escaped("IM&P <a> \"q\" 'x'", false),
            "IM&amp;P &lt;a&gt; \"q\" 'x'"
        );
        assert_eq!(escaped("a\"b\tc\nd\re", true), "a&quot;b&#9;c&#10;d&#13;e");
        assert_eq!(escaped("a\tb\nc", false), "a\tb\nc");
        assert_eq!(
            escaped("x\u{1}y\u{FFFF}Müller", false),
            "x\u{FFFD}y\u{FFFD}Müller"
        );
    }

    #[test]
    fn error_code_digits() {
        for code in [0u16, 7, 7001, 65535] {
            let e = ErrorResponse {
                echo: None,
                severity: super::super::model::Severity::Error,
                code,
                summary: String::new(),
                summary_english: String::new(),
                detail: None,
            };
            let mut out = String::new();
            write_error(&mut out, &e);
            assert!(
                out.contains(&format!("<errorCode>{code}</errorCode>")),
                "{out}"
            );
            assert!(!out.contains("<detail>"));
        }
    }
}
