//! `[retention]`: the active server deletes old logs, events and processed webhook deliveries
//! through [`Store::prune`], which decides what is safe to delete (see its documentation): logs
//! only of finished builds, events only once the snapshot covers them and every outgoing
//! webhook receiver has acknowledged them, deliveries only once processed.
//!
//! A round is a series of small transactions (`batch` rows of each kind at most), with a short
//! pause between them, so that webhooks and the engine's writes never wait long behind it;
//! rounds run every `every`. Only the active server prunes (the task waits for the role like
//! the engine), and on PostgreSQL each transaction is fenced by the lease's epoch.

use std::sync::Arc;
use std::time::Duration;

use cib_core::ports::{Prune, Pruned, Store, StoreError};
use cib_core::time::Timestamp;

use crate::config::RetentionConfig;
use crate::state::AppState;

/// The pause between two transactions of one round, for the writes that wait behind them.
const PAUSE: Duration = Duration::from_millis(20);

/// Totals of one round, for the log line and the tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RoundTotals {
    pub logs: usize,
    pub events: usize,
    pub deliveries: usize,
}

/// Where log pruning goes on from, kept between rounds (builds are visited once each).
#[derive(Debug, Default)]
pub struct Cursor(Option<(Timestamp, cib_core::event::BuildId)>);

/// Runs rounds for as long as the server runs; nothing when retention is off.
pub async fn run(state: Arc<AppState>) {
    let config = state.config.retention.clone();
    if !config.enabled() {
        return;
    }
    let receivers: Vec<String> = state.config.webhooks.iter().map(|w| w.receiver()).collect();
    let mut cursor = Cursor::default();
    loop {
        match round(state.store.as_ref(), &config, &receivers, state.clock.now(), &mut cursor).await {
            Ok(t) if t == RoundTotals::default() => {}
            Ok(t) => tracing::info!(
                logs = t.logs,
                events = t.events,
                deliveries = t.deliveries,
                "retention deleted old logs (builds), events and deliveries"
            ),
            Err(error) => tracing::warn!(%error, "retention failed; trying again at the next round"),
        }
        tokio::select! {
            () = tokio::time::sleep(config.every.as_std()) => {}
            () = state.stopping.notified() => return,
        }
    }
}

/// One round: batches until nothing more is due now.
pub async fn round(
    store: &dyn Store,
    config: &RetentionConfig,
    receivers: &[String],
    now: Timestamp,
    cursor: &mut Cursor,
) -> Result<RoundTotals, StoreError> {
    let before = |age: Option<cib_core::spec::Duration>| age.map(|a| now - a.as_std());
    // A receiver without a cursor yet has not been started: its place is unknown, so no event
    // is deleted until it has one.
    let mut keep = u64::MAX;
    for name in receivers {
        keep = keep.min(store.webhook_cursor(name).await?.unwrap_or(0));
    }
    let mut totals = RoundTotals::default();
    loop {
        let rules = Prune {
            logs_before: before(config.logs),
            events_before: before(config.events),
            events_keep_after: keep,
            deliveries_before: before(config.inbox),
            batch: config.batch,
            logs_after: cursor.0.clone(),
        };
        let Pruned { logs, events, deliveries, logs_after, more } = store.prune(&rules).await?;
        cursor.0 = logs_after;
        totals.logs += logs;
        totals.events += events;
        totals.deliveries += deliveries;
        if !more {
            return Ok(totals);
        }
        tokio::time::sleep(PAUSE).await;
    }
}

#[cfg(test)]
mod tests {
    use cib_core::event::{BuildId, Event, EventBody};
    use cib_core::ports::{Delivery, StoredInput};
    use cib_core::spec::Duration as Age;

    use super::*;

    fn event(seq: u64, at: u64) -> Event {
        Event { seq, at: Timestamp(at), body: EventBody::BuildStarted { build: BuildId::from("b") } }
    }

    /// A round deletes, batch after batch, everything due; a receiver that has no cursor yet
    /// holds every event back, and one with a cursor holds back what it has not acknowledged.
    #[tokio::test]
    async fn retention_rounds_run_batches_until_done_and_receivers_hold_events_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = cib_store::SqliteStore::open(dir.path().join("cib.db"), cib_store::SqliteOptions::default())
            .expect("store");
        let day = 86_400_000;
        let events: Vec<Event> = (1..=25).map(|seq| event(seq, seq)).collect();
        store.append_events(&events).await.expect("events");
        store
            .append_input(&StoredInput { at: Timestamp(day), input: cib_core::pipeline::Input::Tick })
            .await
            .expect("input");
        for i in 0..7 {
            let d = Delivery {
                id: format!("d-{i}"),
                source: "github".into(),
                event: "push".into(),
                received_at: Timestamp(i),
                body: b"{}".to_vec(),
            };
            store.insert_delivery(&d).await.expect("delivery");
            store.mark_delivery_done(&d.id).await.expect("done");
        }
        let config = RetentionConfig {
            events: Some(Age::from_secs(3_600)),
            inbox: Some(Age::from_secs(3_600)),
            batch: 3,
            ..RetentionConfig::default()
        };
        let now = Timestamp(2 * day);
        let receivers = ["audit".to_owned()];
        let mut cursor = Cursor::default();

        let totals = round(&store, &config, &receivers, now, &mut cursor).await.expect("round");
        assert_eq!(totals, RoundTotals { logs: 0, events: 0, deliveries: 7 }, "no cursor, no events deleted");

        store.advance_webhook_cursor("audit", 10).await.expect("cursor");
        let totals = round(&store, &config, &receivers, now, &mut cursor).await.expect("round");
        assert_eq!(totals.events, 10, "up to the receiver's cursor, in batches of 3");
        let left = store.events_after(0, 100).await.expect("events");
        assert_eq!(left.first().map(|e| e.seq), Some(11));

        let totals = round(&store, &config, &[], now, &mut cursor).await.expect("round");
        assert_eq!(totals.events, 14, "with no receivers, all but the newest");
        assert_eq!(store.last_event_seq().await.expect("last"), 25);
    }
}
