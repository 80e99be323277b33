//! The single writer: gathers decoded batches from all connections into
//! large inserts, drops duplicates, and answers each batch only once its
//! rows are committed (that answer becomes the sensor's ack).

use super::rows::HostRow;
use super::{Dedup, Store};
use crate::metrics::Metrics;
use protocol::Batch;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

/// What the writer is handed: a batch, or a gap a sensor reports.
pub enum Work {
    Batch(Job),
    Gap(GapJob),
}

pub struct GapJob {
    pub host: Arc<str>,
    pub gap: protocol::Gap,
    pub reply: oneshot::Sender<Result<(), String>>,
}

pub struct Job {
    /// The host name from the sensor's certificate.
    pub host: Arc<str>,
    pub batch: Batch,
    pub bytes: u32,
    pub reply: oneshot::Sender<Result<(), String>>,
}

pub struct WriterConfig {
    pub max_rows: usize,
    pub flush_interval: Duration,
}

fn now_secs() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as u32)
        .unwrap_or(0)
}

/// How often a host's `hosts` row is refreshed.
const HOST_ROW_EVERY: Duration = Duration::from_secs(60);

pub async fn run(
    mut store: super::StoreHandle,
    mut rx: mpsc::Receiver<Work>,
    metrics: Arc<Metrics>,
    cfg: WriterConfig,
) {
    // Nothing is written (or acked) before the database is there: the queue fills and
    // pushes back on the sensors, as during an outage.
    let store: Store = store.wait().await;
    let mut dedup = Dedup::default();
    match store.recent_batches().await {
        Ok(rows) => {
            let n = rows.len();
            for (h, b, s) in rows {
                dedup.insert(&h, &b, s);
            }
            tracing::info!(
                batches = n,
                "loaded recently stored batch sequence numbers for duplicate suppression"
            );
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot load recent batches; duplicates of batches stored before this start will not be detected")
        }
    }
    // Batches that may be partly stored (see `Store::write`).
    let mut uncertain: HashSet<(String, String, u64)> = match store.uncertain_batches().await {
        Ok(v) => {
            if !v.is_empty() {
                tracing::info!(
                    batches = v.len(),
                    "batches possibly partly stored before this start; their rows are checked when they arrive again"
                );
            }
            v.into_iter().collect()
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read batch intents");
            HashSet::new()
        }
    };
    let mut first_seen = store.first_seen().await.unwrap_or_default();
    let mut host_written: HashMap<Arc<str>, Instant> = HashMap::new();

    while let Some(first) = rx.recv().await {
        let mut jobs = Vec::new();
        let mut gaps = Vec::new();
        let mut rows_est = 0;
        let mut take = |w: Work, rows_est: &mut usize| match w {
            Work::Batch(j) => {
                *rows_est += j.batch.snapshots.len() * 40;
                jobs.push(j);
            }
            Work::Gap(g) => gaps.push(g),
        };
        take(first, &mut rows_est);
        let deadline = tokio::time::Instant::now() + cfg.flush_interval;
        while rows_est < cfg.max_rows {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(w)) => take(w, &mut rows_est),
                _ => break,
            }
        }
        if !gaps.is_empty() {
            write_gaps(&store, gaps, &metrics).await;
        }
        metrics.queue_depth.store(rx.len() as u64, Relaxed);

        // Drop duplicates: already stored, or twice in this round.
        let mut fresh: Vec<Job> = Vec::with_capacity(jobs.len());
        for j in jobs {
            let dup = dedup.seen(&j.host, &j.batch.boot_id, j.batch.seq)
                || fresh.iter().any(|f| {
                    f.host == j.host
                        && f.batch.boot_id == j.batch.boot_id
                        && f.batch.seq == j.batch.seq
                });
            if dup {
                metrics.batches_duplicate.fetch_add(1, Relaxed);
                tracing::debug!(host = %j.host, seq = j.batch.seq, "duplicate batch acknowledged without storing");
                let _ = j.reply.send(Ok(()));
            } else {
                fresh.push(j);
            }
        }
        if fresh.is_empty() {
            continue;
        }

        let now = now_secs();
        let mut host_rows = Vec::new();
        let mut due_hosts: Vec<Arc<str>> = Vec::new();
        for j in &fresh {
            let Some(info) = &j.batch.info else { continue };
            if host_written
                .get(&j.host)
                .is_some_and(|t| t.elapsed() < HOST_ROW_EVERY)
                || due_hosts.contains(&j.host)
            {
                continue;
            }
            let fs = *first_seen.entry(j.host.to_string()).or_insert(now);
            due_hosts.push(j.host.clone());
            host_rows.push(HostRow {
                host: &j.host,
                first_seen: fs,
                last_seen: now,
                sensor_version: &info.sensor_version,
                kernel: &info.kernel,
                os: &info.os,
                arch: &info.arch,
                cpus: info.cpus,
                memory_bytes: info.memory_bytes,
                kernel_boot_id: &info.kernel_boot_id,
                sensor_boot_id: &j.batch.boot_id,
                probes: &info.probes,
            });
        }

        let refs: Vec<(&str, &Batch, u32)> = fresh
            .iter()
            .map(|j| (&*j.host, &j.batch, j.bytes))
            .collect();
        let mut attempt = 0;
        let mut outage_since: Option<Instant> = None;
        let result = loop {
            let t0 = Instant::now();
            match store.write(&refs, &host_rows, now, &uncertain).await {
                Ok(rows) => {
                    metrics.observe_insert(t0.elapsed().as_secs_f64());
                    if let Some(t) = outage_since {
                        tracing::info!(after = ?t.elapsed(), batches = refs.len(), "ClickHouse is back; ingest resumed");
                    }
                    metrics.clickhouse_down.store(0, Relaxed);
                    break Ok(rows);
                }
                Err(e) => {
                    metrics.insert_errors.fetch_add(1, Relaxed);
                    // Part of this round may be in ClickHouse now.
                    for (h, b, _) in &refs {
                        uncertain.insert((h.to_string(), b.boot_id.clone(), b.seq));
                    }
                    if !store.reachable().await {
                        // Outage: hold the round (and, through the bounded queue and
                        // QUIC flow control, the sensors) until ClickHouse returns.
                        if outage_since.is_none() {
                            tracing::error!(error = %format!("{e:#}"), batches = refs.len(), "ClickHouse unreachable; holding batches and retrying until it returns (sensors spool meanwhile)");
                            outage_since = Some(Instant::now());
                        }
                        metrics.clickhouse_down.store(1, Relaxed);
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        continue;
                    }
                    attempt += 1;
                    tracing::warn!(error = %format!("{e:#}"), attempt, batches = refs.len(), "insert into ClickHouse failed");
                    if attempt >= 3 {
                        break Err(format!("{e:#}"));
                    }
                    tokio::time::sleep(Duration::from_secs(1 << (attempt - 1))).await;
                }
            }
        };
        drop(refs);
        drop(host_rows);
        match result {
            Ok(rows) => {
                metrics.rows_inserted.fetch_add(rows as u64, Relaxed);
                for h in due_hosts {
                    host_written.insert(h, Instant::now());
                }
                let mut seen = metrics.last_seen.lock().unwrap();
                for j in &fresh {
                    if !uncertain.is_empty() {
                        uncertain.remove(&(
                            j.host.to_string(),
                            j.batch.boot_id.clone(),
                            j.batch.seq,
                        ));
                    }
                    dedup.insert(&j.host, &j.batch.boot_id, j.batch.seq);
                    metrics.batches_stored.fetch_add(1, Relaxed);
                    metrics
                        .samples_stored
                        .fetch_add(j.batch.sample_count(), Relaxed);
                    match seen.get_mut(&*j.host) {
                        Some(t) => *t = now,
                        None => {
                            seen.insert(j.host.to_string(), now);
                        }
                    }
                }
                drop(seen);
                for j in fresh {
                    let _ = j.reply.send(Ok(()));
                }
            }
            Err(msg) => {
                for j in fresh {
                    metrics.batches_failed.fetch_add(1, Relaxed);
                    let _ = j.reply.send(Err(format!("not stored: {msg}")));
                }
            }
        }
    }
    tracing::info!("writer finished: all queued batches handled");
}

