//! Detect stage: rules evaluated on the live stream of decoded batches (and, with the same
//! code, over history in `aggregator backtest`). One state per rule × series; the alert
//! lifecycle is pending → firing → resolved, with `for`, repeats and a stable alert id.

pub mod anomaly;
pub mod backtest;
pub mod detectors;
pub mod drift;
pub mod eval;
pub mod forecast;
pub mod forest;
pub mod live;
pub mod rng;
pub mod rules;
pub mod series;

use detectors::{Detector, Severity, Verdict};

/// The rules that ship: used when no `rules` file is configured (unless `default_rules =
/// false`); `aggregator default-rules` prints them.
pub const DEFAULT_RULES: &str = include_str!("../../rules/default.toml");
use protocol::Batch;
use rules::{Rule, RuleKind};
use series::SeriesSpec;
use std::collections::HashMap;
use std::hash::Hasher;

/// Shell-style glob with `*` and `?`.
pub fn glob(pattern: &str, s: &str) -> bool {
    fn m(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(b'*'), _) => m(&p[1..], s) || (!s.is_empty() && m(p, &s[1..])),
            (Some(b'?'), Some(_)) => m(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => m(&p[1..], &s[1..]),
            _ => false,
        }
    }
    m(pattern.as_bytes(), s.as_bytes())
}

/// FNV-1a: a fixed hash, so alert ids are the same live, in backtests and across restarts.
struct Fnv(u64);
impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= *b as u64;
            self.0 = self.0.wrapping_mul(0x100000001b3);
        }
    }
}
fn fnv() -> Fnv {
    Fnv(0xcbf29ce484222325)
}

/// A transition of an alert (or a repeat of a firing one).
#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct AlertEvent {
    /// Stable for one alert from its start to its resolution: hash of rule, labels, start.
    pub id: String,
    pub rule: String,
    /// "pending", "firing", "resolved" (and "cleared": pending that never fired).
    pub state: &'static str,
    pub severity: &'static str,
    pub host: String,
    /// Series labels, including `host` and `series` (table.column).
    pub labels: Vec<(String, String)>,
    pub value: f64,
    pub threshold: Option<f64>,
    /// Statistical rules: the detector's score (z-like); None for threshold rules.
    pub score: Option<f64>,
    pub starts_at_ms: u64,
    pub ends_at_ms: Option<u64>,
    /// When this event was produced (sample time).
    pub at_ms: u64,
    /// True when this is a re-notification of a still-firing alert (not a transition).
    pub repeat: bool,
    pub summary: String,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Inactive,
    Pending { since: u64 },
    Firing { since: u64, last_sent: u64 },
}

struct SeriesState {
    rule: usize,
    host: String,
    labels: Vec<(String, String)>,
    det: Option<Detector>,
    phase: Phase,
    severity: Severity,
    last_value: f64,
    last_verdict: Option<Verdict>,
    last_seen_ms: u64,
    /// Taken over from the alerts table (start, id): the alert keeps its id.
    adopted: Option<(u64, String)>,
    /// The newest sample of history its detector replayed (see [`Engine::warm`]): a live
    /// sample of that second or an earlier one is not judged again (a batch that reached detection after a newer
    /// one may hold samples already replayed).
    warmed_until: Option<u64>,
}

/// An alert the alerts table says is firing (another aggregator's, or this one's before a
/// restart): see [`Engine::adopt`].
#[derive(Debug, Clone, PartialEq)]
pub struct OpenAlert {
    pub id: String,
    pub rule: String,
    pub labels: Vec<(String, String)>,
    pub severity: String,
    pub starts_at_ms: u64,
}

impl SeriesState {
    fn new(
        rule: usize,
        host: &str,
        labels: Vec<(String, String)>,
        det: Option<Detector>,
        seen_ms: u64,
    ) -> SeriesState {
        SeriesState {
            rule,
            host: host.to_string(),
            labels,
            det,
            phase: Phase::Inactive,
            severity: Severity::Warning,
            last_value: 0.0,
            last_verdict: None,
            last_seen_ms: seen_ms,
            adopted: None,
            warmed_until: None,
        }
    }

    fn bytes(&self) -> usize {
        std::mem::size_of::<SeriesState>()
            + self.host.capacity()
            + self
                .labels
                .iter()
                .map(|(k, v)| 48 + k.capacity() + v.capacity())
                .sum::<usize>()
            + self.det.as_ref().map_or(0, |d| d.state_bytes())
    }
}

/// Fills `{host}`, `{value}`, `{eta}` (forecast rules: time to the limit) and any series
/// label (`{mount}`, `{device}`, ...) into a rule's summary.
fn expand_summary(text: &str, s: &SeriesState, score: Option<f64>, kind: &RuleKind) -> String {
    if !text.contains('{') {
        return text.to_string();
    }
    let mut out = text.replace("{host}", &s.host);
    let value = format!("{:.4}", s.last_value);
    out = out.replace("{value}", value.trim_end_matches('0').trim_end_matches('.'));
    if let (RuleKind::Forecast { .. }, Some(eta)) = (kind, score) {
        let e = if eta < 0.0 {
            "never".to_string()
        } else {
            forecast::human_eta(eta)
        };
        out = out.replace("{eta}", &e);
    }
    for (k, v) in &s.labels {
        out = out.replace(&format!("{{{k}}}"), v);
    }
    out
}

/// The labels a snapshot carries for its host (the sensor's `labels`), if any.
pub fn host_labels_of(snap: &protocol::Snapshot) -> Option<Vec<(String, String)>> {
    if snap.host_labels.is_empty() {
        return None;
    }
    Some(
        snap.host_labels
            .iter()
            .filter(|l| l.name != "host")
            .map(|l| (l.name.clone(), l.value.clone()))
            .collect(),
    )
}

/// One host's series, their detectors warmed from history by a side engine (see
/// [`Engine::take_host`] and [`Engine::absorb`]).
pub struct WarmedHost {
    rules: Vec<Rule>,
    series: Vec<(u64, SeriesState)>,
}

impl WarmedHost {
    pub fn series(&self) -> usize {
        self.series.len()
    }
}

/// The live detection engine.
pub struct Engine {
    rules: Vec<Rule>,
    series: HashMap<u64, SeriesState>,
    /// Host → (last batch time ms, the host_silent alert states per rule).
    hosts: HashMap<String, u64>,
    host_alerts: HashMap<(usize, String), SeriesState>,
    /// Host → its labels, from the latest batch that carried them.
    host_labels: HashMap<String, Vec<(String, String)>>,
    pub evaluations: u64,
    /// Live samples not judged by a detector because it had replayed them from history.
    pub replayed_skipped: u64,
}

