//! The live side of detection: decoded batches arrive from ingest (before they are stored,
//! so an alert leaves within milliseconds of the batch), duplicates are skipped, absence
//! rules are checked every second, rules are swapped on SIGHUP; alert rows are written to
//! ClickHouse in small batches.

use super::{rules::Rule, AlertEvent, Engine};
use crate::alert::Alerter;
use crate::metrics::Metrics;
use crate::store::{Dedup, Store, StoreHandle};
use protocol::Batch;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
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
    let (ask, asked) = mpsc::unbounded_channel::<WarmRequest>();
    let (ask_late, asked_late) = mpsc::unbounded_channel::<WarmRequest>();
    let (done_tx, mut done) = mpsc::channel::<Warmed>(256);
    tokio::spawn(loader(store.clone(), asked, asked_late, done_tx));
    let mut news = Newcomers::new(Arc::new(engine.rules().to_vec()), ask, ask_late);
    loop {
        let arrived = tokio::select! {
            a = rx.recv() => {
                let Some(a) = a else { break };
                if dedup.seen(&a.host, &a.batch.boot_id, a.batch.seq) {
                    continue;
                }
                dedup.insert(&a.host, &a.batch.boot_id, a.batch.seq);
                news.arrive(&mut engine, a, &metrics, &alerter, &mut out)
            }
            w = done.recv(), if news.loader_alive => {
                let Some(w) = w else {
                    // Cannot happen short of a bug: new hosts then start cold; `WAIT_MAX`
                    // releases those waiting.
                    tracing::error!("the detection loader stopped; new hosts' detectors start without history");
                    news.loader_alive = false;
                    continue;
                };
                news.answered(&mut engine, w, &metrics, &alerter, &mut out)
            }
            _ = tick.tick() => {
                ticks += 1;
                if ticks.is_multiple_of(MOVED_CHECK_EVERY_S) {
                    drop_moved_hosts(&mut engine, &store).await;
                }
                let first = news.tick(&mut engine, Instant::now(), &metrics, &alerter, &mut out);
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
                    news.rules = Arc::new(rules.clone());
                    engine.reload(rules, now_ms(), &mut out);
                }
                None
            }
        };
        metrics
            .detect_hosts_waiting
            .store(news.waiting.len() as u64, Relaxed);
        metrics
            .detect_evaluations
            .store(engine.evaluations, Relaxed);
        metrics
            .detect_replayed_skipped
            .store(engine.replayed_skipped, Relaxed);
        for e in out.drain(..) {
            route(&mut news.unread, e, arrived, &alerter);
        }
    }
}

/// The live loop's hosts new to its engine: those whose batches wait while the loader
/// reads their firing alerts and history, and those judged before their firing alerts
/// could be read, whose alert events are held until they are.
struct Newcomers {
    /// Hosts waiting for the loader's answer, their batches queued in order.
    waiting: HashMap<Arc<str>, Waiting>,
    /// Batches queued for waiting hosts, at most `MAX_HELD`.
    held: usize,
    /// Hosts released before their answer came.
    early: HashSet<Arc<str>>,
    /// Hosts judged here before their firing alerts could be read: their alert events.
    unread: HashMap<Arc<str>, Unread>,
    /// The loader's queues: hosts that just arrived, and catch-ups.
    ask: mpsc::UnboundedSender<WarmRequest>,
    ask_late: mpsc::UnboundedSender<WarmRequest>,
    rules: Arc<Vec<Rule>>,
    loader_alive: bool,
}

impl Newcomers {
    fn new(
        rules: Arc<Vec<Rule>>,
        ask: mpsc::UnboundedSender<WarmRequest>,
        ask_late: mpsc::UnboundedSender<WarmRequest>,
    ) -> Newcomers {
        Newcomers {
            waiting: HashMap::new(),
            held: 0,
            early: HashSet::new(),
            unread: HashMap::new(),
            ask,
            ask_late,
            rules,
            loader_alive: true,
        }
    }

    /// Asks for the history of a host released without it. `alerts`: its firing alerts
    /// were not read (ClickHouse down or too slow): the catch-up takes over those that
    /// began before the host arrived here.
    fn catch_up(&self, host: &Arc<str>, batches: &[Arrival], alerts: bool) {
        let arrived_ms = first_sample_ms(batches);
        let _ = self.ask_late.send(WarmRequest {
            host: host.clone(),
            before_ms: 0,
            alerts_before_ms: alerts.then_some(arrived_ms),
            labels: batches
                .iter()
                .flat_map(|a| a.batch.snapshots.iter())
                .find_map(super::host_labels_of),
            rules: self.rules.clone(),
            asked: Instant::now(),
            released: Arc::new(AtomicBool::new(false)),
        });
    }

    /// Releases a waiting host before its answer came: its batches are evaluated, its
    /// history is asked for again as a catch-up, and its alert events are held until its
    /// firing alerts are read. Returns when its first batch arrived.
    fn release_early(
        &mut self,
        engine: &mut Engine,
        w: Waiting,
        now: Instant,
        metrics: &Metrics,
        out: &mut Vec<AlertEvent>,
    ) -> Option<Instant> {
        let host = w.batches[0].host.clone();
        self.held -= w.batches.len();
        self.early.insert(host.clone());
        self.catch_up(&host, &w.batches, true);
        hold(&mut self.unread, &host, &w, now);
        metrics.detect_hosts_cold.fetch_add(1, Relaxed);
        release(engine, w, out)
    }

    /// A batch not seen before: evaluated, or queued while its host waits for the
    /// loader's answer. Returns when the first batch evaluated arrived.
    fn arrive(
        &mut self,
        engine: &mut Engine,
        a: Arrival,
        metrics: &Metrics,
        to: &impl Dispatch,
        out: &mut Vec<AlertEvent>,
    ) -> Option<Instant> {
        if let Some(w) = self.waiting.get_mut(&a.host) {
            if self.held < MAX_HELD {
                w.batches.push(a);
                self.held += 1;
                return None;
            }
            // Too much queued (a restart, sensors resending their spools): this host goes
            // on without its history; its alerts are still taken over.
            let mut w = self.waiting.remove(&a.host).unwrap();
            w.batches.push(a);
            self.held += 1;
            tracing::debug!(host = %w.batches[0].host, "too many batches held for new hosts: this one starts without its history");
            self.release_early(engine, w, Instant::now(), metrics, out)
        } else if !engine.knows_host(&a.host) && self.loader_alive {
            if let Some(u) = self.unread.remove(&a.host) {
                u.release(to);
            }
            let first = a
                .batch
                .snapshots
                .iter()
                .map(|s| s.ts_ms)
                .min()
                .unwrap_or_else(now_ms);
            let labels = a.batch.snapshots.iter().find_map(super::host_labels_of);
            let released = Arc::new(AtomicBool::new(false));
            let _ = self.ask.send(WarmRequest {
                host: a.host.clone(),
                before_ms: first,
                alerts_before_ms: None,
                labels,
                rules: self.rules.clone(),
                asked: Instant::now(),
                released: released.clone(),
            });
            self.waiting.insert(
                a.host.clone(),
                Waiting {
                    since: Instant::now(),
                    batches: vec![a],
                    released,
                },
            );
            self.held += 1;
            None
        } else {
            engine.observe_batch(&a.host, &a.batch, now_ms(), out);
            Some(a.at)
        }
    }

