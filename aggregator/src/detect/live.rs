//! The live side of detection: decoded batches arrive from ingest (before they are stored,
//! so an alert leaves within milliseconds of the batch), duplicates are skipped, absence
//! rules are checked every second, rules are swapped on SIGHUP; alert rows are written to
//! ClickHouse in small batches.

use super::{rules::Rule, AlertEvent, Engine};
use crate::alert::Alerter;
use crate::metrics::Metrics;
use crate::store::{Dedup, Store, StoreHandle};
use protocol::Batch;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
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
    // Hosts new to this engine wait here, their batches queued in order, while the loader
    // reads their firing alerts and history.
    let mut waiting: HashMap<Arc<str>, Waiting> = HashMap::new();
    let mut rules_now: Arc<Vec<Rule>> = Arc::new(engine.rules().to_vec());
    let (ask, asked) = mpsc::unbounded_channel::<WarmRequest>();
    let (done_tx, mut done) = mpsc::channel::<Warmed>(256);
    tokio::spawn(loader(store.clone(), asked, done_tx));
    let mut loader_alive = true;
    // Batches held for waiting hosts, and hosts released before their answer came.
    let mut held = 0usize;
    let mut early: std::collections::HashSet<Arc<str>> = Default::default();
    loop {
        let arrived = tokio::select! {
            a = rx.recv() => {
                let Some(a) = a else { break };
                if dedup.seen(&a.host, &a.batch.boot_id, a.batch.seq) {
                    continue;
                }
                dedup.insert(&a.host, &a.batch.boot_id, a.batch.seq);
                if let Some(w) = waiting.get_mut(&a.host) {
                    if held < MAX_HELD {
                        w.batches.push(a);
                        held += 1;
                        continue;
                    }
                    // Too much held (a restart, sensors resending their spools): this host
                    // goes on without its history; its alerts are still taken over.
                    let mut w = waiting.remove(&a.host).unwrap();
                    held -= w.batches.len();
                    w.batches.push(a);
                    metrics.detect_hosts_waiting.store(waiting.len() as u64, Relaxed);
                    metrics.detect_hosts_cold.fetch_add(1, Relaxed);
                    tracing::debug!(host = %w.batches[0].host, "too many batches held for new hosts: this one starts without its history");
                    early.insert(w.batches[0].host.clone());
                    release(&mut engine, w, &mut out)
                } else if !engine.knows_host(&a.host) && loader_alive {
                    let first = a.batch.snapshots.iter().map(|s| s.ts_ms).min().unwrap_or_else(now_ms);
                    let labels = a.batch.snapshots.iter().find_map(super::host_labels_of);
                    let released = Arc::new(AtomicBool::new(false));
                    let _ = ask.send(WarmRequest {
                        host: a.host.clone(),
                        before_ms: first,
                        labels,
                        rules: rules_now.clone(),
                        asked: Instant::now(),
                        released: released.clone(),
                    });
                    waiting.insert(a.host.clone(), Waiting { since: Instant::now(), batches: vec![a], released });
                    held += 1;
                    metrics.detect_hosts_waiting.store(waiting.len() as u64, Relaxed);
                    continue;
                } else {
                    engine.observe_batch(&a.host, &a.batch, now_ms(), &mut out);
                    Some(a.at)
                }
            }
            w = done.recv(), if loader_alive => {
                let Some(w) = w else {
                    // Cannot happen short of a bug: new hosts then start cold; `WAIT_MAX`
                    // releases those waiting.
                    tracing::error!("the detection loader stopped; new hosts' detectors start without history");
                    loader_alive = false;
                    continue;
                };
                let Some(wait) = waiting.remove(&w.host) else {
                    // Released before the answer came: its firing alerts are still taken over.
                    if early.remove(&w.host) {
                        adopt(&mut engine, &w);
                    }
                    continue;
                };
                held -= wait.batches.len();
                metrics.detect_hosts_waiting.store(waiting.len() as u64, Relaxed);
                take_over(&mut engine, w, &metrics);
                release(&mut engine, wait, &mut out)
            }
            _ = tick.tick() => {
                ticks += 1;
                if ticks.is_multiple_of(MOVED_CHECK_EVERY_S) {
                    drop_moved_hosts(&mut engine, &store).await;
                }
                // The loader answers within its budget; this only guards against it stalling.
                let late: Vec<Arc<str>> = waiting
                    .iter()
                    .filter(|(_, w)| w.since.elapsed() > WAIT_MAX)
                    .map(|(h, _)| h.clone())
                    .collect();
                let mut first = None;
                for h in late {
                    let w = waiting.remove(&h).unwrap();
                    held -= w.batches.len();
                    early.insert(h.clone());
                    tracing::warn!(host = %h, "no answer about the host's alerts and history; its detectors start without them (a still-firing alert may be notified again)");
                    metrics.detect_hosts_cold.fetch_add(1, Relaxed);
                    first = first.or(release(&mut engine, w, &mut out));
                }
                metrics.detect_hosts_waiting.store(waiting.len() as u64, Relaxed);
                engine.tick(now_ms(), &mut out);
                let (n, b) = engine.state_size();
                metrics.detect_series.store(n as u64, Relaxed);
                metrics.detect_state_bytes.store(b as u64, Relaxed);
                *metrics.rules.lock().unwrap() = engine.rule_status();
                first
            }
            r = reload.recv() => {
                if let Some(rules) = r {
                    tracing::info!(rules = rules.len(), "rules reloaded");
                    rules_now = Arc::new(rules.clone());
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
/// The longest a new host's batches wait for the loader (it answers within `WARM_BUDGET`
/// plus its queries' timeouts; this guards against a stall).
const WAIT_MAX: Duration = Duration::from_secs(40);
/// A host asked about longer ago than this gets its firing alerts taken over but no history
/// replayed (many hosts arrived at once: an aggregator restart in a large fleet), so that its
/// batches are not held long.
const WARM_BUDGET: Duration = Duration::from_secs(20);
/// How much stored history the detectors of a new host replay: statistical rules with a
/// firing alert (so that it resolves when the aggregator it came from would have), and the
/// others (past their warm-up: 300 samples for `anomaly` at 1 s; the forecast window).
const FIRING_HISTORY_S: u64 = 3600;
const WARM_HISTORY_S: u64 = 600;

/// The most batches held for waiting hosts at once (a host's batch past it releases that
/// host without its history): bounds the memory a restart with many hosts resending their
/// spools can take.
const MAX_HELD: usize = 4096;

/// A host new to this engine whose batches wait for its alerts and history.
struct Waiting {
    since: Instant,
    batches: Vec<Arrival>,
    released: Arc<AtomicBool>,
}

/// A host's labels (its sensor's `labels`).
type HostLabels = Vec<(String, String)>;

struct WarmRequest {
    host: Arc<str>,
    /// The first sample of the batch that arrived: history is read before it.
    before_ms: u64,
    labels: Option<HostLabels>,
    rules: Arc<Vec<Rule>>,
    asked: Instant,
    /// Set when the host was released before the answer: no history to read.
    released: Arc<AtomicBool>,
}

/// What the loader found about a new host.
struct Warmed {
    host: Arc<str>,
    /// Its firing alerts (Err: ClickHouse did not answer).
    open: Result<Vec<super::OpenAlert>, String>,
    warmed: Option<super::WarmedHost>,
    samples: usize,
    /// Why no history was replayed, when none was.
    cold: Option<String>,
    /// No history because too many hosts arrived at once (logged once for all of them).
    crowded: bool,
}

impl Warmed {
    /// The answer for `host` with its firing alerts and nothing replayed yet.
    fn new(host: Arc<str>, open: Result<Vec<super::OpenAlert>, String>) -> Warmed {
        Warmed {
            host,
            open,
            warmed: None,
            samples: 0,
            cold: None,
            crowded: false,
        }
    }
}

/// Evaluates the batches a host's arrival held, in order; returns when the first arrived.
fn release(engine: &mut Engine, w: Waiting, out: &mut Vec<AlertEvent>) -> Option<Instant> {
    w.released.store(true, Relaxed);
    let first = w.batches.first().map(|a| a.at);
    for a in &w.batches {
        engine.observe_batch(&a.host, &a.batch, now_ms(), out);
    }
    first
}

/// A host this engine does not know started sending here (it moved from another
/// aggregator, this one restarted, or it is new): its detectors take in the history the
/// loader replayed, so a statistical rule judges the next sample against the host's recent
/// past instead of starting its warm-up again, and its firing alerts are taken over from
/// the alerts table, so that a still-firing alert is not notified again and its resolution
/// comes from here.
fn take_over(engine: &mut Engine, mut w: Warmed, metrics: &Metrics) {
    let series = w.warmed.take().map_or(0, |h| engine.absorb(h));
    let host = &*w.host;
    if w.samples > 0 {
        metrics.detect_hosts_warmed.fetch_add(1, Relaxed);
        metrics
            .detect_warm_samples
            .fetch_add(w.samples as u64, Relaxed);
    }
    if let Some(why) = &w.cold {
        metrics.detect_hosts_cold.fetch_add(1, Relaxed);
        if !w.crowded {
            tracing::warn!(%host, why = %why, "the host's detectors start without its history (statistical rules warm up again; a firing statistical alert may resolve early)");
        }
    } else {
        tracing::debug!(%host, series, history_samples = w.samples, "the host's detectors replayed its history");
    }
    adopt(engine, &w);
}

/// Takes over the host's firing alerts the loader found.
fn adopt(engine: &mut Engine, w: &Warmed) {
    let host = &*w.host;
    match &w.open {
        Ok(open) if !open.is_empty() => {
            let n = engine.adopt(host, open, now_ms());
            tracing::info!(%host, alerts = n, history_samples = w.samples, "took over the host's firing alerts from the alerts table");
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(%host, error = %e, "cannot read the host's open alerts; a still-firing alert may be notified again")
        }
    }
}

/// Answers the live loop's questions about hosts new to it, off its path: their firing
/// alerts (one query for all the hosts waiting), then their stored history, `WARM_CHUNK`
/// hosts per query, replayed into a side engine's detectors on a blocking thread.
async fn loader(
    store: StoreHandle,
    mut asked: mpsc::UnboundedReceiver<WarmRequest>,
    done: mpsc::Sender<Warmed>,
) {
    while let Some(first) = asked.recv().await {
        let mut reqs = vec![first];
        while reqs.len() < 512 {
            match asked.try_recv() {
                Ok(r) => reqs.push(r),
                Err(_) => break,
            }
        }
        let Some(st) = store.get() else {
            // Not open yet: nothing to take over or replay (the host starts as new).
            for r in reqs {
                if done
                    .send(Warmed::new(r.host, Ok(Vec::new())))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            continue;
        };
        let hosts: Vec<String> = reqs.iter().map(|r| r.host.to_string()).collect();
        let mut open =
            match tokio::time::timeout(Duration::from_secs(5), st.open_alerts(&hosts)).await {
                Ok(Ok(m)) => Ok(m),
                Ok(Err(e)) => Err(format!("{e:#}")),
                Err(_) => Err("reading the alerts table timed out (5 s)".to_string()),
            };
        let (n, mut crowded) = (reqs.len(), 0usize);
        let mut reqs = reqs.into_iter().peekable();
        while reqs.peek().is_some() {
            let chunk: Vec<WarmRequest> = reqs.by_ref().take(WARM_CHUNK).collect();
            let mut answers = Vec::with_capacity(chunk.len());
            let mut plain = Vec::new();
            for r in chunk {
                let host_open = match &mut open {
                    Ok(m) => Ok(m.remove(&*r.host).unwrap_or_default()),
                    Err(e) => Err(e.clone()),
                };
                let late = r.asked.elapsed() > WARM_BUDGET || r.released.load(Relaxed);
                crowded += late as usize;
                let firing: Vec<String> = host_open
                    .as_ref()
                    .map(|v| v.iter().map(|a| a.rule.clone()).collect())
                    .unwrap_or_default();
                let statistical_firing = firing
                    .iter()
                    .any(|f| r.rules.iter().any(|x| x.name == *f && x.is_statistical()));
                let mut w = Warmed::new(r.host.clone(), host_open);
                w.crowded = late;
                if late {
                    w.cold = Some("too many hosts arrived at once".to_string());
                } else if statistical_firing {
                    // Rare: a longer history for the firing rules, this host alone.
                    match warm_from_history(&st, &r, &firing).await {
                        Ok((h, k)) => (w.warmed, w.samples) = (Some(h), k),
                        Err(e) => w.cold = Some(e),
                    }
                } else {
                    plain.push((answers.len(), r));
                }
                answers.push(w);
            }
            if !plain.is_empty() {
                let reqs: Vec<&WarmRequest> = plain.iter().map(|(_, r)| r).collect();
                match warm_many(&st, &reqs).await {
                    Ok(mut got) => {
                        for (i, r) in &plain {
                            if let Some((h, k)) = got.remove(&*r.host) {
                                (answers[*i].warmed, answers[*i].samples) = (Some(h), k);
                            }
                        }
                    }
                    Err(e) => {
                        for (i, _) in &plain {
                            answers[*i].cold = Some(e.clone());
                        }
                    }
                }
            }
            for w in answers {
                if done.send(w).await.is_err() {
                    return;
                }
            }
        }
        if crowded > 0 {
            tracing::warn!(hosts = n, without_history = crowded, budget = ?WARM_BUDGET, "many hosts arrived at once: those whose history was not replayed within the budget start without it (statistical rules warm up again; their firing alerts are still taken over)");
        }
    }
}

/// Hosts whose history is read with one query per rule.
const WARM_CHUNK: usize = 32;

/// A host name is spliced into SQL: none that could change the statement.
fn sql_safe(host: &str) -> bool {
    !host.contains(['\'', '\\', '?'])
}

/// Reads the last `WARM_HISTORY_S` of history of several hosts (one query per rule, for
/// the statistical rules over one series) and replays each host's, before its first batch
/// here, into a side engine. Returns each host's warmed series and samples replayed; Err
/// when ClickHouse did not answer in time.
async fn warm_many(
    store: &Store,
    reqs: &[&WarmRequest],
) -> Result<HashMap<String, (super::WarmedHost, usize)>, String> {
    let rules = reqs[0].rules.clone();
    let hosts: Vec<&str> = reqs
        .iter()
        .map(|r| &*r.host)
        .filter(|h| sql_safe(h))
        .collect();
    if hosts.is_empty() {
        return Ok(HashMap::new());
    }
    let to = reqs.iter().map(|r| r.before_ms / 1000).max().unwrap_or(0) + 1;
    let from = reqs
        .iter()
        .map(|r| r.before_ms / 1000)
        .min()
        .unwrap_or(0)
        .saturating_sub(WARM_HISTORY_S);
    let qs = super::backtest::history_queries_of(
        &store.db,
        &rules,
        |ri| rules[ri].is_statistical(),
        &hosts,
        from,
        to,
    );
    let texts = fetch(store, &qs).await?;
    let wanted: Vec<(String, u64, Option<HostLabels>)> = reqs
        .iter()
        .filter(|r| sql_safe(&r.host))
        .map(|r| (r.host.to_string(), r.before_ms, r.labels.clone()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let by_host: Vec<HashMap<&str, String>> = texts
            .iter()
            .map(|t| super::backtest::split_by_host(t))
            .collect();
        let mut side = Engine::new(rules.to_vec());
        let mut counts = HashMap::new();
        for (host, before_ms, labels) in &wanted {
            if let Some(l) = labels {
                side.set_host_labels(host, l.clone());
            }
            let since = before_ms.saturating_sub(WARM_HISTORY_S * 1000);
            let mut samples = Vec::new();
            for (q, t) in qs.iter().zip(&by_host) {
                if let Some(text) = t.get(host.as_str()) {
                    samples.extend(
                        super::backtest::parse_history(q, &rules, host, text)
                            .into_iter()
                            .filter(|s| s.ts_ms >= since && s.ts_ms < *before_ms),
                    );
                }
            }
            counts.insert(host.clone(), replay(&mut side, host, samples));
        }
        side.take_hosts()
            .into_iter()
            .map(|(h, w)| {
                let n = counts.get(&h).copied().unwrap_or(0);
                (h, (w, n))
            })
            .collect()
    })
    .await
    .map_err(|e| format!("replaying the hosts' history failed: {e}"))
}

/// Feeds one host's history to `side`'s detectors in time order; returns the samples fed.
fn replay(side: &mut Engine, host: &str, mut samples: Vec<super::backtest::Sample>) -> usize {
    samples.sort_by_key(|s| s.ts_ms);
    for s in &samples {
        let labels: Vec<(&str, &str)> = s.labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        side.warm(s.rule, host, &labels, s.ts_ms, s.value);
    }
    samples.len()
}

/// The TabSeparated answers of `qs`, in order; Err at the first that fails or takes over 10 s.
async fn fetch(store: &Store, qs: &[super::backtest::HistoryQuery]) -> Result<Vec<String>, String> {
    let mut texts = Vec::with_capacity(qs.len());
    for q in qs {
        let read = tokio::time::timeout(Duration::from_secs(10), async {
            store
                .client
                .query(&q.sql)
                .fetch_bytes("TabSeparated")?
                .collect()
                .await
        })
        .await;
        match read {
            Ok(Ok(bytes)) => texts.push(String::from_utf8_lossy(&bytes).into_owned()),
            Ok(Err(e)) => return Err(format!("cannot read the hosts' history: {e}")),
            Err(_) => return Err("reading the hosts' history timed out (10 s)".into()),
        }
    }
    Ok(texts)
}

/// Replays `r.host`'s stored history before `r.before_ms` into a side engine with the
/// rules `r.rules`: `FIRING_HISTORY_S` for statistical rules among `firing` (so that a
/// taken-over alert resolves when the aggregator it came from would have),
/// `WARM_HISTORY_S` for the other statistical rules over one series (`forest` rules over
/// several series are not replayed). No lifecycle, no notification. Returns the host's
/// warmed series and the samples replayed; Err when ClickHouse did not answer in time.
async fn warm_from_history(
    store: &Store,
    r: &WarmRequest,
    firing: &[String],
) -> Result<(super::WarmedHost, usize), String> {
    let host = &*r.host;
    let rules = &r.rules;
    let mut side = Engine::new(rules.to_vec());
    if let Some(l) = &r.labels {
        side.set_host_labels(host, l.clone());
    }
    if !sql_safe(host) {
        return Ok((side.take_host(host), 0));
    }
    let to = r.before_ms / 1000;
    let is_firing = |ri: usize| firing.iter().any(|f| *f == rules[ri].name);
    let mut qs = Vec::new();
    for (span, want_firing) in [(FIRING_HISTORY_S, true), (WARM_HISTORY_S, false)] {
        qs.extend(super::backtest::history_queries(
            &store.db,
            rules,
            |ri| rules[ri].is_statistical() && is_firing(ri) == want_firing,
            host,
            to.saturating_sub(span),
            to,
            "",
            false,
        ));
    }
    let texts = fetch(store, &qs).await?;
    let host_s = host.to_string();
    let rules = rules.clone();
    tokio::task::spawn_blocking(move || {
        let mut samples = Vec::new();
        for (q, t) in qs.iter().zip(&texts) {
            samples.extend(super::backtest::parse_history(q, &rules, &host_s, t));
        }
        let n = replay(&mut side, &host_s, samples);
        (side.take_host(&host_s), n)
    })
    .await
    .map_err(|e| format!("replaying the host's history failed: {e}"))
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
