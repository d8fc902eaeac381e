//! Bulk work into the outbox, and `--standalone` delivery: the delivery engine and the Webex
//! attempt of `serve` ([`crate::delivery`]), run by the command itself on the configured store,
//! until the work it stands for has ended.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::time::Instant;

use super::diff::Fix;
use crate::config::Config;
use crate::delivery::webex::Deliverer;
use crate::delivery::{AttemptFn, Engine, Finished, Limits};
use crate::metrics::Metrics;
use crate::store::{Call, EntryState, Filter, NewEntry, Origin, Store, StoreError};
use crate::webex::{TokenManager, Transport, TransportOptions, WebexClient};

/// The outbox entry of a fix (bulk origin: delivery takes live commands first). `None` for a
/// fix with no Webex call.
pub fn entry(
    user_id: &str,
    template: &str,
    fix: &Fix,
    command: &str,
) -> Result<Option<NewEntry>, StoreError> {
    let call = match fix {
        Fix::Provision(body) => Call::provision(body)?,
        Fix::Update(body) => Call::update(body)?,
        Fix::Remove => Call::Remove,
        Fix::Unmap => return Ok(None),
    };
    Ok(Some(NewEntry {
        user_id: user_id.to_owned(),
        template: template.to_owned(),
        command: command.to_owned(),
        call,
        client: format!("flowthrough {command}"),
        origin: Origin::Bulk,
    }))
}

/// The Webex client of the configured deployment, with its credentials from `store` (where
/// `serve` keeps the rotated refresh token).
pub async fn connect(
    config: &Config,
    store: &Store,
    metrics: &Arc<Metrics>,
) -> Result<WebexClient, String> {
    let webex = config.webex.as_ref().ok_or(
        "the config has no [webex] section; import and reconcile need the Webex API and credentials",
    )?;
    let transport = Transport::new(
        TransportOptions::from_config(webex, crate::failover::Resolver::System)
            .map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let tokens = TokenManager::new(
        webex,
        store.clone(),
        transport.clone(),
        Some(metrics.clone()),
    )
    .await
    .map_err(|e| e.to_string())?;
    WebexClient::new(webex, transport, tokens).map_err(|e| e.to_string())
}

/// An attempt function that starts attempts at most `rate` times a second (`--max-rate`), on
/// top of the engine's own pace. Each start waits for the one before it and is spaced from when
/// that one really started: after the process was held up, starts resume at the rate instead of
/// catching up in a burst that a per-second limit would answer with 429.
fn capped(attempt: AttemptFn, rate: f64) -> AttemptFn {
    let spacing = Duration::from_secs_f64(1.0 / rate);
    let last_start = Arc::new(tokio::sync::Mutex::new(None::<Instant>));
    Arc::new(move |entry, lease| {
        let attempt = attempt.clone();
        let last_start = last_start.clone();
        Box::pin(async move {
            {
                let mut last = last_start.lock().await;
                if let Some(at) = *last {
                    tokio::time::sleep_until(at + spacing).await;
                }
                *last = Some(Instant::now());
            }
            attempt(entry, lease).await
        })
    })
}

/// How one user's bulk entry ended.
#[derive(Debug, Clone)]
pub struct Ended {
    pub user_id: String,
    pub finished: Finished,
}

/// Store `entries`, then deliver every pending entry of the store (these, and any an
/// interrupted run or a stopped node left) with the engine of `serve`, until all of them have
/// ended. `ended` is told each end as it happens.
pub async fn standalone(
    store: &Store,
    config: &Config,
    client: WebexClient,
    metrics: Arc<Metrics>,
    entries: Vec<NewEntry>,
    max_rate: Option<f64>,
    mut ended: impl FnMut(&Ended),
) -> Result<Vec<Ended>, String> {
    let webex = config
        .webex
        .as_ref()
        .ok_or("the config has no [webex] section")?;
    let deliverer = Deliverer {
        client,
        store: store.clone(),
        metrics,
        follow_up: Duration::from_secs(webex.follow_up_s),
    };
    let mut attempt = deliverer.attempt_fn();
    if let Some(rate) = max_rate.filter(|r| *r > 0.0) {
        attempt = capped(attempt, rate);
    }
    let engine = Engine::new(
        store.clone(),
        attempt,
        Limits {
            max_parallel_users: webex.max_parallel_users,
            max_entry_age: Duration::from_secs(config.store.max_entry_age_hours * 3600),
            poll: None,
            // Its own name on the lanes: on a shared store a running node may deliver too.
            node_id: format!("{}/import", config.cluster.node_id),
            lease: Duration::from_millis(config.cluster.lease_ms),
        },
    );
    store
        .enqueue(entries, crate::store::now_ms())
        .await
        .map_err(|e| e.to_string())?;
    store.flush().await.map_err(|e| e.to_string())?;
    let pending = store
        .list(Filter::Pending, usize::MAX)
        .await
        .map_err(|e| e.to_string())?;
    // A user whose lane a dead entry holds is not delivered (SPEC §11): its pending entries are
    // reported held at once, since no end would come for them.
    let mut held = HashMap::new();
    for dead in store
        .list(Filter::Dead, usize::MAX)
        .await
        .map_err(|e| e.to_string())?
    {
        let head = store
            .head_of(&dead.new.user_id)
            .await
            .map_err(|e| e.to_string())?;
        if let (Some(head), EntryState::Dead { reason, .. }) = (head, &dead.state)
            && head.id == dead.id
        {
            held.insert(dead.new.user_id.clone(), (dead.id, reason.clone()));
        }
    }
    let mut done = Vec::with_capacity(pending.len());
    let watches: FuturesUnordered<_> = FuturesUnordered::new();
    for entry in &pending {
        let user_id = entry.new.user_id.clone();
        if let Some((behind, reason)) = held.get(&user_id) {
            let end = Ended {
                user_id,
                finished: Finished::Held {
                    behind: *behind,
                    reason: reason.clone(),
                },
            };
            ended(&end);
            done.push(end);
            continue;
        }
        let watch = engine.watch(entry.id, &user_id).await;
        watches.push(async move { (user_id, watch.await) });
    }
    let mut watches = watches;
    let scheduler = engine.start().await.map_err(|e| e.to_string())?;
    while let Some((user_id, finished)) = watches.next().await {
        let Ok(finished) = finished else {
            return Err(format!(
                "the delivery engine stopped before the entry of {user_id} ended; run the command again to deliver the rest"
            ));
        };
        let end = Ended { user_id, finished };
        ended(&end);
        done.push(end);
    }
    engine.stop();
    engine.idle().await;
    scheduler.abort();
    store.flush().await.map_err(|e| e.to_string())?;
    Ok(done)
}
