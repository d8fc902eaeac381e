//! Typed calls to the Webex for BroadWorks subscriber API: each sends a `TrackingID`, uses the
//! token manager (refresh once and retry once on 401) and maps the answer to a typed outcome.

use std::time::{Duration, SystemTime};

use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::error::{ApiErrorBody, DUPLICATE_USER_ID, WebexError, retry_after};
use super::token::TokenManager;
use super::transport::{RawResponse, Transport, TransportError};
use super::types::Subscriber;
use crate::config::WebexConfig;

/// A bound on list paging, so a server whose `next` links loop cannot hold a call forever.
const MAX_PAGES: usize = 1000;

/// The result of one logical call and the `TrackingID` it was sent with (kept in the audit).
#[derive(Debug, Clone)]
pub struct Outcome<T> {
    pub tracking_id: String,
    pub result: Result<T, WebexError>,
}

/// Setting up the client failed.
#[derive(Debug, thiserror::Error)]
#[error(
    "webex.api_base {url:?} is not a usable https URL: {reason}; write it like https://webexapis.com/v1"
)]
pub struct ClientSetupError {
    pub url: String,
    pub reason: String,
}

#[derive(Debug, Clone)]
pub struct WebexClient {
    base: Url,
    /// `base` joined with `broadworks/subscribers` once: a join parses the path again (and the
    /// host through IDNA) on every call.
    subscribers: Url,
    transport: Transport,
    tokens: TokenManager,
    retry_after_cap: Duration,
}

#[derive(Deserialize)]
struct Page {
    #[serde(default)]
    items: Vec<Subscriber>,
}

/// One page of the subscriber list and where the next one is.
#[derive(Debug, Clone)]
pub struct ListPage {
    pub items: Vec<Subscriber>,
    /// The `rel="next"` link exactly as Webex gave it; `None` on the last page.
    pub next: Option<Url>,
}

/// The most subscribers Webex returns in one page.
pub const MAX_PAGE: u32 = 100;

/// A version 4 UUID from the thread's random generator: `Uuid::new_v4` asks the kernel
/// (`getrandom`) for every id, a system call per Webex call.
fn new_tracking_id() -> String {
    let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    format!("FLOWTHROUGH_{id}")
}

impl From<TransportError> for WebexError {
    fn from(e: TransportError) -> Self {
        match e {
            TransportError::Unknown { .. } => WebexError::UnknownOutcome {
                reason: e.to_string(),
            },
            other => WebexError::Retryable {
                reason: other.to_string(),
            },
        }
    }
}

impl WebexClient {
    pub fn new(
        cfg: &WebexConfig,
        transport: Transport,
        tokens: TokenManager,
    ) -> Result<Self, ClientSetupError> {
        let bad = |reason: &str| ClientSetupError {
            url: cfg.api_base.clone(),
            reason: reason.to_owned(),
        };
        let mut base = Url::parse(&cfg.api_base).map_err(|e| bad(&e.to_string()))?;
        if base.scheme() != "https" || base.host_str().is_none() {
            return Err(bad("it must be https with a host"));
        }
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let subscribers = base
            .join("broadworks/subscribers")
            .map_err(|e| bad(&e.to_string()))?;
        Ok(WebexClient {
            base,
            subscribers,
            transport,
            tokens,
            retry_after_cap: Duration::from_secs(cfg.retry_after_cap_s.max(1)),
        })
    }

    pub fn tokens(&self) -> &TokenManager {
        &self.tokens
    }

    fn url(&self, path: &str) -> Url {
        // `path` is one of our fixed relative paths (ids are percent-encoded by the caller).
        self.base.join(path).unwrap_or_else(|_| self.base.clone())
    }

    fn subscriber_url(&self, id: &str) -> Url {
        let mut url = self.subscribers.clone();
        if let Ok(mut segs) = url.path_segments_mut() {
            segs.push(id);
        }
        url
    }

    /// `POST /broadworks/subscribers`. Prefer [`WebexClient::provision_once`], which never
    /// creates a duplicate.
    pub async fn provision(&self, body: &impl serde::Serialize) -> Outcome<Subscriber> {
        let tid = new_tracking_id();
        let result = self.post_subscriber(&tid, body).await;
        Outcome {
            tracking_id: tid,
            result,
        }
    }

    /// `PUT /broadworks/subscribers/{id}`.
    pub async fn update(&self, id: &str, body: &impl serde::Serialize) -> Outcome<Subscriber> {
        let tid = new_tracking_id();
        let result = match serde_json::to_vec(body) {
            Ok(b) => self
                .call(&tid, Method::PUT, &self.subscriber_url(id), Some(b), true)
                .await
                .and_then(|r| parse(&r)),
            Err(e) => Err(body_error(e)),
        };
        Outcome {
            tracking_id: tid,
            result,
        }
    }

