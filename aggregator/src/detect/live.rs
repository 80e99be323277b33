//! The live side of detection: decoded batches arrive from ingest (before they are stored,
//! so an alert leaves within milliseconds of the batch), duplicates are skipped, absence
//! rules are checked every second, rules are swapped on SIGHUP; alert rows are written to
//! ClickHouse in small batches.

use super::{rules::Rule, AlertEvent, Engine};
use crate::alert::Alerter;
use crate::metrics::Metrics;
use crate::store::{Dedup, Store};
use protocol::Batch;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

pub struct Arrival {
    pub host: Arc<str>,
    pub batch: Arc<Batch>,
    pub at: Instant,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub async fn run(
    mut engine: Engine,
    mut rx: mpsc::Receiver<Arrival>,
    mut reload: mpsc::Receiver<Vec<Rule>>,
    alerter: Alerter,
    metrics: Arc<Metrics>,
) {
    let mut dedup = Dedup::default();
    let mut out: Vec<AlertEvent> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let arrived = tokio::select! {
            a = rx.recv() => {
                let Some(a) = a else { break };
                if dedup.seen(&a.host, &a.batch.boot_id, a.batch.seq) {
                    continue;
                }
                dedup.insert(&a.host, &a.batch.boot_id, a.batch.seq);
                engine.observe_batch(&a.host, &a.batch, now_ms(), &mut out);
                Some(a.at)
            }
            _ = tick.tick() => {
                engine.tick(now_ms(), &mut out);
                let (n, b) = engine.state_size();
                metrics.detect_series.store(n as u64, Relaxed);
                metrics.detect_state_bytes.store(b as u64, Relaxed);
                *metrics.rules.lock().unwrap() = engine.rule_status();
                None
            }
            r = reload.recv() => {
                if let Some(rules) = r {
                    tracing::info!(rules = rules.len(), "rules reloaded");
                    engine.reload(rules, now_ms(), &mut out);
                }
                None
            }
        };
        metrics
            .detect_evaluations
            .store(engine.evaluations, Relaxed);
        for e in out.drain(..) {
            alerter.dispatch(e, arrived);
        }
    }
}

/// Writes alert transitions to ClickHouse, a few at a time.
pub async fn store_alerts(store: Store, mut rx: mpsc::Receiver<Arc<AlertEvent>>) {
    let mut buf = Vec::new();
    while let Some(e) = rx.recv().await {
        buf.push(e);
        // Gather what else arrives within 200 ms.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
        while let Ok(Some(e)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            buf.push(e);
        }
        for attempt in 0..5u32 {
            match store.write_alerts(&buf).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, attempt, rows = buf.len(), "writing alert rows failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500) * (attempt + 1)).await;
                }
            }
        }
        buf.clear();
    }
}
