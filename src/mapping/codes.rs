//! The stable OCI-P error codes (SPEC §2) and their operator-facing summaries, shared by the server,
//! `translate` and the outbox so one code always means one thing.

use crate::oci::{ErrorResponse, ResponseCommand, Severity};

/// An `ErrorResponse` code flowthrough answers with. The numbers are a published contract
/// (README, SPEC §2): never renumber a variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OciError {
    /// 7001: the document or a command in it is malformed.
    Malformed,
    /// 7002: a well-formed command flowthrough does not handle.
    Unsupported,
    /// 7003: a required field is missing or invalid.
    InvalidField,
    /// 7004: the request names, or resolves to, a template that is not configured.
    UnknownTemplate,
    /// 7005: the command needs a user profile the adapter has never seen.
    UnknownUser,
    /// 7010: Webex refused the request permanently.
    WebexRejected,
    /// 7020 (warning): stored durably, delivery to Webex continues in the background.
    Pending,
    /// 7021 (warning): done, but part of the change cannot be carried to Webex.
    NotCarried,
    /// 7030: Webex refused the refresh token; nothing is delivered until an operator installs one.
    UpstreamCredentials,
}

impl OciError {
    /// Every code, in numeric order (for the README table and exhaustive tests).
    pub const ALL: [OciError; 9] = [
        OciError::Malformed,
        OciError::Unsupported,
        OciError::InvalidField,
        OciError::UnknownTemplate,
        OciError::UnknownUser,
        OciError::WebexRejected,
        OciError::Pending,
        OciError::NotCarried,
        OciError::UpstreamCredentials,
    ];

    pub fn code(self) -> u16 {
        match self {
            OciError::Malformed => 7001,
            OciError::Unsupported => 7002,
            OciError::InvalidField => 7003,
            OciError::UnknownTemplate => 7004,
            OciError::UnknownUser => 7005,
            OciError::WebexRejected => 7010,
            OciError::Pending => 7020,
            OciError::NotCarried => 7021,
            OciError::UpstreamCredentials => 7030,
        }
    }

    /// The code for a number, e.g. when reading an audit record back.
    pub fn from_code(code: u16) -> Option<OciError> {
        OciError::ALL.into_iter().find(|e| e.code() == code)
    }

    /// Only "pending" and "not carried" are warnings: the AS must treat the command as done.
    pub fn severity(self) -> Severity {
        match self {
            OciError::Pending | OciError::NotCarried => Severity::Warning,
            _ => Severity::Error,
        }
    }

    /// The `summary` an AS administrator reads: what happened, and where to look next.
    pub fn summary(self) -> &'static str {
        match self {
            OciError::Malformed => {
                "malformed OCI-P document or command; see detail for the element at fault"
            }
            OciError::Unsupported => {
                "unsupported command: flowthrough does not carry this OCI-P command to Webex"
            }
            OciError::InvalidField => {
                "required field missing or invalid for the Webex customer template; see detail"
            }
            OciError::UnknownTemplate => {
                "unknown customer template: check the request URL and the flowthrough [templates] and [template_overrides]"
            }
            OciError::UnknownUser => {
                "user unknown to flowthrough: no profile of this user has been seen; send UserAddRequest first"
            }
            OciError::WebexRejected => {
                "Webex rejected the request; detail carries Webex's message, errorCode and trackingId"
            }
            OciError::Pending => {
                "accepted and stored; delivery to Webex is still pending (outbox id in detail)"
            }
            OciError::NotCarried => "done, but a change cannot be carried to Webex; see detail",
            OciError::UpstreamCredentials => {
                "Webex credentials invalid: the refresh token was rejected; the flowthrough operator must install a new one"
            }
        }
    }

    /// The response command for this code. `detail` names the specific field, value or id.
    pub fn response(self, echo: Option<String>, detail: Option<String>) -> ResponseCommand {
        ResponseCommand::Error(ErrorResponse {
            echo,
            severity: self.severity(),
            code: self.code(),
            summary: self.summary().to_owned(),
            summary_english: self.summary().to_owned(),
            detail,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_the_spec_table() {
        let table: Vec<(u16, Severity)> = OciError::ALL
            .iter()
            .map(|e| (e.code(), e.severity()))
            .collect();
        assert_eq!(
            table,
            vec![
                (7001, Severity::Error),
                (7002, Severity::Error),
                (7003, Severity::Error),
                (7004, Severity::Error),
                (7005, Severity::Error),
                (7010, Severity::Error),
                (7020, Severity::Warning),
                (7021, Severity::Warning),
                (7030, Severity::Error),
            ]
        );
    }

    #[test]
    fn from_code_round_trips_and_refuses_unknown_numbers() {
        for e in OciError::ALL {
            assert_eq!(OciError::from_code(e.code()), Some(e));
        }
        assert_eq!(OciError::from_code(7000), None);
        assert_eq!(OciError::from_code(7022), None);
    }

    #[test]
    fn response_carries_code_summary_echo_and_detail() {
        let r = OciError::NotCarried.response(Some("e1".into()), Some("email".into()));
        let ResponseCommand::Error(e) = r else {
            panic!("expected an ErrorResponse")
        };
        assert_eq!(e.echo.as_deref(), Some("e1"));
        assert_eq!(e.severity, Severity::Warning);
        assert_eq!(e.code, 7021);
        assert_eq!(e.summary, e.summary_english);
        assert!(e.summary.contains("cannot be carried"));
        assert_eq!(e.detail.as_deref(), Some("email"));
    }

    #[test]
    fn summaries_are_distinct_and_not_empty() {
        let mut seen = std::collections::BTreeSet::new();
        for e in OciError::ALL {
            assert!(e.summary().len() > 20, "{e:?}");
            assert!(seen.insert(e.summary()), "{e:?} repeats a summary");
        }
    }
}
