//! `aggregator evaluate --corpus DIR`: detection quality measured on a labelled corpus,
//! through the same engine as live (rules parsed from TOML, `Engine::observe` /
//! `observe_snapshot`, the alert lifecycle with `for`).
//!
//! The corpus has two parts:
//! - **recorded**: snapshots of a real host recorded with `sensor record` while
//!   `xtask/scripts/inject-incidents.sh` injected incidents one at a time; the labels are the
//!   injection times and the series each incident is expected to show in, written by the
//!   script before any detector saw the data (`DIR/recorded/labels.tsv`);
//! - **synthetic**: series generated here from fixed seeds (the same on every run), with
//!   the anomalies placed by construction: spikes, level shifts, variance changes, trends,
//!   broken seasonality, quantized and integer-valued series, long flat stretches, missing
//!   samples, and pure noise of several scales; at 1 s and at 5 min intervals.
//!
//! Scoring (documented in docs/DETECTION.md): an incident is detected when an alert fires
//! (the `firing` notification, after `for`) on one of its series inside its window
//! `[start, end + grace]`; the delay is from the incident's start to that notification.
//! A false alert is a firing notification outside every window and outside the recovery
//! margin after each window. Combined score, NAB-like: per incident `1 - y` when detected at
//! relative position `y` of its window, `-1` when missed, `-0.11` per false alert, scaled so
//! that never alerting is 0 and detecting everything at once with no false alert is 100.

use super::rng::Rng;
use super::rules::{parse_rules, Rule};
use super::{glob, AlertEvent, Engine};
use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Corpus directory (with recorded/host.rec.zst and recorded/labels.tsv); the synthetic
    /// part is generated.
    #[arg(long, value_name = "DIR")]
    pub corpus: PathBuf,
    /// Also write the report (Markdown) to this file.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Only the synthetic part (no recording needed).
    #[arg(long)]
    pub synthetic_only: bool,
    /// Write every alert on the recorded part to this CSV
    /// (detector,time,series,verdict: detection / false / ignored).
    #[arg(long, value_name = "FILE")]
    pub alerts: Option<PathBuf>,
    /// Instead of evaluating, print one series of the recording as CSV
    /// (timestamp,value,labels...; the input `aggregator backtest --csv` takes).
    #[arg(long, value_name = "TABLE.COLUMN")]
    pub export: Option<String>,
}

/// The detectors compared: (name, rule body). ewma and mad use the README's settings.
pub const KINDS: &[(&str, &str)] = &[
    ("anomaly (defaults)", "kind = \"anomaly\""),
    (
        "ewma (README)",
        "kind = \"ewma\"\nalpha = 0.05\nwarmup = 60\nthreshold = 5",
    ),
    (
        "mad (README)",
        "kind = \"mad\"\nwindow = 300\nmin_samples = 60\nthreshold = 6\nfor = \"10s\"",
    ),
    ("forest (defaults)", "kind = \"forest\""),
    ("drift (defaults)", "kind = \"drift\""),
];

/// One labelled window.
#[derive(Debug, Clone)]
pub struct Window {
    pub name: String,
    pub start_ms: u64,
    /// End of the detection window (incident end + grace).
    pub end_ms: u64,
    /// Alerts before this (after the window) are neither detections nor false alerts.
    pub ignore_until_ms: u64,
    /// Series patterns `name{k=v,...}` the incident is expected to show in (recorded part).
    pub series: Vec<String>,
}

/// A synthetic series.
pub struct Synthetic {
    pub file: String,
    pub interval_ms: u64,
    pub points: Vec<(u64, f64)>,
    pub windows: Vec<Window>,
}

/// What one detector did on one corpus file.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub incidents: usize,
    pub detected: usize,
    /// Delays (s) of detected incidents.
    pub delays_s: Vec<f64>,
    pub false_alerts: usize,
    pub series_days: f64,
    /// Sum of per-incident rewards (1 - y, or -1 when missed).
    pub reward: f64,
}

impl Outcome {
    fn add(&mut self, o: &Outcome) {
        self.incidents += o.incidents;
        self.detected += o.detected;
        self.delays_s.extend(&o.delays_s);
        self.false_alerts += o.false_alerts;
        self.series_days += o.series_days;
        self.reward += o.reward;
    }