    /// `DELETE /broadworks/subscribers/{id}`.
    pub async fn remove(&self, id: &str) -> Outcome<()> {
        let tid = new_tracking_id();
        let result = self
            .call(&tid, Method::DELETE, &self.subscriber_url(id), None, true)
            .await
            .map(|_| ());
        Outcome {
            tracking_id: tid,
            result,
        }
    }

    /// `GET /broadworks/subscribers/{id}`.
    pub async fn get(&self, id: &str) -> Outcome<Subscriber> {
        let tid = new_tracking_id();
        let result = self
            .call(&tid, Method::GET, &self.subscriber_url(id), None, true)
            .await
            .and_then(|r| parse(&r));
        Outcome {
            tracking_id: tid,
            result,
        }
    }

    /// `GET /broadworks/subscribers?userId=…`, following `next` links exactly as given and
    /// keeping only items whose userId matches (later pages have been seen to drop the filter).
    pub async fn list_by_user_id(&self, user_id: &str) -> Outcome<Vec<Subscriber>> {
        let tid = new_tracking_id();
        let result = self.list(&tid, user_id).await;
        Outcome {
            tracking_id: tid,
            result,
        }
    }

    /// The first page of `GET /broadworks/subscribers` with these filters (`provisioningId`,
    /// `spEnterpriseId`, `userId`, `status`) and [`MAX_PAGE`] items a page.
    pub fn list_url(&self, filters: &[(&str, &str)]) -> Url {
        let mut url = self.subscribers.clone();
        {
            let mut query = url.query_pairs_mut();
            for (key, value) in filters {
                query.append_pair(key, value);
            }
            query.append_pair("max", &MAX_PAGE.to_string());
        }
        url
    }

    /// One page of the subscriber list. The caller paces the pages and re-checks its filters on
    /// every item: later pages have been seen to drop them.
    pub async fn list_page(&self, url: &Url) -> Outcome<ListPage> {
        let tid = new_tracking_id();
        let result = self.page(&tid, url).await;
        Outcome {
            tracking_id: tid,
            result,
        }
    }

    /// `POST /broadworks/subscribers/validate`: Webex's precheck of a subscriber body.
    pub async fn precheck(&self, body: &impl serde::Serialize) -> Outcome<serde_json::Value> {
        let tid = new_tracking_id();
        let url = self.url("broadworks/subscribers/validate");
        let result = match serde_json::to_vec(body) {
            Ok(b) => self
                .call(&tid, Method::POST, &url, Some(b), true)
                .await
                .and_then(|r| {
                    if r.body.is_empty() {
                        Ok(serde_json::Value::Null)
                    } else {
                        parse(&r)
                    }
                }),
            Err(e) => Err(body_error(e)),
        };
        Outcome {
            tracking_id: tid,
            result,
        }
    }

    /// Create the subscriber for `user_id` exactly once: after an unknown outcome (timeout once
    /// the request may have been sent) the user is looked up before any new POST, and a duplicate
    /// answer resolves to the existing subscriber.
    pub async fn provision_once(
        &self,
        user_id: &str,
        body: &impl serde::Serialize,
    ) -> Outcome<Subscriber> {
        let tid = new_tracking_id();
        let result = self.provision_once_inner(&tid, user_id, body).await;
        Outcome {
            tracking_id: tid,
            result,
        }
    }

    async fn provision_once_inner(
        &self,
        tid: &str,
        user_id: &str,
        body: &impl serde::Serialize,
    ) -> Result<Subscriber, WebexError> {
        let mut last_unknown = None;
        for _ in 0..3 {
            match self.post_subscriber(tid, body).await {
                Err(WebexError::UnknownOutcome { reason }) => {
                    tracing::warn!(tracking_id = tid, reason = %reason, "provision outcome unknown; looking the user up before retrying");
                    if let Some(existing) = self.list(tid, user_id).await?.into_iter().next() {
                        return Ok(existing);
                    }
                    last_unknown = Some(reason);
                }
                Err(WebexError::Duplicate { status, message }) => {
                    return match self.list(tid, user_id).await?.into_iter().next() {
                        Some(existing) => Ok(existing),
                        None => Err(WebexError::Permanent {
                            status,
                            message: format!(
                                "Webex reports a duplicate but lists no subscriber with this userId: {message}"
                            ),
                            errors: Vec::new(),
                            tracking_id: Some(tid.to_owned()),
                        }),
                    };
                }
                other => return other,
            }
        }
        Err(WebexError::UnknownOutcome {
            reason: last_unknown.unwrap_or_default(),
        })
    }

    async fn post_subscriber(
        &self,
        tid: &str,
        body: &impl serde::Serialize,
    ) -> Result<Subscriber, WebexError> {
        let body = serde_json::to_vec(body).map_err(body_error)?;
        let resp = self
            .call(tid, Method::POST, &self.subscribers, Some(body), false)
            .await?;
        parse(&resp)
    }