    /// The loader's answer about a host. Returns when the first batch evaluated arrived.
    fn answered(
        &mut self,
        engine: &mut Engine,
        mut w: Warmed,
        metrics: &Metrics,
        to: &impl Dispatch,
        out: &mut Vec<AlertEvent>,
    ) -> Option<Instant> {
        if w.catch_up {
            // A host released without its history: its detectors catch up, unless it
            // left, or came back as new, meanwhile.
            if self.waiting.contains_key(&w.host) || !engine.knows_host(&w.host) {
                if let Some(u) = self.unread.remove(&w.host) {
                    u.release(to);
                }
                return None;
            }
            if let Some(h) = w.warmed.take() {
                let n = engine.catch_up(h);
                metrics.detect_hosts_caught_up.fetch_add(1, Relaxed);
                metrics
                    .detect_warm_samples
                    .fetch_add(w.samples as u64, Relaxed);
                tracing::debug!(host = %w.host, series = n, history_samples = w.samples, "the host's detectors caught up with its history");
            }
            // After the swap: an alert taken over keeps a detector that replayed.
            adopt(engine, &w, &mut self.unread, to, out);
            None
        } else if let Some(wait) = self.waiting.remove(&w.host) {
            self.held -= wait.batches.len();
            if w.cold.is_some() || w.open.is_err() {
                // Without its history, whatever the reason: it catches up later, and takes
                // over its firing alerts then if they could not be read now (its alert
                // events are held until then).
                self.catch_up(&w.host, &wait.batches, w.open.is_err());
                if w.open.is_err() {
                    hold(&mut self.unread, &w.host, &wait, Instant::now());
                }
            }
            take_over(engine, w, metrics, &mut self.unread, to, out);
            release(engine, wait, out)
        } else {
            // Released before the answer came: its firing alerts are still taken over (or
            // at its catch-up, if they could not be read).
            if self.early.remove(&w.host) {
                adopt(engine, &w, &mut self.unread, to, out);
            }
            None
        }
    }

    /// Once a second: releases the hosts that have waited longer than `WAIT_MAX` (the
    /// loader answers within its budget; this only guards against it stalling), and sends
    /// the alert events held longer than `HOLD_MAX`. Returns when the first batch
    /// evaluated arrived.
    fn tick(
        &mut self,
        engine: &mut Engine,
        now: Instant,
        metrics: &Metrics,
        to: &impl Dispatch,
        out: &mut Vec<AlertEvent>,
    ) -> Option<Instant> {
        let late: Vec<Arc<str>> = self
            .waiting
            .iter()
            .filter(|(_, w)| now.saturating_duration_since(w.since) > WAIT_MAX)
            .map(|(h, _)| h.clone())
            .collect();
        let mut first = None;
        for h in late {
            let w = self.waiting.remove(&h).unwrap();
            tracing::warn!(host = %h, "no answer about the host's alerts and history; its detectors start without them (its alert notifications wait for its firing alerts to be read, up to {HOLD_MAX:?})");
            first = first.or(self.release_early(engine, w, now, metrics, out));
        }
        expire(&mut self.unread, now, to);
        metrics.detect_alerts_held.store(
            self.unread.values().map(|u| u.events.len() as u64).sum(),
            Relaxed,
        );
        first
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
/// A host released without its history (too many hosts at once) has its statistical
/// detectors caught up later, when the loader has no new host to answer: its history up to
/// the time of reading is replayed into new detectors, which replace those still in their
/// warm-up and not alerting. Not past this age: by then the live detectors have warmed up
/// on their own (`anomaly` needs 300 samples at 1 s). A host whose firing alerts could not
/// be read when it arrived still has them taken over past it, once ClickHouse answers.
const CATCH_UP_MAX: Duration = Duration::from_secs(240);
/// After a catch-up chunk failed (ClickHouse not open, refusing or slow), the requests wait
/// this long before the next is tried: one chunk per try while ClickHouse does not answer,
/// so that a slow server is not sent every chunk's queries in turn.
const CATCH_UP_RETRY: Duration = Duration::from_secs(10);
/// How long a new host's batches wait for the store to open (the aggregator started while
/// ClickHouse is down or slow): long enough for a server starting beside it, short enough
/// that the host's alerts are not held long in an outage.
const NOT_OPEN_WAIT: Duration = Duration::from_secs(10);

/// The longest a host's alert events wait for its firing alerts to be read (it arrived
/// while ClickHouse was down, or was released before its answer came), and the most that
/// wait per host: past either, they are sent, and an alert still firing from before the
/// host arrived may be notified again.
const HOLD_MAX: Duration = Duration::from_secs(60);
const HOLD_MAX_EVENTS: usize = 256;

/// The alert events of a host judged here before its firing alerts could be read, neither
/// stored nor notified until they are: one that the alerts taken over replace (the host's
/// alert fired before it arrived, and its condition still holds) is dropped, so that each
/// transition is told once.
struct Unread {
    since: Instant,
    /// The host's first sample here: an alert that fired here since is one of its own.
    first_ms: u64,
    events: Vec<(AlertEvent, Option<Instant>)>,
}

/// Where alert events go to be stored and notified (the alerter; a list in the tests).
trait Dispatch {
    fn dispatch(&self, e: AlertEvent, arrived: Option<Instant>);
}

impl Dispatch for Alerter {
    fn dispatch(&self, e: AlertEvent, arrived: Option<Instant>) {
        Alerter::dispatch(self, e, arrived)
    }
}

impl Unread {
    /// Stores and notifies the held events but those of `replaced` alerts.
    fn release_but(self, replaced: &[String], to: &impl Dispatch) {
        for (e, at) in self.events {
            if !replaced.contains(&e.id) {
                to.dispatch(e, at);
            }
        }
    }

    fn release(self, to: &impl Dispatch) {
        self.release_but(&[], to)
    }
}

/// An alert event out of the engine: held when its host's firing alerts are not read yet,
/// else sent. A host that has `HOLD_MAX_EVENTS` held has its hold ended: they are sent, in
/// order, then this one.
fn route(
    unread: &mut HashMap<Arc<str>, Unread>,
    e: AlertEvent,
    arrived: Option<Instant>,
    to: &impl Dispatch,
) {
    match unread.get_mut(e.host.as_str()) {
        Some(u) if u.events.len() < HOLD_MAX_EVENTS => u.events.push((e, arrived)),
        Some(_) => {
            let (h, u) = unread.remove_entry(e.host.as_str()).unwrap();
            tracing::warn!(host = %h, events = u.events.len(), "too many alert events held for a host whose firing alerts are not read yet: they are sent now (one still firing from before it arrived may be notified again)");
            u.release(to);
            to.dispatch(e, arrived);
        }
        None => to.dispatch(e, arrived),
    }
}

/// Ends the holds begun more than `HOLD_MAX` before `now`: their events are sent.
fn expire(unread: &mut HashMap<Arc<str>, Unread>, now: Instant, to: &impl Dispatch) {
    let stale: Vec<Arc<str>> = unread
        .iter()
        .filter(|(_, u)| now.saturating_duration_since(u.since) > HOLD_MAX)
        .map(|(h, _)| h.clone())
        .collect();
    for h in stale {
        let u = unread.remove(&h).unwrap();
        if !u.events.is_empty() {
            tracing::warn!(host = %h, events = u.events.len(), held = ?HOLD_MAX, "the host's firing alerts still cannot be read: its held alert events are sent now (one still firing from before it arrived may be notified again)");
        }
        u.release(to);
    }
}

/// The time of the first sample in `batches` (a host's first here), or now.
fn first_sample_ms(batches: &[Arrival]) -> u64 {
    batches
        .iter()
        .flat_map(|a| a.batch.snapshots.iter())
        .map(|s| s.ts_ms)
        .min()
        .unwrap_or_else(now_ms)
}

/// Holds the alert events of a host released with its firing alerts unread.
fn hold(unread: &mut HashMap<Arc<str>, Unread>, host: &Arc<str>, w: &Waiting, now: Instant) {
    let first_ms = first_sample_ms(&w.batches);
    unread.entry(host.clone()).or_insert(Unread {
        since: now,
        first_ms,
        events: Vec::new(),
    });
}

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
    /// A catch-up for a host whose firing alerts could not be read when it arrived: those
    /// that began before this time (its first sample here) are taken over.
    alerts_before_ms: Option<u64>,
    labels: Option<HostLabels>,
    rules: Arc<Vec<Rule>>,
    asked: Instant,
    /// Set when the host was released before the answer: no history to read.
    released: Arc<AtomicBool>,
}

impl WarmRequest {
    /// Whether a catch-up still replays the host's history at `now`: not past
    /// `CATCH_UP_MAX`, when its live detectors have nearly warmed up on their own.
    fn history_wanted(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.asked) < CATCH_UP_MAX
    }