    /// 0 = never alerting, 100 = every incident at its start and no false alert.
    pub fn score(&self) -> f64 {
        if self.incidents == 0 {
            return -0.11 * self.false_alerts as f64;
        }
        let n = self.incidents as f64;
        100.0 * (self.reward - 0.11 * self.false_alerts as f64 + n) / (2.0 * n)
    }

    pub fn fa_per_series_day(&self) -> f64 {
        if self.series_days > 0.0 {
            self.false_alerts as f64 / self.series_days
        } else {
            0.0
        }
    }
}

fn pct(v: &[f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Some(s[((s.len() - 1) as f64 * q).round() as usize])
}

/// Scores firing times (ms, with the series key they fired on) against windows.
/// `relevant(window, key)` says whether an alert on that series can detect the window.
fn score(
    alerts: &[(u64, String)],
    windows: &[Window],
    relevant: impl Fn(&Window, &str) -> bool,
) -> Outcome {
    let mut o = Outcome {
        incidents: windows.len(),
        ..Default::default()
    };
    for w in windows {
        let first = alerts
            .iter()
            .filter(|(t, k)| *t >= w.start_ms && *t <= w.end_ms && relevant(w, k))
            .map(|(t, _)| *t)
            .min();
        match first {
            Some(t) => {
                o.detected += 1;
                let delay = (t - w.start_ms) as f64 / 1000.0;
                o.delays_s.push(delay);
                let len = (w.end_ms - w.start_ms).max(1) as f64 / 1000.0;
                o.reward += 1.0 - (delay / len).clamp(0.0, 1.0);
            }
            None => o.reward -= 1.0,
        }
    }
    o.false_alerts = alerts
        .iter()
        .filter(|(t, _)| {
            !windows
                .iter()
                .any(|w| *t >= w.start_ms && *t <= w.ignore_until_ms.max(w.end_ms))
        })
        .count();
    o
}

/// Milliseconds of `[from, to)` outside every window's `[start, ignore_until]`.
fn normal_ms(from: u64, to: u64, windows: &[Window]) -> u64 {
    let mut spans: Vec<(u64, u64)> = windows
        .iter()
        .map(|w| {
            (
                w.start_ms.max(from),
                w.ignore_until_ms.max(w.end_ms).min(to),
            )
        })
        .filter(|(a, b)| b > a)
        .collect();
    spans.sort();
    let mut covered = 0;
    let mut cur: Option<(u64, u64)> = None;
    for (a, b) in spans {
        match cur {
            Some((ca, cb)) if a <= cb => cur = Some((ca, cb.max(b))),
            Some((ca, cb)) => {
                covered += cb - ca;
                cur = Some((a, b));
            }
            None => cur = Some((a, b)),
        }
    }
    if let Some((a, b)) = cur {
        covered += b - a;
    }
    (to - from).saturating_sub(covered)
}

fn firing(events: &[AlertEvent]) -> impl Iterator<Item = &AlertEvent> {
    events.iter().filter(|e| e.state == "firing" && !e.repeat)
}

// ---------------------------------------------------------------- synthetic corpus

/// The synthetic corpus: every family at 1 s and at 5 min, fixed seeds.
pub fn synthetic() -> Vec<Synthetic> {
    let mut out = Vec::new();
    for (interval_ms, n, tag) in [(1000u64, 21_600usize, "1s"), (300_000, 8_064, "5min")] {
        for (fi, family) in FAMILIES.iter().enumerate() {
            let seed = (fi as u64 + 1) * 1_000 + interval_ms;
            let mut rng = Rng::new(seed);
            let (values, anomalies) = family.1(&mut rng, n, interval_ms);
            let t0 = 1_767_225_600_000u64; // 2026-01-01
            let mut points = Vec::with_capacity(n);
            for (i, v) in values.into_iter().enumerate() {
                if let Some(v) = v {
                    points.push((t0 + i as u64 * interval_ms, v));
                }
            }
            let grace = 10u64.max(60_000 / interval_ms);
            let windows = anomalies
                .into_iter()
                .map(|(a, b)| Window {
                    name: family.0.to_string(),
                    start_ms: t0 + a as u64 * interval_ms,
                    end_ms: t0 + (b as u64 + grace) * interval_ms,
                    ignore_until_ms: t0 + (b as u64 + 6 * grace) * interval_ms,
                    series: vec![],
                })
                .collect();
            out.push(Synthetic {
                file: format!("synthetic/{tag}/{}", family.0),
                interval_ms,
                points,
                windows,
            });
        }
    }
    out
}

type Gen = fn(&mut Rng, usize, u64) -> (Vec<Option<f64>>, Vec<(usize, usize)>);

/// (name, generator → values (None = missing) and anomalies as [first, last] sample).
const FAMILIES: &[(&str, Gen)] = &[
    ("spikes", |r, n, _| {
        let pos = [n * 5 / 10, n * 7 / 10, n * 9 / 10];
        let mags = [8.0, 12.0, 20.0];
        let v = (0..n)
            .map(|i| {
                let mut x = 50.0 + 2.0 * r.normal();
                for (p, m) in pos.iter().zip(mags) {
                    if i == *p || i == p + 1 {
                        x += 2.0 * m;
                    }
                }
                Some(x)
            })
            .collect();
        (v, pos.iter().map(|&p| (p, p + 1)).collect())
    }),
    ("level_shift", |r, n, _| {
        let (a, b) = (n / 2, n / 2 + n / 12);
        let (c, d) = (n * 8 / 10, n * 8 / 10 + n / 12);
        let v = (0..n)
            .map(|i| {
                let shift = if (a..b).contains(&i) {
                    30.0
                } else if (c..d).contains(&i) {
                    -30.0
                } else {
                    0.0
                };
                Some(100.0 + 5.0 * r.normal() + shift)
            })
            .collect();
        (v, vec![(a, b), (c, d)])
    }),
    ("variance_change", |r, n, _| {
        let (a, b) = (n * 6 / 10, n * 6 / 10 + n / 36);
        let v = (0..n)
            .map(|i| Some(r.normal() * if (a..b).contains(&i) { 5.0 } else { 1.0 }))
            .collect();
        (v, vec![(a, b)])
    }),
    ("trend", |r, n, _| {
        // A ramp of +10 sigma over n/24 samples, then it stays up.
        let (a, len) = (n * 6 / 10, n / 24);
        let v = (0..n)
            .map(|i| {
                let t = if i >= a {
                    (((i - a) as f64) / len as f64).min(1.0) * 10.0
                } else {
                    0.0
                };
                Some(20.0 + r.normal() + t)
            })
            .collect();
        (v, vec![(a, a + len)])
    }),
    ("seasonal_break", |r, n, interval| {
        // Hourly cycle at 1 s, daily at 5 min; one period loses its peak (flat at the mean).
        let period = if interval >= 60_000 { 288 } else { 3600 };
        let k = n * 7 / 10 / period;
        let (a, b) = (k * period + period / 8, k * period + period * 3 / 8);
        let v = (0..n)
            .map(|i| {
                let phase = (i % period) as f64 / period as f64 * std::f64::consts::TAU;
                let s = if (a..b).contains(&i) {
                    0.0
                } else {
                    10.0 * phase.sin()
                };
                Some(40.0 + s + r.normal())
            })
            .collect();
        (v, vec![(a, b)])
    }),
    ("quantized_cpu", |r, n, _| {
        // CPU busy % in 0.5 steps around 5 %, saturated (~100 %) for n/72 samples.
        let (a, b) = (n * 6 / 10, n * 6 / 10 + n / 72);
        let v = (0..n)
            .map(|i| {
                let x = if (a..b).contains(&i) {
                    99.0 + 0.5 * r.normal()
                } else {
                    5.0 + 2.0 * r.normal()
                };
                Some((x.clamp(0.0, 100.0) * 2.0).round() / 2.0)
            })
            .collect();
        (v, vec![(a, b)])
    }),
    ("integer_counts", |r, n, _| {
        // Poisson(3) events per interval, a burst of Poisson(15).
        let (a, b) = (n * 7 / 10, n * 7 / 10 + n / 180);
        let v = (0..n)
            .map(|i| Some(r.poisson(if (a..b).contains(&i) { 15.0 } else { 3.0 })))
            .collect();
        (v, vec![(a, b)])
    }),
    ("flat_blips", |_, n, _| {
        // 0 for hours with a rare blip of 1 (an error counter), then a real step to 5.
        let (a, b) = (n * 8 / 10, n * 8 / 10 + n / 72);
        let v = (0..n)
            .map(|i| {
                Some(if (a..b).contains(&i) {
                    5.0
                } else if i % 1999 == 7 {
                    1.0
                } else {
                    0.0
                })
            })
            .collect();
        (v, vec![(a, b)])
    }),
    ("missing_samples", |r, n, _| {
        // 10 % of samples missing at random and a long gap; a spike after the gap.
        let gap = (n / 2, n / 2 + n / 36);
        let p = n * 3 / 4;
        let v = (0..n)
            .map(|i| {
                let dropped = r.uniform() < 0.1;
                if (gap.0..gap.1).contains(&i) || (dropped && i != p) {
                    None
                } else {
                    Some(10.0 + r.normal() + if i == p { 12.0 } else { 0.0 })
                }
            })
            .collect();
        (v, vec![(p, p)])
    }),
    ("noise_small", |r, n, _| {
        (
            (0..n).map(|_| Some(1e-3 * r.normal() + 0.01)).collect(),
            vec![],
        )
    }),
    ("noise_large", |r, n, _| {
        (
            (0..n).map(|_| Some(1e6 * r.normal() + 1e9)).collect(),
            vec![],
        )
    }),
    ("noise_heavy_tailed", |r, n, _| {
        // Laplace noise plus rare moderate bursts that are part of normal behaviour.
        (
            (0..n)
                .map(|_| {
                    let u = r.uniform() - 0.5;
                    Some(100.0 - 3.0 * u.signum() * (1.0 - 2.0 * u.abs()).max(1e-12).ln())
                })
                .collect(),
            vec![],
        )
    }),
];

fn rules_for(kind_body: &str, series: &[String]) -> Result<Vec<Rule>> {
    let mut text = String::new();
    for s in series {
        writeln!(
            text,
            "[[rule]]\nname = {:?}\nseries = {:?}\n{kind_body}\n",
            s, s
        )?;
    }
    parse_rules("evaluation", &text)
}

/// Runs one detector over one synthetic series through the engine.
pub fn run_synthetic(kind_body: &str, s: &Synthetic) -> Result<Outcome> {
    let rules = rules_for(kind_body, &["system.load1".to_string()])?;
    let mut engine = Engine::new(rules);
    let mut out = Vec::new();
    for &(ts, v) in &s.points {
        engine.observe(0, "synthetic", &[], ts, v, &mut out);
    }
    let alerts: Vec<(u64, String)> = firing(&out).map(|e| (e.at_ms, String::new())).collect();
    let mut o = score(&alerts, &s.windows, |_, _| true);
    let (from, to) = (
        s.points.first().map_or(0, |p| p.0),
        s.points.last().map_or(0, |p| p.0),
    );
    o.series_days = normal_ms(from, to, &s.windows) as f64 / 86_400_000.0;
    Ok(o)
}

// ---------------------------------------------------------------- recorded corpus

/// Reads `sensor record` output (u32 LE length + snapshot), zstd-compressed or not.
pub fn read_recording(path: &Path) -> Result<Vec<protocol::Snapshot>> {
    let raw = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let data = if raw.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        protocol::decompress_bounded(&raw, 1 << 30)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
    } else {
        raw
    };
    let (out, cut) = protocol::read_recording(&data)
        .map_err(|(i, e)| anyhow::anyhow!("{}: snapshot {i}: {e}", path.display()))?;
    if cut {
        // A recording stopped mid-write: everything before the last snapshot is whole.
        eprintln!(
            "evaluate: {}: the last snapshot ({}) is cut short; using the {} before it",
            path.display(),
            out.len() + 1,
            out.len()
        );
    }
    Ok(out)
}

