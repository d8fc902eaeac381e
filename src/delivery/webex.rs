//! The Webex attempt: one outbox entry, one try against the Webex API, classified for the
//! scheduler, plus the follow-up of accepted subscribers until their status settles.

use std::sync::Arc;
use std::time::Duration;

use super::{Attempt, AttemptFn, Tenure};
use crate::metrics::{CallLabels, Metrics, StatusLabels};
use crate::store::{AuditEvent, AuditRecord, Call, Entry, Store, now_ms};
use crate::webex::{Outcome, Subscriber, SubscriberStatus, WebexClient, WebexError, backoff};

/// Backoff of the probe while Webex fails: 1 s doubling to 15 s, with jitter. Only one user
/// probes (the others wait for it, see [`Attempt::RetryUpstream`]), so a short cap costs Webex
/// little and finds its recovery quickly.
const PROBE_BASE: Duration = Duration::from_secs(1);
const PROBE_CAP: Duration = Duration::from_secs(15);
/// While the credentials are invalid nothing can be delivered; look again at this pace.
const CREDENTIALS_RETRY: Duration = Duration::from_secs(30);

/// What the attempt function needs.
#[derive(Clone)]
pub struct Deliverer {
    pub client: WebexClient,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    /// How long an accepted subscriber is followed up with GET.
    pub follow_up: Duration,
}

impl Deliverer {
    /// The attempt function the scheduler calls.
    pub fn attempt_fn(self) -> AttemptFn {
        let this = Arc::new(self);
        Arc::new(move |entry: Entry, tenure: Tenure| {
            let this = this.clone();
            Box::pin(async move { this.attempt(entry, &tenure).await })
        })
    }

    async fn attempt(&self, entry: Entry, tenure: &Tenure) -> Attempt {
        // A non-zero count says an earlier call may have reached Webex, so a provision looks the
        // user up first. A failed call is counted when it returns (`record`), a delivering one in
        // `Store::finish`; a crash during a call leaves the count as it was, and the POST sent
        // again is answered as a duplicate, which `provision_once` settles by lookup.
        let previous_attempts = entry.attempts;
        let user_id = entry.new.user_id.as_str();
        let mut tracking_id = None;
        let result = match &entry.new.call {
            Call::Provision { body } => {
                if previous_attempts > 0 {
                    match self.lookup(user_id).await {
                        Ok(Some(existing)) => {
                            return self
                                .delivered(&entry, Some(existing), "provision", None)
                                .await;
                        }
                        Ok(None) => {}
                        Err(e) => return self.classify(&entry, e, None),
                    }
                }
                if !tenure.held() {
                    return Attempt::LeaseExpired;
                }
                let started = std::time::Instant::now();
                let outcome = self.client.provision_once(user_id, body).await;
                self.record(&entry, tenure, "provision", &outcome, started.elapsed())
                    .await;
                tracking_id = Some(outcome.tracking_id.clone());
                match outcome.result {
                    Ok(subscriber) => {
                        return self
                            .delivered(&entry, Some(subscriber), "provision", tracking_id)
                            .await;
                    }
                    Err(e) => e,
                }
            }
            Call::Update { body } => match self.subscriber_id(user_id).await {
                Ok(Some(id)) => {
                    if !tenure.held() {
                        return Attempt::LeaseExpired;
                    }
                    let started = std::time::Instant::now();
                    let outcome = self.client.update(&id, body).await;
                    self.record(&entry, tenure, "update", &outcome, started.elapsed())
                        .await;
                    tracking_id = Some(outcome.tracking_id.clone());
                    match outcome.result {
                        Ok(subscriber) => {
                            return self
                                .delivered(&entry, Some(subscriber), "update", tracking_id)
                                .await;
                        }
                        Err(WebexError::NotFound) => {
                            // The map was stale: forget it and look the user up on the next try.
                            let _ = self.store.unmap_subscriber(user_id).await;
                            return Attempt::RetryUser {
                                after: PROBE_BASE,
                                reason: format!(
                                    "subscriber {id} no longer exists; looking {user_id} up again"
                                ),
                            };
                        }
                        Err(e) => e,
                    }
                }
                Ok(None) => {
                    return Attempt::Dead {
                        reason: format!(
                            "Webex has no subscriber with userId {user_id}, so the change cannot be applied; provision the user first (UserAddRequest or IM&P assignment), then `flowthrough outbox retry {}`",
                            entry.id
                        ),
                    };
                }
                Err(e) => e,
            },
            Call::Remove => match self.subscriber_id(user_id).await {
                Ok(Some(id)) => {
                    if !tenure.held() {
                        return Attempt::LeaseExpired;
                    }
                    let started = std::time::Instant::now();
                    let outcome = self.client.remove(&id).await;
                    self.record(&entry, tenure, "remove", &outcome, started.elapsed())
                        .await;
                    tracking_id = Some(outcome.tracking_id.clone());
                    match outcome.result {
                        // The user map forgets the subscriber with the entry's end.
                        Ok(()) | Err(WebexError::NotFound) => {
                            return Attempt::Delivered {
                                subscriber_id: Some(id),
                                webex_status: Some("removed".to_owned()),
                                tracking_id,
                            };
                        }
                        Err(e) => e,
                    }
                }
                // Unknown user: removal is idempotent.
                Ok(None) => {
                    return Attempt::Delivered {
                        subscriber_id: None,
                        webex_status: Some("absent".to_owned()),
                        tracking_id: None,
                    };
                }
                Err(e) => e,
            },
        };
        self.classify(&entry, result, tracking_id)
    }

