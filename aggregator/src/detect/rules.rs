//! The rules file: TOML, checked at start, by `aggregator check-rules` and on SIGHUP, with
//! errors that name the file, the line and the field.

use super::anomaly::Anomaly;
use super::detectors::{Detector, Ewma, Mad, Severity, Threshold};
use super::drift::Drift;
use super::forecast::Forecast;
use super::forest::Forest;
use super::series::{parse_series, SeriesSpec};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default, rename = "rule")]
    rules: Vec<RawRule>,
}

#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    kind: Spanned<String>,
    #[serde(default)]
    series: Option<Spanned<OneOrMany>>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    direction: Option<Spanned<String>>,
    #[serde(default)]
    warning: Option<f64>,
    #[serde(default)]
    critical: Option<f64>,
    #[serde(default)]
    hysteresis: Option<f64>,
    #[serde(default, rename = "for")]
    for_: Option<Spanned<String>>,
    #[serde(default)]
    repeat: Option<Spanned<String>>,
    #[serde(default)]
    severity: Option<Spanned<String>>,
    #[serde(default)]
    threshold: Option<Spanned<f64>>,
    #[serde(default)]
    alpha: Option<Spanned<f64>>,
    #[serde(default)]
    warmup: Option<u32>,
    #[serde(default)]
    window: Option<Spanned<toml::Value>>,
    #[serde(default)]
    limit: Option<f64>,
    #[serde(default)]
    within: Option<Spanned<String>>,
    #[serde(default)]
    min_samples: Option<u32>,
    #[serde(default)]
    summary: Option<String>,
}

/// Default threshold of `anomaly` and `forest` rules: a sample as unusual as 1 in 100,000 of
/// the series' own history (about one false alert per series-day at 1 s on pure noise before
/// `for`; far fewer in practice, since the tail model errs on the heavy side).
pub const ANOMALY_THRESHOLD: f64 = 0.99999;

#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// What a rule watches for.
#[derive(Debug, Clone, PartialEq)]
pub enum RuleKind {
    Threshold {
        above: bool,
        warning: Option<f64>,
        critical: Option<f64>,
        hysteresis: f64,
    },
    Ewma {
        alpha: f64,
        threshold: f64,
        warmup: u32,
        severity: Severity,
        direction: Option<bool>,
    },
    Mad {
        window: u32,
        threshold: f64,
        min_samples: u32,
        severity: Severity,
        direction: Option<bool>,
    },
    /// Calibrated anomaly probability (no parameters needed).
    Anomaly {
        threshold: f64,
        severity: Severity,
        direction: Option<bool>,
    },
    /// Half-space trees over one shingled series or several of one host's series.
    Forest { threshold: f64, severity: Severity },
    /// Distribution drift (two-sample KS) between a reference and the recent window.
    Drift { threshold: f64, severity: Severity },
    /// Time until the series reaches `limit` is under `within`.
    Forecast {
        limit: f64,
        above: bool,
        within: Duration,
        window: Duration,
        severity: Severity,
    },
    /// No batch from a host for `for`.
    HostSilent { severity: Severity },
    /// A series that was reporting has had no sample for `for`.
    Absent { severity: Severity },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: String,
    pub kind: RuleKind,
    pub series: Option<SeriesSpec>,
    /// Further series of a multi-series rule (`forest` with `series = [..]`), evaluated
    /// together with `series` per host and snapshot.
    pub more_series: Vec<SeriesSpec>,
    /// Label matchers (globs); `host` matches the host name.
    pub labels: BTreeMap<String, String>,
    pub for_: Duration,
    pub repeat: Duration,
    pub summary: String,
}

impl Rule {
    /// A fresh detector for one series; `seed` fixes any randomness (the forest's trees),
    /// so live and backtest build the same model.
    pub fn new_detector(&self, seed: u64) -> Option<Detector> {
        Some(match &self.kind {
            RuleKind::Threshold {
                above,
                warning,
                critical,
                hysteresis,
            } => Detector::Threshold(Threshold::new(*above, *warning, *critical, *hysteresis)),
            RuleKind::Ewma {
                alpha,
                threshold,
                warmup,
                severity,
                direction,
            } => Detector::Ewma(Ewma::new(
                *alpha, *threshold, *warmup, *severity, *direction,
            )),
            RuleKind::Mad {
                window,
                threshold,
                min_samples,
                severity,
                direction,
            } => Detector::Mad(Mad::new(
                *window as usize,
                *threshold,
                *min_samples as usize,
                *severity,
                *direction,
            )),
            RuleKind::Anomaly {
                threshold,
                severity,
                direction,
            } => Detector::Anomaly(Box::new(Anomaly::new(*threshold, *severity, *direction))),
            RuleKind::Forest {
                threshold,
                severity,
            } => Detector::Forest(Box::new(Forest::new(
                *threshold,
                *severity,
                1 + self.more_series.len(),
                seed,
            ))),
            RuleKind::Drift {
                threshold,
                severity,
            } => Detector::Drift(Box::new(Drift::new(*threshold, *severity))),
            RuleKind::Forecast {
                limit,
                above,
                within,
                window,
                severity,
            } => Detector::Forecast(Box::new(Forecast::new(
                *limit,
                *above,
                within.as_secs_f64(),
                window.as_millis() as u64,
                *severity,
            ))),
            _ => return None,
        })
    }

