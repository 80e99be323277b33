//! `aggregator backtest`: history (CSV or ClickHouse) through the same engine as live.

use super::rules::{load_rules, Rule};
use super::series::SeriesSpec;
use super::{AlertEvent, Engine};
use crate::alert::rfc3339_ms;
use crate::config::Config;
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Rules file (TOML), as for `aggregator run --rules`.
    #[arg(long, value_name = "FILE")]
    pub rules: PathBuf,
    /// Read history from this CSV file (header: timestamp,value[,label...]).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["host", "from", "to"])]
    pub csv: Option<PathBuf>,
    /// Read history from ClickHouse for this host.
    #[arg(long, value_name = "HOST", requires_all = ["from", "to"])]
    pub host: Option<String>,
    /// Start of the ClickHouse window: RFC 3339 (2026-11-22T10:00:00Z) or Unix seconds.
    #[arg(long, value_name = "TIME")]
    pub from: Option<String>,
    /// End of the ClickHouse window (exclusive).
    #[arg(long, value_name = "TIME")]
    pub to: Option<String>,
    /// ClickHouse HTTP URL (default: the config's; needed when the config uses a managed server).
    #[arg(long, value_name = "URL")]
    pub clickhouse_url: Option<String>,
    /// Read ClickHouse history from a rollup tier instead of the raw rows: `1m` or `1h`
    /// (one sample per bucket: a gauge's or rate's average, a counter's sum, histograms
    /// merged), for ranges longer than the raw retention or faster over weeks.
    #[arg(long, value_name = "TIER", default_value = "raw", value_parser = ["raw", "1m", "1h"])]
    pub tier: String,
    /// Write one row per input sample and rule (timestamp,rule,host,labels,value,score,norm;
    /// warm-up rows included with score 0 and norm 0) to this CSV.
    #[arg(long, value_name = "OUT.csv")]
    pub scores: Option<PathBuf>,
}