async fn write_gaps(store: &Store, gaps: Vec<GapJob>, metrics: &Metrics) {
    let now = now_secs();
    let rows: Vec<super::rows::GapRow> = gaps
        .iter()
        .map(|g| super::rows::GapRow {
            host: &g.host,
            sensor_boot_id: &g.gap.boot_id,
            first_seq: g.gap.first_seq,
            last_seq: g.gap.last_seq,
            from_ts: (g.gap.from_ms / 1000) as u32,
            to_ts: (g.gap.to_ms / 1000) as u32,
            batches: g.gap.batches,
            samples: g.gap.samples,
            received: now,
        })
        .collect();
    let r = store.write_gaps(&rows).await.map_err(|e| format!("{e:#}"));
    drop(rows);
    for g in gaps {
        match &r {
            Ok(()) => {
                metrics.gaps_reported.fetch_add(1, Relaxed);
                tracing::warn!(host = %g.host, boot = %g.gap.boot_id, first_seq = g.gap.first_seq, last_seq = g.gap.last_seq, samples = g.gap.samples, "sensor reports batches it had to drop (spool full); recorded in the gaps table");
            }
            Err(e) => {
                tracing::warn!(host = %g.host, error = %e, "cannot record a gap; the sensor will resend it")
            }
        }
        let _ = g.reply.send(r.clone());
    }
}