    /// Whether a catch-up is still worth a query at `now`: for its history, or, however
    /// late, for the firing alerts that could not be read when the host arrived.
    fn still_wanted(&self, now: Instant) -> bool {
        self.history_wanted(now) || self.alerts_before_ms.is_some()
    }
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
    /// Why no history was replayed was logged once for all the hosts asked together (too
    /// many arrived at once, or ClickHouse was not open yet).
    told: bool,
    /// The answer to a catch-up request.
    catch_up: bool,
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
            told: false,
            catch_up: false,
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
fn take_over(
    engine: &mut Engine,
    mut w: Warmed,
    metrics: &Metrics,
    unread: &mut HashMap<Arc<str>, Unread>,
    to: &impl Dispatch,
    out: &mut Vec<AlertEvent>,
) {
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
        if !w.told {
            tracing::warn!(%host, why = %why, "the host's detectors start without its history (statistical rules warm up again; a firing statistical alert may resolve early)");
        }
    } else {
        tracing::debug!(%host, series, history_samples = w.samples, "the host's detectors replayed its history");
    }
    adopt(engine, &w, unread, to, out);
}

/// Takes over the host's firing alerts the loader found; once they are read, the host's
/// held alert events are sent, but those of its alerts that fired here and were replaced.
fn adopt(
    engine: &mut Engine,
    w: &Warmed,
    unread: &mut HashMap<Arc<str>, Unread>,
    to: &impl Dispatch,
    out: &mut Vec<AlertEvent>,
) {
    let host = &*w.host;
    if w.open.is_ok() {
        if let Some(u) = unread.remove(host) {
            let (n, replaced) = match &w.open {
                Ok(open) if !open.is_empty() => {
                    let resolved: Vec<&AlertEvent> = u
                        .events
                        .iter()
                        .map(|(e, _)| e)
                        .filter(|e| e.state == "resolved")
                        .collect();
                    engine.adopt_held(host, open, now_ms(), Some(u.first_ms), &resolved, out)
                }
                _ => (0, Vec::new()),
            };
            if n > 0 {
                tracing::info!(%host, alerts = n, replaced = replaced.len(), held_events = u.events.len(), "took over the host's firing alerts from the alerts table, read after it arrived; its held alert events are sent but those of the alerts replaced");
            } else {
                tracing::debug!(%host, held_events = u.events.len(), "no firing alert of the host to take over; its held alert events are sent");
            }
            u.release_but(&replaced, to);
            return;
        }
    }
    match &w.open {
        Ok(open) if !open.is_empty() => {
            let n = engine.adopt(host, open, now_ms(), out);
            tracing::info!(%host, alerts = n, history_samples = w.samples, "took over the host's firing alerts from the alerts table");
        }
        Ok(_) => {}
        // Said once for all the hosts asked together.
        Err(_) if w.told => {}
        Err(e) => {
            tracing::warn!(%host, error = %e, "cannot read the host's open alerts yet: they are taken over at its catch-up, and its alert events wait for them up to {HOLD_MAX:?}")
        }
    }
}

/// Answers the live loop's questions about hosts new to it, off its path: their firing
/// alerts (one query for all the hosts waiting), then their stored history, `WARM_CHUNK`
/// hosts per query, replayed into a side engine's detectors on a blocking thread while
/// the next chunk is read.
async fn loader(
    store: StoreHandle,
    mut asked: mpsc::UnboundedReceiver<WarmRequest>,
    mut asked_late: mpsc::UnboundedReceiver<WarmRequest>,
    done: mpsc::Sender<Warmed>,
) {
    // Catch-up requests not answered yet, oldest first; after a chunk failed (ClickHouse
    // down or too slow), none is tried before `retry_at`.
    let mut late: VecDeque<WarmRequest> = VecDeque::new();
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        // New hosts first; catch-ups when none is waiting.
        let first = tokio::select! {
            biased;
            r = asked.recv() => match r {
                Some(r) => r,
                None => return,
            },
            r = asked_late.recv() => match r {
                Some(r) => {
                    late.push_back(r);
                    continue;
                }
                None => return,
            },
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)), if retry_at.is_some() => {
                retry_at = None;
                continue;
            }
            _ = std::future::ready(()), if retry_at.is_none() && !late.is_empty() => {
                while let Ok(r) = asked_late.try_recv() {
                    late.push_back(r);
                }
                // Past `CATCH_UP_MAX`, only the alerts are still worth reading.
                let now = Instant::now();
                late.retain(|r| r.still_wanted(now));
                let n = late.len().min(WARM_CHUNK);
                let chunk: Vec<WarmRequest> = late.drain(..n).collect();
                match catch_up_chunk(&store, chunk, &done).await {
                    CatchUp::Done => {}
                    CatchUp::Gone => return,
                    CatchUp::Failed(chunk, why) => {
                        tracing::info!(hosts = late.len() + chunk.len(), error = %why, retry_in = ?CATCH_UP_RETRY, "hosts that started without their history cannot catch up with it yet; retrying");
                        for r in chunk.into_iter().rev() {
                            late.push_front(r);
                        }
                        retry_at = Some(tokio::time::Instant::now() + CATCH_UP_RETRY);
                    }
                }
                continue;
            }
        };
        let mut reqs = vec![first];
        while reqs.len() < 512 {
            match asked.try_recv() {
                Ok(r) => reqs.push(r),
                Err(_) => break,
            }
        }
        // Not open yet (the aggregator started while ClickHouse is down or slow): the hosts'
        // batches wait for it up to `NOT_OPEN_WAIT` after the first of them was asked about.
        let open_by = tokio::time::Instant::from_std(reqs[0].asked + NOT_OPEN_WAIT);
        let mut handle = store.clone();
        let st = match store.get() {
            Some(st) => Some(st),
            None => tokio::time::timeout_at(open_by, handle.wait()).await.ok(),
        };
        let Some(st) = st else {
            // Still not open: nothing to take over or replay now. The hosts start without
            // their history, and catch up with it and take over their firing alerts once
            // the store opens; a firing alert of theirs that fires here first (its
            // condition still holds) is notified again.
            tracing::warn!(hosts = reqs.len(), "ClickHouse is not open yet: new hosts' detectors start without their history (statistical rules warm up) and their firing alerts (one that fires here first is notified again); both are taken over once it is");
            for r in reqs {
                let mut w = Warmed::new(r.host, Err("ClickHouse is not open yet".to_string()));
                w.cold = Some("ClickHouse is not open yet".to_string());
                w.told = true;
                if done.send(w).await.is_err() {
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
        // The chunk before, replaying while this one is read.
        let mut previous: Option<Replaying> = None;
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
                w.told = late;
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
            let job = if plain.is_empty() {
                None
            } else {
                let reqs: Vec<&WarmRequest> = plain.iter().map(|(_, r)| r).collect();
                Some(match read_history(&st, &reqs).await {
                    Ok(h) => Ok(tokio::task::spawn_blocking(move || h.replay())),
                    Err(e) => Err(e),
                })
            };
            if let Some(p) = previous.take() {
                if !p.finish(&done).await {
                    return;
                }
            }
            let plain = plain.into_iter().map(|(i, r)| (i, r.host)).collect();
            previous = Some(Replaying {
                answers,
                plain,
                job,
            });
        }
        if let Some(p) = previous.take() {
            if !p.finish(&done).await {
                return;
            }
        }
        if crowded > 0 {
            tracing::warn!(hosts = n, without_history = crowded, budget = ?WARM_BUDGET, "many hosts arrived at once: those whose history was not replayed within the budget start without it (statistical rules warm up again; their firing alerts are still taken over)");
        }
    }
}