/// One sample from history.
pub struct Sample {
    pub ts_ms: u64,
    pub rule: usize,
    pub host: String,
    pub labels: Vec<(&'static str, String)>,
    pub value: f64,
}

pub fn parse_time(s: &str) -> Result<u64> {
    let s = s.trim();
    if let Ok(n) = s.parse::<f64>() {
        // Seconds, or milliseconds when it is too large to be seconds.
        return Ok(if n > 1e11 {
            n as u64
        } else {
            (n * 1000.0) as u64
        });
    }
    let t = humantime::parse_rfc3339_weak(s)
        .with_context(|| format!("{s:?} is neither Unix time nor RFC 3339"))?;
    Ok(t.duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64)
}

/// Reads `timestamp,value[,labels...]`; every rule with a series is applied to the value.
pub fn csv_samples(path: &std::path::Path, rules: &[Rule]) -> Result<Vec<Sample>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut lines = text.lines().enumerate();
    let (_, header) = lines.next().context("empty CSV")?;
    let cols: Vec<String> = header.split(',').map(|c| c.trim().to_string()).collect();
    let ti = cols.iter().position(|c| c == "timestamp" || c == "ts");
    let vi = cols.iter().position(|c| c == "value");
    let (Some(ti), Some(vi)) = (ti, vi) else {
        bail!(
            "{}:1: the header needs `timestamp` and `value` columns (got {header:?})",
            path.display()
        );
    };
    let hi = cols.iter().position(|c| c == "host");
    let label_cols: Vec<(usize, &'static str)> = cols
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != ti && *i != vi && Some(*i) != hi)
        .map(|(i, c)| (i, &*Box::leak(c.clone().into_boxed_str())))
        .collect();
    let mut out = Vec::new();
    for (n, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let at = |what: &str| format!("{}:{}: {what}", path.display(), n + 1);
        let ts = parse_time(f.get(ti).copied().unwrap_or("")).with_context(|| at("timestamp"))?;
        let value: f64 = f
            .get(vi)
            .and_then(|v| v.parse().ok())
            .with_context(|| at("value is not a number"))?;
        let host = hi
            .and_then(|i| f.get(i))
            .map(|s| s.to_string())
            .unwrap_or_else(|| "csv".into());
        let labels: Vec<(&'static str, String)> = label_cols
            .iter()
            .map(|(i, c)| (*c, f.get(*i).copied().unwrap_or("").to_string()))
            .collect();
        for (ri, r) in rules.iter().enumerate() {
            if r.series.is_some() && !r.is_absence() && r.more_series.is_empty() {
                out.push(Sample {
                    ts_ms: ts,
                    rule: ri,
                    host: host.clone(),
                    labels: labels.clone(),
                    value,
                });
            }
        }
    }
    out.sort_by_key(|s| s.ts_ms);
    Ok(out)
}

/// The SQL for a rule's series: (table, label columns, value expression).
fn sql_for(spec: &SeriesSpec) -> (&'static str, Vec<&'static str>, String) {
    (spec.table_name(), spec.label_names(), spec.sql())
}

async fn ch(client: &reqwest::Client, url: &str, cfg: &Config, sql: &str) -> Result<String> {
    let mut req = client.post(url).body(sql.to_string());
    if !cfg.clickhouse.user.is_empty() {
        req = req.basic_auth(&cfg.clickhouse.user, Some(&cfg.clickhouse.password));
    }
    let r = req
        .send()
        .await
        .with_context(|| format!("ClickHouse at {url} is unreachable"))?;
    let status = r.status();
    let text = r.text().await?;
    if !status.is_success() {
        bail!("ClickHouse answered {status}: {}", text.trim());
    }
    Ok(text)
}

fn parse_array(s: &str) -> Vec<u64> {
    s.trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .filter_map(|x| x.trim().parse().ok())
        .collect()
}

pub async fn clickhouse_samples(args: &Args, cfg: &Config, rules: &[Rule]) -> Result<Vec<Sample>> {
    let url = cfg
        .clickhouse
        .url_for_tools(args.clickhouse_url.as_deref())?;
    let host = args.host.as_deref().unwrap();
    if host.contains('\'') || host.contains('\\') {
        bail!("--host: {host:?} contains a quote");
    }
    let from = parse_time(args.from.as_deref().unwrap()).context("--from")? / 1000;
    let to = parse_time(args.to.as_deref().unwrap()).context("--to")? / 1000;
    if to <= from {
        bail!("--to must be after --from");
    }
    let db = &cfg.clickhouse.database;
    let client = reqwest::Client::new();
    // On 18.x servers a view's WHERE reaches its table only with this setting.
    let url = if args.tier == "raw" {
        url
    } else {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}enable_optimize_predicate_expression=1")
    };
    let suffix = if args.tier == "raw" {
        String::new()
    } else {
        format!("_{}", args.tier)
    };
    let mut out = Vec::new();
    for q in history_queries(db, rules, |_| true, host, from, to, &suffix, true) {
        let text = ch(
            &client,
            &url,
            cfg,
            &format!("{} FORMAT TabSeparated", q.sql),
        )
        .await?;
        out.extend(parse_history(&q, rules, host, &text));
    }
    out.sort_by_key(|s| s.ts_ms);
    Ok(out)
}

/// One query of a host's history (read as TabSeparated): one per table, for all the
/// wanted rules over that table's series.
pub struct HistoryQuery {
    /// The (rule, part) it reads, in the order of its value columns (latency: one set of
    /// histograms, from which each rule's code computes its statistic). Part 0 is a
    /// rule's `series`, part k its k-th of `more_series` (see [`part_spec`]).
    pub rules: Vec<(usize, usize)>,
    /// Without a FORMAT clause.
    pub sql: String,
    /// None: latency histograms (rebuilt, the live code computes the statistic);
    /// otherwise the label columns before the values.
    labels: Option<Vec<&'static str>>,
}