/// The state of a series seen for the first time: its labels (`host`, the series' own,
/// `series`) and a fresh detector.
fn new_series(
    rule: &Rule,
    rule_idx: usize,
    host: &str,
    labels: &[(&str, &str)],
    key: u64,
    ts_ms: u64,
) -> SeriesState {
    let mut l: Vec<(String, String)> = vec![("host".into(), host.into())];
    l.extend(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    if let Some(sp) = &rule.series {
        l.push(("series".into(), sp.name()));
    }
    SeriesState::new(rule_idx, host, l, rule.new_detector(key), ts_ms)
}

/// Whether a multi-series rule takes the value of `spec` (one of its series) with these
/// labels: every matcher naming one of `spec`'s labels matches (of the values it takes at
/// one time, the largest is the series' value).
pub fn vector_part_selects(rule: &Rule, spec: &SeriesSpec, labels: &[(&str, &str)]) -> bool {
    rule.labels.iter().all(|(k, pat)| {
        k == "host"
            || !spec.label_names().contains(&k.as_str())
            || labels.iter().any(|(n, l)| n == k && glob(pat, l))
    })
}

/// The key of the series an alert is of, from the alert's labels (which also name the
/// host and the series).
fn alert_series_key(rule: &Rule, host: &str, labels: &[(String, String)]) -> u64 {
    let labels: Vec<(&str, &str)> = labels
        .iter()
        .filter(|(k, _)| k != "host" && k != "series")
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    series_key(rule, host, &labels)
}

fn series_key(rule: &Rule, host: &str, labels: &[(&str, &str)]) -> u64 {
    let mut h = fnv();
    h.write(rule.name.as_bytes());
    h.write(&[0]);
    h.write(host.as_bytes());
    for (k, v) in labels {
        h.write(&[0]);
        h.write(k.as_bytes());
        h.write(&[1]);
        h.write(v.as_bytes());
    }
    h.finish()
}

fn alert_id(rule: &str, labels: &[(String, String)], start: u64) -> String {
    let mut h = fnv();
    h.write(rule.as_bytes());
    for (k, v) in labels {
        h.write(&[0]);
        h.write(k.as_bytes());
        h.write(&[1]);
        h.write(v.as_bytes());
    }
    h.write(&start.to_le_bytes());
    format!("{:016x}", h.finish())
}

/// Whether a rule's label matchers select this series: `host` is the host name (from the
/// certificate); any other name is the series' own label, or else one of the host's labels
/// (the sensor's `labels`, e.g. `env`).
fn matches(
    rule: &Rule,
    host: &str,
    labels: &[(&str, &str)],
    host_labels: Option<&Vec<(String, String)>>,
) -> bool {
    rule.labels.iter().all(|(k, pat)| {
        if k == "host" {
            return glob(pat, host);
        }
        match labels.iter().find(|(n, _)| n == k) {
            Some((_, v)) => glob(pat, v),
            None => host_labels
                .and_then(|hl| hl.iter().find(|(n, _)| n == k))
                .is_some_and(|(_, v)| glob(pat, v)),
        }
    })
}

impl Engine {
    pub fn new(rules: Vec<Rule>) -> Engine {
        Engine {
            rules,
            series: HashMap::new(),
            hosts: HashMap::new(),
            host_alerts: HashMap::new(),
            host_labels: HashMap::new(),
            evaluations: 0,
            replayed_skipped: 0,
        }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Replaces the rules. Series of rules whose definition did not change keep their
    /// detector and alert state; the others start fresh (firing alerts of removed or changed
    /// rules are resolved).
    pub fn reload(&mut self, rules: Vec<Rule>, now_ms: u64, out: &mut Vec<AlertEvent>) {
        let map: Vec<Option<usize>> = self
            .rules
            .iter()
            .map(|old| rules.iter().position(|r| r == old))
            .collect();
        let old_series = std::mem::take(&mut self.series);
        for (k, mut s) in old_series {
            match map[s.rule] {
                Some(n) => {
                    s.rule = n;
                    self.series.insert(k, s);
                }
                None => {
                    if let Phase::Firing { since, .. } = s.phase {
                        out.push(self.event(&s, "resolved", since, Some(now_ms), now_ms, false));
                    }
                }
            }
        }
        let old_hosts = std::mem::take(&mut self.host_alerts);
        for ((r, h), mut s) in old_hosts {
            if let Some(n) = map[r] {
                s.rule = n;
                self.host_alerts.insert((n, h), s);
            }
        }
        self.rules = rules;
    }

    fn event(
        &self,
        s: &SeriesState,
        state: &'static str,
        since: u64,
        end: Option<u64>,
        at: u64,
        repeat: bool,
    ) -> AlertEvent {
        let rule = &self.rules[s.rule.min(self.rules.len().saturating_sub(1))];
        let v = s.last_verdict;
        let statistical = rule.is_statistical();
        let summary = expand_summary(&rule.summary, s, v.map(|v| v.score), &rule.kind);
        let id = match &s.adopted {
            Some((start, id)) if *start == since => id.clone(),
            _ => alert_id(&rule.name, &s.labels, since),
        };
        AlertEvent {
            id,
            rule: rule.name.clone(),
            state,
            severity: s.severity.as_str(),
            host: s.host.clone(),
            labels: s.labels.clone(),
            value: s.last_value,
            threshold: v.and_then(|v| v.threshold),
            score: if statistical {
                v.map(|v| v.score)
            } else {
                None
            },
            starts_at_ms: since,
            ends_at_ms: end,
            at_ms: at,
            repeat,
            summary,
        }
    }

    /// The lifecycle step shared by every rule kind.
    fn step(
        &self,
        s: &mut SeriesState,
        breach: Option<Severity>,
        ts: u64,
        out: &mut Vec<AlertEvent>,
    ) {
        let rule = &self.rules[s.rule];
        let for_ms = rule.for_.as_millis() as u64;
        match (s.phase, breach) {
            (Phase::Inactive, None) => {}
            (Phase::Inactive, Some(sev)) => {
                s.severity = sev;
                if for_ms == 0 {
                    s.phase = Phase::Firing {
                        since: ts,
                        last_sent: ts,
                    };
                    out.push(self.event(s, "firing", ts, None, ts, false));
                } else {
                    s.phase = Phase::Pending { since: ts };
                    out.push(self.event(s, "pending", ts, None, ts, false));
                }
            }
            (Phase::Pending { since }, Some(sev)) => {
                s.severity = s.severity.max(sev);
                if ts.saturating_sub(since) >= for_ms {
                    s.phase = Phase::Firing {
                        since,
                        last_sent: ts,
                    };
                    out.push(self.event(s, "firing", since, None, ts, false));
                }
            }
            (Phase::Pending { since }, None) => {
                s.phase = Phase::Inactive;
                out.push(self.event(s, "cleared", since, Some(ts), ts, false));
            }
            (Phase::Firing { since, last_sent }, Some(sev)) => {
                let escalated = sev > s.severity;
                s.severity = sev;
                let due = ts.saturating_sub(last_sent) >= rule.repeat.as_millis() as u64;
                if escalated || due {
                    s.phase = Phase::Firing {
                        since,
                        last_sent: ts,
                    };
                    out.push(self.event(s, "firing", since, None, ts, !escalated));
                }
            }
            (Phase::Firing { since, .. }, None) => {
                s.phase = Phase::Inactive;
                out.push(self.event(s, "resolved", since, Some(ts), ts, false));
            }
        }
    }

    /// `s` (taken out of the map under `key`) to evaluate at `ts_ms`; None, with `s` put
    /// back, when its detector replayed a sample of that second or a later one from history
    /// (`warmed_until`).
    fn unless_replayed(&mut self, key: u64, s: SeriesState, ts_ms: u64) -> Option<SeriesState> {
        // History is stored by the second: a live sample in the newest second replayed is
        // that sample.
        if s.warmed_until.is_some_and(|w| ts_ms / 1000 <= w / 1000) {
            self.replayed_skipped += 1;
            self.series.insert(key, s);
            return None;
        }
        Some(s)
    }

    /// Evaluates one sample of one rule's series.
    pub fn observe(
        &mut self,
        rule_idx: usize,
        host: &str,
        labels: &[(&str, &str)],
        ts_ms: u64,
        value: f64,
        out: &mut Vec<AlertEvent>,
    ) -> Option<Verdict> {
        let rule = &self.rules[rule_idx];
        if !matches(rule, host, labels, self.host_labels.get(host)) {
            return None;
        }
        let key = series_key(rule, host, labels);
        let s = match self.series.remove(&key) {
            Some(s) => s,
            None => new_series(rule, rule_idx, host, labels, key, ts_ms),
        };
        let mut s = self.unless_replayed(key, s, ts_ms)?;
        self.evaluations += 1;
        s.last_seen_ms = ts_ms;
        s.last_value = value;
        let mut verdict = None;
        match &mut s.det {
            Some(d) => {
                let v = d.eval(ts_ms, value);
                s.last_verdict = Some(v);
                verdict = Some(v);
                self.step(&mut s, v.breach, ts_ms, out);
            }
            None => {
                // An absence rule: the series is present now.
                if let Phase::Firing { .. } | Phase::Pending { .. } = s.phase {
                    self.step(&mut s, None, ts_ms, out);
                }
            }
        }
        self.series.insert(key, s);
        verdict
    }

    /// Feeds one sample of history to a series' detector without its alert lifecycle:
    /// nothing fires, pends or resolves, nothing is notified. Used before taking a host's
    /// alerts over (see [`Engine::adopt`]), so that a statistical detector judges the next
    /// sample against the host's recent past rather than starting from nothing.
    pub fn warm(
        &mut self,
        rule_idx: usize,
        host: &str,
        labels: &[(&str, &str)],
        ts_ms: u64,
        value: f64,
    ) -> bool {
        let rule = &self.rules[rule_idx];
        if !matches(rule, host, labels, self.host_labels.get(host)) {
            return false;
        }
        let key = series_key(rule, host, labels);
        let s = self
            .series
            .entry(key)
            .or_insert_with(|| new_series(rule, rule_idx, host, labels, key, ts_ms));
        let Some(d) = &mut s.det else { return false };
        s.last_verdict = Some(d.eval(ts_ms, value));
        s.last_value = value;
        s.last_seen_ms = ts_ms;
        s.warmed_until = Some(s.warmed_until.map_or(ts_ms, |w| w.max(ts_ms)));
        true
    }

    /// Evaluates a multi-series rule (a `forest` over several of one host's series) on one
    /// vector of values taken at one time.
    pub fn observe_vector(
        &mut self,
        rule_idx: usize,
        host: &str,
        ts_ms: u64,
        values: &[f64],
        out: &mut Vec<AlertEvent>,
    ) -> Option<Verdict> {
        let (key, s) = self.vector_series(rule_idx, host, ts_ms)?;
        let mut s = self.unless_replayed(key, s, ts_ms)?;
        self.evaluations += 1;
        s.last_seen_ms = ts_ms;
        s.last_value = values.first().copied().unwrap_or(0.0);
        let v = s.det.as_mut().map(|d| d.eval_vector(ts_ms, values));
        if let Some(v) = v {
            s.last_verdict = Some(v);
            self.step(&mut s, v.breach, ts_ms, out);
        }
        self.series.insert(key, s);
        v
    }

    /// As [`Engine::warm`] for a multi-series rule: one vector of history, no lifecycle.
    pub fn warm_vector(&mut self, rule_idx: usize, host: &str, ts_ms: u64, values: &[f64]) -> bool {
        let Some((key, mut s)) = self.vector_series(rule_idx, host, ts_ms) else {
            return false;
        };
        let fed = match &mut s.det {
            Some(d) => {
                s.last_verdict = Some(d.eval_vector(ts_ms, values));
                s.last_seen_ms = ts_ms;
                s.last_value = values.first().copied().unwrap_or(0.0);
                s.warmed_until = Some(s.warmed_until.map_or(ts_ms, |w| w.max(ts_ms)));
                true
            }
            None => false,
        };
        self.series.insert(key, s);
        fed
    }

    /// The state of a multi-series rule's one series for `host`, taken out of the map (or
    /// new), with its key; None when the rule does not select the host.
    fn vector_series(
        &mut self,
        rule_idx: usize,
        host: &str,
        ts_ms: u64,
    ) -> Option<(u64, SeriesState)> {
        let rule = &self.rules[rule_idx];
        // Matchers naming a label of one of the series select the series' values (done by
        // the caller, `vector_part_selects`); the others are the host name or the host's
        // labels.
        let series_labels: Vec<&str> = rule
            .series
            .iter()
            .chain(rule.more_series.iter())
            .flat_map(|sp| sp.label_names())
            .collect();
        let host_labels = self.host_labels.get(host);
        let selected = rule.labels.iter().all(|(k, pat)| {
            if k == "host" {
                glob(pat, host)
            } else if series_labels.contains(&k.as_str()) {
                true
            } else {
                host_labels
                    .and_then(|hl| hl.iter().find(|(n, _)| n == k))
                    .is_some_and(|(_, v)| glob(pat, v))
            }
        });
        if !selected {
            return None;
        }
        let key = series_key(rule, host, &[]);
        let s = match self.series.remove(&key) {
            Some(s) => s,
            None => {
                let names: Vec<String> = rule
                    .series
                    .iter()
                    .chain(rule.more_series.iter())
                    .map(|sp| sp.name())
                    .collect();
                let labels = vec![
                    ("host".into(), host.into()),
                    ("series".into(), names.join(",")),
                ];
                SeriesState::new(rule_idx, host, labels, rule.new_detector(key), ts_ms)
            }
        };
        Some((key, s))
    }

    /// Evaluates every rule on every snapshot of a batch from `host`.
    pub fn observe_batch(
        &mut self,
        host: &str,
        batch: &Batch,
        now_ms: u64,
        out: &mut Vec<AlertEvent>,
    ) {
        self.host_seen(host, now_ms, out);
        for snap in &batch.snapshots {
            self.observe_snapshot(host, snap, out);
        }
    }

    /// Evaluates every rule on one snapshot (live, and the corpus evaluation).
    pub fn observe_snapshot(
        &mut self,
        host: &str,
        snap: &protocol::Snapshot,
        out: &mut Vec<AlertEvent>,
    ) {
        if let Some(labels) = host_labels_of(snap) {
            self.set_host_labels(host, labels);
        }
        let mut samples: Vec<(usize, Vec<(&'static str, String)>, f64)> = Vec::new();
        let mut vectors: Vec<(usize, Vec<f64>)> = Vec::new();
        for (i, r) in self.rules.iter().enumerate() {
            let Some(sp) = &r.series else { continue };
            if r.more_series.is_empty() {
                sp.for_each(snap, |labels, v| {
                    samples.push((
                        i,
                        labels.iter().map(|(k, v)| (*k, v.to_string())).collect(),
                        v,
                    ))
                });
            } else {
                // One value per series: the largest over the label sets the rule selects.
                let mut vec = Vec::with_capacity(1 + r.more_series.len());
                for spec in std::iter::once(sp).chain(r.more_series.iter()) {
                    let mut best: Option<f64> = None;
                    spec.for_each(snap, |labels, v| {
                        if vector_part_selects(r, spec, labels) && v.is_finite() {
                            best = Some(best.map_or(v, |b: f64| b.max(v)));
                        }
                    });
                    match best {
                        Some(b) => vec.push(b),
                        None => break,
                    }
                }
                if vec.len() == 1 + r.more_series.len() {
                    vectors.push((i, vec));
                }
            }
        }
        for (i, labels, v) in samples.drain(..) {
            let l: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
            self.observe(i, host, &l, snap.ts_ms, v, out);
        }
        for (i, v) in vectors {
            self.observe_vector(i, host, snap.ts_ms, &v, out);
        }
    }

    /// Sets `host`'s labels (as its sensor's `labels` reports them): a side engine warming
    /// a host from history needs them so that rules selecting by a host label pick the same
    /// series as live.
    pub fn set_host_labels(&mut self, host: &str, labels: Vec<(String, String)>) {
        if self.host_labels.get(host) != Some(&labels) {
            self.host_labels.insert(host.to_string(), labels);
        }
    }

    /// Moves `host`'s series (detectors warmed by [`Engine::warm`]) out of this engine, to be
    /// taken in by another with [`Engine::absorb`].
    pub fn take_host(&mut self, host: &str) -> WarmedHost {
        let (mine, rest): (Vec<(u64, SeriesState)>, Vec<(u64, SeriesState)>) =
            std::mem::take(&mut self.series)
                .into_iter()
                .partition(|(_, s)| s.host == host);
        self.series = rest.into_iter().collect();
        WarmedHost {
            rules: self.rules.clone(),
            series: mine,
        }
    }

    /// Moves every host's series out of this engine (a side engine that warmed several), by
    /// host; see [`Engine::take_host`].
    pub fn take_hosts(self) -> HashMap<String, WarmedHost> {
        let mut out: HashMap<String, WarmedHost> = HashMap::new();
        for (k, s) in self.series {
            out.entry(s.host.clone())
                .or_insert_with(|| WarmedHost {
                    rules: self.rules.clone(),
                    series: Vec::new(),
                })
                .series
                .push((k, s));
        }
        out
    }

    /// Takes in series warmed by another engine, each with its detector. A series' rule is
    /// found by its definition: one whose rule changed or went since (a reload) is dropped,
    /// as is one this engine already has. Returns how many were taken in.
    pub fn absorb(&mut self, w: WarmedHost) -> usize {
        self.take_in(w, false)
    }

    /// A host's detectors catch up with its history (it started here without it): as
    /// [`Engine::absorb`], but a warmed series also replaces the live one's detector while
    /// that one is not alerting (inactive, not taken over). Returns how many changed.
    pub fn catch_up(&mut self, w: WarmedHost) -> usize {
        self.take_in(w, true)
    }

    fn take_in(&mut self, w: WarmedHost, replace: bool) -> usize {
        let map: Vec<Option<usize>> = w
            .rules
            .iter()
            .map(|old| self.rules.iter().position(|r| r == old))
            .collect();
        let mut n = 0;
        for (k, mut s) in w.series {
            let Some(ri) = map[s.rule] else { continue };
            match self.series.get_mut(&k) {
                Some(live) => {
                    if !replace || !matches!(live.phase, Phase::Inactive) || live.adopted.is_some()
                    {
                        continue;
                    }
                    live.det = s.det;
                    live.last_verdict = s.last_verdict;
                    live.warmed_until = s.warmed_until;
                }
                None => {
                    s.rule = ri;
                    self.series.insert(k, s);
                }
            }
            n += 1;
        }
        n
    }

    /// Whether this engine holds anything about `host` (it has sent here since this engine
    /// started or took it over).
    pub fn knows_host(&self, host: &str) -> bool {
        self.hosts.contains_key(host)
    }

    /// Hosts last heard from at least `quiet_ms` ago, with when (ms).
    pub fn quiet_hosts(&self, now_ms: u64, quiet_ms: u64) -> Vec<(String, u64)> {
        self.hosts
            .iter()
            .filter(|(_, &t)| now_ms.saturating_sub(t) >= quiet_ms)
            .map(|(h, &t)| (h.clone(), t))
            .collect()
    }

    /// Forgets `host`, without notifications: its sensor now sends to another aggregator,
    /// which takes its alerts over (see [`Engine::adopt`]); no `host_silent` here. Returns
    /// how many series and host alerts were dropped.
    pub fn host_left(&mut self, host: &str) -> usize {
        let before = self.series.len() + self.host_alerts.len();
        self.series.retain(|_, s| s.host != host);
        self.host_alerts.retain(|(_, h), _| h != host);
        self.hosts.remove(host);
        before - (self.series.len() + self.host_alerts.len())
    }

    /// Takes over `host`'s alerts that are firing (from the alerts table) when the host
    /// starts sending here: each continues under its id without a new "firing"
    /// notification, and this engine sends its resolution when it clears (a `host_silent`
    /// one resolves at once: the host is sending). Alerts of rules this engine does not
    /// have are left alone. A series already judged here is taken over only while it is not
    /// firing: pending (its condition holds here too, not yet for its `for`) or inactive; one
    /// firing here under its own id keeps it. Returns how many were taken over.
    pub fn adopt(
        &mut self,
        host: &str,
        open: &[OpenAlert],
        now_ms: u64,
        out: &mut Vec<AlertEvent>,
    ) -> usize {
        self.adopt_held(host, open, now_ms, None, &[], out).0
    }

    /// `adopt`, for a host whose events since `held_since_ms` (its first sample here) are
    /// still held, neither stored nor notified, because its alerts could not be read then:
    /// a series that began firing here since then is taken over too, its own alert never
    /// having been told. One whose first alert here already resolved (`held_resolved`: the
    /// "resolved" events held) had the alert taken over end then: that alert's resolution
    /// is sent with the end seen here, in place of the local alert's, and the series goes
    /// on as it is here. Returns how many were taken over, and the ids of the alerts that
    /// fired here and were replaced (the caller drops their held events).
    pub fn adopt_held(
        &mut self,
        host: &str,
        open: &[OpenAlert],
        now_ms: u64,
        held_since_ms: Option<u64>,
        held_resolved: &[&AlertEvent],
        out: &mut Vec<AlertEvent>,
    ) -> (usize, Vec<String>) {
        let mut n = 0;
        let mut replaced = Vec::new();
        // The first alert of each series that fired here since the hold began and resolved.
        let mut ended: HashMap<u64, &AlertEvent> = HashMap::new();
        if let Some(t) = held_since_ms {
            for e in held_resolved {
                let (Some(rule), Some(_)) =
                    (self.rules.iter().find(|r| r.name == e.rule), e.ends_at_ms)
                else {
                    continue;
                };
                if e.host != host || e.starts_at_ms < t {
                    continue;
                }
                let k = alert_series_key(rule, host, &e.labels);
                if ended
                    .get(&k)
                    .is_none_or(|f| e.starts_at_ms < f.starts_at_ms)
                {
                    ended.insert(k, e);
                }
            }
        }
        let held = |phase: &Phase| match (phase, held_since_ms) {
            (Phase::Firing { since, .. }, Some(t)) => *since >= t,
            _ => false,
        };
        for a in open {
            let Some(ri) = self.rules.iter().position(|r| r.name == a.rule) else {
                continue;
            };
            let rule = &self.rules[ri];
            let severity = if a.severity == "critical" {
                Severity::Critical
            } else {
                Severity::Warning
            };
            let phase = Phase::Firing {
                since: a.starts_at_ms,
                last_sent: now_ms,
            };
            if matches!(rule.kind, RuleKind::HostSilent { .. }) {
                let k = (ri, host.to_string());
                if self.host_alerts.contains_key(&k) {
                    continue;
                }
                let mut s =
                    SeriesState::new(ri, host, vec![("host".into(), host.into())], None, now_ms);
                s.phase = phase;
                s.severity = severity;
                s.adopted = Some((a.starts_at_ms, a.id.clone()));
                self.host_alerts.insert(k, s);
                n += 1;
                continue;
            }
            let key = alert_series_key(rule, host, &a.labels);
            if let Some(e) = ended.get(&key) {
                // It ended here: its resolution, under its id, with the end seen here.
                if let Some(s) = self.series.get(&key) {
                    let mut r =
                        self.event(s, "resolved", a.starts_at_ms, e.ends_at_ms, e.at_ms, false);
                    r.id = a.id.clone();
                    r.severity = severity.as_str();
                    out.push(r);
                    replaced.push(e.id.clone());
                    n += 1;
                    continue;
                }
            }
            match self.series.remove(&key) {
                // Warmed from history (`warm`), or judged here before the alert could be
                // read (a catch-up): the detector is kept, the alert taken over. A pending
                // one here never fired: it is cleared, and goes on as the alert taken over.
                // One firing here whose events are all still held is replaced untold.
                Some(mut s)
                    if s.adopted.is_none()
                        && (matches!(s.phase, Phase::Inactive | Phase::Pending { .. })
                            || held(&s.phase)) =>
                {
                    match s.phase {
                        Phase::Pending { since } => {
                            out.push(self.event(&s, "cleared", since, Some(now_ms), now_ms, false))
                        }
                        Phase::Firing { since, .. } => {
                            replaced.push(alert_id(&rule.name, &s.labels, since))
                        }
                        Phase::Inactive => {}
                    }
                    s.phase = phase;
                    s.severity = severity;
                    s.adopted = Some((a.starts_at_ms, a.id.clone()));
                    self.series.insert(key, s);
                }
                Some(s) => {
                    self.series.insert(key, s);
                    continue;
                }
                None => {
                    let mut s = SeriesState::new(
                        ri,
                        host,
                        a.labels.clone(),
                        rule.new_detector(key),
                        now_ms,
                    );
                    s.phase = phase;
                    s.severity = severity;
                    s.adopted = Some((a.starts_at_ms, a.id.clone()));
                    self.series.insert(key, s);
                }
            }
            n += 1;
        }
        (n, replaced)
    }

    /// A host was heard from (live: a batch arrived).
    pub fn host_seen(&mut self, host: &str, now_ms: u64, out: &mut Vec<AlertEvent>) {
        self.hosts.insert(host.to_string(), now_ms);
        let keys: Vec<(usize, String)> = self
            .host_alerts
            .keys()
            .filter(|(_, h)| h == host)
            .cloned()
            .collect();
        for k in keys {
            let mut s = self.host_alerts.remove(&k).unwrap();
            if !matches!(s.phase, Phase::Inactive) {
                self.step(&mut s, None, now_ms, out);
            }
            self.host_alerts.insert(k, s);
        }
    }

    /// Checks absence rules against the clock (live: every second; backtest: at each sample).
    pub fn tick(&mut self, now_ms: u64, out: &mut Vec<AlertEvent>) {
        for (ri, rule) in self.rules.iter().enumerate() {
            match rule.kind {
                RuleKind::HostSilent { severity } => {
                    for (host, &last) in &self.hosts {
                        if !matches(rule, host, &[], self.host_labels.get(host)) {
                            continue;
                        }
                        let silent = now_ms.saturating_sub(last) >= rule.for_.as_millis() as u64;
                        let key = (ri, host.clone());
                        let s = self.host_alerts.entry(key).or_insert_with(|| {
                            let labels = vec![("host".into(), host.clone())];
                            SeriesState::new(ri, host, labels, None, last)
                        });
                        if silent && matches!(s.phase, Phase::Inactive) {
                            s.severity = severity;
                            s.last_value = now_ms.saturating_sub(last) as f64 / 1000.0;
                            // Silent since the last batch: the alert starts then.
                            s.phase = Phase::Firing {
                                since: last,
                                last_sent: now_ms,
                            };
                        }
                    }
                }
                RuleKind::Absent { severity } => {
                    for s in self.series.values_mut().filter(|s| s.rule == ri) {
                        if matches!(s.phase, Phase::Inactive)
                            && now_ms.saturating_sub(s.last_seen_ms) >= rule.for_.as_millis() as u64
                        {
                            s.severity = severity;
                            s.phase = Phase::Firing {
                                since: s.last_seen_ms,
                                last_sent: now_ms,
                            };
                        }
                    }
                }
                _ => {}
            }
        }
        // Emit the firing events for what just started (done after the loops for borrows).
        let mut fired = Vec::new();
        for s in self.host_alerts.values().chain(self.series.values()) {
            if let Phase::Firing { since, last_sent } = s.phase {
                if last_sent == now_ms && self.rules[s.rule].is_absence() {
                    fired.push(self.event(s, "firing", since, None, now_ms, false));
                }
            }
        }
        out.extend(fired);
    }

    /// Per rule: name, kind, series, and how many series it tracks, pending and firing
    /// (the console's rules page).
    pub fn rule_status(&self) -> Vec<serde_json::Value> {
        let mut counts = vec![(0usize, 0usize, 0usize); self.rules.len()];
        for s in self.series.values().chain(self.host_alerts.values()) {
            if let Some(c) = counts.get_mut(s.rule) {
                c.0 += 1;
                match s.phase {
                    Phase::Pending { .. } => c.1 += 1,
                    Phase::Firing { .. } => c.2 += 1,
                    Phase::Inactive => {}
                }
            }
        }
        self.rules
            .iter()
            .zip(counts)
            .map(|(r, (n, p, f))| {
                let kind = format!("{:?}", r.kind);
                serde_json::json!({
                    "name": r.name,
                    // As rules files spell it: `Threshold` -> threshold, `HostSilent` -> host_silent.
                    "kind": kind
                        .split([' ', '{', '('])
                        .next()
                        .unwrap_or("")
                        .chars()
                        .enumerate()
                        .flat_map(|(i, c)| {
                            let sep = (i > 0 && c.is_ascii_uppercase()).then_some('_');
                            sep.into_iter().chain(std::iter::once(c.to_ascii_lowercase()))
                        })
                        .collect::<String>(),
                    "series": r.series.as_ref().map(|s| s.name()),
                    "labels": r.labels,
                    "for_s": r.for_.as_secs_f64(),
                    "summary": r.summary,
                    "series_tracked": n,
                    "pending": p,
                    "firing": f,
                })
            })
            .collect()
    }

    /// Number of series with state, and their approximate memory.
    pub fn state_size(&self) -> (usize, usize) {
        let n = self.series.len() + self.host_alerts.len();
        let b = self
            .series
            .values()
            .chain(self.host_alerts.values())
            .map(|s| s.bytes())
            .sum();
        (n, b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str) -> Vec<Rule> {
        rules::parse_rules("t.toml", text).unwrap()
    }

    #[test]
    fn lifecycle_pending_firing_repeat_resolved_with_stable_id() {
        let mut e = Engine::new(rules(
            "[[rule]]\nname = \"busy\"\nkind = \"threshold\"\nseries = \"cpu.busy\"\ncritical = 80\nfor = \"5s\"\nrepeat = \"10s\"\n",
        ));
        let mut out = Vec::new();
        let l = [("cpu", "total")];
        for t in 0..30u64 {
            let v = if (3..20).contains(&t) { 95.0 } else { 10.0 };
            e.observe(0, "h1", &l, t * 1000, v, &mut out);
        }
        let states: Vec<(&str, u64, bool)> = out
            .iter()
            .map(|a| (a.state, a.at_ms / 1000, a.repeat))
            .collect();
        assert_eq!(
            states,
            vec![
                ("pending", 3, false),
                ("firing", 8, false),
                ("firing", 18, true),
                ("resolved", 20, false)
            ]
        );
        let id = out[1].id.clone();
        assert!(out[1..].iter().all(|a| a.id == id));
        assert_eq!(out[3].ends_at_ms, Some(20_000));
        assert_eq!(out[1].starts_at_ms, 3000);
        assert_eq!(out[1].severity, "critical");
        assert!(out[1]
            .labels
            .contains(&("series".into(), "cpu.busy".into())));
        // A second episode gets another id.
        for t in 40..50u64 {
            e.observe(0, "h1", &l, t * 1000, 99.0, &mut out);
        }
        assert_ne!(out.last().unwrap().id, id);
    }

    #[test]
    fn label_globs_select_series() {
        let mut e = Engine::new(rules(
            "[[rule]]\nname = \"d\"\nkind = \"threshold\"\nseries = \"disk.util_pct\"\nwarning = 50\nlabels = { device = \"sd*\", host = \"db-*\" }\n",
        ));
        let mut out = Vec::new();
        e.observe(0, "db-1", &[("device", "sda")], 0, 90.0, &mut out);
        e.observe(0, "db-1", &[("device", "nvme0n1")], 0, 90.0, &mut out);
        e.observe(0, "web-1", &[("device", "sda")], 0, 90.0, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].host, "db-1");
    }

    #[test]
    fn host_silent_fires_and_resolves() {
        let mut e = Engine::new(rules(
            "[[rule]]\nname = \"silent\"\nkind = \"host_silent\"\nfor = \"30s\"\n",
        ));
        let mut out = Vec::new();
        e.host_seen("h", 0, &mut out);
        e.tick(10_000, &mut out);
        assert!(out.is_empty());
        e.tick(31_000, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].state, "firing");
        assert_eq!(out[0].starts_at_ms, 0);
        e.tick(32_000, &mut out);
        assert_eq!(out.len(), 1, "fires once");
        e.host_seen("h", 40_000, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].state, "resolved");
        assert_eq!(out[1].id, out[0].id);
    }

    /// A host moves from aggregator A to B: A forgets it without a host_silent alert; B
    /// A statistical alert taken over: warmed from the host's history first, the new
    /// aggregator resolves it when the one it came from would have; taken over cold (a
    /// detector with no history), it resolves early, while the condition still holds.
    #[test]
    fn a_statistical_alert_taken_over_with_history_resolves_when_the_original_would() {
        let text = "[[rule]]\nname = \"slow\"\nkind = \"mad\"\nseries = \"disk.w_await_ms\"\n\
                    threshold = 6\nwindow = 120\nmin_samples = 30\nfor = \"5s\"\n";
        let l = [("device", "sda")];
        // Noise around 10 ms for 10 minutes, then 60 ms from then on.
        let value = |t: u64| -> f64 {
            let noise = ((t * 7919) % 13) as f64 / 13.0 - 0.5;
            if t < 600 {
                10.0 + noise
            } else {
                60.0 + noise
            }
        };
        let mut a = Engine::new(rules(text));
        let mut out = Vec::new();
        let mut history = Vec::new();
        let mut fired = None;
        for t in 0..640u64 {
            a.observe(0, "h", &l, t * 1000, value(t), &mut out);
            history.push((t * 1000, value(t)));
            if let Some(e) = out.iter().find(|e| e.state == "firing") {
                fired.get_or_insert(e.clone());
            }
        }
        let fired = fired.expect("the shift fires on A");
        let open = OpenAlert {
            id: fired.id.clone(),
            rule: "slow".into(),
            labels: fired.labels.clone(),
            severity: fired.severity.to_string(),
            starts_at_ms: fired.starts_at_ms / 1000 * 1000,
        };
        // From t = 640 the host sends elsewhere: A (had it stayed), B warmed, C cold.
        let mut b = Engine::new(rules(text));
        for (ts, v) in &history {
            b.warm(0, "h", &l, *ts, *v);
        }
        assert_eq!(b.adopt("h", &[open.clone()], 640_000, &mut Vec::new()), 1);
        let mut c = Engine::new(rules(text));
        assert_eq!(c.adopt("h", &[open], 640_000, &mut Vec::new()), 1);
        let resolved_at = |e: &mut Engine| -> Option<u64> {
            let mut out = Vec::new();
            for t in 640..900u64 {
                e.observe(0, "h", &l, t * 1000, value(t), &mut out);
                if let Some(r) = out.iter().find(|e| e.state == "resolved") {
                    assert_eq!(r.id, fired.id, "resolved under the id it fired with");
                    return Some(t);
                }
                assert!(
                    out.iter().all(|e| e.state != "firing"),
                    "no second firing: {out:?}"
                );
            }
            None
        };
        let (ta, tb, tc) = (
            resolved_at(&mut a),
            resolved_at(&mut b),
            resolved_at(&mut c),
        );
        assert!(
            ta.is_some(),
            "the shift resolves on A once the window holds the new level"
        );
        assert_eq!(tb, ta, "warmed from history: resolved when A would have");
        assert!(
            tc.is_some_and(|tc| tc < ta.unwrap()),
            "cold: resolved early ({tc:?} against {ta:?})"
        );
    }

    /// A host new to an engine (it moved, or the aggregator restarted) with nothing firing:
    /// a side engine replays its history and hands the detectors over (`take_host`,
    /// `absorb`). The statistical rule then alerts on the same sample as an engine that saw
    /// everything; a cold engine is still in its warm-up and misses it. A rule that changed
    /// between the replay and the hand-over (a reload) is not handed over.
    #[test]
    fn a_new_host_warmed_from_history_alerts_as_if_it_had_never_moved() {
        let text = "[[rule]]\nname = \"spike\"\nkind = \"ewma\"\nseries = \"disk.w_await_ms\"\n\
                    threshold = 5\nwarmup = 60\nfor = \"0s\"\n\
                    [[rule]]\nname = \"other\"\nkind = \"ewma\"\nseries = \"disk.w_await_ms\"\nthreshold = 5\n";
        let l = [("device", "sda")];
        // Noise around 10 ms; one spike at t = 130.
        let value = |t: u64| -> f64 {
            let noise = ((t * 7919) % 13) as f64 / 13.0 - 0.5;
            if t == 130 {
                50.0
            } else {
                10.0 + noise
            }
        };
        let fired_at = |e: &mut Engine, from: u64| -> Option<u64> {
            let mut out = Vec::new();
            for t in from..200u64 {
                e.observe(0, "h", &l, t * 1000, value(t), &mut out);
                if out.iter().any(|e| e.state == "firing" && e.rule == "spike") {
                    return Some(t);
                }
            }
            None
        };
        let mut a = Engine::new(rules(text));
        let mut out = Vec::new();
        for t in 0..100u64 {
            a.observe(0, "h", &l, t * 1000, value(t), &mut out);
        }
        // From t = 100 the host sends to a new engine: B warmed through a side engine, C cold.
        let mut side = Engine::new(rules(text));
        side.set_host_labels("h", vec![("env".into(), "prod".into())]);
        for t in 0..100u64 {
            side.warm(0, "h", &l, t * 1000, value(t));
            side.warm(1, "h", &l, t * 1000, value(t));
        }
        let w = side.take_host("h");
        assert_eq!(w.series(), 2);
        assert_eq!(side.state_size().0, 0, "taken out of the side engine");
        let mut b = Engine::new(rules(text));
        assert_eq!(b.absorb(w), 2);
        let mut c = Engine::new(rules(text));
        let (ta, tb, tc) = (
            fired_at(&mut a, 100),
            fired_at(&mut b, 100),
            fired_at(&mut c, 100),
        );
        assert_eq!(ta, Some(130), "the spike fires on A");
        assert_eq!(tb, ta, "warmed: fires when A does");
        assert_eq!(tc, None, "cold: still in its warm-up at the spike");
        // Rule "other" changed between the replay and the hand-over: only "spike" is taken.
        let mut side = Engine::new(rules(text));
        for t in 0..100u64 {
            side.warm(0, "h", &l, t * 1000, value(t));
            side.warm(1, "h", &l, t * 1000, value(t));
        }
        let w = side.take_host("h");
        let changed = text.replace(
            "name = \"other\"\nkind = \"ewma\"\nseries = \"disk.w_await_ms\"\nthreshold = 5",
            "name = \"other\"\nkind = \"ewma\"\nseries = \"disk.w_await_ms\"\nthreshold = 4",
        );
        let mut d = Engine::new(rules(&changed));
        assert_eq!(d.absorb(w), 1, "the changed rule's series is not taken in");
        assert_eq!(fired_at(&mut d, 100), Some(130));
    }

    /// takes its firing alerts over (no new "firing"), and resolves them under their ids.
    #[test]
    fn a_host_that_moves_is_handed_over_without_new_notifications() {
        let text = "[[rule]]\nname = \"silent\"\nkind = \"host_silent\"\nfor = \"30s\"\n\
                    [[rule]]\nname = \"hot\"\nkind = \"threshold\"\nseries = \"disk.util_pct\"\nwarning = 50\nfor = \"0s\"\n";
        let mut a = Engine::new(rules(text));
        let mut out = Vec::new();
        a.host_seen("h", 0, &mut out);
        a.observe(1, "h", &[("device", "sda")], 1_000, 90.0, &mut out);
        a.tick(2_000, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].state, "firing");
        let fired = out[0].clone();
        // The host moves; A hears nothing more and is told it moved before `for` elapses.
        assert_eq!(a.quiet_hosts(20_000, 8_000), vec![("h".to_string(), 0)]);
        assert_eq!(a.host_left("h"), 2);
        a.tick(60_000, &mut out);
        assert_eq!(
            out.len(),
            1,
            "no host_silent from the aggregator the host left: {out:?}"
        );
        assert!(!a.knows_host("h"));
        // B takes over what the alerts table says is firing (start at second precision).
        let mut b = Engine::new(rules(text));
        let open = OpenAlert {
            id: fired.id.clone(),
            rule: "hot".into(),
            labels: fired.labels.clone(),
            severity: "warning".into(),
            starts_at_ms: 1_000,
        };
        assert_eq!(b.adopt("h", &[open.clone()], 20_000, &mut out), 1);
        assert_eq!(
            b.adopt("h", &[open], 20_000, &mut out),
            0,
            "taken over once"
        );
        b.host_seen("h", 20_000, &mut out);
        b.observe(1, "h", &[("device", "sda")], 21_000, 95.0, &mut out);
        assert_eq!(out.len(), 1, "still firing: no new notification: {out:?}");
        b.observe(1, "h", &[("device", "sda")], 22_000, 10.0, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].state, "resolved");
        assert_eq!(out[1].id, fired.id, "resolved under the id it fired with");
        // A host_silent alert taken over resolves as soon as the host is heard from.
        let mut c = Engine::new(rules(text));
        let silent = OpenAlert {
            id: "abc".into(),
            rule: "silent".into(),
            labels: vec![("host".into(), "h".into())],
            severity: "warning".into(),
            starts_at_ms: 5_000,
        };
        assert_eq!(c.adopt("h", &[silent], 50_000, &mut out), 1);
        c.host_seen("h", 50_000, &mut out);
        assert_eq!(out.len(), 3);
        assert_eq!((out[2].state, out[2].id.as_str()), ("resolved", "abc"));
    }

    /// A host whose alerts could not be read when it arrived (ClickHouse down) is judged
    /// here first; when they are read (its catch-up), an alert pending here is taken over
    /// (cleared as pending, no new "firing" when its `for` elapses) and resolved under the
    /// old id, and one already firing here under its own id keeps that id.
    #[test]
    fn an_alert_read_late_is_taken_over_from_a_pending_series_not_a_firing_one() {
        let text = "[[rule]]\nname = \"slow\"\nkind = \"threshold\"\nseries = \"disk.util_pct\"\nwarning = 50\nfor = \"30s\"\n\
                    [[rule]]\nname = \"hot\"\nkind = \"threshold\"\nseries = \"disk.util_pct\"\nwarning = 50\nfor = \"0s\"\n";
        let mut b = Engine::new(rules(text));
        let mut out = Vec::new();
        b.host_seen("h", 100_000, &mut out);
        for r in 0..2 {
            b.observe(r, "h", &[("device", "sda")], 100_000, 90.0, &mut out);
        }
        let states: Vec<(&str, &str)> = out.iter().map(|e| (e.rule.as_str(), e.state)).collect();
        assert_eq!(states, vec![("slow", "pending"), ("hot", "firing")]);
        let (pending_id, own_id) = (out[0].id.clone(), out[1].id.clone());
        let open = |rule: &str, id: &str| OpenAlert {
            id: id.into(),
            rule: rule.into(),
            labels: vec![("host".into(), "h".into()), ("device".into(), "sda".into())],
            severity: "warning".into(),
            starts_at_ms: 40_000,
        };
        out.clear();
        let n = b.adopt(
            "h",
            &[open("slow", "old-slow"), open("hot", "old-hot")],
            110_000,
            &mut out,
        );
        assert_eq!(n, 1, "only the pending one is taken over");
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(
            (out[0].state, out[0].id.as_str()),
            ("cleared", pending_id.as_str())
        );
        out.clear();
        // Past the pending series' `for`: no new "firing" for either rule.
        for r in 0..2 {
            b.observe(r, "h", &[("device", "sda")], 140_000, 90.0, &mut out);
        }
        assert!(out.is_empty(), "notified again: {out:?}");
        for r in 0..2 {
            b.observe(r, "h", &[("device", "sda")], 141_000, 10.0, &mut out);
        }
        let mut got: Vec<(&str, &str, &str)> = out
            .iter()
            .map(|e| (e.rule.as_str(), e.state, e.id.as_str()))
            .collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                ("hot", "resolved", own_id.as_str()),
                ("slow", "resolved", "old-slow")
            ]
        );
    }

    /// A threshold rule with no `for`, and an alert of it firing on h's sda since 40 s.
    const HOT_NO_FOR: &str = "[[rule]]\nname = \"hot\"\nkind = \"threshold\"\nseries = \"disk.util_pct\"\nwarning = 50\nfor = \"0s\"\n";

    fn old_hot() -> OpenAlert {
        OpenAlert {
            id: "old-hot".into(),
            rule: "hot".into(),
            labels: vec![("host".into(), "h".into()), ("device".into(), "sda".into())],
            severity: "warning".into(),
            starts_at_ms: 40_000,
        }
    }

    /// The same, for a host whose alert events were held until its alerts were read: an
    /// alert that fired here since its first sample here is replaced by the one taken
    /// over (its id returned, for its held events to be dropped), and resolves under the
    /// old id; one that fired before the hold began keeps its own.
    #[test]
    fn an_alert_read_late_replaces_one_fired_here_while_its_events_were_held() {
        let (text, open) = (HOT_NO_FOR, old_hot());
        for (held_since, replaced) in [(100_000, true), (101_000, false)] {
            let mut b = Engine::new(rules(text));
            let mut out = Vec::new();
            b.host_seen("h", 100_000, &mut out);
            b.observe(0, "h", &[("device", "sda")], 100_000, 90.0, &mut out);
            assert_eq!(out.len(), 1, "{out:?}");
            let own_id = out[0].id.clone();
            out.clear();
            let (n, ids) = b.adopt_held(
                "h",
                &[open.clone()],
                110_000,
                Some(held_since),
                &[],
                &mut out,
            );
            assert!(out.is_empty(), "{out:?}");
            b.observe(0, "h", &[("device", "sda")], 120_000, 90.0, &mut out);
            assert!(out.is_empty(), "notified again: {out:?}");
            b.observe(0, "h", &[("device", "sda")], 121_000, 10.0, &mut out);
            assert_eq!(out.len(), 1, "{out:?}");
            assert_eq!(out[0].state, "resolved");
            if replaced {
                assert_eq!((n, ids), (1, vec![own_id]));
                assert_eq!(out[0].id, "old-hot");
            } else {
                assert_eq!((n, ids.len()), (0, 0));
                assert_eq!(out[0].id, own_id);
            }
        }
    }

    #[test]
    fn an_alert_read_late_that_ended_while_held_resolves_once_under_its_id() {
        let (text, open) = (HOT_NO_FOR, old_hot());
        // Held: the condition still held at the host's first sample here (its own alert
        // fired), ended a second later; in the second case a new one began after.
        for again in [false, true] {
            let mut b = Engine::new(rules(text));
            let mut held = Vec::new();
            b.host_seen("h", 100_000, &mut held);
            b.observe(0, "h", &[("device", "sda")], 100_000, 90.0, &mut held);
            b.observe(0, "h", &[("device", "sda")], 101_000, 10.0, &mut held);
            if again {
                b.observe(0, "h", &[("device", "sda")], 102_000, 95.0, &mut held);
            }
            let states: Vec<&str> = held.iter().map(|e| e.state).collect();
            assert_eq!(states.len(), 2 + again as usize, "{held:?}");
            let own_id = held[0].id.clone();
            let resolved: Vec<&AlertEvent> =
                held.iter().filter(|e| e.state == "resolved").collect();
            let mut out = Vec::new();
            let (n, ids) = b.adopt_held(
                "h",
                &[open.clone()],
                110_000,
                Some(100_000),
                &resolved,
                &mut out,
            );
            assert_eq!((n, ids), (1, vec![own_id.clone()]));
            assert_eq!(out.len(), 1, "{out:?}");
            let r = &out[0];
            assert_eq!((r.state, r.id.as_str()), ("resolved", "old-hot"));
            assert_eq!((r.starts_at_ms, r.ends_at_ms), (40_000, Some(101_000)));
            out.clear();
            if again {
                // The alert that began after is its own, and resolves under its own id.
                b.observe(0, "h", &[("device", "sda")], 120_000, 10.0, &mut out);
                assert_eq!(out.len(), 1, "{out:?}");
                assert_eq!((out[0].state, &out[0].id), ("resolved", &held[2].id));
            } else {
                // Nothing is left firing; a new breach is a new alert.
                b.observe(0, "h", &[("device", "sda")], 120_000, 10.0, &mut out);
                assert!(out.is_empty(), "{out:?}");
                b.observe(0, "h", &[("device", "sda")], 121_000, 90.0, &mut out);
                assert_eq!(out.len(), 1, "{out:?}");
                assert_eq!(out[0].state, "firing");
                assert_ne!(out[0].id, "old-hot");
            }
        }
    }

    #[test]
    fn absent_series_fires_then_resolves_when_it_returns() {
        let mut e = Engine::new(rules(
            "[[rule]]\nname = \"sda gone\"\nkind = \"absent\"\nseries = \"disk.util_pct\"\nlabels = { device = \"sda\" }\nfor = \"10s\"\n",
        ));
        let mut out = Vec::new();
        for t in 0..5u64 {
            e.observe(0, "h", &[("device", "sda")], t * 1000, 1.0, &mut out);
            e.observe(0, "h", &[("device", "sdb")], t * 1000, 1.0, &mut out);
            e.tick(t * 1000, &mut out);
        }
        assert!(out.is_empty());
        // sda stops reporting at 4 s; sdb is not selected by the rule.
        for t in 5..20u64 {
            e.observe(0, "h", &[("device", "sdb")], t * 1000, 1.0, &mut out);
            e.tick(t * 1000, &mut out);
        }
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].state, "firing");
        assert_eq!(out[0].starts_at_ms, 4000);
        assert!(out[0].labels.contains(&("device".into(), "sda".into())));
        e.observe(0, "h", &[("device", "sda")], 21_000, 1.0, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].state, "resolved");
        assert_eq!(out[1].id, out[0].id);
    }

    #[test]
    fn reload_keeps_state_of_unchanged_rules() {
        let text = "[[rule]]\nname = \"a\"\nkind = \"ewma\"\nseries = \"cpu.busy\"\nwarmup = 10\n\n[[rule]]\nname = \"b\"\nkind = \"threshold\"\nseries = \"cpu.busy\"\nwarning = 50\n";
        let mut e = Engine::new(rules(text));
        let mut out = Vec::new();
        for t in 0..20u64 {
            e.observe(
                0,
                "h",
                &[("cpu", "total")],
                t * 1000,
                10.0 + (t % 3) as f64,
                &mut out,
            );
            e.observe(1, "h", &[("cpu", "total")], t * 1000, 60.0, &mut out);
        }
        assert_eq!(out.iter().filter(|a| a.state == "firing").count(), 1);
        // Reload with rule b changed: its firing alert resolves; rule a keeps its warm state.
        let changed = text.replace("warning = 50", "warning = 70");
        e.reload(rules(&changed), 21_000, &mut out);
        assert_eq!(out.last().unwrap().state, "resolved");
        let before = out.len();
        // Rule a is warm: a spike alerts at once (no new warm-up).
        e.observe(0, "h", &[("cpu", "total")], 22_000, 95.0, &mut out);
        assert_eq!(out.len(), before + 1);
        assert_eq!(out.last().unwrap().rule, "a");
    }

    #[test]
    fn rules_select_hosts_by_their_labels() {
        let mut e = Engine::new(rules(
            "[[rule]]\nname = \"prod load\"\nkind = \"threshold\"\nseries = \"system.procs_running\"\nlabels = { env = \"prod\" }\nwarning = 5\n\n\
             [[rule]]\nname = \"db silent\"\nkind = \"host_silent\"\nlabels = { role = \"d*\" }\nfor = \"10s\"\n",
        ));
        let mut out = Vec::new();
        let snap = |ts: u64, labels: &[(&str, &str)]| protocol::Snapshot {
            ts_ms: ts,
            system: protocol::SystemRec {
                procs_running: 9,
                ..Default::default()
            },
            host_labels: labels
                .iter()
                .map(|(n, v)| protocol::HostLabelRec {
                    name: n.to_string(),
                    value: v.to_string(),
                })
                .collect(),
            ..Default::default()
        };
        let batch = |snaps: Vec<protocol::Snapshot>| protocol::Batch {
            snapshots: snaps,
            ..Default::default()
        };
        // Labels come with the first snapshot of a batch and hold for the later ones.
        for (host, labels) in [
            ("web1", &[("env", "prod"), ("role", "web")][..]),
            ("web2", &[("env", "dev"), ("role", "web")][..]),
            ("db1", &[("env", "prod"), ("role", "db")][..]),
            ("bare", &[][..]),
        ] {
            e.observe_batch(
                host,
                &batch(vec![snap(1000, labels), snap(2000, &[])]),
                2000,
                &mut out,
            );
        }
        let firing: Vec<&str> = out
            .iter()
            .filter(|a| a.state == "firing" && a.rule == "prod load")
            .map(|a| a.host.as_str())
            .collect();
        assert_eq!(firing, ["web1", "db1"]);
        // host_silent with a host-label matcher: only the db host.
        out.clear();
        e.tick(20_000, &mut out);
        let silent: Vec<&str> = out
            .iter()
            .filter(|a| a.rule == "db silent")
            .map(|a| a.host.as_str())
            .collect();
        assert_eq!(silent, ["db1"]);
        // Labels change with the next batch that carries them.
        e.observe_batch(
            "web2",
            &batch(vec![snap(30_000, &[("env", "prod")])]),
            30_000,
            &mut out,
        );
        assert!(out
            .iter()
            .any(|a| a.host == "web2" && a.rule == "prod load" && a.state == "firing"));
    }

    #[test]
    fn a_multi_series_forest_sees_one_vector_per_host_and_snapshot() {
        let mut e = Engine::new(rules(
            "[[rule]]\nname = \"fp\"\nkind = \"forest\"\nseries = [\"cpu.busy\", \"memory.used\"]\nlabels = { cpu = \"total\" }\nthreshold = 0.999\nsummary = \"{host}: unusual mix\"\n",
        ));
        let mut out = Vec::new();
        let mut rng = rng::Rng::new(4);
        for i in 0..3000u64 {
            // CPU and memory move together; at the end memory jumps while CPU stays idle.
            let a = rng.normal();
            let (busy, used) = if i < 2990 {
                (50.0 + 10.0 * a, 4e9 + 1e8 * a)
            } else {
                (50.0, 4e9 + 8e8)
            };
            let snap = protocol::Snapshot {
                ts_ms: i * 1000,
                cpu: vec![
                    protocol::CpuRec {
                        cpu: protocol::CPU_TOTAL,
                        idle: (100.0 - busy) as f32,
                        ..Default::default()
                    },
                    // Another CPU the label selects away: it must not enter the vector.
                    protocol::CpuRec {
                        cpu: 0,
                        idle: 0.0,
                        ..Default::default()
                    },
                ],
                memory: protocol::MemoryRec {
                    total: 16_000_000_000,
                    available: 16_000_000_000 - used as u64,
                    ..Default::default()
                },
                ..Default::default()
            };
            e.observe_snapshot("h1", &snap, &mut out);
        }
        assert_eq!(e.state_size().0, 1, "one state per host for the rule");
        let fired: Vec<&AlertEvent> = out.iter().filter(|a| a.state == "firing").collect();
        assert!(
            fired.iter().any(|a| a.at_ms >= 2_990_000),
            "the joint anomaly fired: {:?}",
            fired.iter().map(|a| a.at_ms / 1000).collect::<Vec<_>>()
        );
        let last = fired.last().unwrap();
        assert!(last
            .labels
            .contains(&("series".into(), "cpu.busy,memory.used".into())));
        assert_eq!(last.summary, "h1: unusual mix");
    }

    /// The default rules for containers: a cgroup throttled in 40 % of its periods for
    /// over 5 minutes and one at 95 % of its memory limit fire, named by their cgroup and
    /// container; a cgroup without a limit (0 % of limit) and an unthrottled one do not.
    #[test]
    fn default_container_rules_fire_per_cgroup() {
        let mut e = Engine::new(rules(DEFAULT_RULES));
        let mut out = Vec::new();
        for i in 0..400u64 {
            let cg = |path: &str, container: &str, throttled: u32, ws: u64, limit: u64| {
                protocol::CgroupRec {
                    cgroup: path.into(),
                    container: container.into(),
                    cpu_periods: 10,
                    cpu_throttled_periods: throttled,
                    memory_working_set: ws,
                    memory_limit: limit,
                    ..Default::default()
                }
            };
            let snap = protocol::Snapshot {
                ts_ms: 1_000_000 + i * 1000,
                cgroups: vec![
                    cg("/docker/a", "docker:aaaaaaaaaaaa", 4, 100, 1000),
                    cg("/system.slice/db.service", "db.service", 0, 950, 1000),
                    cg("/system.slice/free.service", "free.service", 0, 1 << 30, 0),
                ],
                ..Default::default()
            };
            e.observe_snapshot("h1", &snap, &mut out);
        }
        let fired = |rule: &str| -> Vec<String> {
            out.iter()
                .filter(|a| a.rule == rule && a.state == "firing")
                .map(|a| a.summary.clone())
                .collect()
        };
        let thr = fired("container cpu throttled");
        assert_eq!(thr.len(), 1, "{thr:?}");
        assert!(
            thr[0].contains("/docker/a docker:aaaaaaaaaaaa throttled in 40 %"),
            "{thr:?}"
        );
        let mem = fired("container memory near limit");
        assert_eq!(mem.len(), 1, "{mem:?}");
        assert!(
            mem[0].contains("/system.slice/db.service db.service working set at 95 %"),
            "{mem:?}"
        );
    }

    #[test]
    fn globs() {
        assert!(glob("web-*", "web-12"));
        assert!(glob("*", ""));
        assert!(glob("sd?", "sda"));
        assert!(!glob("sd?", "sda1"));
        assert!(glob("disk:*:write", "disk:sda:write"));
    }
}