    async fn list(&self, tid: &str, user_id: &str) -> Result<Vec<Subscriber>, WebexError> {
        let mut url = self.subscribers.clone();
        url.query_pairs_mut().append_pair("userId", user_id);
        let mut out = Vec::new();
        for _ in 0..MAX_PAGES {
            let page = self.page(tid, &url).await?;
            out.extend(page.items.into_iter().filter(|s| s.user_id == user_id));
            match page.next {
                None => return Ok(out),
                Some(next) => url = next,
            }
        }
        Err(WebexError::Retryable {
            reason: format!("the subscriber list did not end after {MAX_PAGES} pages"),
        })
    }

    async fn page(&self, tid: &str, url: &Url) -> Result<ListPage, WebexError> {
        let resp = self.call(tid, Method::GET, url, None, true).await?;
        let page: Page = parse(&resp)?;
        let next = match next_link(&resp, url) {
            Some(next) if !same_origin(&next, &self.base) => {
                return Err(WebexError::Retryable {
                    reason: format!(
                        "Webex sent a next link to another host ({}); not following it",
                        next.host_str().unwrap_or_default()
                    ),
                });
            }
            next => next,
        };
        Ok(ListPage {
            items: page.items,
            next,
        })
    }

    /// Send with the current token; on 401 refresh once and retry once. Maps non-2xx answers.
    async fn call(
        &self,
        tid: &str,
        method: Method,
        url: &Url,
        body: Option<Vec<u8>>,
        idempotent: bool,
    ) -> Result<RawResponse, WebexError> {
        let (mut token, mut generation) = self.tokens.access_token().await?;
        let mut refreshed = false;
        loop {
            let resp = self
                .transport
                .send(url, idempotent, |c| {
                    let mut req = c
                        .request(method.clone(), url.clone())
                        .bearer_auth(token.expose())
                        .header("TrackingID", tid)
                        .header(reqwest::header::ACCEPT, "application/json");
                    if let Some(b) = &body {
                        req = req
                            .header(reqwest::header::CONTENT_TYPE, "application/json")
                            .body(b.clone());
                    }
                    req
                })
                .await?;
            tracing::debug!(tracking_id = tid, %method, status = resp.status.as_u16(), addr = %resp.addr, "Webex answered");
            if resp.status == StatusCode::UNAUTHORIZED {
                if refreshed {
                    return Err(WebexError::CredentialsInvalid {
                        reason: "Webex refused a freshly refreshed access token (401); check the client's scopes".to_owned(),
                    });
                }
                refreshed = true;
                (token, generation) = self.tokens.refresh_after_rejection(generation).await?;
                continue;
            }
            return classify(resp, tid, self.retry_after_cap);
        }
    }
}

fn body_error(e: serde_json::Error) -> WebexError {
    WebexError::Permanent {
        status: 0,
        message: format!("the request body cannot be serialized: {e}"),
        errors: Vec::new(),
        tracking_id: None,
    }
}

fn parse<T: DeserializeOwned>(resp: &RawResponse) -> Result<T, WebexError> {
    serde_json::from_slice(&resp.body).map_err(|e| WebexError::Retryable {
        reason: format!(
            "Webex answered HTTP {} with a body that does not parse: {e}",
            resp.status.as_u16()
        ),
    })
}

/// Map an answer to success or a typed failure.
fn classify(resp: RawResponse, tid: &str, cap: Duration) -> Result<RawResponse, WebexError> {
    let status = resp.status;
    if status.is_success() {
        return Ok(resp);
    }
    let body: ApiErrorBody = serde_json::from_slice(&resp.body).unwrap_or_default();
    let code = status.as_u16();
    let duplicate = body
        .errors
        .iter()
        .any(|e| e.error_code == DUPLICATE_USER_ID);
    match code {
        // A 409 that is not "userId already exists" is a conflict with work in progress on the
        // subscriber (still provisioning or updating): wait and retry, order kept (SPEC §4).
        429 | 423 | 409 if !duplicate => {
            let header = resp
                .headers
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok());
            Err(WebexError::RetryAfter {
                status: code,
                after: retry_after(header, SystemTime::now(), 0, cap),
            })
        }
        404 => Err(WebexError::NotFound),
        // The server gave up waiting for the whole request (RFC 9110 §15.5.9), so nothing was
        // applied and it may be sent again, POST included. Seen from a server starved of CPU
        // while an outage backlog arrived; as a 4xx it had made the entry dead.
        408 => Err(WebexError::Retryable {
            reason: format!(
                "Webex answered HTTP 408: it did not receive the whole request in time {}",
                body.message
            )
            .trim_end()
            .to_owned(),
        }),
        _ if status.is_server_error() => Err(WebexError::Retryable {
            reason: format!("Webex answered HTTP {code}: {}", body.message),
        }),
        _ if duplicate => Err(WebexError::Duplicate {
            status: code,
            message: body.message,
        }),
        _ => Err(WebexError::Permanent {
            status: code,
            message: body.message,
            errors: body.errors,
            tracking_id: Some(body.tracking_id.unwrap_or_else(|| tid.to_owned())),
        }),
    }
}