/// The queries that read `host`'s history in [from, to) (Unix seconds) for the rules
/// `want` selects, from the raw tables (`suffix` empty) or a tier (`_1m`, `_1h`). Absence
/// rules have no history; rules over several series are read only when `tell` is false
/// (the live warm-up replays them; the backtest says on stderr that it skips them).
/// `host` must hold no quote (callers check).
#[allow(clippy::too_many_arguments)]
pub fn history_queries(
    db: &str,
    rules: &[Rule],
    want: impl Fn(usize) -> bool,
    host: &str,
    from: u64,
    to: u64,
    suffix: &str,
    tell: bool,
) -> Vec<HistoryQuery> {
    let cond = format!("host = '{host}'");
    queries_where(db, rules, want, &cond, "", "", from, to, suffix, tell)
}

/// As [`history_queries`] for several hosts in one query per rule, from the raw tables:
/// each row starts with its host's name (read with [`each_sample`]). `hosts` must hold
/// no quote (callers check).
pub fn history_queries_of(
    db: &str,
    rules: &[Rule],
    want: impl Fn(usize) -> bool,
    hosts: &[&str],
    from: u64,
    to: u64,
) -> Vec<HistoryQuery> {
    let list: Vec<String> = hosts.iter().map(|h| format!("'{h}'")).collect();
    let cond = format!("host IN ({})", list.join(", "));
    queries_where(
        db,
        rules,
        want,
        &cond,
        "toString(host), ",
        "host, ",
        from,
        to,
        "",
        false,
    )
}

#[allow(clippy::too_many_arguments)]
fn queries_where(
    db: &str,
    rules: &[Rule],
    want: impl Fn(usize) -> bool,
    cond: &str,
    first: &str,
    order: &str,
    from: u64,
    to: u64,
    suffix: &str,
    tell: bool,
) -> Vec<HistoryQuery> {
    // (table, label columns) → ((rule, part)s, value expressions), in the rules' order.
    type Group = (
        &'static str,
        Option<Vec<&'static str>>,
        Vec<(usize, usize)>,
        Vec<String>,
    );
    let mut by_table: Vec<Group> = Vec::new();
    for (ri, r) in rules.iter().enumerate() {
        let Some(spec) = &r.series else { continue };
        if r.is_absence() || !want(ri) {
            continue;
        }
        if !r.more_series.is_empty() && tell {
            eprintln!(
                "backtest: rule {:?} reads several series at once; it is evaluated live and by `aggregator evaluate`, not replayed here",
                r.name
            );
            continue;
        }
        for (part, spec) in std::iter::once(spec).chain(&r.more_series).enumerate() {
            let (table, labels, expr) = match spec {
                SeriesSpec::Latency { .. } => ("latency", None, String::new()),
                _ => {
                    let (t, l, e) = sql_for(spec);
                    (t, Some(l), e)
                }
            };
            match by_table
                .iter_mut()
                .find(|(t, l, ..)| *t == table && *l == labels)
            {
                Some((_, _, rs, es)) => {
                    rs.push((ri, part));
                    es.push(expr);
                }
                None => by_table.push((table, labels, vec![(ri, part)], vec![expr])),
            }
        }
    }
    let window = format!("{cond} AND ts >= toDateTime({from}) AND ts < toDateTime({to})");
    by_table
        .into_iter()
        .map(|(table, labels, rules, exprs)| {
            let columns = match &labels {
                None => ", source, unit, count, sum, bucket_upper, bucket_count".to_string(),
                Some(labels) => {
                    let mut c: String = labels
                        .iter()
                        .map(|l| format!(", toString(`{l}`)"))
                        .collect();
                    for e in &exprs {
                        c.push_str(&format!(", toFloat64({e})"));
                    }
                    c
                }
            };
            HistoryQuery {
                rules,
                sql: format!(
                    "SELECT {first}toUInt32(ts){columns} FROM {db}.{table}{suffix} WHERE {window} ORDER BY {order}ts"
                ),
                labels,
            }
        })
        .collect()
}