/// Reads `name<TAB>start<TAB>end<TAB>series...` (Unix seconds).
pub fn read_labels(path: &Path) -> Result<Vec<Window>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        let at = || format!("{}:{}", path.display(), n + 1);
        if f.len() < 4 {
            bail!("{}: expected name, start, end, series", at());
        }
        let start: u64 = f[1].parse().with_context(|| format!("{}: start", at()))?;
        let end: u64 = f[2].parse().with_context(|| format!("{}: end", at()))?;
        out.push(Window {
            name: f[0].to_string(),
            start_ms: start * 1000,
            // Grace 60 s after the injection ends; recovery margin 5 min.
            end_ms: (end + 60) * 1000,
            ignore_until_ms: (end + 300) * 1000,
            series: f[3].split_whitespace().map(str::to_string).collect(),
        });
    }
    Ok(out)
}

/// The series an alert fired on, as `name{k=v,...}` (latency: the concrete source).
fn alert_key(e: &AlertEvent) -> String {
    let series = e
        .labels
        .iter()
        .find(|(k, _)| k == "series")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let mut name = series.clone();
    if let Some(rest) = series.strip_prefix("latency.") {
        let stat = rest.rsplit('.').next().unwrap_or("");
        if let Some((_, src)) = e.labels.iter().find(|(k, _)| k == "source") {
            name = format!("latency.{src}.{stat}");
        }
    }
    let labels: Vec<String> = e
        .labels
        .iter()
        .filter(|(k, _)| k != "series" && k != "host" && k != "source")
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    format!("{name}{{{}}}", labels.join(","))
}

