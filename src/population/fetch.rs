//! Reading Webex's side of a population: every subscriber under a provisioning ID or an
//! spEnterpriseId, page by page (`max` = 100, `Link` paging), paced by the same learned pace as
//! delivery ([`crate::delivery::pace`]) and honouring `Retry-After`.

use std::collections::HashSet;
use std::time::Duration;

use tokio::time::Instant;

use crate::delivery::pace::Pacer;
use crate::webex::{Subscriber, WebexClient, WebexError, backoff};

/// Which subscribers to list.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    ProvisioningId(String),
    SpEnterpriseId(String),
}

impl Scope {
    fn filter(&self) -> (&'static str, &str) {
        match self {
            Scope::ProvisioningId(id) => ("provisioningId", id),
            Scope::SpEnterpriseId(id) => ("spEnterpriseId", id),
        }
    }

    /// Whether a subscriber belongs: later pages have been seen to drop the query's filters.
    pub fn holds(&self, subscriber: &Subscriber) -> bool {
        match self {
            Scope::ProvisioningId(id) => subscriber.provisioning_id.as_deref() == Some(id),
            Scope::SpEnterpriseId(id) => subscriber.sp_enterprise_id.as_deref() == Some(id),
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (key, value) = self.filter();
        write!(f, "{key}={value}")
    }
}

/// Attempts of one page through network errors and 5xx before the listing gives up.
const PAGE_ATTEMPTS: u32 = 5;

/// What listing took, for the report and the benchmark.
#[derive(Debug, Clone, Copy, Default)]
pub struct ListStats {
    pub pages: u64,
    pub rate_limited: u64,
}

/// Every subscriber of a scope. `max_rate` caps pages per second; `page_done` is told the
/// subscribers found so far after each page (a progress bar).
pub async fn list_scope(
    client: &WebexClient,
    scope: &Scope,
    max_rate: Option<f64>,
    stats: &mut ListStats,
    mut page_done: impl FnMut(usize),
) -> Result<Vec<Subscriber>, WebexError> {
    let mut pacer = Pacer::new();
    let spacing = max_rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(1.0 / r));
    let mut next_allowed = Instant::now();
    let mut url = client.list_url(&[scope.filter()]);
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut failures = 0;
    loop {
        let now = Instant::now();
        let at = pacer
            .wait_until(now)
            .into_iter()
            .chain([next_allowed])
            .max();
        // The next page is always waiting: a wake-up for its slot that comes late is owed it.
        let waited = pacer.wait_until(now).is_some();
        if let Some(at) = at.filter(|at| *at > now) {
            tokio::time::sleep_until(at).await;
        }
        let now = Instant::now();
        pacer.started(now, waited);
        if let Some(spacing) = spacing {
            next_allowed = now + spacing;
        }
        match client.list_page(&url).await.result {
            Ok(page) => {
                failures = 0;
                stats.pages += 1;
                pacer.accepted(Instant::now(), now);
                for subscriber in page.items {
                    if scope.holds(&subscriber) && seen.insert(subscriber.id.clone()) {
                        out.push(subscriber);
                    }
                }
                page_done(out.len());
                match page.next {
                    Some(next) => url = next,
                    None => return Ok(out),
                }
            }
            Err(WebexError::RetryAfter { after, .. }) => {
                stats.rate_limited += 1;
                pacer.limited(Instant::now());
                tokio::time::sleep(after).await;
            }
            Err(e @ (WebexError::Retryable { .. } | WebexError::UnknownOutcome { .. }))
                if failures + 1 < PAGE_ATTEMPTS =>
            {
                tracing::warn!(%scope, error = %e, "a subscriber list page failed; trying it again");
                tokio::time::sleep(backoff(
                    failures,
                    Duration::from_secs(1),
                    Duration::from_secs(15),
                ))
                .await;
                failures += 1;
            }
            Err(e) => return Err(e),
        }
    }
}