/// The samples in a [`HistoryQuery`]'s TabSeparated answer.
pub fn parse_history(q: &HistoryQuery, rules: &[Rule], host: &str, text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    each_sample(
        q,
        rules,
        text,
        false,
        |(rule, _), _, ts_ms, labels, value| {
            out.push(Sample {
                ts_ms,
                rule,
                host: host.to_string(),
                labels: labels.iter().map(|(k, v)| (*k, v.to_string())).collect(),
                value,
            })
        },
    );
    out
}

/// The series of a rule's part: 0 its `series`, k its k-th of `more_series`.
pub fn part_spec(rule: &Rule, part: usize) -> Option<&SeriesSpec> {
    match part {
        0 => rule.series.as_ref(),
        k => rule.more_series.get(k - 1),
    }
}

/// Calls `f((rule, part), host, ts_ms, labels, value)` for each sample in a [`HistoryQuery`]'s
/// TabSeparated answer, in the answer's order, borrowing from `text` (nothing is allocated
/// per sample but for latency histograms). `with_host`: each row starts with its host's
/// name (a [`history_queries_of`] answer); otherwise `f` gets "" for the host.
pub fn each_sample<'t>(
    q: &HistoryQuery,
    rules: &[Rule],
    text: &'t str,
    with_host: bool,
    mut f: impl FnMut((usize, usize), &'t str, u64, &[(&'static str, &str)], f64),
) {
    let mut fields: Vec<&'t str> = Vec::with_capacity(16);
    let mut labels: Vec<(&'static str, &'t str)> = Vec::with_capacity(8);
    for line in text.lines() {
        fields.clear();
        fields.extend(line.split('\t'));
        let (host, f_) = match with_host {
            true if fields.len() < 2 => continue,
            true => (fields[0], &fields[1..]),
            false => ("", &fields[..]),
        };
        let ts = f_.first().and_then(|t| t.parse::<u64>().ok()).unwrap_or(0) * 1000;
        let Some(names) = &q.labels else {
            // Rebuild the histogram and let the live code compute each rule's statistic.
            if f_.len() < 7 {
                continue;
            }
            let uppers = parse_array(f_[5]);
            let counts = parse_array(f_[6]);
            let rec = protocol::LatencyRec {
                source: f_[1].to_string(),
                unit: f_[2].to_string(),
                count: f_[3].parse().unwrap_or(0),
                sum: f_[4].parse().unwrap_or(0),
                buckets: uppers
                    .iter()
                    .zip(&counts)
                    .map(|(u, c)| protocol::BucketRec {
                        index: u.trailing_zeros(),
                        count: *c,
                    })
                    .collect(),
            };
            let snap = protocol::Snapshot {
                latency: vec![rec],
                ..Default::default()
            };
            for &(ri, part) in &q.rules {
                if let Some(spec) = part_spec(&rules[ri], part) {
                    spec.for_each(&snap, |l, v| f((ri, part), host, ts, l, v));
                }
            }
            continue;
        };
        if f_.len() != 1 + names.len() + q.rules.len() {
            continue;
        }
        labels.clear();
        labels.extend(names.iter().copied().zip(f_[1..].iter().copied()));
        for (&c, v) in q.rules.iter().zip(&f_[1 + names.len()..]) {
            f(c, host, ts, &labels, v.parse().unwrap_or(f64::NAN));
        }
    }
}

/// The format a [`HistoryQuery`]'s answer is read in: RowBinary (every column is cast to
/// String, UInt32 or Float64 by the query) but for latency histograms (arrays), which are
/// read as TabSeparated. Binary is about a quarter smaller, cheaper for ClickHouse to write
/// and for [`each_sample_in`] to read (no number is parsed from text).
pub fn answer_format(q: &HistoryQuery) -> &'static str {
    if q.labels.is_some() {
        "RowBinary"
    } else {
        "TabSeparated"
    }
}