    /// Rules whose score is a statistic (reported as `score` in alerts).
    pub fn is_statistical(&self) -> bool {
        !matches!(
            self.kind,
            RuleKind::Threshold { .. } | RuleKind::HostSilent { .. } | RuleKind::Absent { .. }
        )
    }

    pub fn is_absence(&self) -> bool {
        matches!(
            self.kind,
            RuleKind::HostSilent { .. } | RuleKind::Absent { .. }
        )
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Parses and checks a rules file's text. `origin` names it in errors.
pub fn parse_rules(origin: &str, text: &str) -> anyhow::Result<Vec<Rule>> {
    let file: File = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start));
        match line {
            Some(l) => anyhow::anyhow!("{origin}:{l}: {}", e.message()),
            None => anyhow::anyhow!("{origin}: {e}"),
        }
    })?;
    let mut out = Vec::new();
    let mut names = std::collections::HashSet::new();
    for r in file.rules {
        let at = |s: std::ops::Range<usize>, field: &str, msg: String| {
            anyhow::anyhow!(
                "{origin}:{}: rule {:?}, field `{field}`: {msg}",
                line_of(text, s.start),
                r.name.get_ref()
            )
        };
        let name = r.name.get_ref().trim().to_string();
        if name.is_empty() {
            return Err(at(r.name.span(), "name", "must not be empty".into()));
        }
        if !names.insert(name.clone()) {
            return Err(at(
                r.name.span(),
                "name",
                "another rule has this name".into(),
            ));
        }
        let dur = |f: &Option<Spanned<String>>, field: &str, default: Duration| match f {
            None => Ok(default),
            Some(s) => humantime::parse_duration(s.get_ref()).map_err(|e| {
                at(
                    s.span(),
                    field,
                    format!("{:?} is not a duration ({e})", s.get_ref()),
                )
            }),
        };
        let for_ = dur(&r.for_, "for", Duration::ZERO)?;
        let repeat = dur(&r.repeat, "repeat", Duration::from_secs(3600))?;
        let severity = match &r.severity {
            None => Severity::Warning,
            Some(s) => match s.get_ref().as_str() {
                "warning" => Severity::Warning,
                "critical" => Severity::Critical,
                other => {
                    return Err(at(
                        s.span(),
                        "severity",
                        format!("{other:?} is neither \"warning\" nor \"critical\""),
                    ))
                }
            },
        };
        let direction = match &r.direction {
            None => None,
            Some(s) => match s.get_ref().as_str() {
                "above" => Some(true),
                "below" => Some(false),
                "both" => None,
                other => {
                    return Err(at(
                        s.span(),
                        "direction",
                        format!("{other:?} is not \"above\", \"below\" or \"both\""),
                    ))
                }
            },
        };
        let (series, more_series) = match &r.series {
            None => (None, Vec::new()),
            Some(s) => {
                let names: Vec<&String> = match s.get_ref() {
                    OneOrMany::One(n) => vec![n],
                    OneOrMany::Many(v) => v.iter().collect(),
                };
                if names.is_empty() {
                    return Err(at(s.span(), "series", "an empty list".into()));
                }
                if names.len() > 1 && r.kind.get_ref() != "forest" {
                    return Err(at(
                        s.span(),
                        "series",
                        format!(
                            "only a forest rule takes several series ({} is one series)",
                            r.kind.get_ref()
                        ),
                    ));
                }
                if names.len() > 64 {
                    return Err(at(s.span(), "series", "at most 64 series".into()));
                }
                let mut specs = Vec::new();
                for n in names {
                    specs.push(parse_series(n).map_err(|e| at(s.span(), "series", e))?);
                }
                let first = specs.remove(0);
                (Some(first), specs)
            }
        };
        let window_samples = |default: u32| -> anyhow::Result<u32> {
            match &r.window {
                None => Ok(default),
                Some(w) => match w.get_ref() {
                    toml::Value::Integer(i) if *i >= 5 && *i <= 100_000 => Ok(*i as u32),
                    other => Err(at(
                        w.span(),
                        "window",
                        format!("{other} is not a number of samples from 5 to 100000"),
                    )),
                },
            }
        };
        let window_duration = |default: Duration| -> anyhow::Result<Duration> {
            match &r.window {
                None => Ok(default),
                Some(w) => match w.get_ref() {
                    toml::Value::String(s) => humantime::parse_duration(s).map_err(|e| {
                        at(w.span(), "window", format!("{s:?} is not a duration ({e})"))
                    }),
                    other => Err(at(
                        w.span(),
                        "window",
                        format!("{other} is not a duration such as \"30m\""),
                    )),
                },
            }
        };
        let probability = |default: f64| -> anyhow::Result<f64> {
            match &r.threshold {
                None => Ok(default),
                Some(t) if *t.get_ref() > 0.0 && *t.get_ref() < 1.0 => Ok(*t.get_ref()),
                Some(t) => Err(at(
                    t.span(),
                    "threshold",
                    format!(
                        "{} is not a probability strictly between 0 and 1 (e.g. 0.999)",
                        t.get_ref()
                    ),
                )),
            }
        };
        let need_series = |kind: &str| {
            series.clone().ok_or_else(|| {
                at(
                    r.kind.span(),
                    "series",
                    format!("a {kind} rule needs `series = \"table.column\"`"),
                )
            })
        };
        let kind = match r.kind.get_ref().as_str() {
            "threshold" => {
                need_series("threshold")?;
                if r.warning.is_none() && r.critical.is_none() {
                    return Err(at(
                        r.kind.span(),
                        "warning",
                        "a threshold rule needs `warning`, `critical` or both".into(),
                    ));
                }
                let above = direction.unwrap_or(true);
                if let (Some(w), Some(c)) = (r.warning, r.critical) {
                    if (above && w > c) || (!above && w < c) {
                        return Err(at(
                            r.kind.span(),
                            "critical",
                            format!("critical ({c}) must be beyond warning ({w}) in the rule's direction"),
                        ));
                    }
                }
                RuleKind::Threshold {
                    above,
                    warning: r.warning,
                    critical: r.critical,
                    hysteresis: r.hysteresis.unwrap_or(0.0),
                }
            }
            "ewma" => {
                need_series("ewma")?;
                let alpha = r.alpha.as_ref().map(|a| *a.get_ref()).unwrap_or(0.1);
                if !(alpha > 0.0 && alpha <= 1.0) {
                    let s = r.alpha.as_ref().map(|a| a.span()).unwrap_or(r.kind.span());
                    return Err(at(s, "alpha", format!("{alpha} is outside (0, 1]")));
                }
                RuleKind::Ewma {
                    alpha,
                    threshold: positive(&r.threshold, 4.0, |s, m| at(s, "threshold", m))?,
                    warmup: r.warmup.unwrap_or(30),
                    severity,
                    direction,
                }
            }
            "mad" => {
                need_series("mad")?;
                let window = window_samples(120)?;
                RuleKind::Mad {
                    window,
                    threshold: positive(&r.threshold, 5.0, |s, m| at(s, "threshold", m))?,
                    min_samples: r.min_samples.unwrap_or(window / 2).min(window),
                    severity,
                    direction,
                }
            }
            "anomaly" => {
                need_series("anomaly")?;
                RuleKind::Anomaly {
                    threshold: probability(ANOMALY_THRESHOLD)?,
                    severity,
                    direction,
                }
            }
            "forest" => {
                need_series("forest")?;
                RuleKind::Forest {
                    threshold: probability(ANOMALY_THRESHOLD)?,
                    severity,
                }
            }
            "drift" => {
                need_series("drift")?;
                RuleKind::Drift {
                    threshold: probability(0.6)?,
                    severity,
                }
            }
            "forecast" => {
                let sp = need_series("forecast")?;
                let within = match &r.within {
                    None => {
                        return Err(at(
                            r.kind.span(),
                            "within",
                            "a forecast rule needs `within` (e.g. \"6h\": fire when the limit is nearer than that)".into(),
                        ))
                    }
                    Some(_) => dur(&r.within, "within", Duration::ZERO)?,
                };
                let limit = match r.limit {
                    Some(l) if l.is_finite() => l,
                    Some(l) => {
                        return Err(at(r.kind.span(), "limit", format!("{l} is not a number")))
                    }
                    None if sp.name().ends_with("_pct") => 100.0,
                    None => {
                        return Err(at(
                            r.kind.span(),
                            "limit",
                            format!("a forecast rule on {} needs `limit` (only *_pct series default to 100)", sp.name()),
                        ))
                    }
                };
                RuleKind::Forecast {
                    limit,
                    above: direction.unwrap_or(true),
                    within,
                    window: window_duration(Duration::from_secs(1800))?,
                    severity,
                }
            }
            "host_silent" => {
                if for_.is_zero() {
                    return Err(at(
                        r.kind.span(),
                        "for",
                        "a host_silent rule needs `for` (e.g. \"30s\")".into(),
                    ));
                }
                RuleKind::HostSilent { severity }
            }
            "absent" => {
                need_series("absent")?;
                if for_.is_zero() {
                    return Err(at(
                        r.kind.span(),
                        "for",
                        "an absent rule needs `for` (e.g. \"60s\")".into(),
                    ));
                }
                RuleKind::Absent { severity }
            }
            other => {
                return Err(at(
                    r.kind.span(),
                    "kind",
                    format!("{other:?} is not one of threshold, anomaly, ewma, mad, forest, drift, forecast, host_silent, absent"),
                ))
            }
        };
        if let Some(sp) = &series {
            for k in r.labels.keys() {
                let known = std::iter::once(sp)
                    .chain(more_series.iter())
                    .any(|s| s.label_names().contains(&k.as_str()));
                // Any other name selects on the host's labels (the sensor's `labels`),
                // except a label of another table: that is a mistake, not a host label.
                let other_table_label = protocol::TABLES.iter().any(|t| {
                    t.name != "host_labels" && t.label_columns().any(|(_, c)| c.name == k.as_str())
                });
                if k != "host" && !known && other_table_label {
                    return Err(at(
                        r.name.span(),
                        "labels",
                        format!(
                            "`{k}` is not a label of {} (labels: host{}, or a host label from the sensors' `labels`)",
                            sp.table_name(),
                            sp.label_names()
                                .iter()
                                .map(|l| format!(", {l}"))
                                .collect::<String>()
                        ),
                    ));
                }
            }
        }
        out.push(Rule {
            summary: r.summary.clone().unwrap_or_default(),
            name,
            kind,
            series,
            more_series,
            labels: r.labels.clone(),
            for_,
            repeat,
        });
    }
    Ok(out)
}

