//! The OAuth token manager: keeps a valid Webex access token, refreshing it with the partner's
//! refresh token one refresh at a time however many calls wait, ahead of expiry and after a 401;
//! persists every result (the refresh token may rotate) and tracks whether the credentials work.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use oauth2::basic::{
    BasicErrorResponse, BasicErrorResponseType, BasicRevocationErrorResponse,
    BasicTokenIntrospectionResponse, BasicTokenType,
};
use oauth2::{
    AuthType, ClientId, ClientSecret, ExtraTokenFields, RefreshToken, RequestTokenError,
    StandardRevocableToken, StandardTokenResponse, TokenResponse, TokenUrl,
};
use serde::{Deserialize, Serialize};

use super::error::WebexError;
use super::transport::{Transport, TransportError};
use crate::config::{SecretSource, WebexConfig};
use crate::metrics::{Metrics, OutcomeLabels};
use crate::secret::Secret;
use crate::store::{Store, StoreError, TokenRecord, TokenState};

/// Below this much refresh-token lifetime left, warn the operator (SPEC §4).
pub const REFRESH_TOKEN_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// Setting up the token manager failed; the message says what to configure.
#[derive(Debug, thiserror::Error)]
pub enum TokenSetupError {
    #[error("the Webex client secret is missing: set {env} or {key} in the config")]
    MissingClientSecret {
        env: &'static str,
        key: &'static str,
    },
    #[error("cannot read {key} ({path}): {reason}; fix the path or set {env} instead")]
    SecretFile {
        key: &'static str,
        env: &'static str,
        path: String,
        reason: String,
    },
    #[error("webex.token_url {url:?} is not a valid URL: {reason}")]
    TokenUrl { url: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Read a secret from its environment variable, else its file (trimmed). `None` when neither
/// is set.
pub fn read_secret(source: &SecretSource) -> Result<Option<Secret>, TokenSetupError> {
    if let Ok(v) = std::env::var(source.env)
        && !v.trim().is_empty()
    {
        return Ok(Some(Secret::new(v.trim())));
    }
    let Some(path) = &source.file else {
        return Ok(None);
    };
    let raw = std::fs::read_to_string(path).map_err(|e| TokenSetupError::SecretFile {
        key: source.key,
        env: source.env,
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let value = Secret::new(raw.trim());
    Ok((!value.is_empty()).then_some(value))
}

/// `refresh_token_expires_in`, which Webex returns beside the standard fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct WebexExtra {
    #[serde(default)]
    refresh_token_expires_in: Option<u64>,
}
impl ExtraTokenFields for WebexExtra {}

type WebexTokenResponse = StandardTokenResponse<WebexExtra, BasicTokenType>;

/// What `token status` and metrics show; no secret in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenStatus {
    pub state: TokenState,
    pub access_expires_at: Option<i64>,
    pub refresh_expires_at: Option<i64>,
    pub last_refresh: Option<i64>,
    /// Seconds of refresh-token lifetime left, when Webex said how long it lives.
    pub refresh_seconds_left: Option<i64>,
    /// True when less than 14 days are left: install a new refresh token soon.
    pub refresh_expiring_soon: bool,
}

impl TokenStatus {
    /// The status of a stored record (`None`: no refresh token installed).
    pub fn of(record: Option<&TokenRecord>) -> TokenStatus {
        let refresh_expires_at = record.and_then(|r| r.refresh_expires_at);
        let refresh_seconds_left = refresh_expires_at.map(|at| at - now_unix());
        TokenStatus {
            state: match record {
                None => no_token(),
                Some(r) => r.state.clone(),
            },
            access_expires_at: record.and_then(|r| r.access_expires_at),
            refresh_expires_at,
            last_refresh: record.and_then(|r| r.last_refresh),
            refresh_seconds_left,
            refresh_expiring_soon: refresh_seconds_left
                .is_some_and(|s| s < REFRESH_TOKEN_WARNING.as_secs() as i64),
        }
    }
}

fn is_rejected(record: Option<&TokenRecord>) -> bool {
    record.is_none_or(|r| matches!(r.state, TokenState::CredentialsInvalid { .. }))
}

fn no_token() -> TokenState {
    TokenState::CredentialsInvalid {
        reason: "no refresh token is installed".to_owned(),
    }
}

/// Cheap to clone; all clones share one token and one refresh at a time.
#[derive(Clone)]
pub struct TokenManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TokenManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenManager")
            .field("client_id", &self.inner.client_id)
            .field("token_url", &self.inner.token_url)
            .finish()
    }
}