/// How a chunk of catch-up requests went.
enum CatchUp {
    Done,
    /// The live loop is gone.
    Gone,
    /// ClickHouse is not open, refused or did not answer in time: the requests, and why.
    Failed(Vec<WarmRequest>, String),
}

/// Answers a chunk of catch-up requests: each host's history up to now, replayed.
async fn catch_up_chunk(
    store: &StoreHandle,
    mut reqs: Vec<WarmRequest>,
    done: &mpsc::Sender<Warmed>,
) -> CatchUp {
    if reqs.is_empty() {
        return CatchUp::Done;
    }
    let Some(st) = store.get() else {
        return CatchUp::Failed(reqs, "ClickHouse is not open yet".into());
    };
    let now = now_ms();
    for r in &mut reqs {
        r.before_ms = now;
    }
    // Hosts whose firing alerts could not be read when they arrived: those that began
    // before the host arrived here are the previous aggregator's (or this one's before a
    // restart), and are taken over now.
    let unread: Vec<String> = reqs
        .iter()
        .filter(|r| r.alerts_before_ms.is_some())
        .map(|r| r.host.to_string())
        .collect();
    let mut open = HashMap::new();
    if !unread.is_empty() {
        open = match tokio::time::timeout(Duration::from_secs(5), st.open_alerts(&unread)).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => return CatchUp::Failed(reqs, format!("{e:#}")),
            Err(_) => {
                return CatchUp::Failed(reqs, "reading the alerts table timed out (5 s)".into())
            }
        };
    }
    // History for the hosts asked recently; later, their live detectors are nearly warm
    // on their own (a host left waiting by a long outage still has its alerts taken over).
    let young: Vec<&WarmRequest> = reqs
        .iter()
        .filter(|r| r.history_wanted(Instant::now()))
        .collect();
    let mut got = HashMap::new();
    if !young.is_empty() {
        match read_history(&st, &young).await {
            Ok(h) => match tokio::task::spawn_blocking(move || h.replay()).await {
                Ok(g) => got = g,
                Err(e) => {
                    tracing::error!(error = %e, "replaying hosts' history failed; their detectors do not catch up")
                }
            },
            Err(e) => return CatchUp::Failed(reqs, e),
        }
    }
    for r in reqs {
        let mut alerts = open.remove(&*r.host).unwrap_or_default();
        alerts.retain(|a: &super::OpenAlert| {
            r.alerts_before_ms
                .is_some_and(|t| a.starts_at_ms < t / 1000 * 1000)
        });
        let mut w = Warmed::new(r.host.clone(), Ok(alerts));
        w.catch_up = true;
        if let Some((h, k)) = got.remove(&*r.host) {
            (w.warmed, w.samples) = (Some(h), k);
        }
        if done.send(w).await.is_err() {
            return CatchUp::Gone;
        }
    }
    CatchUp::Done
}

/// Hosts whose history is read together (one query per table). A query's cost is mostly
/// fixed at 32 hosts (on ClickHouse 18.16 here, 128 hosts' 10 minutes took 0.33 s a chunk
/// against 0.15 s for 32), and a chunk's answers are about 30 MB at 128.
const WARM_CHUNK: usize = 128;

/// A host name is spliced into SQL: none that could change the statement.
fn sql_safe(host: &str) -> bool {
    !host.contains(['\'', '\\', '?'])
}

/// A chunk's answers, its hosts' history replaying on a blocking thread.
struct Replaying {
    answers: Vec<Warmed>,
    /// The answers to fill from the replay, by index.
    plain: Vec<(usize, Arc<str>)>,
    job: Option<Result<tokio::task::JoinHandle<WarmedHosts>, String>>,
}

/// Each host's warmed series and the samples replayed.
type WarmedHosts = HashMap<String, (super::WarmedHost, usize)>;

impl Replaying {
    /// Waits for the replay and sends the chunk's answers; false when the live loop is gone.
    async fn finish(mut self, done: &mpsc::Sender<Warmed>) -> bool {
        let got = match self.job {
            None => Ok(HashMap::new()),
            Some(Err(e)) => Err(e),
            Some(Ok(h)) => h
                .await
                .map_err(|e| format!("replaying the hosts' history failed: {e}")),
        };
        match got {
            Ok(mut got) => {
                for (i, host) in &self.plain {
                    if let Some((h, k)) = got.remove(&**host) {
                        (self.answers[*i].warmed, self.answers[*i].samples) = (Some(h), k);
                    }
                }
            }
            Err(e) => {
                for (i, _) in &self.plain {
                    self.answers[*i].cold = Some(e.clone());
                }
            }
        }
        for w in self.answers {
            if done.send(w).await.is_err() {
                return false;
            }
        }
        true
    }
}

/// Several hosts' history as read, to replay.
struct ChunkHistory {
    rules: Arc<Vec<Rule>>,
    qs: Vec<super::backtest::HistoryQuery>,
    /// Each query's answer, in `backtest::answer_format`.
    answers: Vec<bytes::Bytes>,
    /// Each host: the first sample time it must not replay, and its labels.
    wanted: Vec<(String, u64, Option<HostLabels>)>,
    fetched: Duration,
}

/// Reads the last `WARM_HISTORY_S` of history of several hosts for the statistical rules
/// (one query per table); Err when ClickHouse did not answer in time.
async fn read_history(store: &Store, reqs: &[&WarmRequest]) -> Result<ChunkHistory, String> {
    let rules = reqs[0].rules.clone();
    let wanted: Vec<(String, u64, Option<HostLabels>)> = reqs
        .iter()
        .filter(|r| sql_safe(&r.host))
        .map(|r| (r.host.to_string(), r.before_ms, r.labels.clone()))
        .collect();
    let hosts: Vec<&str> = wanted.iter().map(|w| w.0.as_str()).collect();
    let to = wanted.iter().map(|w| w.1 / 1000).max().unwrap_or(0) + 1;
    let from = wanted
        .iter()
        .map(|w| w.1 / 1000)
        .min()
        .unwrap_or(0)
        .saturating_sub(WARM_HISTORY_S);
    let qs = if hosts.is_empty() {
        Vec::new()
    } else {
        super::backtest::history_queries_of(
            &store.db,
            &rules,
            |ri| rules[ri].is_statistical(),
            &hosts,
            from,
            to,
        )
    };
    let t0 = Instant::now();
    let answers = fetch(store, &qs).await?;
    Ok(ChunkHistory {
        rules,
        qs,
        answers,
        wanted,
        fetched: t0.elapsed(),
    })
}

