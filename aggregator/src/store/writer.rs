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
    /// A sensor connected for this host: load what ClickHouse knows of it unless this
    /// writer's view is recent (several aggregators: it may have come from another).
    Arrived(Arc<str>),
}

pub struct GapJob {
    pub host: Arc<str>,
    pub gap: protocol::Gap,
    pub reply: oneshot::Sender<Result<(), String>>,
}

pub struct Job {
    /// The host name from the sensor's certificate.
    pub host: Arc<str>,
    /// Shared with the live detector (no copy per batch).
    pub batch: Arc<Batch>,
    pub bytes: u32,
    pub reply: oneshot::Sender<Result<(), String>>,
}

pub struct WriterConfig {
    pub max_rows: usize,
    pub flush_interval: Duration,
    /// Insert rounds in flight at once (at least 1).
    pub rounds: usize,
}

fn now_secs() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as u32)
        .unwrap_or(0)
}

/// How often a host's `hosts` row is refreshed.
const HOST_ROW_EVERY: Duration = Duration::from_secs(60);

type Key = (String, String, u64);
type Reply = oneshot::Sender<Result<(), String>>;

/// What the writer knows about stored batches, shared by its rounds in flight.
#[derive(Default)]
struct Book {
    dedup: Dedup,
    /// Batches that may be partly stored (see `Store::write`).
    uncertain: HashSet<Key>,
    /// Batches in a round in flight, with the replies of copies that arrived meanwhile
    /// (a sensor resending after a lost ack): they get the first copy's verdict.
    in_flight: HashMap<Key, Vec<Reply>>,
    host_written: HashMap<Arc<str>, Instant>,
    first_seen: HashMap<String, u32>,
    /// Hosts that connected while their stored state could not be read (storage down):
    /// loaded before any of their batches is stored.
    unloaded: HashSet<Arc<str>>,
    /// Batches with an open intent written by another aggregator process (its writers):
    /// that one may be inserting them right now. A copy here waits until none of those
    /// writers has a statement running (`await_writers`).
    foreign: HashMap<Key, Vec<String>>,
}

impl Book {
    /// Takes in open intents read from ClickHouse (`Store::uncertain_batches`): a batch
    /// not stored and not in a round here is uncertain (its rows are checked before they
    /// are inserted), and one another aggregator process began is marked foreign.
    fn note_open(&mut self, open: &[(Key, Vec<String>)]) {
        for (k, writers) in open {
            if self.dedup.seen(&k.0, &k.1, k.2) {
                continue;
            }
            if !self.in_flight.contains_key(k) {
                self.uncertain.insert(k.clone());
            }
            // Intents of releases before migration 12 name no writer.
            let others: Vec<String> = writers
                .iter()
                .filter(|w| !w.is_empty() && w.as_str() != super::writer_id())
                .cloned()
                .collect();
            if others.is_empty() {
                self.foreign.remove(k);
            } else {
                self.foreign.insert(k.clone(), others);
            }
        }
    }

    /// Forgets the uncertain and foreign marks of batches now known stored (by this
    /// aggregator or another): a batch whose copy never came here (its sensor's copy was
    /// stored elsewhere) would otherwise keep its marks for the process's life.
    fn forget_stored(&mut self) {
        let dedup = &self.dedup;
        self.uncertain.retain(|k| !dedup.seen(&k.0, &k.1, k.2));
        self.foreign.retain(|k, _| !dedup.seen(&k.0, &k.1, k.2));
    }

    /// Moves out of `fresh` the batches marked foreign (see `note_open`).
    fn take_foreign(&self, fresh: &mut Vec<Job>) -> Vec<Job> {
        if self.foreign.is_empty() {
            return Vec::new();
        }
        let (held, kept) = std::mem::take(fresh)
            .into_iter()
            .partition(|j| self.foreign.contains_key(&key(&j.host, &j.batch)));
        *fresh = kept;
        held
    }
}

fn key(host: &str, b: &Batch) -> Key {
    (host.to_string(), b.boot_id.clone(), b.seq)
}