struct Inner {
    client_id: String,
    client_secret: Secret,
    token_url: TokenUrl,
    refresh_ahead: Duration,
    store: Store,
    transport: Transport,
    current: Mutex<Current>,
    /// Held for the whole refresh: the single flight.
    refresh_lock: tokio::sync::Mutex<()>,
    /// `flowthrough_token_refreshes_total` (the server's; the CLI counts nothing).
    metrics: Option<Arc<Metrics>>,
    /// True while the credentials are invalid, so a request waiting on its delivery can answer
    /// 7030 the moment the refresh token is rejected instead of 7020 at its deadline.
    rejected: tokio::sync::watch::Sender<bool>,
}

struct Current {
    record: Option<TokenRecord>,
    /// Bumped by every successful refresh; a caller that saw an older one knows someone else
    /// already refreshed.
    generation: u64,
    /// Bumped by every refresh attempt, so waiters share a failed attempt's error too.
    attempts: u64,
    last_error: Option<WebexError>,
}

fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

impl TokenManager {
    /// Load the stored token; with none stored, take the initial refresh token from
    /// `FLOWTHROUGH_REFRESH_TOKEN` / `webex.refresh_token_file`.
    pub async fn new(
        cfg: &WebexConfig,
        store: Store,
        transport: Transport,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Self, TokenSetupError> {
        let source = cfg.client_secret_source();
        let client_secret = read_secret(&source)?.ok_or(TokenSetupError::MissingClientSecret {
            env: source.env,
            key: source.key,
        })?;
        let token_url =
            TokenUrl::new(cfg.token_url.clone()).map_err(|e| TokenSetupError::TokenUrl {
                url: cfg.token_url.clone(),
                reason: e.to_string(),
            })?;
        let record = match store.token().await? {
            Some(r) => Some(r),
            None => read_secret(&cfg.refresh_token_source())?.map(|refresh_token| TokenRecord {
                access_token: None,
                access_expires_at: None,
                refresh_token,
                refresh_expires_at: None,
                last_refresh: None,
                state: TokenState::Ok,
            }),
        };
        let rejected = tokio::sync::watch::Sender::new(is_rejected(record.as_ref()));
        Ok(TokenManager {
            inner: Arc::new(Inner {
                client_id: cfg.client_id.clone(),
                client_secret,
                token_url,
                refresh_ahead: Duration::from_secs(cfg.refresh_ahead_s),
                store,
                transport,
                current: Mutex::new(Current {
                    record,
                    generation: 0,
                    attempts: 0,
                    last_error: None,
                }),
                refresh_lock: tokio::sync::Mutex::new(()),
                metrics,
                rejected,
            }),
        })
    }

    /// Whether the credentials work; readiness and the 7030 answer read this.
    pub fn state(&self) -> TokenState {
        match &self.current().record {
            None => no_token(),
            Some(r) => r.state.clone(),
        }
    }

    /// Resolves once the credentials are invalid (at once if they already are).
    pub async fn credentials_rejected(&self) {
        let mut rejected = self.inner.rejected.subscribe();
        if rejected.wait_for(|invalid| *invalid).await.is_err() {
            // The sender lives as long as `self`: unreachable, but never answer early.
            std::future::pending::<()>().await;
        }
    }

    pub fn status(&self) -> TokenStatus {
        TokenStatus::of(self.current().record.as_ref())
    }

    /// A valid access token and its generation (pass the generation back to
    /// [`TokenManager::refresh_after_rejection`] on a 401).
    pub async fn access_token(&self) -> Result<(Secret, u64), WebexError> {
        let (seen_generation, seen_attempts) = {
            let cur = self.current();
            if let Some(r) = &cur.record {
                if let TokenState::CredentialsInvalid { reason } = &r.state {
                    return Err(WebexError::CredentialsInvalid {
                        reason: reason.clone(),
                    });
                }
                if let Some(token) = self.fresh(r) {
                    return Ok((token, cur.generation));
                }
            }
            (cur.generation, cur.attempts)
        };
        self.refresh(seen_generation, seen_attempts).await
    }

    /// Webex answered 401 to the token of `generation`: refresh, unless another call already did.
    pub async fn refresh_after_rejection(
        &self,
        generation: u64,
    ) -> Result<(Secret, u64), WebexError> {
        let attempts = self.current().attempts;
        self.refresh(generation, attempts).await
    }

    /// Install a new refresh token (`flowthrough token set`), verified by one refresh; the old
    /// record stays when the new token does not work.
    pub async fn install_refresh_token(&self, refresh_token: Secret) -> Result<(), WebexError> {
        let _flight = self.inner.refresh_lock.lock().await;
        let lock = self.lock_token().await?;
        let previous = lock
            .record()
            .cloned()
            .or_else(|| self.current().record.clone());
        let record = self.exchange(&refresh_token, previous.as_ref()).await?;
        self.commit(Ok(record), lock).await.map(|_| ())
    }

    fn current(&self) -> std::sync::MutexGuard<'_, Current> {
        self.inner.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The access token if it is not within the refresh-ahead window. The window is at most half
    /// the token's lifetime, so short-lived tokens are not refreshed on every call.
    fn fresh(&self, r: &TokenRecord) -> Option<Secret> {
        let token = r.access_token.as_ref()?;
        let Some(expires_at) = r.access_expires_at else {
            // Webex gave no lifetime: use the token until a 401 says otherwise.
            return Some(token.clone());
        };
        let lifetime = expires_at - r.last_refresh.unwrap_or(expires_at);
        let ahead = (self.inner.refresh_ahead.as_secs() as i64).min(lifetime / 2);
        (expires_at - now_unix() > ahead).then(|| token.clone())
    }

    async fn refresh(
        &self,
        seen_generation: u64,
        seen_attempts: u64,
    ) -> Result<(Secret, u64), WebexError> {
        let _flight = self.inner.refresh_lock.lock().await;
        let previous = {
            let cur = self.current();
            if cur.generation != seen_generation
                && let Some(r) = &cur.record
                && let Some(token) = &r.access_token
                && r.access_expires_at.is_none_or(|at| at > now_unix())
            {
                return Ok((token.clone(), cur.generation));
            }
            if cur.attempts != seen_attempts
                && let Some(e) = &cur.last_error
            {
                return Err(e.clone());
            }
            match &cur.record {
                None => {
                    return Err(WebexError::CredentialsInvalid {
                        reason: "no refresh token is installed".to_owned(),
                    });
                }
                Some(r) => {
                    if let TokenState::CredentialsInvalid { reason } = &r.state {
                        return Err(WebexError::CredentialsInvalid {
                            reason: reason.clone(),
                        });
                    }
                    r.clone()
                }
            }
        };
        // One node at a time: wait for the token row, then look at what the node before this
        // one committed while this one waited.
        let lock = self.lock_token().await?;
        let previous = match lock.record() {
            Some(stored) if *stored != previous => {
                if let Some(adopted) = self.adopt(stored) {
                    let _ = self.inner.store.commit_token(lock, None).await;
                    return adopted;
                }
                // Stored by another node with a refresh token newer than the one this node
                // holds (it rotates), and already due again: refresh with that one.
                stored.clone()
            }
            _ => previous,
        };
        let result = self
            .exchange(&previous.refresh_token, Some(&previous))
            .await
            .map_err(|e| {
                if let WebexError::CredentialsInvalid { reason } = &e {
                    tracing::error!(
                        reason = %reason,
                        "the Webex token endpoint rejected the refresh token; provisioning is stopped until an operator installs a new refresh token with `flowthrough token set`"
                    );
                    (
                        e.clone(),
                        Some(TokenRecord {
                            state: TokenState::CredentialsInvalid {
                                reason: reason.clone(),
                            },
                            ..previous.clone()
                        }),
                    )
                } else {
                    tracing::warn!(error = %e, "refreshing the Webex access token failed; will retry");
                    (e, None)
                }
            });
        self.commit(result, lock).await
    }

    /// Take the token record for a refresh, its row locked on a shared store.
    async fn lock_token(&self) -> Result<crate::store::TokenLock, WebexError> {
        self.inner.store.lock_token().await.map_err(|e| {
            let err = WebexError::Retryable {
                reason: format!("cannot read the stored token for a refresh: {e}"),
            };
            let mut cur = self.current();
            cur.attempts += 1;
            cur.last_error = Some(err.clone());
            err
        })
    }

    /// Take over a record another node stored while this one waited for the token row, if it
    /// settles the refresh: a fresh access token, or credentials found invalid.
    fn adopt(&self, stored: &TokenRecord) -> Option<Result<(Secret, u64), WebexError>> {
        let outcome = match &stored.state {
            TokenState::CredentialsInvalid { reason } => Err(WebexError::CredentialsInvalid {
                reason: reason.clone(),
            }),
            TokenState::Ok => Ok(self.fresh(stored)?),
        };
        let mut cur = self.current();
        cur.record = Some(stored.clone());
        cur.attempts += 1;
        let adopted = match outcome {
            Ok(token) => {
                cur.generation += 1;
                cur.last_error = None;
                Ok((token, cur.generation))
            }
            Err(e) => {
                cur.last_error = Some(e.clone());
                Err(e)
            }
        };
        self.inner
            .rejected
            .send_replace(is_rejected(cur.record.as_ref()));
        Some(adopted)
    }

    /// Record the outcome of one refresh attempt (persisting any new record) and hand it out.
    async fn commit(
        &self,
        result: Result<TokenRecord, (WebexError, Option<TokenRecord>)>,
        lock: crate::store::TokenLock,
    ) -> Result<(Secret, u64), WebexError> {
        let to_store = match &result {
            Ok(r) => Some(r),
            Err((_, r)) => r.as_ref(),
        };
        let persisted = self.inner.store.commit_token(lock, to_store).await;
        self.count_refresh(match (&result, &persisted) {
            (Ok(_), Ok(())) => "ok",
            (Err((WebexError::CredentialsInvalid { .. }, _)), _) => "rejected",
            _ => "failed",
        });
        if let Err(e) = persisted {
            // The refresh token may have rotated: without persisting it, a restart would use a
            // dead token. Report the attempt as failed so it is retried.
            tracing::error!(error = %e, "cannot persist the Webex token record");
            let mut cur = self.current();
            cur.attempts += 1;
            let err = WebexError::Retryable {
                reason: format!("cannot persist the refreshed token: {e}"),
            };
            cur.last_error = Some(err.clone());
            return Err(err);
        }
        let mut cur = self.current();
        cur.attempts += 1;
        let handed_out = match result {
            Ok(record) => {
                let token = record.access_token.clone().unwrap_or_default();
                cur.record = Some(record);
                cur.generation += 1;
                cur.last_error = None;
                Ok((token, cur.generation))
            }
            Err((e, record)) => {
                if record.is_some() {
                    cur.record = record;
                }
                cur.last_error = Some(e.clone());
                Err(e)
            }
        };
        self.inner
            .rejected
            .send_replace(is_rejected(cur.record.as_ref()));
        handed_out
    }

    fn count_refresh(&self, outcome: &str) {
        if let Some(metrics) = &self.inner.metrics {
            metrics
                .token_refreshes
                .get_or_create(&OutcomeLabels {
                    outcome: outcome.to_owned(),
                })
                .inc();
        }
    }

    /// One refresh-grant exchange; builds the new record from the lifetimes Webex returned.
    async fn exchange(
        &self,
        refresh_token: &Secret,
        previous: Option<&TokenRecord>,
    ) -> Result<TokenRecord, WebexError> {
        let client: oauth2::Client<
            BasicErrorResponse,
            WebexTokenResponse,
            BasicTokenIntrospectionResponse,
            StandardRevocableToken,
            BasicRevocationErrorResponse,
        > = oauth2::Client::new(ClientId::new(self.inner.client_id.clone()));
        let client = client
            .set_client_secret(ClientSecret::new(
                self.inner.client_secret.expose().to_owned(),
            ))
            .set_auth_type(AuthType::RequestBody)
            .set_token_uri(self.inner.token_url.clone());
        let transport = self.inner.transport.clone();
        let http = move |req: oauth2::HttpRequest| {
            let transport = transport.clone();
            async move { send_oauth(&transport, req).await }
        };
        let refresh = RefreshToken::new(refresh_token.expose().to_owned());
        let started = now_unix();
        let resp = client
            .exchange_refresh_token(&refresh)
            .request_async(&http)
            .await
            .map_err(classify_token_error)?;
        let access_expires_at = resp.expires_in().map(|d| started + d.as_secs() as i64);
        let new_refresh = resp
            .refresh_token()
            .map(|t| Secret::new(t.secret().as_str()))
            .unwrap_or_else(|| refresh_token.clone());
        let refresh_expires_at = match resp.extra_fields().refresh_token_expires_in {
            Some(s) => Some(started + s as i64),
            None => previous.and_then(|p| p.refresh_expires_at),
        };
        if let Some(at) = refresh_expires_at {
            let left = at - started;
            if left < REFRESH_TOKEN_WARNING.as_secs() as i64 {
                tracing::warn!(
                    days_left = left / 86400,
                    "the Webex refresh token expires in less than 14 days; get a new one from the partner portal and install it with `flowthrough token set`"
                );
            }
        }
        tracing::info!(
            access_expires_at,
            refresh_expires_at,
            "Webex access token refreshed"
        );
        Ok(TokenRecord {
            access_token: Some(Secret::new(resp.access_token().secret().as_str())),
            access_expires_at,
            refresh_token: new_refresh,
            refresh_expires_at,
            last_refresh: Some(started),
            state: TokenState::Ok,
        })
    }
}

fn classify_token_error(e: RequestTokenError<TransportError, BasicErrorResponse>) -> WebexError {
    match e {
        RequestTokenError::ServerResponse(resp) => {
            let code = resp.error().to_string();
            let detail = resp.error_description().cloned().unwrap_or_default();
            match resp.error() {
                BasicErrorResponseType::InvalidGrant
                | BasicErrorResponseType::InvalidClient
                | BasicErrorResponseType::UnauthorizedClient => WebexError::CredentialsInvalid {
                    reason: format!("the token endpoint answered {code}: {detail}"),
                },
                _ => WebexError::Retryable {
                    reason: format!("the token endpoint answered {code}: {detail}"),
                },
            }
        }
        RequestTokenError::Request(t) => WebexError::Retryable {
            reason: t.to_string(),
        },
        RequestTokenError::Parse(_, _) | RequestTokenError::Other(_) => WebexError::Retryable {
            reason: "the token endpoint gave an answer that is not a token response".to_owned(),
        },
    }
}

/// Carry oauth2's request over the failover transport. A token request is retried on another
/// address after a timeout: the worst case is a rotated token whose answer was lost, which the
/// next `invalid_grant` reports.
async fn send_oauth(
    transport: &Transport,
    req: oauth2::HttpRequest,
) -> Result<oauth2::HttpResponse, TransportError> {
    let url = reqwest::Url::parse(&req.uri().to_string()).map_err(|e| TransportError::Setup {
        reason: format!("bad token URL: {e}"),
    })?;
    let method = req.method().clone();
    let headers = req.headers().clone();
    let body = req.body().clone();
    let raw = transport
        .send(&url, true, |c| {
            c.request(method.clone(), url.clone())
                .headers(headers.clone())
                .body(body.clone())
        })
        .await?;
    let mut resp = oauth2::HttpResponse::new(raw.body.to_vec());
    *resp.status_mut() = raw.status;
    *resp.headers_mut() = raw.headers;
    Ok(resp)
}