impl ChunkHistory {
    /// Replays each host's history before its first batch here into a side engine, one
    /// pass over each answer (its rows are in time order per host, and each series is one
    /// rule's, so each series sees its samples in order).
    fn replay(self) -> WarmedHosts {
        let t0 = Instant::now();
        let mut side = Engine::new(self.rules.to_vec());
        // Each host's window [since, before).
        let mut window: HashMap<&str, (u64, u64)> = HashMap::new();
        for (host, before_ms, labels) in &self.wanted {
            if let Some(l) = labels {
                side.set_host_labels(host, l.clone());
            }
            // Stored times are whole seconds: the second of the first live sample is left
            // to live evaluation (it is that sample, truncated).
            let before = before_ms / 1000 * 1000;
            let since = before.saturating_sub(WARM_HISTORY_S * 1000);
            window.insert(host, (since, before));
        }
        let mut feed = Feeder::new(side, &self.rules);
        for (q, a) in self.qs.iter().zip(&self.answers) {
            let whole = super::backtest::each_sample_in(
                q,
                &self.rules,
                a,
                true,
                |c, host, ts, labels, v| {
                    if let Some((since, before)) = window.get(host) {
                        if ts >= *since && ts < *before {
                            feed.sample(c, host, ts, labels, v);
                        }
                    }
                },
            );
            if !whole {
                tracing::warn!(query = %q.sql, "a history answer ends in a row that does not fit its query; the rest of it is not replayed");
            }
        }
        let (side, counts) = feed.finish();
        tracing::debug!(
            hosts = self.wanted.len(),
            queries = self.qs.len(),
            bytes = self.answers.iter().map(|t| t.len()).sum::<usize>(),
            samples = counts.values().sum::<usize>(),
            fetch_ms = self.fetched.as_millis() as u64,
            replay_ms = t0.elapsed().as_millis() as u64,
            "a chunk of hosts' history read and replayed"
        );
        side.take_hosts()
            .into_iter()
            .map(|(h, w)| {
                let n = counts.get(&h).copied().unwrap_or(0);
                (h, (w, n))
            })
            .collect()
    }
}

/// A multi-series rule's values by time, each series' when it came.
type Vectors = BTreeMap<u64, Vec<Option<f64>>>;

/// Feeds history to a side engine's detectors. A rule over one series gets each sample
/// as it comes (an answer is in time order per host, and each series is one rule's). A
/// rule over several series (a `forest`) gets, per host and time, one vector of its
/// series' values (each the largest of the label sets the rule selects, as live), in
/// time order, once every answer is read; a time missing one of the series is skipped, as
/// live.
struct Feeder<'r> {
    side: Engine,
    rules: &'r [Rule],
    /// (host, rule) → time → each series' value.
    vectors: HashMap<(String, usize), Vectors>,
    /// Samples and vectors a detector took, by host, but for the last host's latest run.
    fed: HashMap<String, usize>,
    last: Option<(String, usize)>,
}

impl<'r> Feeder<'r> {
    fn new(side: Engine, rules: &'r [Rule]) -> Self {
        Feeder {
            side,
            rules,
            vectors: HashMap::new(),
            fed: HashMap::new(),
            last: None,
        }
    }

    fn count(&mut self, host: &str) {
        // An answer's rows come host by host: the last host counted is usually this one.
        if let Some((h, n)) = &mut self.last {
            if **h == *host {
                *n += 1;
                return;
            }
        }
        if let Some((h, n)) = self.last.take() {
            *self.fed.entry(h).or_default() += n;
        }
        self.last = Some((host.to_string(), 1));
    }