/// [`each_sample`] over an answer in [`answer_format`]. Returns false when the answer is
/// malformed (a binary answer is read up to the first row that does not fit the query).
pub fn each_sample_in<'t>(
    q: &HistoryQuery,
    rules: &[Rule],
    answer: &'t [u8],
    with_host: bool,
    mut f: impl FnMut((usize, usize), &str, u64, &[(&'static str, &str)], f64),
) -> bool {
    let Some(names) = &q.labels else {
        match std::str::from_utf8(answer) {
            Ok(t) => each_sample(q, rules, t, with_host, &mut f),
            Err(_) => each_sample(
                q,
                rules,
                &String::from_utf8_lossy(answer),
                with_host,
                &mut f,
            ),
        }
        return true;
    };
    let mut r = RowBinary(answer);
    let mut labels: Vec<(&'static str, &'t str)> = Vec::with_capacity(names.len());
    while !r.0.is_empty() {
        let host = match with_host {
            true => match r.string() {
                Some(h) => h,
                None => return false,
            },
            false => "",
        };
        let Some(ts) = r.u32() else { return false };
        labels.clear();
        for &n in names {
            let Some(l) = r.string() else { return false };
            labels.push((n, l));
        }
        // The whole row is read before any of it is used.
        let Some(values) = r.take(8 * q.rules.len()) else {
            return false;
        };
        for (&c, v) in q.rules.iter().zip(values.chunks_exact(8)) {
            let v = f64::from_le_bytes(v.try_into().expect("8 bytes"));
            f(c, host, ts as u64 * 1000, &labels, v);
        }
    }
    true
}

/// A RowBinary answer being read.
struct RowBinary<'t>(&'t [u8]);

impl<'t> RowBinary<'t> {
    fn take(&mut self, n: usize) -> Option<&'t [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    /// A String: its length as an unsigned LEB128, then its bytes (not UTF-8: read lossily
    /// as empty, which no label or host matcher selects).
    fn string(&mut self) -> Option<&'t str> {
        let mut n = 0usize;
        for shift in (0..64).step_by(7) {
            let b = *self.take(1)?.first()?;
            n |= ((b & 0x7f) as usize) << shift;
            if b & 0x80 == 0 {
                return Some(std::str::from_utf8(self.take(n)?).unwrap_or(""));
            }
        }
        None
    }
}

/// Feeds samples through the engine in time order. Returns the alert events and, per
/// sample, (ts, rule, host, labels, value, score, norm).
pub fn replay(
    rules: Vec<Rule>,
    samples: &[Sample],
    mut scores: Option<&mut dyn Write>,
) -> Result<Vec<AlertEvent>> {
    let mut engine = Engine::new(rules);
    let mut out = Vec::new();
    if let Some(w) = scores.as_deref_mut() {
        writeln!(w, "timestamp,rule,host,labels,value,score,norm")?;
    }
    let mut last_ts = 0;
    for s in samples {
        if s.ts_ms != last_ts {
            engine.tick(s.ts_ms, &mut out);
            last_ts = s.ts_ms;
        }
        engine.host_seen(&s.host, s.ts_ms, &mut out);
        let labels: Vec<(&str, &str)> = s.labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let v = engine.observe(s.rule, &s.host, &labels, s.ts_ms, s.value, &mut out);
        if let Some(w) = scores.as_deref_mut() {
            // One row per input sample and rule, aligned with the input: a sample the rule
            // does not select (labels) scores 0 like a warm-up sample.
            let v = v.unwrap_or(super::detectors::Verdict::quiet());
            let l: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            writeln!(
                w,
                "{},{},{},{},{},{},{:.6}",
                rfc3339_ms(s.ts_ms),
                engine.rules()[s.rule].name,
                s.host,
                l.join(";"),
                s.value,
                v.score,
                v.norm
            )?;
        }
    }
    Ok(out)
}

