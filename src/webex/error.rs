//! What a Webex call can end in, and the defensive parsing of the upstream's error signals
//! (`Retry-After`, the JSON error body) that decides between retry, pause and give up.

use std::time::{Duration, SystemTime};

use rand::Rng;
use serde::{Deserialize, Serialize};

/// One entry of `errors[]` in a Webex error body or a subscriber.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiErrorItem {
    #[serde(deserialize_with = "number_or_string")]
    pub error_code: u32,
    #[serde(default)]
    pub description: String,
}

/// The Webex error body `{message, errors:[…], trackingId}`; every field optional on the wire.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiErrorBody {
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub errors: Vec<ApiErrorItem>,
    #[serde(default)]
    pub tracking_id: Option<String>,
}

/// Webex's code for "BroadWorks UserID already associated with an existing user".
pub const DUPLICATE_USER_ID: u32 = 10022;

/// The outcome of a Webex call that did not succeed. Cloneable so that callers waiting on one
/// token refresh all receive its result.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WebexError {
    #[error(
        "Webex asked to wait {after:?} (HTTP {status}); deliveries pause and resume on their own"
    )]
    RetryAfter { status: u16, after: Duration },
    #[error("Webex is unreachable or failing ({reason}); the call will be retried with backoff")]
    Retryable { reason: String },
    #[error(
        "Webex refused the request (HTTP {status}): {message}{}; fix the data or the template and retry the command",
        describe(errors)
    )]
    Permanent {
        status: u16,
        message: String,
        errors: Vec<ApiErrorItem>,
        tracking_id: Option<String>,
    },
    #[error("Webex says the subscriber already exists (HTTP {status}): {message}")]
    Duplicate { status: u16, message: String },
    #[error("Webex has no such subscriber")]
    NotFound,
    #[error(
        "the Webex credentials are not valid: {reason}; install a new refresh token with `flowthrough token set`"
    )]
    CredentialsInvalid { reason: String },
    #[error(
        "the request to Webex may or may not have been applied ({reason}); look the user up before retrying"
    )]
    UnknownOutcome { reason: String },
}

fn describe(errors: &[ApiErrorItem]) -> String {
    errors
        .iter()
        .map(|e| format!(" [{}: {}]", e.error_code, e.description))
        .collect()
}

fn number_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Num(u32),
        Str(String),
    }
    match Raw::deserialize(d)? {
        Raw::Num(n) => Ok(n),
        Raw::Str(s) => s.trim().parse().map_err(serde::de::Error::custom),
    }
}

/// Exponential backoff with jitter: a random wait in `[d/2, d]` where `d = base·2^attempt` capped
/// at `cap`. Never zero (at least 1 ms), so a retry loop can never spin.
pub fn backoff(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let factor = 2u32.saturating_pow(attempt.min(30));
    let full = base
        .saturating_mul(factor)
        .min(cap)
        .max(Duration::from_millis(2));
    let half = full / 2;
    let jitter_ms = rand::rng().random_range(0..=(full - half).as_millis() as u64);
    half + Duration::from_millis(jitter_ms)
}

/// How long to wait after a 429/423. `Retry-After` may be seconds or an HTTP date; a missing,
/// malformed (seen in the wild: `rand(30),add(30)`), zero or past value falls back to capped
/// backoff with jitter. The result is capped at `cap` and never zero.
pub fn retry_after(value: Option<&str>, now: SystemTime, attempt: u32, cap: Duration) -> Duration {
    let fallback = || backoff(attempt, Duration::from_secs(1), cap);
    let Some(raw) = value.map(str::trim) else {
        return fallback();
    };
    let parsed = if let Ok(secs) = raw.parse::<u64>() {
        Some(Duration::from_secs(secs))
    } else {
        httpdate::parse_http_date(raw)
            .ok()
            .and_then(|at| at.duration_since(now).ok())
    };
    match parsed {
        Some(d) if !d.is_zero() => d.min(cap),
        _ => fallback(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: Duration = Duration::from_secs(300);

    #[test]
    fn retry_after_seconds_and_cap() {
        let now = SystemTime::now();
        assert_eq!(retry_after(Some("7"), now, 0, CAP), Duration::from_secs(7));
        assert_eq!(
            retry_after(Some(" 12 "), now, 0, CAP),
            Duration::from_secs(12)
        );
        assert_eq!(retry_after(Some("86400"), now, 0, CAP), CAP);
    }

    #[test]
    fn retry_after_http_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let at = httpdate::fmt_http_date(now + Duration::from_secs(42));
        assert_eq!(retry_after(Some(&at), now, 0, CAP), Duration::from_secs(42));
    }

    #[test]
    fn retry_after_malformed_missing_zero_or_past_falls_back_to_bounded_backoff() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let past = httpdate::fmt_http_date(now - Duration::from_secs(10));
        for v in [
            Some("rand(30),add(30)"),
            None,
            Some(""),
            Some("0"),
            Some("-5"),
            Some(past.as_str()),
            Some("99999999999999999999999"),
        ] {
            let d = retry_after(v, now, 0, CAP);
            assert!(
                d >= Duration::from_millis(500) && d <= Duration::from_secs(1),
                "{v:?}: {d:?}"
            );
        }
        let d = retry_after(Some("rand(30),add(30)"), now, 40, CAP);
        assert!(d <= CAP && d >= CAP / 2);
    }

    #[test]
    fn backoff_grows_is_capped_and_never_zero() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(5);
        for attempt in 0..64 {
            let d = backoff(attempt, base, cap);
            assert!(!d.is_zero());
            assert!(d <= cap);
        }
        let d3 = backoff(3, base, cap);
        assert!(d3 >= Duration::from_millis(400) && d3 <= Duration::from_millis(800));
        assert!(!backoff(0, Duration::ZERO, Duration::ZERO).is_zero());
    }

    #[test]
    fn error_body_parses_string_or_number_codes_and_ignores_unknown_fields() {
        let b: ApiErrorBody = serde_json::from_str(
            r#"{"message":"dup","errors":[{"errorCode":10022,"description":"d"},{"errorCode":"7","description":"x"}],"trackingId":"T","extra":1}"#,
        )
        .unwrap();
        assert_eq!(b.errors[0].error_code, DUPLICATE_USER_ID);
        assert_eq!(b.errors[1].error_code, 7);
        assert_eq!(b.tracking_id.as_deref(), Some("T"));
    }
}