/// Does an alert key `name{k=v,...}` match a label pattern `name` or `name{k=glob,...}`?
pub fn key_matches(pattern: &str, key: &str) -> bool {
    let (pn, pl) = pattern
        .split_once('{')
        .map(|(a, b)| (a, b.trim_end_matches('}')))
        .unwrap_or((pattern, ""));
    let (kn, kl) = key
        .split_once('{')
        .map(|(a, b)| (a, b.trim_end_matches('}')))
        .unwrap_or((key, ""));
    if !glob(pn, kn) {
        return false;
    }
    pl.split(',').filter(|s| !s.is_empty()).all(|want| {
        let (k, v) = want.split_once('=').unwrap_or((want, ""));
        kl.split(',')
            .filter_map(|x| x.split_once('='))
            .any(|(kk, vv)| kk == k && glob(v, vv))
    })
}

/// Runs a rule set over the recording; returns the outcome and the alerts by series key.
pub fn run_recorded(
    rules: Vec<Rule>,
    snaps: &[protocol::Snapshot],
    windows: &[Window],
) -> (Outcome, Vec<(u64, String)>, (usize, usize)) {
    let mut engine = Engine::new(rules);
    let mut out = Vec::new();
    for s in snaps {
        engine.host_seen("recorded", s.ts_ms, &mut out);
        engine.observe_snapshot("recorded", s, &mut out);
        engine.tick(s.ts_ms, &mut out);
    }
    let alerts: Vec<(u64, String)> = firing(&out).map(|e| (e.at_ms, alert_key(e))).collect();
    let mut o = score(&alerts, windows, |w, k| {
        w.series.iter().any(|p| key_matches(p, k))
    });
    let (from, to) = (
        snaps.first().map_or(0, |s| s.ts_ms),
        snaps.last().map_or(0, |s| s.ts_ms),
    );
    let state = engine.state_size();
    o.series_days = state.0 as f64 * normal_ms(from, to, windows) as f64 / 86_400_000.0;
    (o, alerts, state)
}