/// The `rel="next"` target of the `Link` header, resolved against the current URL.
fn next_link(resp: &RawResponse, current: &Url) -> Option<Url> {
    resp.headers
        .get_all(reqwest::header::LINK)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|part| {
            let (target, params) = part.split_once(';')?;
            let is_next = params.split(';').any(|p| {
                let p = p.trim().replace(' ', "");
                p == "rel=\"next\"" || p == "rel=next"
            });
            let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
            if is_next {
                current.join(target).ok()
            } else {
                None
            }
        })
}

fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue};

    #[test]
    fn tracking_ids_are_distinct_version_4_uuids() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| new_tracking_id()).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            let uuid = id
                .strip_prefix("FLOWTHROUGH_")
                .and_then(|u| uuid::Uuid::parse_str(u).ok())
                .unwrap_or_else(|| panic!("{id} is not FLOWTHROUGH_ and a UUID"));
            assert_eq!(uuid.get_version(), Some(uuid::Version::Random), "{id}");
            assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122, "{id}");
        }
    }

    fn raw(status: u16, headers: &[(&str, &str)], body: &str) -> RawResponse {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                reqwest::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        RawResponse {
            status: StatusCode::from_u16(status).unwrap(),
            headers: h,
            body: body.as_bytes().to_vec().into(),
            addr: "127.0.0.1:1".parse().unwrap(),
        }
    }

    #[test]
    fn next_link_is_followed_exactly() {
        let cur = Url::parse("https://h:1/v1/broadworks/subscribers?userId=a").unwrap();
        let r = raw(
            200,
            &[(
                "link",
                r#"<https://h:1/v1/x?cursor=2>; rel="prev", <https://h:1/v1/broadworks/subscribers?cursor=3&max=1>; rel="next""#,
            )],
            "",
        );
        assert_eq!(
            next_link(&r, &cur).unwrap().as_str(),
            "https://h:1/v1/broadworks/subscribers?cursor=3&max=1"
        );
        assert!(next_link(&raw(200, &[], ""), &cur).is_none());
    }

    #[test]
    fn classification() {
        let cap = Duration::from_secs(300);
        let e = classify(raw(400, &[], r#"{"message":"bad","errors":[{"errorCode":1,"description":"d"}],"trackingId":"T"}"#), "X", cap).unwrap_err();
        assert!(
            matches!(e, WebexError::Permanent { status: 400, ref tracking_id, ref errors, .. } if tracking_id.as_deref() == Some("T") && errors.len() == 1)
        );
        let e = classify(
            raw(
                400,
                &[],
                r#"{"message":"dup","errors":[{"errorCode":10022,"description":"d"}]}"#,
            ),
            "X",
            cap,
        )
        .unwrap_err();
        assert!(matches!(e, WebexError::Duplicate { status: 400, .. }));
        assert!(matches!(
            classify(raw(409, &[], "not json"), "X", cap).unwrap_err(),
            WebexError::RetryAfter { status: 409, .. }
        ));
        let e = classify(
            raw(
                409,
                &[],
                r#"{"message":"dup","errors":[{"errorCode":10022,"description":"d"}]}"#,
            ),
            "X",
            cap,
        )
        .unwrap_err();
        assert!(matches!(e, WebexError::Duplicate { status: 409, .. }));
        assert!(matches!(
            classify(raw(404, &[], ""), "X", cap).unwrap_err(),
            WebexError::NotFound
        ));
        assert!(matches!(
            classify(raw(502, &[], ""), "X", cap).unwrap_err(),
            WebexError::Retryable { .. }
        ));
        // A request timeout is a 4xx that is not the data's fault: retried, never dead.
        assert!(matches!(
            classify(raw(408, &[], ""), "X", cap).unwrap_err(),
            WebexError::Retryable { reason } if reason.contains("408")
        ));
        assert_eq!(
            classify(raw(429, &[("retry-after", "9")], ""), "X", cap).unwrap_err(),
            WebexError::RetryAfter {
                status: 429,
                after: Duration::from_secs(9)
            }
        );
        assert!(
            matches!(classify(raw(423, &[], ""), "X", cap).unwrap_err(), WebexError::RetryAfter { status: 423, after } if !after.is_zero())
        );
        assert!(classify(raw(204, &[], ""), "X", cap).is_ok());
    }
}