/// The writer: gathers rounds from the queue and runs up to `cfg.rounds` of them at once.
/// Exactly once holds across rounds in flight: a batch is in at most one round (a copy
/// that arrives while it is in flight waits for that round's verdict), the intent and
/// `batches` rows of each round bracket its rows as before, and a round's failure marks
/// its batches uncertain for whichever round stores them next.
pub async fn run(
    mut store: super::StoreHandle,
    mut rx: mpsc::Receiver<Work>,
    metrics: Arc<Metrics>,
    cfg: WriterConfig,
) {
    // Nothing is written (or acked) before the database is there: the queue fills and
    // pushes back on the sensors, as during an outage.
    let store: Store = store.wait().await;
    let mut book = Book::default();
    match store.recent_batches(None).await {
        Ok(rows) => {
            let n = rows.len();
            for (h, b, s) in rows {
                book.dedup.insert(&h, &b, s);
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
    match store.uncertain_batches(None).await {
        Ok(v) => {
            if !v.is_empty() {
                tracing::info!(
                    batches = v.len(),
                    "batches possibly partly stored before this start; their rows are checked when they arrive again"
                );
            }
            book.note_open(&v);
        }
        Err(e) => tracing::warn!(error = %e, "cannot read batch intents"),
    }
    book.first_seen = store.first_seen().await.unwrap_or_default();
    let started = Instant::now();
    let book = Arc::new(std::sync::Mutex::new(book));
    // ClickHouse before 20.10 refuses a quorum insert into a table while the previous one's
    // quorum is pending (no insert_quorum_parallel): one round at a time there.
    let rounds = if store.quorum > 1 && !store.modern {
        if cfg.rounds > 1 {
            tracing::info!(
                configured = cfg.rounds,
                "insert quorum on ClickHouse {}: one insert round at a time (this server generation has no parallel quorum inserts)",
                store.version
            );
        }
        1
    } else {
        cfg.rounds.max(1)
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(rounds));
    let mut rounds = tokio::task::JoinSet::new();

    while let Some(first) = rx.recv().await {
        let t_first = Instant::now();
        let mut jobs = Vec::new();
        let mut gaps = Vec::new();
        let mut arrived = Vec::new();
        let mut rows_est = 0;
        let mut take = |w: Work, rows_est: &mut usize| match w {
            Work::Batch(j) => {
                *rows_est += j.batch.snapshots.len() * 40;
                jobs.push(j);
            }
            Work::Gap(g) => gaps.push(g),
            Work::Arrived(h) => arrived.push(h),
        };
        take(first, &mut rows_est);
        let deadline = tokio::time::Instant::now() + cfg.flush_interval;
        while rows_est < cfg.max_rows {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(w)) => take(w, &mut rows_est),
                _ => break,
            }
        }
        // While a round is in flight, another starts only once it is full: small rounds
        // in parallel would only make more parts for ClickHouse to merge (measured: half
        // the throughput). Extra rounds are for a backlog, each a full one.
        while rows_est < cfg.max_rows && !rounds.is_empty() {
            tokio::select! {
                w = rx.recv() => match w {
                    Some(w) => take(w, &mut rows_est),
                    None => break,
                },
                _ = rounds.join_next() => {}
            }
        }
        while rounds.try_join_next().is_some() {}
        if !gaps.is_empty() {
            // Off the writer's loop: checking a gap against `batches` is a query, and a
            // slow ClickHouse would hold the next round behind it. (Gaps are rare.)
            let (store, metrics) = (store.clone(), metrics.clone());
            tokio::spawn(async move { write_gaps(&store, gaps, &metrics).await });
        }
        if !arrived.is_empty() {
            load_hosts(&store, &book, arrived, started).await;
        }
        metrics.queue_depth.store(rx.len() as u64, Relaxed);
        if jobs.is_empty() {
            continue;
        }
        // A slot first: while every slot is busy, the queue fills and pushes back.
        let t_gathered = t_first.elapsed();
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        tracing::debug!(
            jobs = jobs.len(),
            gather_ms = t_gathered.as_millis() as u64,
            slot_ms = (t_first.elapsed() - t_gathered).as_millis() as u64,
            queued = rx.len(),
            "round gathered"
        );

        // Drop duplicates: already stored, in a round in flight, or twice in this one.
        let now = now_secs();
        let mut fresh: Vec<Job> = Vec::with_capacity(jobs.len());
        let mut host_rows_for: Vec<(Arc<str>, u32)> = Vec::new();
        let mut unc: HashSet<Key> = HashSet::new();
        let held;
        {
            let mut b = book.lock().unwrap();
            for j in jobs {
                if b.dedup.seen(&j.host, &j.batch.boot_id, j.batch.seq) {
                    metrics.batches_duplicate.fetch_add(1, Relaxed);
                    tracing::debug!(host = %j.host, seq = j.batch.seq, "duplicate batch acknowledged without storing");
                    let _ = j.reply.send(Ok(()));
                    continue;
                }
                let k = key(&j.host, &j.batch);
                if let Some(waiters) = b.in_flight.get_mut(&k) {
                    metrics.batches_duplicate.fetch_add(1, Relaxed);
                    tracing::debug!(host = %j.host, seq = j.batch.seq, "copy of a batch being stored; answered with its verdict");
                    waiters.push(j.reply);
                    continue;
                }
                if b.uncertain.contains(&k) {
                    unc.insert(k.clone());
                }
                b.in_flight.insert(k, Vec::new());
                fresh.push(j);
            }
            held = b.take_foreign(&mut fresh);
            for j in &fresh {
                if j.batch.info.is_none()
                    || b.host_written
                        .get(&j.host)
                        .is_some_and(|t| t.elapsed() < HOST_ROW_EVERY)
                    || host_rows_for.iter().any(|(h, _)| *h == j.host)
                {
                    continue;
                }
                let fs = *b.first_seen.entry(j.host.to_string()).or_insert(now);
                // Marked now so that rounds in flight do not all write it; a failed
                // round clears the mark.
                b.host_written.insert(j.host.clone(), Instant::now());
                host_rows_for.push((j.host.clone(), fs));
            }
        }
        hold(&store, &book, &metrics, held, now, true);
        if fresh.is_empty() {
            continue;
        }
        if !rounds.is_empty() {
            metrics.rounds_overlapped.fetch_add(1, Relaxed);
        }
        metrics.rounds_in_flight.fetch_add(1, Relaxed);
        let (store, book, metrics) = (store.clone(), book.clone(), metrics.clone());
        rounds.spawn(async move {
            let m = metrics.clone();
            round(store, book, metrics, fresh, host_rows_for, unc, now, true).await;
            m.rounds_in_flight.fetch_sub(1, Relaxed);
            drop(slot);
        });
    }
    while rounds.join_next().await.is_some() {}
    tracing::info!("writer finished: all queued batches handled");
}

/// Loads what ClickHouse knows of hosts whose sensors just connected here: their stored
/// sequence numbers and their open intents. With several aggregators a sensor that moved
/// here from another may resend a batch stored there whose ack it lost; this makes that
/// copy a duplicate. A connection is the signal: a sensor that was away (even briefly)
/// may have stored elsewhere meanwhile. The start-up load covers the first seconds.
/// When it cannot be read (storage down), the hosts are marked: their batches are not
/// stored until it has been (see `round`).
async fn load_hosts(
    store: &Store,
    book: &std::sync::Mutex<Book>,
    mut hosts: Vec<Arc<str>>,
    started: Instant,
) {
    if started.elapsed() < STARTUP_LOAD_FRESH {
        return;
    }
    hosts.sort();
    hosts.dedup();
    if let Err(e) = load_state(store, book, &hosts).await.map(drop) {
        tracing::warn!(error = %format!("{e:#}"), hosts = hosts.len(), "cannot load stored batches of hosts that connected; their batches wait until it can be read");
        book.lock().unwrap().unloaded.extend(hosts);
    }
}

/// Reads `hosts`' stored sequence numbers and open intents into the book, and returns
/// the open intents (those of batches in flight here too, which the book leaves to
/// their round).
async fn load_state(
    store: &Store,
    book: &std::sync::Mutex<Book>,
    hosts: &[Arc<str>],
) -> anyhow::Result<HashSet<Key>> {
    let names: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
    let stored = store.recent_batches(Some(&names)).await?;
    let open = store.uncertain_batches(Some(&names)).await?;
    let mut b = book.lock().unwrap();
    let (ns, no) = (stored.len(), open.len());
    for (h, boot, seq) in stored {
        b.dedup.insert(&h, &boot, seq);
    }
    b.forget_stored();
    b.note_open(&open);
    for h in hosts {
        b.unloaded.remove(h);
    }
    tracing::debug!(
        hosts = names.len(),
        stored = ns,
        open_intents = no,
        "loaded the stored state of hosts that connected"
    );
    Ok(open.into_iter().map(|(k, _)| k).collect())
}

/// A batch whose sensor connection closed before it was stored (an orphan) is stored
/// after storage has answered this long without a break, unless another aggregator
/// stored it meanwhile. The sensor resends it wherever it reconnects; were this aggregator
/// to store it at once, both would when storage returns from an outage, and neither would
/// see the other's rows yet. The other aggregator stores its copy in its first round
/// after storage returns (seconds), well inside this.
const ORPHAN_WAIT: Duration = Duration::from_secs(60);

/// Moves out of `fresh` the batches nobody waits for any more (the connection that sent
/// them closed, and no copy from another connection waits on them). They stay in flight,
/// so a copy that arrives meanwhile waits for their verdict.
fn take_orphans(book: &std::sync::Mutex<Book>, fresh: &mut Vec<Job>) -> Vec<Job> {
    if !fresh.iter().any(|j| j.reply.is_closed()) {
        return Vec::new();
    }
    let b = book.lock().unwrap();
    let (orphans, kept): (Vec<Job>, Vec<Job>) = std::mem::take(fresh).into_iter().partition(|j| {
        j.reply.is_closed()
            && b.in_flight
                .get(&key(&j.host, &j.batch))
                .is_none_or(|w| w.iter().all(|r| r.is_closed()))
    });
    *fresh = kept;
    orphans
}

/// Stores orphaned batches (see `ORPHAN_WAIT`): waits until storage has answered for that
/// long without a break, reloads their hosts' stored state (a copy stored by
/// another aggregator is then a duplicate) and checks their rows table by table (one
/// stored partly elsewhere is completed, not doubled), then stores what is missing.
fn store_orphans(
    store: Store,
    book: Arc<std::sync::Mutex<Book>>,
    metrics: Arc<Metrics>,
    jobs: Vec<Job>,
    now: u32,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    // Boxed with a named type: `round` spawns this and this runs a `round`.
    Box::pin(async move {
        let mut up_since: Option<Instant> = None;
        loop {
            if store.reachable().await {
                if up_since.get_or_insert_with(Instant::now).elapsed() >= ORPHAN_WAIT {
                    break;
                }
            } else {
                up_since = None;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let mut unc = HashSet::new();
        {
            let mut b = book.lock().unwrap();
            for j in &jobs {
                let k = key(&j.host, &j.batch);
                b.uncertain.insert(k.clone());
                unc.insert(k);
                b.unloaded.insert(j.host.clone());
            }
        }
        tracing::info!(
            batches = jobs.len(),
            "storing deferred batches (their sensor went away), unless another aggregator stored them"
        );
        round(store, book, metrics, jobs, Vec::new(), unc, now, false).await
    })
}

/// How often `await_writers` looks whether the other writers' statements have ended.
const WRITER_POLL: Duration = Duration::from_millis(500);

/// How long the other writers must show nothing running (looked at every quarter of it)
/// before their batches are taken up: a round is several statements one after another
/// (intents, tables, `batches`), and one look could fall between two of them.
const WRITER_QUIET: Duration = Duration::from_secs(1);

/// Hands `held` (batches another aggregator process began storing) to `await_writers`.
fn hold(
    store: &Store,
    book: &Arc<std::sync::Mutex<Book>>,
    metrics: &Arc<Metrics>,
    held: Vec<Job>,
    now: u32,
    divert: bool,
) {
    if !held.is_empty() {
        tokio::spawn(await_writers(
            store.clone(),
            book.clone(),
            metrics.clone(),
            held,
            now,
            divert,
        ));
    }
}

/// Stores batches another aggregator process began storing (an open intent of its;
/// see `Book::note_open`) once that process has had no statement running on ClickHouse
/// for `WRITER_QUIET`: its insert of them has then committed or failed. Their hosts'
/// stored state is read again (what it stored is a duplicate here), and the round checks
/// the rest table by table. Without this wait a sensor that left an aggregator while that
/// one's insert of its batch was running, and resent the batch here, could have it
/// stored by both. The batches stay in flight meanwhile: a copy that arrives waits for
/// their verdict.
fn await_writers(
    store: Store,
    book: Arc<std::sync::Mutex<Book>>,
    metrics: Arc<Metrics>,
    jobs: Vec<Job>,
    now: u32,
    divert: bool,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    // Boxed with a named type: `round` spawns this and this runs a `round`.
    Box::pin(async move {
        let keys: Vec<Key> = jobs.iter().map(|j| key(&j.host, &j.batch)).collect();
        let writers: HashSet<String> = {
            let b = book.lock().unwrap();
            keys.iter()
                .filter_map(|k| b.foreign.get(k))
                .flatten()
                .cloned()
                .collect()
        };
        let t0 = Instant::now();
        let mut told = false;
        let mut warned = Instant::now();
        let mut last_error: Option<Instant> = None;
        let mut quiet_since: Option<Instant> = None;
        loop {
            match store.writers_running(&writers).await {
                Ok(running) if running.is_empty() => {
                    if quiet_since.get_or_insert_with(Instant::now).elapsed() >= WRITER_QUIET {
                        break;
                    }
                    tokio::time::sleep(WRITER_QUIET / 4).await;
                }
                Ok(running) => {
                    quiet_since = None;
                    if !told {
                        told = true;
                        metrics
                            .batches_awaited
                            .fetch_add(jobs.len() as u64, Relaxed);
                        tracing::info!(
                            batches = jobs.len(),
                            writers = %running.into_iter().collect::<Vec<_>>().join(", "),
                            "another aggregator's insert of these batches is still running; they are stored (or found stored) when it ends"
                        );
                    } else if warned.elapsed() >= Duration::from_secs(60) {
                        warned = Instant::now();
                        tracing::warn!(
                            batches = jobs.len(),
                            waited = ?t0.elapsed(),
                            "still waiting for another aggregator's insert of these batches to end"
                        );
                    }
                    tokio::time::sleep(WRITER_POLL).await;
                }
                Err(e) => {
                    // Storage down: the other writer's insert cannot commit either.
                    quiet_since = None;
                    if last_error.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                        last_error = Some(Instant::now());
                        tracing::warn!(error = %format!("{e:#}"), batches = jobs.len(), "cannot read which inserts are running on ClickHouse; these batches wait");
                    }
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        }
        let mut hosts: Vec<Arc<str>> = jobs.iter().map(|j| j.host.clone()).collect();
        hosts.sort();
        hosts.dedup();
        let loaded = load_state(&store, &book, &hosts).await;
        let mut unc = HashSet::new();
        let mut done = Vec::new();
        let (stored, rest): (Vec<Job>, Vec<Job>);
        {
            let mut b = book.lock().unwrap();
            if loaded.is_err() {
                // The round reads it first.
                b.unloaded.extend(hosts);
            }
            for k in &keys {
                b.foreign.remove(k);
            }
            (stored, rest) = jobs
                .into_iter()
                .partition(|j| b.dedup.seen(&j.host, &j.batch.boot_id, j.batch.seq));
            for j in &stored {
                let k = key(&j.host, &j.batch);
                b.uncertain.remove(&k);
                done.extend(b.in_flight.remove(&k).unwrap_or_default());
            }
            for j in &rest {
                let k = key(&j.host, &j.batch);
                b.uncertain.insert(k.clone());
                unc.insert(k);
            }
        }
        let jobs = rest;
        let found = stored.len();
        metrics.batches_duplicate.fetch_add(found as u64, Relaxed);
        done.extend(stored.into_iter().map(|j| j.reply));
        if told {
            tracing::info!(
                waited = ?t0.elapsed(),
                stored_by_the_other = found,
                left = jobs.len(),
                "the other aggregator's insert ended; what it stored is acknowledged here, the rest checked row by row and stored"
            );
        } else {
            tracing::info!(
                waited = ?t0.elapsed(),
                stored_elsewhere = found,
                left = jobs.len(),
                "batches with an open intent of another aggregator process (nothing of it running: it ended or died); the rest checked row by row and stored"
            );
        }
        for r in done {
            let _ = r.send(Ok(()));
        }
        if jobs.is_empty() {
            return;
        }
        round(store, book, metrics, jobs, Vec::new(), unc, now, divert).await
    })
}

/// The start-up load is the state of every host for this long.
const STARTUP_LOAD_FRESH: Duration = Duration::from_secs(5);

/// A cheap random number (jitter).
pub(super) fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    h.finish()
}

/// One insert round: stores `fresh` (retrying through outages), then answers every batch
/// in it and every copy that arrived meanwhile. With `divert`, batches whose sensor went
/// away before they were stored are handed to `store_orphans` (before each attempt).
#[allow(clippy::too_many_arguments)]
async fn round(
    store: Store,
    book: Arc<std::sync::Mutex<Book>>,
    metrics: Arc<Metrics>,
    mut fresh: Vec<Job>,
    host_rows_for: Vec<(Arc<str>, u32)>,
    mut unc: HashSet<Key>,
    now: u32,
    divert: bool,
) {
    let mut attempt = 0;
    let mut quorum_waits = 0;
    let mut outage_since: Option<Instant> = None;
    let result = loop {
        // Another aggregator is changing the schema: no attempt starts until it is done.
        if store.fenced.load(Relaxed) {
            metrics.schema_change_hold.store(1, Relaxed);
            while store.fenced.load(Relaxed) {
                tokio::time::sleep(super::lock::FENCE_POLL / 4).await;
            }
            metrics.schema_change_hold.store(0, Relaxed);
        }
        if divert {
            let orphans = take_orphans(&book, &mut fresh);
            if !orphans.is_empty() {
                metrics
                    .batches_deferred
                    .fetch_add(orphans.len() as u64, Relaxed);
                tracing::info!(
                    batches = orphans.len(),
                    wait = ?ORPHAN_WAIT,
                    "sensor connection closed before its batches were stored; they are stored once storage has answered for the wait, unless another aggregator stores them first"
                );
                tokio::spawn(store_orphans(
                    store.clone(),
                    book.clone(),
                    metrics.clone(),
                    orphans,
                    now,
                ));
            }
        }
        // Hosts that connected during an outage: their stored state first (another
        // aggregator may have stored some of these batches).
        let mut need: Vec<Arc<str>> = {
            let b = book.lock().unwrap();
            fresh
                .iter()
                .filter(|j| b.unloaded.contains(&j.host))
                .map(|j| j.host.clone())
                .collect()
        };
        if !need.is_empty() {
            need.sort();
            need.dedup();
            let open = match load_state(&store, &book, &need).await {
                Ok(open) => {
                    // ClickHouse answered: a round whose batches all turn out stored
                    // (or deferred) writes nothing, and must not leave the flag up.
                    metrics.clickhouse_down.store(0, Relaxed);
                    open
                }
                Err(e) => {
                    if outage_since.is_none() {
                        tracing::error!(error = %format!("{e:#}"), hosts = need.len(), "cannot read the stored state of hosts that connected during an outage; holding their batches and retrying");
                        outage_since = Some(Instant::now());
                    }
                    metrics.clickhouse_down.store(1, Relaxed);
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
            };
            let mut done = Vec::new();
            {
                let mut b = book.lock().unwrap();
                let mut i = 0;
                while i < fresh.len() {
                    let j = &fresh[i];
                    let k = key(&j.host, &j.batch);
                    if b.dedup.seen(&j.host, &j.batch.boot_id, j.batch.seq) {
                        metrics.batches_duplicate.fetch_add(1, Relaxed);
                        tracing::debug!(host = %j.host, seq = j.batch.seq, "stored by another aggregator; acknowledged without storing");
                        b.uncertain.remove(&k);
                        let waiters = b.in_flight.remove(&k).unwrap_or_default();
                        let j = fresh.swap_remove(i);
                        done.push(j.reply);
                        done.extend(waiters);
                        continue;
                    }
                    // Open intents count for this round's own batches too: another
                    // aggregator may have stored one partly before storage went.
                    if b.uncertain.contains(&k) || open.contains(&k) {
                        unc.insert(k);
                    }
                    i += 1;
                }
            }
            for r in done {
                let _ = r.send(Ok(()));
            }
            // Another aggregator began storing some of them: they wait for it.
            let held = book.lock().unwrap().take_foreign(&mut fresh);
            hold(&store, &book, &metrics, held, now, divert);
        }
        if fresh.is_empty() {
            break Ok(0);
        }
        let mut host_rows = Vec::new();
        for (h, fs) in &host_rows_for {
            // The host's row comes from one of its batches still in the round.
            let Some((j, info)) = fresh
                .iter()
                .filter(|j| j.host == *h)
                .find_map(|j| Some((j, j.batch.info.as_ref()?)))
            else {
                continue;
            };
            host_rows.push(HostRow {
                host: &j.host,
                first_seen: *fs,
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
            .map(|j| (&*j.host, &*j.batch, j.bytes))
            .collect();
        let t0 = Instant::now();
        match store.write(&refs, &host_rows, now, &unc).await {
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
                {
                    let mut b = book.lock().unwrap();
                    for (h, bt, _) in &refs {
                        let k = key(h, bt);
                        unc.insert(k.clone());
                        b.uncertain.insert(k);
                    }
                }
                let text = format!("{e:#}");
                // A cluster whose replicated tables cannot write (ZooKeeper or Keeper
                // unreachable: "Table is in readonly mode") is an outage too.
                let readonly = store.cluster.is_some()
                    && (text.contains("readonly mode") || text.contains("ZooKeeper"));
                // A server of the cluster without the schema (a shard or replica just added
                // to `remote_servers`; `watch_new_servers` creates it there within seconds)
                // is an outage too: the round is held, not failed back to its sensors.
                let bare = store.cluster.is_some() && text.contains("doesn't exist");
                if readonly || bare || !store.reachable().await {
                    // Outage: hold the round (and, through the bounded queue and
                    // QUIC flow control, the sensors) until ClickHouse returns.
                    if outage_since.is_none() {
                        let what = if readonly {
                            "ClickHouse cluster cannot write (replication coordinator unreachable: tables read-only)"
                        } else if bare {
                            "ClickHouse cluster cannot write (a server has no table: a new shard or replica whose schema is not created yet)"
                        } else {
                            "ClickHouse unreachable"
                        };
                        tracing::error!(error = %text, batches = refs.len(), "{what}; holding batches and retrying until it returns (sensors spool meanwhile)");
                        outage_since = Some(Instant::now());
                    }
                    metrics.clickhouse_down.store(1, Relaxed);
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
                let msg = text;
                // Another writer's quorum insert into the same table is pending (several
                // aggregators on a cluster of ClickHouse < 20.10): retry soon, as recovery.
                if msg.contains("Quorum for previous write has not been satisfied")
                    && quorum_waits < 100
                {
                    quorum_waits += 1;
                    metrics.quorum_retries.fetch_add(1, Relaxed);
                    let ms = 50 + (rand_u64() % 200);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    continue;
                }
                attempt += 1;
                tracing::warn!(error = %msg, attempt, batches = refs.len(), "insert into ClickHouse failed");
                if attempt >= 3 {
                    break Err(format!("{e:#}"));
                }
                tokio::time::sleep(Duration::from_secs(1 << (attempt - 1))).await;
            }
        }
    };
    let mut replies: Vec<(Reply, Result<(), String>)> = Vec::new();
    {
        let mut b = book.lock().unwrap();
        match &result {
            Ok(rows) => {
                metrics.rows_inserted.fetch_add(*rows as u64, Relaxed);
                let mut seen = metrics.last_seen.lock().unwrap();
                for j in &fresh {
                    let k = key(&j.host, &j.batch);
                    if !b.uncertain.is_empty() {
                        b.uncertain.remove(&k);
                    }
                    b.dedup.insert(&j.host, &j.batch.boot_id, j.batch.seq);
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
            }
            Err(_) => {
                for (h, _) in &host_rows_for {
                    b.host_written.remove(h);
                }
            }
        }
        let verdict = result
            .as_ref()
            .map(|_| ())
            .map_err(|m| format!("not stored: {m}"));
        for j in fresh {
            if verdict.is_err() {
                metrics.batches_failed.fetch_add(1, Relaxed);
            }
            for w in b
                .in_flight
                .remove(&key(&j.host, &j.batch))
                .unwrap_or_default()
            {
                replies.push((w, verdict.clone()));
            }
            replies.push((j.reply, verdict.clone()));
        }
    }
    for (r, v) in replies {
        let _ = r.send(v);
    }
}

/// A gap of at most this many batches is checked against the `batches` table before it is
/// recorded (a sensor sends a batch it had sent, then dropped, as a gap of its own).
const GAP_CHECK_MAX: u64 = 16;

async fn write_gaps(store: &Store, mut gaps: Vec<GapJob>, metrics: &Metrics) {
    // A batch the sensor sent, whose ack it never got (the connection failed), then
    // dropped from its full spool, may have been stored: such a gap is not a loss.
    // (When the check fails, the gap is recorded: an over-report, never a loss unsaid.)
    let mut i = 0;
    while i < gaps.len() {
        let g = &gaps[i].gap;
        let span = g.last_seq.saturating_sub(g.first_seq) + 1;
        if g.last_seq >= g.first_seq && span <= GAP_CHECK_MAX {
            let stored = store
                .stored_count(&gaps[i].host, &g.boot_id, g.first_seq, g.last_seq)
                .await;
            if matches!(stored, Ok(n) if n == span) {
                let g = gaps.swap_remove(i);
                metrics.gaps_stored.fetch_add(1, Relaxed);
                tracing::info!(host = %g.host, boot = %g.gap.boot_id, first_seq = g.gap.first_seq, last_seq = g.gap.last_seq, "sensor reports batches it dropped that were stored after all (their ack was lost); not recorded as a gap");
                let _ = g.reply.send(Ok(()));
                continue;
            }
        }
        i += 1;
    }
    if gaps.is_empty() {
        return;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn job(seq: u64) -> (Job, oneshot::Receiver<Result<(), String>>) {
        let (tx, rx) = oneshot::channel();
        let batch = Batch {
            boot_id: "boot".into(),
            seq,
            ..Default::default()
        };
        let j = Job {
            host: "h".into(),
            batch: Arc::new(batch),
            bytes: 0,
            reply: tx,
        };
        (j, rx)
    }

    #[test]
    fn orphans_are_the_batches_nobody_waits_for() {
        let book = std::sync::Mutex::new(Book::default());
        let (j1, r1) = job(1); // its connection is open
        let (j2, r2) = job(2); // its connection closed
        let (j3, r3) = job(3); // closed, but a copy from another connection waits on it
        let (j4, r4) = job(4); // closed, and the copy waiting on it closed too
        let (w3, rw3) = oneshot::channel();
        let (w4, rw4) = oneshot::channel();
        {
            let mut b = book.lock().unwrap();
            for j in [&j1, &j2, &j3, &j4] {
                b.in_flight.insert(key(&j.host, &j.batch), Vec::new());
            }
            b.in_flight.get_mut(&key("h", &j3.batch)).unwrap().push(w3);
            b.in_flight.get_mut(&key("h", &j4.batch)).unwrap().push(w4);
        }
        drop((r2, r3, r4, rw4));
        let mut fresh = vec![j1, j2, j3, j4];
        let orphans = take_orphans(&book, &mut fresh);
        let seqs = |v: &[Job]| v.iter().map(|j| j.batch.seq).collect::<Vec<_>>();
        assert_eq!(seqs(&orphans), vec![2, 4]);
        assert_eq!(seqs(&fresh), vec![1, 3]);
        // They stay in flight: a copy that arrives later waits for their verdict.
        assert!(book
            .lock()
            .unwrap()
            .in_flight
            .contains_key(&key("h", &orphans[0].batch)));
        drop((r1, rw3));
    }

    #[test]
    fn nothing_is_taken_while_every_connection_is_open() {
        let book = std::sync::Mutex::new(Book::default());
        let (j1, _r1) = job(1);
        let mut fresh = vec![j1];
        assert!(take_orphans(&book, &mut fresh).is_empty());
        assert_eq!(fresh.len(), 1);
    }

    #[test]
    fn a_batch_another_aggregator_began_is_held_and_ours_or_unnamed_ones_are_not() {
        let mut b = Book::default();
        let me = super::super::writer_id().to_string();
        let k = |seq: u64| ("h".to_string(), "boot".to_string(), seq);
        b.dedup.insert("h", "boot", 5);
        b.note_open(&[
            (k(1), vec!["other-1-aa".into()]),
            (k(2), vec![me.clone()]),
            (k(3), vec![String::new()]),
            (k(4), vec![me, "other-2-bb".into()]),
            (k(5), vec!["other-1-aa".into()]), // stored meanwhile
        ]);
        // Every open one is uncertain (rows checked before inserting); only those with
        // another writer are held.
        for s in [1, 2, 3, 4] {
            assert!(b.uncertain.contains(&k(s)), "{s}");
        }
        assert!(!b.uncertain.contains(&k(5)));
        let mut held: Vec<u64> = b.foreign.keys().map(|k| k.2).collect();
        held.sort();
        assert_eq!(held, [1, 4]);
        assert_eq!(b.foreign[&k(4)], ["other-2-bb"]);
        let (jobs, _rx): (Vec<Job>, Vec<_>) = (1..=4).map(job).unzip();
        let mut fresh = jobs;
        let taken = b.take_foreign(&mut fresh);
        let seqs = |v: &[Job]| v.iter().map(|j| j.batch.seq).collect::<Vec<_>>();
        assert_eq!(seqs(&taken), [1, 4]);
        assert_eq!(seqs(&fresh), [2, 3]);
        // Read again naming no other writer: no longer held.
        b.note_open(&[(k(1), vec![String::new()])]);
        assert!(!b.foreign.contains_key(&k(1)));
        // Found stored later (the other aggregator stored it; no copy came here): its
        // marks go, the others' stay.
        b.dedup.insert("h", "boot", 4);
        b.forget_stored();
        assert!(!b.foreign.contains_key(&k(4)));
        assert!(!b.uncertain.contains(&k(4)));
        assert!(b.uncertain.contains(&k(1)) && b.uncertain.contains(&k(2)));
    }
}