// ---------------------------------------------------------------- the report

pub struct Report {
    pub markdown: String,
}

fn row(name: &str, o: &Outcome, delay_unit: f64) -> String {
    let fmt = |v: Option<f64>| v.map_or("–".into(), |d| format!("{:.0}", d / delay_unit));
    format!(
        "| {name} | {}/{} | {} | {} | {} ({:.2}/series·7 d) | {:.1} |",
        o.detected,
        o.incidents,
        fmt(pct(&o.delays_s, 0.5)),
        fmt(pct(&o.delays_s, 0.9)),
        o.false_alerts,
        o.fa_per_series_day() * 7.0,
        o.score()
    )
}

pub fn evaluate(args: &Args, default_rules: &str) -> Result<Report> {
    let mut md = String::new();
    let started = std::time::Instant::now();
    let synth = synthetic();
    // Totals per detector: 1 s data (synthetic 1 s + recorded) and 5 min data.
    let mut totals_1s: Vec<Outcome> = vec![Outcome::default(); KINDS.len()];
    let mut totals_5m: Vec<Outcome> = vec![Outcome::default(); KINDS.len()];
    let mut per_file = String::new();
    for s in &synth {
        for (ki, (kname, body)) in KINDS.iter().enumerate() {
            let o = run_synthetic(body, s)?;
            let unit = s.interval_ms as f64 / 1000.0;
            writeln!(
                per_file,
                "{}",
                row(&format!("{} · {kname}", s.file), &o, unit)
            )?;
            if s.interval_ms == 1000 {
                totals_1s[ki].add(&o);
            } else {
                totals_5m[ki].add(&o);
            }
        }
    }
    eprintln!(
        "evaluate: synthetic part ({} series x {} detectors) in {:.1} s",
        synth.len(),
        KINDS.len(),
        started.elapsed().as_secs_f64()
    );
    let mut recorded = String::new();
    let mut recorded_summary = String::new();
    if !args.synthetic_only {
        let dir = args.corpus.join("recorded");
        let rec = ["host.rec.zst", "host.rec"]
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.exists())
            .with_context(|| format!("no recording in {} (host.rec.zst)", dir.display()))?;
        let snaps = read_recording(&rec)?;
        let windows = read_labels(&dir.join("labels.tsv"))?;
        let hours = snaps.len() as f64 / 3600.0;
        writeln!(
            recorded_summary,
            "Recorded part: {} snapshots ({:.1} h at 1 s) of this host, {} injected incidents ({}).",
            snaps.len(),
            hours,
            windows.len(),
            windows
                .iter()
                .map(|w| w.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )?;
        let all = super::series::all_series();
        let mut incident_rows = String::new();
        let mut sets: Vec<(String, Vec<Rule>)> = Vec::new();
        for (kname, body) in KINDS.iter() {
            sets.push((kname.to_string(), rules_for(body, &all)?));
        }
        sets.push((
            "default rules".into(),
            parse_rules("default rules", default_rules)?,
        ));
        let mut dump = String::from("detector,time,series,verdict\n");
        for (si, (kname, rules)) in sets.into_iter().enumerate() {
            let t = std::time::Instant::now();
            let (o, alerts, (n_series, state_bytes)) = run_recorded(rules, &snaps, &windows);
            if kname == "default rules" {
                writeln!(
                    recorded_summary,
                    "\nOn this host the default rules kept state for {n_series} series, {:.0} kB in all ({:.2} kB per series).",
                    state_bytes as f64 / 1000.0,
                    state_bytes as f64 / 1000.0 / n_series.max(1) as f64
                )?;
            }
            for (at, k) in &alerts {
                let verdict = if windows.iter().any(|w| {
                    *at >= w.start_ms
                        && *at <= w.end_ms
                        && w.series.iter().any(|p| key_matches(p, k))
                }) {
                    "detection"
                } else if windows
                    .iter()
                    .any(|w| *at >= w.start_ms && *at <= w.ignore_until_ms.max(w.end_ms))
                {
                    "ignored"
                } else {
                    "false"
                };
                writeln!(
                    dump,
                    "{kname},{},{},{verdict}",
                    crate::alert::rfc3339_ms(*at),
                    k.replace(',', ";")
                )?;
            }
            eprintln!(
                "evaluate: recorded part, {kname}: {} alerts in {:.1} s",
                alerts.len(),
                t.elapsed().as_secs_f64()
            );
            writeln!(recorded, "{}", row(&format!("recorded · {kname}"), &o, 1.0))?;
            // Per incident: the delay of each detector.
            for w in &windows {
                let first = alerts
                    .iter()
                    .filter(|(t, k)| {
                        *t >= w.start_ms
                            && *t <= w.end_ms
                            && w.series.iter().any(|p| key_matches(p, k))
                    })
                    .min_by_key(|(t, _)| *t);
                writeln!(
                    incident_rows,
                    "| {} | {kname} | {} |",
                    w.name,
                    match first {
                        Some((t, k)) => format!("{:.0} s ({k})", (t - w.start_ms) as f64 / 1000.0),
                        None => "missed".into(),
                    }
                )?;
            }
            // False alerts by series (the top ones).
            let mut fa: std::collections::BTreeMap<String, usize> = Default::default();
            for (t, k) in &alerts {
                if !windows
                    .iter()
                    .any(|w| *t >= w.start_ms && *t <= w.ignore_until_ms)
                {
                    *fa.entry(k.clone()).or_default() += 1;
                }
            }
            let mut fav: Vec<(String, usize)> = fa.into_iter().collect();
            fav.sort_by_key(|x| std::cmp::Reverse(x.1));
            if !fav.is_empty() {
                writeln!(
                    incident_rows,
                    "| (false alerts) | {kname} | {} |",
                    fav.iter()
                        .take(6)
                        .map(|(k, n)| format!("{k} ×{n}"))
                        .collect::<Vec<_>>()
                        .join("; ")
                )?;
            }
            if si < KINDS.len() {
                totals_1s[si].add(&o);
            }
        }
        if let Some(p) = &args.alerts {
            std::fs::write(p, &dump).with_context(|| format!("cannot write {}", p.display()))?;
        }
        recorded.push_str("\nPer incident, the first alert on one of its series (delay from the injection's start):\n\n| incident | detector | first alert |\n|---|---|---|\n");
        recorded.push_str(&incident_rows);
    }
    let header = "| detector | detected | median delay | p90 delay | false alerts | score |\n|---|---|---|---|---|---|\n";
    // The targets for `anomaly` with defaults, and where each kind stands.
    writeln!(
        md,
        "### Against the targets\n\nTargets for `anomaly` with defaults: ≥ 95 % of incidents detected across the corpus, median delay ≤ 30 s at 1 s data, ≤ 1 false alert per series per 7 days of normal data.\n\n| detector | detected (all parts) | median delay, 1 s data | false alerts per series·7 d (1 s data) | false alerts per series·7 d (5 min data) |\n|---|---|---|---|---|"
    )?;
    for (ki, (kname, _)) in KINDS.iter().enumerate() {
        let mut all = totals_1s[ki].clone();
        all.add(&totals_5m[ki]);
        writeln!(
            md,
            "| {kname} | {}/{} ({:.0} %) | {} | {:.2} | {:.2} |",
            all.detected,
            all.incidents,
            100.0 * all.detected as f64 / all.incidents.max(1) as f64,
            pct(&totals_1s[ki].delays_s, 0.5).map_or("–".into(), |d| format!("{d:.0} s")),
            totals_1s[ki].fa_per_series_day() * 7.0,
            totals_5m[ki].fa_per_series_day() * 7.0,
        )?;
    }
    writeln!(md)?;
    writeln!(
        md,
        "### All 1 s data (synthetic 1 s + recorded; delays in seconds)\n"
    )?;
    md.push_str(header);
    for (ki, (kname, _)) in KINDS.iter().enumerate() {
        writeln!(md, "{}", row(kname, &totals_1s[ki], 1.0))?;
    }
    writeln!(md, "\n### 5 min data (synthetic; delays in minutes)\n")?;
    md.push_str(header);
    for (ki, (kname, _)) in KINDS.iter().enumerate() {
        writeln!(md, "{}", row(kname, &totals_5m[ki], 60.0))?;
    }
    if !recorded.is_empty() {
        writeln!(
            md,
            "\n### Recorded incidents on a real host (1 s)\n\n{recorded_summary}"
        )?;
        md.push_str(header);
        md.push_str(&recorded);
    }
    writeln!(
        md,
        "\n### Per corpus file\n\nDelays in samples of the file's own interval.\n"
    )?;
    md.push_str(header);
    md.push_str(&per_file);
    Ok(Report { markdown: md })
}