    /// One sample of `(rule, part)` (see `backtest::HistoryQuery::rules`).
    fn sample(
        &mut self,
        (ri, part): (usize, usize),
        host: &str,
        ts: u64,
        labels: &[(&'static str, &str)],
        v: f64,
    ) {
        let r = &self.rules[ri];
        if r.more_series.is_empty() {
            if self.side.warm(ri, host, labels, ts, v) {
                self.count(host);
            }
            return;
        }
        let Some(spec) = super::backtest::part_spec(r, part) else {
            return;
        };
        if !v.is_finite() || !super::vector_part_selects(r, spec, labels) {
            return;
        }
        let n = 1 + r.more_series.len();
        let parts = self
            .vectors
            .entry((host.to_string(), ri))
            .or_default()
            .entry(ts)
            .or_insert_with(|| vec![None; n]);
        parts[part] = Some(parts[part].map_or(v, |b: f64| b.max(v)));
    }

    /// Feeds the vectors gathered; returns the engine and what each host was fed.
    fn finish(mut self) -> (Engine, HashMap<String, usize>) {
        let mut values = Vec::new();
        for ((host, ri), by_ts) in std::mem::take(&mut self.vectors) {
            for (ts, parts) in by_ts {
                values.clear();
                values.extend(parts.iter().map_while(|p| *p));
                if values.len() == parts.len() && self.side.warm_vector(ri, &host, ts, &values) {
                    self.count(&host);
                }
            }
        }
        if let Some((h, n)) = self.last.take() {
            *self.fed.entry(h).or_default() += n;
        }
        (self.side, self.fed)
    }
}

/// The answers of `qs` (each in `backtest::answer_format`), in order; Err at the first
/// that fails or takes over 10 s.
async fn fetch(
    store: &Store,
    qs: &[super::backtest::HistoryQuery],
) -> Result<Vec<bytes::Bytes>, String> {
    let mut answers = Vec::with_capacity(qs.len());
    for q in qs {
        let read = tokio::time::timeout(Duration::from_secs(10), async {
            store
                .client
                .query(&q.sql)
                .fetch_bytes(super::backtest::answer_format(q))?
                .collect()
                .await
        })
        .await;
        match read {
            Ok(Ok(bytes)) => answers.push(bytes),
            Ok(Err(e)) => return Err(format!("cannot read the hosts' history: {e}")),
            Err(_) => return Err("reading the hosts' history timed out (10 s)".into()),
        }
    }
    Ok(answers)
}

/// Replays `r.host`'s stored history before `r.before_ms` into a side engine with the
/// rules `r.rules`: `FIRING_HISTORY_S` for statistical rules among `firing` (so that a
/// taken-over alert resolves when the aggregator it came from would have),
/// `WARM_HISTORY_S` for the other statistical rules (a `forest` over several series gets
/// its vectors, see `Feeder`). No lifecycle, no notification. Returns the host's
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
    let answers = fetch(store, &qs).await?;
    let host_s = host.to_string();
    let rules = rules.clone();
    tokio::task::spawn_blocking(move || {
        let mut feed = Feeder::new(side, &rules);
        for (q, a) in qs.iter().zip(&answers) {
            super::backtest::each_sample_in(q, &rules, a, false, |c, _, ts, labels, v| {
                feed.sample(c, &host_s, ts, labels, v)
            });
        }
        let (mut side, fed) = feed.finish();
        let n = fed.get(&host_s).copied().unwrap_or(0);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The events sent, in order: (host, id).
    #[derive(Default)]
    struct Sent(std::cell::RefCell<Vec<(String, String)>>);

    impl Dispatch for Sent {
        fn dispatch(&self, e: AlertEvent, _: Option<Instant>) {
            self.0.borrow_mut().push((e.host, e.id));
        }
    }

    impl Sent {
        fn take(&self) -> Vec<(String, String)> {
            std::mem::take(&mut *self.0.borrow_mut())
        }
    }

    fn event(host: &str, id: &str) -> AlertEvent {
        AlertEvent {
            id: id.into(),
            rule: "r".into(),
            state: "firing",
            severity: "warning",
            host: host.into(),
            labels: vec![("host".into(), host.into())],
            value: 1.0,
            threshold: None,
            score: None,
            starts_at_ms: 0,
            ends_at_ms: None,
            at_ms: 0,
            repeat: false,
            summary: String::new(),
        }
    }

    fn held_host(unread: &mut HashMap<Arc<str>, Unread>, host: &str, since: Instant) {
        unread.insert(
            host.into(),
            Unread {
                since,
                first_ms: 0,
                events: Vec::new(),
            },
        );
    }

    #[test]
    fn held_alert_events_are_sent_past_their_bounds_in_order_and_the_hold_ends() {
        let t0 = Instant::now();
        let sent = Sent::default();
        let mut unread = HashMap::new();
        held_host(&mut unread, "h", t0);
        // A host not held: at once.
        route(&mut unread, event("x", "x1"), None, &sent);
        assert_eq!(sent.take(), [("x".to_string(), "x1".to_string())]);
        // Held up to the bound...
        for i in 0..HOLD_MAX_EVENTS {
            route(&mut unread, event("h", &format!("e{i}")), None, &sent);
        }
        assert!(sent.take().is_empty());
        assert_eq!(unread["h"].events.len(), HOLD_MAX_EVENTS);
        // ...and one more sends them all, in order, then it; the host is held no more.
        route(&mut unread, event("h", "last"), None, &sent);
        let ids: Vec<String> = sent.take().into_iter().map(|(_, id)| id).collect();
        let want: Vec<String> = (0..HOLD_MAX_EVENTS)
            .map(|i| format!("e{i}"))
            .chain(["last".to_string()])
            .collect();
        assert_eq!(ids, want);
        assert!(!unread.contains_key("h"));
        route(&mut unread, event("h", "after"), None, &sent);
        assert_eq!(sent.take().len(), 1);

        // In time: held until `HOLD_MAX` has passed, then sent and the hold ends.
        held_host(&mut unread, "g", t0);
        held_host(&mut unread, "k", t0 + Duration::from_secs(30));
        route(&mut unread, event("g", "g1"), None, &sent);
        route(&mut unread, event("g", "g2"), None, &sent);
        route(&mut unread, event("k", "k1"), None, &sent);
        expire(&mut unread, t0 + HOLD_MAX - Duration::from_secs(1), &sent);
        assert!(sent.take().is_empty());
        expire(&mut unread, t0 + HOLD_MAX + Duration::from_secs(1), &sent);
        assert_eq!(
            sent.take(),
            [
                ("g".to_string(), "g1".to_string()),
                ("g".to_string(), "g2".to_string())
            ]
        );
        assert!(!unread.contains_key("g"));
        assert_eq!(unread["k"].events.len(), 1, "a later hold goes on");
    }

    #[test]
    fn a_released_hold_drops_the_events_of_the_alerts_replaced() {
        let sent = Sent::default();
        let mut unread = HashMap::new();
        held_host(&mut unread, "h", Instant::now());
        for id in ["own", "other", "own"] {
            route(&mut unread, event("h", id), None, &sent);
        }
        unread
            .remove("h")
            .unwrap()
            .release_but(&["own".to_string()], &sent);
        assert_eq!(sent.take(), [("h".to_string(), "other".to_string())]);
    }
    use crate::detect::backtest::{self, history_queries_of, part_spec};

    const HOT: &str = "[[rule]]\nname = \"hot\"\nkind = \"threshold\"\nseries = \"cpu.busy\"\nlabels = { cpu = \"total\" }\nwarning = 1\nfor = \"0s\"\n";

    /// Second `i` with the CPUs idle (`HOT` not breached; `snap` breaches it).
    fn calm(i: u64) -> protocol::Snapshot {
        let mut s = snap(i);
        s.cpu[0].idle = 100.0;
        s.cpu[0].user = 0.0;
        s
    }

    /// The live loop's side for hosts new to its engine, driven by hand: the loader's
    /// queues are read by the test, alert events are sent to `sent`.
    struct Live {
        engine: Engine,
        news: Newcomers,
        asked: mpsc::UnboundedReceiver<WarmRequest>,
        asked_late: mpsc::UnboundedReceiver<WarmRequest>,
        metrics: Metrics,
        sent: Sent,
        out: Vec<AlertEvent>,
    }

    impl Live {
        fn new(rules: &str) -> Live {
            let rules = parse_rules("t", rules).unwrap();
            let (ask, asked) = mpsc::unbounded_channel();
            let (ask_late, asked_late) = mpsc::unbounded_channel();
            Live {
                engine: Engine::new(rules.clone()),
                news: Newcomers::new(Arc::new(rules), ask, ask_late),
                asked,
                asked_late,
                metrics: Metrics::default(),
                sent: Sent::default(),
                out: Vec::new(),
            }
        }

        /// Batch `seq` of `host`, one snapshot.
        fn arrive(&mut self, host: &str, seq: u64, s: protocol::Snapshot) -> Option<Instant> {
            let batch = Batch {
                host: host.into(),
                boot_id: "b".into(),
                seq,
                info: None,
                snapshots: vec![s],
            };
            let a = Arrival {
                host: host.into(),
                batch: Arc::new(batch),
                at: Instant::now(),
            };
            let (m, to) = (&self.metrics, &self.sent);
            self.news.arrive(&mut self.engine, a, m, to, &mut self.out)
        }

        fn answered(&mut self, w: Warmed) -> Option<Instant> {
            let (m, to) = (&self.metrics, &self.sent);
            self.news
                .answered(&mut self.engine, w, m, to, &mut self.out)
        }

        fn tick(&mut self, now: Instant) -> Option<Instant> {
            let (m, to) = (&self.metrics, &self.sent);
            self.news.tick(&mut self.engine, now, m, to, &mut self.out)
        }

        /// The engine's events, held or sent as the loop does.
        fn route(&mut self) {
            for e in self.out.drain(..) {
                route(&mut self.news.unread, e, None, &self.sent);
            }
        }
    }

    fn old_hot(host: &str) -> super::super::OpenAlert {
        super::super::OpenAlert {
            id: "old-hot".into(),
            rule: "hot".into(),
            labels: vec![("host".into(), host.into()), ("cpu".into(), "total".into())],
            severity: "warning".into(),
            starts_at_ms: 1_600_000_000_000,
        }
    }

    /// A waiting host whose batch would pass `MAX_HELD` queued is released at once: its
    /// batches judged in order, its history and firing alerts asked for again as a
    /// catch-up, and its alert events held meanwhile. Its first answer, come after the
    /// release, could not read its alerts; the catch-up's did: the alert from before is
    /// taken over and replaces the one that fired here, which is never sent; its
    /// resolution comes under the old id.
    #[test]
    fn a_host_past_the_queue_bound_is_judged_at_once_and_takes_its_alerts_over_at_its_catch_up() {
        let mut l = Live::new(HOT);
        let n = MAX_HELD as u64;
        for seq in 1..=n {
            assert_eq!(
                l.arrive("q", seq, snap(seq)),
                None,
                "batch {seq} not queued"
            );
        }
        assert_eq!(&*l.asked.try_recv().unwrap().host, "q");
        assert!(l.asked.try_recv().is_err(), "asked once");
        assert_eq!(l.news.held, MAX_HELD);
        assert!(l.out.is_empty() && !l.engine.knows_host("q"));

        assert!(
            l.arrive("q", n + 1, snap(n + 1)).is_some(),
            "not released past the bound"
        );
        assert_eq!((l.news.held, l.news.waiting.len()), (0, 0));
        assert_eq!(l.metrics.detect_hosts_cold.load(Relaxed), 1);
        let late = l.asked_late.try_recv().expect("no catch-up asked for");
        assert_eq!(&*late.host, "q");
        assert_eq!(
            late.alerts_before_ms,
            Some(snap(1).ts_ms),
            "its alerts not asked for"
        );
        // Judged in order: `hot` fired at the first batch (and was repeated an hour on).
        let out = &l.out;
        assert_eq!(
            (out[0].state, out[0].at_ms),
            ("firing", snap(1).ts_ms),
            "{out:?}"
        );
        let own = out[0].id.clone();
        assert!(
            out.iter().all(|e| e.id == own && e.state == "firing"),
            "{out:?}"
        );
        assert_eq!(out.iter().filter(|e| !e.repeat).count(), 1, "{out:?}");
        l.route();
        assert!(l.sent.take().is_empty(), "sent before its alerts were read");

        // The first answer, after the release, without its alerts: still held.
        let held = l.news.unread["q"].events.len();
        assert_eq!(
            l.answered(Warmed::new("q".into(), Err("timed out".into()))),
            None
        );
        assert!(l.out.is_empty() && l.sent.take().is_empty());
        assert_eq!(l.news.unread["q"].events.len(), held);
        // The catch-up's, with them.
        let mut w = Warmed::new("q".into(), Ok(vec![old_hot("q")]));
        w.catch_up = true;
        l.answered(w);
        assert!(l.out.is_empty(), "{:?}", l.out);
        assert!(
            l.sent.take().is_empty(),
            "the replaced alert's events were sent"
        );
        assert!(!l.news.unread.contains_key("q"), "still held");
        // Still breached: nothing; then calm: resolved under the old id, not under {own}.
        l.arrive("q", n + 2, snap(n + 2));
        assert!(l.out.is_empty(), "{:?}", l.out);
        l.arrive("q", n + 3, calm(n + 3));
        let got: Vec<(&str, &str)> = l.out.iter().map(|e| (e.state, e.id.as_str())).collect();
        assert_eq!(got, [("resolved", "old-hot")], "own alert was {own}");
    }

    /// A catch-up replays history only within `CATCH_UP_MAX` of being asked for; past it,
    /// one for a host whose firing alerts were never read is still made (for them alone),
    /// and one for history alone is dropped.
    #[test]
    fn a_catch_up_past_its_age_still_takes_the_alerts_over_but_replays_no_history() {
        let mut l = Live::new(HOT);
        let (with, without): (Arc<str>, Arc<str>) = ("a".into(), "h".into());
        l.news.catch_up(&with, &[], true);
        l.news.catch_up(&without, &[], false);
        let a = l.asked_late.try_recv().unwrap();
        let h = l.asked_late.try_recv().unwrap();
        assert!(a.alerts_before_ms.is_some() && h.alerts_before_ms.is_none());
        let second = Duration::from_secs(1);
        for r in [&a, &h] {
            let soon = r.asked + CATCH_UP_MAX - second;
            assert!(r.history_wanted(soon) && r.still_wanted(soon), "{}", r.host);
            assert!(!r.history_wanted(r.asked + CATCH_UP_MAX), "{}", r.host);
        }
        let late = a.asked + CATCH_UP_MAX + 60 * second;
        assert!(
            a.still_wanted(late),
            "alerts never read dropped past the age"
        );
        assert!(
            !h.still_wanted(h.asked + CATCH_UP_MAX),
            "history asked for too late"
        );
    }

    /// A host whose answer does not come within `WAIT_MAX` (the loader stalled) is
    /// released at the first tick past it: judged, asked for as a catch-up, its alert
    /// events held; with its firing alerts still unread `HOLD_MAX` later, they are sent.
    #[test]
    fn a_host_without_an_answer_is_released_after_wait_max_and_its_events_sent_after_hold_max() {
        let mut l = Live::new(HOT);
        let t0 = Instant::now();
        l.arrive("s", 1, snap(1));
        l.arrive("s", 2, snap(2));
        let second = Duration::from_secs(1);
        assert_eq!(l.tick(t0 + WAIT_MAX - second), None);
        assert_eq!((l.news.waiting.len(), l.out.len()), (1, 0));
        assert!(l.asked_late.try_recv().is_err());

        let t1 = t0 + WAIT_MAX + second;
        assert!(l.tick(t1).is_some(), "not released after WAIT_MAX");
        assert_eq!((l.news.held, l.news.waiting.len()), (0, 0));
        assert!(l.news.early.contains("s"));
        let late = l.asked_late.try_recv().expect("no catch-up asked for");
        assert_eq!(late.alerts_before_ms, Some(snap(1).ts_ms));
        assert_eq!(l.out.len(), 1, "{:?}", l.out);
        l.route();
        l.arrive("s", 3, calm(3));
        l.route();
        l.tick(t1 + HOLD_MAX - second);
        assert!(l.sent.take().is_empty(), "sent before HOLD_MAX");
        assert_eq!(l.metrics.detect_alerts_held.load(Relaxed), 2);
        l.tick(t1 + HOLD_MAX + second);
        let ids: Vec<String> = l.sent.take().into_iter().map(|(_, id)| id).collect();
        assert_eq!(ids.len(), 2, "not sent after HOLD_MAX: {ids:?}");
        assert_eq!(ids[0], ids[1], "the firing and the resolution of one alert");
        assert_eq!(l.metrics.detect_alerts_held.load(Relaxed), 0);
    }

    use crate::detect::rules::parse_rules;

    const RULES: &str = r#"
[[rule]]
name = "fingerprint"
kind = "forest"
series = ["cpu.busy", "disk.util_pct", "memory.used"]
labels = { cpu = "total" }

[[rule]]
name = "busy"
kind = "anomaly"
series = "cpu.busy"
labels = { cpu = "total" }

[[rule]]
name = "hot"
kind = "threshold"
series = "cpu.busy"
labels = { cpu = "total" }
warning = 1
"#;

    /// Second `i` of a host with two CPUs and two disks, values varying smoothly.
    fn snap(i: u64) -> protocol::Snapshot {
        let x = i as f32;
        let cpu = |cpu: u32, idle: f32| protocol::CpuRec {
            cpu,
            idle,
            user: 100.0 - idle,
            ..Default::default()
        };
        let disk = |d: &str, util: f32| protocol::DiskRec {
            device: d.into(),
            util_pct: util,
            ..Default::default()
        };
        protocol::Snapshot {
            ts_ms: 1_700_000_000_000 + i * 1000,
            cpu: vec![
                cpu(protocol::CPU_TOTAL, 60.0 + 10.0 * (x / 7.0).sin()),
                cpu(0, 50.0 + (x / 3.0).cos()),
            ],
            disks: vec![
                disk("sda", 20.0 + 5.0 * (x / 5.0).sin()),
                disk("sdb", 10.0 + (x / 11.0).cos()),
            ],
            memory: protocol::MemoryRec {
                total: 1 << 34,
                available: (1 << 33) + ((x / 13.0).sin() * 1e8) as u64,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// `q`'s TabSeparated answer as ClickHouse gives it for `host`'s snapshots: one row
    /// per table row, the labels, then one value per (rule, part) the query reads.
    /// The answer ClickHouse gives to `q` about `host`'s snapshots, in the format the
    /// loader asks for (`backtest::answer_format`).
    fn answer(
        q: &backtest::HistoryQuery,
        rules: &[Rule],
        host: &str,
        snaps: &[protocol::Snapshot],
    ) -> Vec<u8> {
        let binary = backtest::answer_format(q) == "RowBinary";
        let mut out = Vec::new();
        let string = |out: &mut Vec<u8>, s: &str| {
            let mut n = s.len();
            loop {
                let b = (n & 0x7f) as u8;
                n >>= 7;
                out.push(if n > 0 { b | 0x80 } else { b });
                if n == 0 {
                    break;
                }
            }
            out.extend_from_slice(s.as_bytes());
        };
        for s in snaps {
            let cols: Vec<Vec<(Vec<String>, f64)>> = q
                .rules
                .iter()
                .map(|&(ri, part)| {
                    let mut rows = Vec::new();
                    part_spec(&rules[ri], part).unwrap().for_each(s, |l, v| {
                        rows.push((l.iter().map(|(_, v)| v.to_string()).collect(), v))
                    });
                    rows
                })
                .collect();
            for r in 0..cols[0].len() {
                let ts = s.ts_ms / 1000;
                if binary {
                    string(&mut out, host);
                    out.extend_from_slice(&(ts as u32).to_le_bytes());
                    for l in &cols[0][r].0 {
                        string(&mut out, l);
                    }
                    for c in &cols {
                        out.extend_from_slice(&c[r].1.to_le_bytes());
                    }
                    continue;
                }
                let mut f = vec![host.to_string(), ts.to_string()];
                f.extend(cols[0][r].0.iter().cloned());
                f.extend(cols.iter().map(|c| c[r].1.to_string()));
                out.extend_from_slice(f.join("\t").as_bytes());
                out.push(b'\n');
            }
        }
        out
    }

    /// The forest's and the anomaly rule's scores for second `i`, fed as live.
    fn judge(e: &mut Engine, i: u64, out: &mut Vec<AlertEvent>) -> (Option<f64>, Option<f64>) {
        let s = snap(i);
        let busy = 100.0 - s.cpu[0].idle as f64;
        let util = s
            .disks
            .iter()
            .map(|d| d.util_pct as f64)
            .fold(f64::MIN, f64::max);
        let mem = (s.memory.total - s.memory.available) as f64;
        let f = e
            .observe_vector(0, "h", s.ts_ms, &[busy, util, mem], out)
            .map(|v| v.score);
        let a = e
            .observe(1, "h", &[("cpu", "total")], s.ts_ms, busy, out)
            .map(|v| v.score);
        (f, a)
    }

    /// A host's detectors warmed from its stored history (as the loader reads it) judge
    /// the next samples exactly as detectors that saw the same history live, for a rule
    /// over one series and a `forest` over several series from three tables; detectors
    /// that saw nothing judge them differently.
    #[test]
    fn detectors_warmed_from_history_judge_as_if_they_had_seen_it_live() {
        let rules = parse_rules("t", RULES).unwrap();
        let history: Vec<protocol::Snapshot> = (0..600).map(snap).collect();
        let before_ms = 1_700_000_000_000 + 600 * 1000;

        let mut live = Engine::new(rules.clone());
        let mut out = Vec::new();
        for s in &history {
            live.observe_snapshot("h", s, &mut out);
        }

        let qs = history_queries_of(
            "sonde",
            &rules,
            |ri| rules[ri].is_statistical(),
            &["h", "other"],
            0,
            2_000_000_000,
        );
        // One query per table: cpu (both rules), disk, memory.
        assert_eq!(
            qs.len(),
            3,
            "{:?}",
            qs.iter().map(|q| &q.sql).collect::<Vec<_>>()
        );
        let answers: Vec<bytes::Bytes> = qs
            .iter()
            .map(|q| {
                // Another host's rows in the same answer, and rows at and after the first
                // live batch, are not the host's history here.
                let late: Vec<protocol::Snapshot> = (600..620).map(snap).collect();
                let mut a = answer(q, &rules, "h", &history);
                a.extend(answer(q, &rules, "h", &late));
                a.extend(answer(q, &rules, "other", &history[..50]));
                a.into()
            })
            .collect();
        // The first live batch's first sample falls within a second, as a sensor's do: its
        // stored copy (truncated to the second) is not history.
        let before_ms = before_ms + 400;
        let chunk = ChunkHistory {
            rules: Arc::new(rules.clone()),
            qs,
            answers,
            wanted: vec![("h".to_string(), before_ms, None)],
            fetched: Duration::ZERO,
        };
        let mut warmed = chunk.replay();
        let (w, fed) = warmed.remove("h").expect("h warmed");
        // 600 seconds: the anomaly rule's sample (the total CPU's row, not CPU 0's) and one
        // forest vector each.
        assert_eq!(fed, 1200);
        let mut warm = Engine::new(rules.clone());
        assert_eq!(warm.absorb(w), 2);
        let mut cold = Engine::new(rules.clone());
        // A batch that reaches detection late, with a second the history held: the
        // statistical detectors do not judge it again; the threshold rule does.
        let evaluated = warm.evaluations;
        let mut late = Vec::new();
        warm.observe_snapshot("h", &snap(590), &mut late);
        assert_eq!(
            warm.replayed_skipped, 2,
            "the anomaly's sample and the forest's vector"
        );
        assert_eq!(
            warm.evaluations,
            evaluated + 1,
            "the threshold rule's sample"
        );
        assert!(late.iter().any(|e| e.rule == "hot"), "{late:?}");

        let (mut same, mut differ_cold) = (0, 0);
        for i in 600..700 {
            let l = judge(&mut live, i, &mut out);
            let w = judge(&mut warm, i, &mut out);
            let c = judge(&mut cold, i, &mut out);
            assert!(l.0.is_some() && l.1.is_some());
            assert_eq!(l, w, "second {i}: live {l:?}, warmed {w:?}");
            same += 1;
            differ_cold += (l != c) as usize;
        }
        assert_eq!(same, 100);
        assert!(
            differ_cold > 50,
            "cold detectors judged like warmed ones: {differ_cold}"
        );
    }

    /// A host that started without its history (too many hosts at once) and ran cold for a
    /// while catches up: its statistical detectors are replaced by ones that replayed its
    /// history up to now, and judge from then on as if they had seen it all live.
    #[test]
    fn a_host_started_cold_catches_up_with_its_history() {
        let rules = parse_rules("t", RULES).unwrap();
        let snaps: Vec<protocol::Snapshot> = (0..600).map(snap).collect();
        let mut live = Engine::new(rules.clone());
        let mut cold = Engine::new(rules.clone());
        let mut out = Vec::new();
        for (i, s) in snaps.iter().enumerate() {
            live.observe_snapshot("h", s, &mut out);
            // Released cold at second 500.
            if i >= 500 {
                cold.observe_snapshot("h", s, &mut out);
            }
        }
        let qs = history_queries_of(
            "sonde",
            &rules,
            |ri| rules[ri].is_statistical(),
            &["h"],
            0,
            2_000_000_000,
        );
        let answers = qs
            .iter()
            .map(|q| answer(q, &rules, "h", &snaps).into())
            .collect();
        let chunk = ChunkHistory {
            rules: Arc::new(rules.clone()),
            qs,
            answers,
            wanted: vec![("h".to_string(), 1_700_000_000_000 + 600_400, None)],
            fetched: Duration::ZERO,
        };
        let (w, _) = chunk.replay().remove("h").unwrap();
        assert_eq!(cold.catch_up(w), 2);
        for i in 600..650 {
            let (l, c) = (judge(&mut live, i, &mut out), judge(&mut cold, i, &mut out));
            assert!(l.0.is_some() && l.1.is_some());
            assert_eq!(l, c, "second {i}");
        }
    }
}