    /// What an error means for the scheduler. Dead reasons carry what the AS's 7010 `detail`
    /// must: Webex's message, its errorCode(s) and the trackingId.
    fn classify(&self, entry: &Entry, error: WebexError, tracking_id: Option<String>) -> Attempt {
        let reason = error.to_string();
        let tracking_id = tracking_id
            .or_else(|| entry.tracking_id.clone())
            .unwrap_or_default();
        match error {
            WebexError::RetryAfter { status: 429, after } => Attempt::PauseAll { after, reason },
            WebexError::RetryAfter { after, .. } => Attempt::RetryUser { after, reason },
            WebexError::Retryable { .. } | WebexError::UnknownOutcome { .. } => {
                Attempt::RetryUpstream {
                    after: backoff(entry.attempts, PROBE_BASE, PROBE_CAP),
                    reason,
                }
            }
            WebexError::CredentialsInvalid { .. } => Attempt::RetryUpstream {
                after: CREDENTIALS_RETRY,
                reason,
            },
            WebexError::Permanent {
                status,
                message,
                errors,
                tracking_id: webex_tracking_id,
            } => {
                let codes: Vec<String> = errors
                    .iter()
                    .map(|e| format!("{}: {}", e.error_code, e.description))
                    .collect();
                Attempt::Dead {
                    reason: format!(
                        "Webex answered HTTP {status}: {message}{}; trackingId {}",
                        if codes.is_empty() {
                            String::new()
                        } else {
                            format!(" [{}]", codes.join("; "))
                        },
                        webex_tracking_id.unwrap_or(tracking_id)
                    ),
                }
            }
            WebexError::Duplicate { status, message } => Attempt::Dead {
                reason: format!(
                    "Webex answered HTTP {status}: {message} [{}]; trackingId {tracking_id}",
                    crate::webex::DUPLICATE_USER_ID
                ),
            },
            WebexError::NotFound => Attempt::Dead {
                reason: format!("{reason}; trackingId {tracking_id}"),
            },
        }
    }

    /// Record the call in metrics and the entry's tracking id in the store.
    async fn record<T>(
        &self,
        entry: &Entry,
        tenure: &Tenure,
        call: &str,
        outcome: &Outcome<T>,
        took: Duration,
    ) {
        self.metrics.webex_seconds.observe(took.as_secs_f64());
        let status = match &outcome.result {
            Ok(_) => "ok".to_owned(),
            Err(WebexError::RetryAfter { status, .. }) => status.to_string(),
            Err(WebexError::Permanent { status, .. }) => status.to_string(),
            Err(WebexError::Duplicate { status, .. }) => status.to_string(),
            Err(WebexError::NotFound) => "404".to_owned(),
            Err(WebexError::CredentialsInvalid { .. }) => "credentials".to_owned(),
            Err(WebexError::Retryable { .. }) => "retryable".to_owned(),
            Err(WebexError::UnknownOutcome { .. }) => "unknown".to_owned(),
        };
        self.metrics
            .webex_calls
            .get_or_create(&CallLabels {
                call: call.to_owned(),
                status,
            })
            .inc();
        // A call that delivered the entry is counted by `Store::finish`, in the same write. A
        // 429 is not counted: Webex refused it unread, so the next try need not look the user
        // up first, and under a rate limit that lookup would spend half of Webex's allowance.
        if outcome.result.is_err()
            && !matches!(
                outcome.result,
                Err(WebexError::RetryAfter { status: 429, .. })
            )
            && let Err(e) = self
                .store
                .record_attempt(entry.id, &outcome.tracking_id, Some(tenure.lease()))
                .await
        {
            tracing::error!(entry = entry.id, error = %e, "cannot record a delivery attempt");
        }
        tracing::info!(
            entry = entry.id,
            user_id = %entry.new.user_id,
            tracking_id = %outcome.tracking_id,
            call,
            ok = outcome.result.is_ok(),
            "webex call"
        );
    }