pub async fn run(args: Args, cfg: &Config) -> Result<()> {
    let rules = load_rules(&args.rules)?;
    let samples = match (&args.csv, &args.host) {
        (Some(p), _) => csv_samples(p, &rules)?,
        (None, Some(_)) => clickhouse_samples(&args, cfg, &rules).await?,
        (None, None) => bail!("give either --csv FILE or --host HOST --from TIME --to TIME"),
    };
    eprintln!(
        "backtest: {} samples through {} rules",
        samples.len(),
        rules.len()
    );
    let mut file = match &args.scores {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        )),
        None => None,
    };
    let events = replay(rules, &samples, file.as_mut().map(|f| f as &mut dyn Write))?;
    if let Some(mut f) = file {
        f.flush()?;
    }
    let mut fired = 0;
    for e in events
        .iter()
        .filter(|e| !e.repeat && matches!(e.state, "firing" | "resolved"))
    {
        if e.state == "firing" {
            fired += 1;
        }
        let labels: Vec<String> = e
            .labels
            .iter()
            .filter(|(k, _)| k != "host")
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let detail = match (e.threshold, e.score) {
            (Some(t), _) => format!("threshold={t}"),
            (_, Some(s)) => format!("score={s:.2}"),
            _ => String::new(),
        };
        println!(
            "{}  {:<8} {:<8} {:<24} host={} {} value={} {} id={}",
            rfc3339_ms(e.at_ms),
            e.state.to_uppercase(),
            e.severity,
            e.rule,
            e.host,
            labels.join(" "),
            e.value,
            detail,
            e.id
        );
    }
    println!("{fired} alerts would have fired");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::rules::parse_rules;

    const RULES: &str = r#"
[[rule]]
name = "busy"
kind = "threshold"
series = "cpu.busy"
labels = { cpu = "total" }
warning = 70
critical = 90
hysteresis = 5
for = "3s"

[[rule]]
name = "busy anomaly"
kind = "ewma"
series = "cpu.busy"
labels = { cpu = "total" }
threshold = 5
warmup = 20

[[rule]]
name = "busy calibrated"
kind = "anomaly"
series = "cpu.busy"
labels = { cpu = "total" }

[[rule]]
name = "busy forest"
kind = "forest"
series = "cpu.busy"
threshold = 0.999

[[rule]]
name = "busy drift"
kind = "drift"
series = "cpu.busy"