fn positive(
    v: &Option<Spanned<f64>>,
    default: f64,
    err: impl Fn(std::ops::Range<usize>, String) -> anyhow::Error,
) -> anyhow::Result<f64> {
    match v {
        None => Ok(default),
        Some(s) if *s.get_ref() > 0.0 && s.get_ref().is_finite() => Ok(*s.get_ref()),
        Some(s) => Err(err(
            s.span(),
            format!("{} must be a positive number", s.get_ref()),
        )),
    }
}

pub fn load_rules(path: &Path) -> anyhow::Result<Vec<Rule>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read rules file {}: {e}", path.display()))?;
    parse_rules(&path.display().to_string(), &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_rules_parse() {
        let r = parse_rules(
            "r.toml",
            r#"
[[rule]]
name = "cpu busy"
kind = "threshold"
series = "cpu.busy"
labels = { cpu = "total", host = "web-*" }
warning = 70
critical = 80
hysteresis = 5
for = "5s"

[[rule]]
name = "disk latency anomaly"
kind = "mad"
series = "disk.w_await_ms"
threshold = 6
window = 300

[[rule]]
name = "runq"
kind = "ewma"
series = "latency.runqueue.p99"
direction = "above"

[[rule]]
name = "silent"
kind = "host_silent"
for = "30s"
severity = "critical"
"#,
        )
        .unwrap();
        assert_eq!(r.len(), 4);
        assert_eq!(r[0].for_, Duration::from_secs(5));
        assert!(matches!(
            r[1].kind,
            RuleKind::Mad {
                window: 300,
                min_samples: 150,
                ..
            }
        ));
        assert!(matches!(
            r[3].kind,
            RuleKind::HostSilent {
                severity: Severity::Critical
            }
        ));
    }

    #[test]
    fn the_default_rules_load_and_cover_what_they_promise() {
        let r = parse_rules("default.toml", crate::detect::DEFAULT_RULES).unwrap();
        let kinds: std::collections::HashSet<String> = r
            .iter()
            .map(|r| {
                format!("{:?}", r.kind)
                    .split([' ', '{'])
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect();
        for k in ["HostSilent", "Threshold", "Anomaly", "Forecast"] {
            assert!(kinds.contains(k), "no {k} rule in the defaults");
        }
        for series in [
            "filesystem.used_pct",
            "filesystem.inodes_used_pct",
            "probes.oom_kills",
            "pressure.some_avg10",
            "memory.swap_out_per_s",
            "latency.runqueue.p99",
            "disk.util_pct",
            "tcp.retrans_segs_per_s",
            "tcp.out_rsts_per_s",
            "net.rx_errors_per_s",
            "net.rx_drops_per_s",
            "system.forks_per_s",
            "cpu.busy",
        ] {
            assert!(
                r.iter()
                    .any(|r| r.series.as_ref().is_some_and(|s| s.name() == series)),
                "no default rule watches {series}"
            );
        }
        assert!(
            r.iter().all(|r| !r.summary.is_empty()),
            "every rule has a summary"
        );
    }

    #[test]
    fn new_kinds_parse_with_defaults_and_check_their_fields() {
        let r = parse_rules(
            "r.toml",
            "[[rule]]\nname = \"a\"\nkind = \"anomaly\"\nseries = \"cpu.busy\"\n\n[[rule]]\nname = \"f\"\nkind = \"forest\"\nseries = [\"cpu.busy\", \"memory.used\", \"disk.util_pct\"]\n\n[[rule]]\nname = \"d\"\nkind = \"forecast\"\nseries = \"filesystem.used_pct\"\nwithin = \"6h\"\n",
        )
        .unwrap();
        assert!(
            matches!(r[0].kind, RuleKind::Anomaly { threshold, .. } if threshold == ANOMALY_THRESHOLD)
        );
        assert_eq!(r[1].more_series.len(), 2);
        assert!(matches!(r[2].kind, RuleKind::Forecast { limit, .. } if limit == 100.0));
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let cases = [
            ("[[rule]]\nname = \"a\"\nkind = \"threshold\"\nseries = \"cpu.bussy\"\nwarning = 1\n", "r.toml:4", "series"),
            ("[[rule]]\nname = \"a\"\nkind = \"threshold\"\nseries = \"cpu.busy\"\nwarning = 1\nfor = \"soon\"\n", "r.toml:6", "for"),
            ("[[rule]]\nname = \"a\"\nkind = \"wobble\"\nseries = \"cpu.busy\"\n", "r.toml:3", "kind"),
            ("[[rule]]\nname = \"a\"\nkind = \"threshold\"\nseries = \"cpu.busy\"\n", "r.toml:3", "warning"),
            ("[[rule]]\nname = \"a\"\nkind = \"threshold\"\nseries = \"cpu.busy\"\nwarning = 1\nlabels = { device = \"sda\" }\n", "r.toml:2", "labels"),
            ("[[rule]]\nname = \"a\"\nkind = \"threshold\"\nseries = \"cpu.busy\"\nwarning = 1\ncolour = 3\n", "r.toml:", "colour"),
            ("[[rule]]\nname = \"a\"\nkind = \"ewma\"\nseries = \"cpu.busy\"\nalpha = 2.0\n", "r.toml:5", "alpha"),
            ("[[rule]]\nname = \"a\"\nkind = \"host_silent\"\n", "r.toml:3", "for"),
            ("[[rule]]\nname = \"a\"\nkind = \"anomaly\"\nseries = \"cpu.busy\"\nthreshold = 5\n", "r.toml:5", "probability"),
            ("[[rule]]\nname = \"a\"\nkind = \"anomaly\"\nseries = [\"cpu.busy\", \"memory.used\"]\n", "r.toml:4", "only a forest"),
            ("[[rule]]\nname = \"a\"\nkind = \"forecast\"\nseries = \"memory.used\"\nwithin = \"1h\"\n", "r.toml:3", "limit"),
            ("[[rule]]\nname = \"a\"\nkind = \"forecast\"\nseries = \"filesystem.used_pct\"\n", "r.toml:3", "within"),
            ("[[rule]]\nname = \"a\"\nkind = \"forecast\"\nseries = \"filesystem.used_pct\"\nwithin = \"1h\"\nwindow = 30\n", "r.toml:6", "window"),
        ];
        for (text, at, field) in cases {
            let e = parse_rules("r.toml", text).unwrap_err().to_string();
            assert!(e.starts_with(at) && e.contains(field), "{text:?} gave: {e}");
        }
    }
}
