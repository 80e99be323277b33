//! The rules file: TOML, checked at start, by `aggregator check-rules` and on SIGHUP, with
//! errors that name the file, the line and the field.

use super::detectors::{Detector, Ewma, Mad, Severity, Threshold};
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
    series: Option<Spanned<String>>,
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
    window: Option<Spanned<u32>>,
    #[serde(default)]
    min_samples: Option<u32>,
    #[serde(default)]
    summary: Option<String>,
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
    /// Label matchers (globs); `host` matches the host name.
    pub labels: BTreeMap<String, String>,
    pub for_: Duration,
    pub repeat: Duration,
    pub summary: String,
}

impl Rule {
    pub fn new_detector(&self) -> Option<Detector> {
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
            _ => return None,
        })
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
        let series = match &r.series {
            None => None,
            Some(s) => Some(parse_series(s.get_ref()).map_err(|e| at(s.span(), "series", e))?),
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
                let window = r.window.as_ref().map(|w| *w.get_ref()).unwrap_or(120);
                if window < 5 {
                    let s = r.window.as_ref().map(|w| w.span()).unwrap_or(r.kind.span());
                    return Err(at(
                        s,
                        "window",
                        format!("{window} samples is too few (at least 5)"),
                    ));
                }
                RuleKind::Mad {
                    window,
                    threshold: positive(&r.threshold, 5.0, |s, m| at(s, "threshold", m))?,
                    min_samples: r.min_samples.unwrap_or(window / 2).min(window),
                    severity,
                    direction,
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
                    format!("{other:?} is not one of threshold, ewma, mad, host_silent, absent"),
                ))
            }
        };
        if let Some(sp) = &series {
            for k in r.labels.keys() {
                if k != "host" && !sp.label_names().contains(&k.as_str()) {
                    return Err(at(
                        r.name.span(),
                        "labels",
                        format!(
                            "`{k}` is not a label of {} (labels: host{})",
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
        ];
        for (text, at, field) in cases {
            let e = parse_rules("r.toml", text).unwrap_err().to_string();
            assert!(e.starts_with(at) && e.contains(field), "{text:?} gave: {e}");
        }
    }
}