[[rule]]
name = "busy forecast"
kind = "forecast"
series = "cpu.busy"
limit = 99
within = "1m"
window = "2m"
"#;

    fn series() -> Vec<(u64, f64)> {
        (0..600u64)
            .map(|i| {
                let noise = ((i * 7919) % 13) as f64 / 13.0;
                let v = match i {
                    400..=440 => 95.0,
                    200 => 60.0,
                    _ => 20.0,
                };
                (1_700_000_000_000 + i * 1000, v + noise)
            })
            .collect()
    }

    /// Several hosts' history in one query per table: each row leads with its host, then
    /// one value per rule over that table, each read back as its rule's sample.
    #[test]
    fn history_of_several_hosts_reads_back_each_hosts_samples_per_rule() {
        let rules = parse_rules("t", RULES).unwrap();
        let one = history_queries("sonde", &rules, |_| true, "a", 100, 200, "", false);
        let many = history_queries_of("sonde", &rules, |_| true, &["a", "b"], 100, 200);
        // Every rule here is over cpu.busy: one query for all of them.
        assert_eq!((one.len(), many.len()), (1, 1));
        let (o, m) = (&one[0], &many[0]);
        assert_eq!(o.rules, m.rules);
        assert_eq!(
            m.rules,
            (0..rules.len()).map(|i| (i, 0)).collect::<Vec<_>>()
        );
        assert!(
            o.sql.contains("WHERE host = 'a' AND ts >= toDateTime(100)"),
            "{}",
            o.sql
        );
        assert!(
            m.sql.starts_with("SELECT toString(host), toUInt32(ts)"),
            "{}",
            m.sql
        );
        assert!(m
            .sql
            .contains("WHERE host IN ('a', 'b') AND ts >= toDateTime(100)"));
        assert!(m.sql.ends_with("ORDER BY host, ts"), "{}", m.sql);
        assert_eq!(
            m.sql.matches("toFloat64(").count(),
            rules.len(),
            "{}",
            m.sql
        );
        // Only the rules wanted.
        let two = history_queries_of("sonde", &rules, |ri| ri == 1 || ri == 2, &["a"], 1, 2);
        assert_eq!(two[0].rules, [(1, 0), (2, 0)]);
        assert_eq!(two[0].sql.matches("toFloat64(").count(), 2);

        let q = m;
        let n = q.labels.as_ref().unwrap().len();
        let k = q.rules.len();
        // Rule j's value is v + j.
        let row = |ts: u32, v: f64| {
            let mut f = vec![ts.to_string()];
            f.extend((0..n).map(|_| "total".to_string()));
            f.extend((0..k).map(|j| (v + j as f64).to_string()));
            f.join("\t")
        };
        let text = format!(
            "a\t{}\na\t{}\nb\t{}\n",
            row(100, 1.0),
            row(101, 2.0),
            row(100, 7.0)
        );
        let mut got = Vec::new();
        each_sample(q, &rules, &text, true, |ri, h, ts, labels, v| {
            assert_eq!(labels.len(), n);
            assert!(labels.iter().all(|(_, l)| *l == "total"), "{labels:?}");
            got.push((ri, h.to_string(), ts, v));
        });
        let want: Vec<((usize, usize), String, u64, f64)> = [
            ("a", 100_000, 1.0),
            ("a", 101_000, 2.0),
            ("b", 100_000, 7.0),
        ]
        .iter()
        .flat_map(|&(h, ts, v)| (0..k).map(move |j| ((j, 0), h.to_string(), ts, v + j as f64)))
        .collect();
        assert_eq!(got, want);
        // The same rows as RowBinary, the format the loader asks for: the same samples.
        assert_eq!(answer_format(q), "RowBinary");
        let bin_row = |out: &mut Vec<u8>, h: &str, ts: u32, v: f64| {
            for s in std::iter::once(h).chain((0..n).map(|_| "total")) {
                out.push(s.len() as u8);
                out.extend_from_slice(s.as_bytes());
                if s == h {
                    out.extend_from_slice(&ts.to_le_bytes());
                }
            }
            for j in 0..k {
                out.extend_from_slice(&(v + j as f64).to_le_bytes());
            }
        };
        let mut bin = Vec::new();
        bin_row(&mut bin, "a", 100, 1.0);
        bin_row(&mut bin, "a", 101, 2.0);
        bin_row(&mut bin, "b", 100, 7.0);
        let mut got_bin = Vec::new();
        let whole = each_sample_in(q, &rules, &bin, true, |ri, h, ts, labels, v| {
            assert!(labels.iter().all(|(_, l)| *l == "total"), "{labels:?}");
            got_bin.push((ri, h.to_string(), ts, v));
        });
        assert!(whole);
        assert_eq!(got_bin, want);
        // An answer cut within a row: the rows before it, and a false.
        let mut cut = 0;
        assert!(!each_sample_in(
            q,
            &rules,
            &bin[..bin.len() - 3],
            true,
            |_, _, _, _, _| cut += 1
        ));
        assert_eq!(cut, 2 * k);
        // A row cut short is skipped, not misread.
        let mut short = 0;
        each_sample(q, &rules, "a\t100\t1\n", true, |_, _, _, _, _| short += 1);
        assert_eq!(short, 0);
        // The one-host answer, read as the backtest reads it.
        let one_text: String = row(100, 1.0) + "\n";
        let samples = parse_history(o, &rules, "a", &one_text);
        assert_eq!(samples.len(), k);
        assert!(samples
            .iter()
            .enumerate()
            .all(|(j, s)| s.rule == j && s.host == "a" && s.value == 1.0 + j as f64));
    }

    #[test]
    fn backtest_matches_live_on_the_same_input() {
        // Live: the batches the sensor would send, five snapshots each.
        let rules = parse_rules("t", RULES).unwrap();
        let mut live = Engine::new(rules.clone());
        let mut live_out = Vec::new();
        for chunk in series().chunks(5) {
            let b = protocol::Batch {
                host: "h".into(),
                boot_id: "b".into(),
                seq: 1,
                info: None,
                snapshots: chunk
                    .iter()
                    .map(|(ts, v)| protocol::Snapshot {
                        ts_ms: *ts,
                        cpu: vec![protocol::CpuRec {
                            cpu: protocol::CPU_TOTAL,
                            idle: (100.0 - v) as f32,
                            ..Default::default()
                        }],
                        ..Default::default()
                    })
                    .collect(),
            };
            live.observe_batch("h", &b, chunk[0].0, &mut live_out);
        }
        // Backtest: the same values from a CSV.
        let dir = std::env::temp_dir().join(format!("sonde-bt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let csv = dir.join("in.csv");
        let mut text = String::from("timestamp,value,host,cpu\n");
        for (ts, v) in series() {
            // The live path sees the f32 the wire carries.
            let v = 100.0 - (100.0 - v) as f32 as f64;
            text.push_str(&format!("{ts},{v},h,total\n"));
        }
        std::fs::write(&csv, text).unwrap();
        let samples = csv_samples(&csv, &rules).unwrap();
        let mut scores = Vec::new();
        let bt = replay(rules, &samples, Some(&mut scores)).unwrap();
        let key = |e: &AlertEvent| (e.id.clone(), e.state, e.at_ms, e.severity);
        let l: Vec<_> = live_out.iter().map(key).collect();
        let b: Vec<_> = bt.iter().map(key).collect();
        assert!(!l.is_empty());
        assert_eq!(l, b);
        // Every kind took part: the calibrated anomaly rule (quiet for its first 300
        // samples) fired on the 95 % plateau too.
        assert!(bt
            .iter()
            .any(|e| e.rule == "busy calibrated" && e.state == "firing"));
        // The threshold alert: pending at 400 s, firing 3 s later, resolved at 441 s.
        let busy: Vec<_> = bt
            .iter()
            .filter(|e| e.rule == "busy")
            .map(|e| (e.state, (e.at_ms - 1_700_000_000_000) / 1000))
            .collect();
        assert_eq!(
            busy,
            vec![("pending", 400), ("firing", 403), ("resolved", 441)]
        );
        // Scores: one line per input sample and rule (warm-up rows included), so the file
        // lines up with its input; norm within 0..1, warm-up rows 0.
        let scores = String::from_utf8(scores).unwrap();
        assert_eq!(scores.lines().count(), 1 + 6 * 600);
        for line in scores.lines().skip(1) {
            let norm: f64 = line.rsplit(',').next().unwrap().parse().unwrap();
            assert!((0.0..=1.0).contains(&norm), "{line}");
        }
        let first_anomaly = scores
            .lines()
            .find(|l| l.contains(",busy calibrated,"))
            .unwrap();
        assert!(first_anomaly.ends_with(",0,0.000000"), "{first_anomaly}");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn csv_errors_name_the_line() {
        let dir = std::env::temp_dir().join(format!("sonde-bt2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rules = parse_rules("t", RULES).unwrap();
        let p = dir.join("bad.csv");
        std::fs::write(&p, "timestamp,value\n1700000000,5\n1700000001,abc\n").unwrap();
        let e = format!("{:#}", csv_samples(&p, &rules).err().unwrap());
        assert!(e.contains("bad.csv:3") && e.contains("value"), "{e}");
        std::fs::write(&p, "time,v\n").unwrap();
        let e = format!("{:#}", csv_samples(&p, &rules).err().unwrap());
        assert!(e.contains("bad.csv:1"), "{e}");
        std::fs::remove_dir_all(dir).ok();
    }
}
