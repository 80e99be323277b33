//! The live side of detection: decoded batches arrive from ingest (before they are stored,
//! so an alert leaves within milliseconds of the batch), duplicates are skipped, absence
//! rules are checked every second, rules are swapped on SIGHUP; alert rows are written to
//! ClickHouse in small batches.

use super::{rules::Rule, AlertEvent, Engine};
use crate::alert::Alerter;
use crate::metrics::Metrics;
use crate::store::{Dedup, Store, StoreHandle};
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
    store: StoreHandle,
) {
    let mut dedup = Dedup::default();
    let mut out: Vec<AlertEvent> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut ticks = 0u64;
    loop {
        let arrived = tokio::select! {
            a = rx.recv() => {
                let Some(a) = a else { break };
                if dedup.seen(&a.host, &a.batch.boot_id, a.batch.seq) {
                    continue;
                }
                dedup.insert(&a.host, &a.batch.boot_id, a.batch.seq);
                if !engine.knows_host(&a.host) {
                    let first = a.batch.snapshots.iter().map(|s| s.ts_ms).min().unwrap_or_else(now_ms);
                    take_over(&mut engine, &store, &a.host, first).await;
                }
                engine.observe_batch(&a.host, &a.batch, now_ms(), &mut out);
                Some(a.at)
            }
            _ = tick.tick() => {
                ticks += 1;
                if ticks % MOVED_CHECK_EVERY_S == 0 {
                    drop_moved_hosts(&mut engine, &store).await;
                }
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

/// How often hosts that went quiet here are checked for having moved to another aggregator.
const MOVED_CHECK_EVERY_S: u64 = 5;
/// A host is checked once it has sent nothing here for this long (batches come every 5 s).
const QUIET_MS: u64 = 8_000;

/// A host this engine does not know started sending here: take over its firing alerts
/// from the alerts table (another aggregator's, or this one's before a restart), so that
/// a still-firing alert is not notified again and its resolution comes from here. The
/// detectors of statistical rules with a firing alert first replay the host's last hour
/// from ClickHouse (before `before_ms`, the first sample of the batch that arrived), so
/// that they resolve the alert when the aggregator it came from would have.
async fn take_over(engine: &mut Engine, store: &StoreHandle, host: &str, before_ms: u64) {
    let Some(store) = store.get() else { return };
    match tokio::time::timeout(Duration::from_secs(2), store.open_alerts(host)).await {
        Ok(Ok(open)) if !open.is_empty() => {
            let warmed = warm_from_history(engine, &store, host, &open, before_ms).await;
            let n = engine.adopt(host, &open, now_ms());
            tracing::info!(%host, alerts = n, history_samples = warmed, "took over the host's firing alerts from the alerts table");
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::warn!(%host, error = %format!("{e:#}"), "cannot read the host's open alerts; a still-firing alert may be notified again")
        }
        Err(_) => {
            tracing::warn!(%host, "reading the host's open alerts timed out; a still-firing alert may be notified again")
        }
    }
}

/// How much of a host's history the detectors of its taken-over statistical alerts replay.
const TAKEOVER_HISTORY_S: u64 = 3600;

/// Replays `host`'s stored history of the statistical rules among `open` into their
/// detectors (no lifecycle, no notification). Returns the samples replayed; 0 when there
/// is nothing to replay or ClickHouse does not answer in time (the alerts are then taken
/// over with fresh detectors, which may resolve them early).
async fn warm_from_history(
    engine: &mut Engine,
    store: &Store,
    host: &str,
    open: &[super::OpenAlert],
    before_ms: u64,
) -> usize {
    let wanted: Vec<usize> = engine
        .rules()
        .iter()
        .enumerate()
        .filter(|(_, r)| r.is_statistical() && open.iter().any(|a| a.rule == r.name))
        .map(|(i, _)| i)
        .collect();
    // A host name is spliced into SQL: none that could change the statement.
    if wanted.is_empty() || host.contains(['\'', '\\', '?']) {
        return 0;
    }
    let to = before_ms / 1000;
    let qs = super::backtest::history_queries(
        &store.db,
        engine.rules(),
        |ri| wanted.contains(&ri),
        host,
        to.saturating_sub(TAKEOVER_HISTORY_S),
        to,
        "",
        false,
    );
    let mut samples = Vec::new();
    for q in &qs {
        let read = tokio::time::timeout(Duration::from_secs(5), async {
            store
                .client
                .query(&q.sql)
                .fetch_bytes("TabSeparated")?
                .collect()
                .await
        })
        .await;
        match read {
            Ok(Ok(bytes)) => samples.extend(super::backtest::parse_history(
                q,
                engine.rules(),
                host,
                &String::from_utf8_lossy(&bytes),
            )),
            Ok(Err(e)) => {
                tracing::warn!(%host, error = %e, "cannot read the host's history; its statistical alerts are taken over without it and may resolve early");
                return 0;
            }
            Err(_) => {
                tracing::warn!(%host, "reading the host's history timed out; its statistical alerts are taken over without it and may resolve early");
                return 0;
            }
        }
    }
    samples.sort_by_key(|s| s.ts_ms);
    for s in &samples {
        let labels: Vec<(&str, &str)> = s.labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        engine.warm(s.rule, host, &labels, s.ts_ms, s.value);
    }
    samples.len()
}

/// Several aggregators: a host that went quiet here while another aggregator stored its
/// batches since has moved (its sensor failed over, or back): forget it here, without a
/// `host_silent` alert; the other aggregator took its alerts over. The shared truth is the
/// `batches` table (when each batch was stored, by whichever aggregator).
async fn drop_moved_hosts(engine: &mut Engine, store: &StoreHandle) {
    let quiet = engine.quiet_hosts(now_ms(), QUIET_MS);
    if quiet.is_empty() {
        return;
    }
    let Some(store) = store.get() else { return };
    let names: Vec<String> = quiet.iter().map(|(h, _)| h.clone()).collect();
    let stored = match tokio::time::timeout(Duration::from_secs(5), store.last_received(&names))
        .await
    {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            tracing::debug!(error = %format!("{e:#}"), "cannot check whether quiet hosts moved");
            return;
        }
        Err(_) => return,
    };
    for (host, last_here) in quiet {
        let Some(&elsewhere_s) = stored.get(&host) else {
            continue;
        };
        // Stored (by anyone) clearly after the last batch that arrived here: it moved.
        if elsewhere_s * 1000 > last_here + 3_000 {
            let n = engine.host_left(&host);
            tracing::info!(%host, series = n, "host moved to another aggregator; its detection state here is dropped (no host_silent from here)");
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