pub fn run(args: Args, default_rules: &str) -> Result<()> {
    if let Some(name) = &args.export {
        let spec =
            super::series::parse_series(name).map_err(|e| anyhow::anyhow!("--export: {e}"))?;
        let dir = args.corpus.join("recorded");
        let rec = ["host.rec.zst", "host.rec"]
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.exists())
            .with_context(|| format!("no recording in {}", dir.display()))?;
        let mut out = String::new();
        let names = spec.label_names();
        writeln!(
            out,
            "timestamp,value{}",
            names.iter().map(|n| format!(",{n}")).collect::<String>()
        )?;
        for snap in read_recording(&rec)? {
            spec.for_each(&snap, |labels, v| {
                let l: String = labels.iter().map(|(_, v)| format!(",{v}")).collect();
                let _ = writeln!(out, "{},{v}{l}", snap.ts_ms);
            });
        }
        print!("{out}");
        return Ok(());
    }
    let r = evaluate(&args, default_rules)?;
    println!("{}", r.markdown);
    if let Some(p) = &args.out {
        std::fs::write(p, &r.markdown).with_context(|| format!("cannot write {}", p.display()))?;
        eprintln!("evaluate: report written to {}", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scoring_rewards_early_detection_and_penalises_false_alerts() {
        let w = vec![Window {
            name: "x".into(),
            start_ms: 100_000,
            end_ms: 200_000,
            ignore_until_ms: 300_000,
            series: vec![],
        }];
        let perfect = score(&[(100_000, String::new())], &w, |_, _| true);
        assert_eq!(perfect.detected, 1);
        assert!((perfect.score() - 100.0).abs() < 1e-9);
        let never = score(&[], &w, |_, _| true);
        assert!(never.score().abs() < 1e-9);
        let late = score(&[(150_000, String::new())], &w, |_, _| true);
        assert!((late.score() - 75.0).abs() < 1e-9, "{}", late.score());
        // Inside the recovery margin: neither; after it: a false alert.
        let fa = score(
            &[
                (100_000, String::new()),
                (250_000, String::new()),
                (400_000, String::new()),
            ],
            &w,
            |_, _| true,
        );
        assert_eq!(fa.false_alerts, 1);
        assert_eq!(normal_ms(0, 500_000, &w), 300_000);
    }

    #[test]
    fn label_patterns_match_alert_keys() {
        assert!(key_matches("cpu.busy{cpu=total}", "cpu.busy{cpu=total}"));
        assert!(!key_matches("cpu.busy{cpu=total}", "cpu.busy{cpu=0}"));
        assert!(key_matches(
            "tcp.retrans_segs_per_s",
            "tcp.retrans_segs_per_s{}"
        ));
        assert!(key_matches(
            "disk.util_pct{device=loop*}",
            "disk.util_pct{device=loop1}"
        ));
        assert!(key_matches(
            "latency.disk:loop1:write.p99",
            "latency.disk:loop1:write.p99{}"
        ));
    }

    #[test]
    fn recordings_and_labels_read_back_and_bad_input_is_named() {
        let dir = std::env::temp_dir().join(format!("sonde-eval-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Three snapshots as `sensor record` writes them, the last one cut short.
        let mut buf = protocol::recording_header().to_vec();
        for ts in [1000u64, 2000, 3000] {
            let snap = protocol::Snapshot {
                ts_ms: ts,
                ..Default::default()
            };
            protocol::record_snapshot(&snap, &mut buf);
        }
        buf.truncate(buf.len() - 1);
        let rec = dir.join("host.rec");
        std::fs::write(&rec, &buf).unwrap();
        let snaps = read_recording(&rec).unwrap();
        assert_eq!(
            snaps.iter().map(|s| s.ts_ms).collect::<Vec<_>>(),
            vec![1000, 2000]
        );
        // Garbage inside a snapshot is an error naming the file and the snapshot.
        let mut bad = buf.clone();
        for b in bad[12..20].iter_mut() {
            *b = 0xff;
        }
        std::fs::write(&rec, &bad).unwrap();
        let e = format!("{:#}", read_recording(&rec).unwrap_err());
        assert!(e.contains("host.rec") && e.contains("snapshot 1"), "{e}");
        // Labels: good lines parse; a bad one is named by file and line.
        let labels = dir.join("labels.tsv");
        std::fs::write(
            &labels,
            "name\tstart\tend\tseries\ncpu\t100\t250\tcpu.busy{cpu=total} system.load1\n",
        )
        .unwrap();
        let w = read_labels(&labels).unwrap();
        assert_eq!(w[0].start_ms, 100_000);
        assert_eq!(w[0].end_ms, 310_000);
        assert_eq!(w[0].series.len(), 2);
        std::fs::write(&labels, "name\tstart\tend\tseries\ncpu\tsoon\t250\tx\n").unwrap();
        let e = format!("{:#}", read_labels(&labels).unwrap_err());
        assert!(e.contains("labels.tsv:2") && e.contains("start"), "{e}");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn synthetic_corpus_is_deterministic_and_labelled() {
        let a = synthetic();
        let b = synthetic();
        assert_eq!(a.len(), b.len());
        assert!(a.iter().zip(&b).all(|(x, y)| x.points == y.points));
        assert!(a.iter().filter(|s| !s.windows.is_empty()).count() >= 16);
    }
}