    async fn lookup(&self, user_id: &str) -> Result<Option<Subscriber>, WebexError> {
        self.client
            .list_by_user_id(user_id)
            .await
            .result
            .map(|list| list.into_iter().next())
    }

    /// The subscriber id of a user: from the map, else looked up (and remembered).
    async fn subscriber_id(&self, user_id: &str) -> Result<Option<String>, WebexError> {
        if let Ok(Some(record)) = self.store.user(user_id).await
            && let Some(id) = record.subscriber_id
        {
            return Ok(Some(id));
        }
        let found = self.lookup(user_id).await?;
        if let Some(subscriber) = &found {
            let _ = self
                .store
                .map_user(user_id, Some(&subscriber.id), None)
                .await;
        }
        Ok(found.map(|s| s.id))
    }

    async fn delivered(
        &self,
        entry: &Entry,
        subscriber: Option<Subscriber>,
        call: &str,
        tracking_id: Option<String>,
    ) -> Attempt {
        let Some(subscriber) = subscriber else {
            return Attempt::Delivered {
                subscriber_id: None,
                webex_status: None,
                tracking_id,
            };
        };
        // The user map learns the subscriber with the entry's end (`Store::finish_try`).
        let status = status_name(subscriber.status);
        if !subscriber.status.is_settled() {
            self.follow_up(entry, subscriber.id.clone(), call);
        }
        Attempt::Delivered {
            subscriber_id: Some(subscriber.id),
            webex_status: Some(status),
            tracking_id,
        }
    }

    /// Follow an accepted subscriber with GET (backoff, bounded) until its status settles, and
    /// record the final status in the audit and metrics.
    fn follow_up(&self, entry: &Entry, subscriber_id: String, call: &str) {
        let this = self.clone();
        let entry_id = entry.id;
        let user_id = entry.new.user_id.clone();
        let template = entry.new.template.clone();
        let client_label = entry.new.client.clone();
        let command = entry.new.command.clone();
        let call = call.to_owned();
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let mut attempt = 0;
            let final_status = loop {
                tokio::time::sleep(backoff(
                    attempt,
                    Duration::from_millis(500),
                    Duration::from_secs(30),
                ))
                .await;
                attempt += 1;
                let outcome = this.client.get(&subscriber_id).await;
                match outcome.result {
                    Ok(s) if s.status.is_settled() => {
                        let errors: Vec<String> = s
                            .errors
                            .iter()
                            .map(|e| format!("{}: {}", e.error_code, e.description))
                            .collect();
                        break (status_name(s.status), errors, outcome.tracking_id);
                    }
                    Ok(_) | Err(_) if started.elapsed() < this.follow_up => continue,
                    Ok(s) => break (status_name(s.status), Vec::new(), outcome.tracking_id),
                    Err(e) => break (format!("unknown ({e})"), Vec::new(), outcome.tracking_id),
                }
            };
            let (status, errors, tracking_id) = final_status;
            this.metrics
                .webex_final_status
                .get_or_create(&StatusLabels {
                    status: if status.starts_with("unknown") {
                        "unknown".to_owned()
                    } else {
                        status.clone()
                    },
                })
                .inc();
            if !errors.is_empty() {
                tracing::warn!(user_id = %user_id, subscriber_id = %subscriber_id, errors = ?errors, "Webex could not provision the subscriber; fix the cause in Control Hub or the template and send the user again");
            }
            let _ = this.store.set_webex_status(entry_id, &status).await;
            let record = AuditRecord {
                at_ms: now_ms(),
                client: client_label,
                event: AuditEvent::Command {
                    template: Some(template),
                    command: format!("{command} ({call} follow-up)"),
                    user_id: Some(user_id),
                    outcome: if errors.is_empty() {
                        status.clone()
                    } else {
                        format!("{status}: {}", errors.join("; "))
                    },
                    webex_status: Some(status),
                    tracking_id: Some(tracking_id),
                    outbox_id: Some(entry_id),
                    latency_ms: started.elapsed().as_millis() as u64,
                },
            };
            let _ = this.store.append_audit(&record).await;
        });
    }
}

/// The status as Webex spells it (`provisioned`, `pending_email_input`, …).
fn status_name(status: SubscriberStatus) -> String {
    match serde_json::to_value(status) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "unknown".to_owned(),
    }
}
