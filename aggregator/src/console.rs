//! The console's JSON API: time series, latency heatmaps and alerts, downsampled in
//! ClickHouse from the raw table or the rollup tier that fits the range.
//!
//! Every parameter is validated or bound: the host and label values are bound query
//! parameters, a metric must resolve to a declared column (`table.column`, derived or
//! alias), times are numbers or RFC 3339, `points` is clamped.

// Handlers return ready HTTP error responses from their helpers.
#![allow(clippy::result_large_err)]

use crate::api::Api;
use crate::detect::series::{parse_series, Col, SeriesSpec};
use crate::store::Store;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use clickhouse::Row;
use protocol::tables::Kind;
use protocol::TABLES;
use serde::Deserialize;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};

const MAX_POINTS: u64 = 5000;
const DEFAULT_POINTS: u64 = 1000;

fn bad(msg: impl Into<String>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({ "error": msg.into() })),
    )
        .into_response()
}

fn unavailable(msg: impl Into<String>) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "error": msg.into() })),
    )
        .into_response()
}

fn store(api: &Api) -> Result<Store, Response> {
    api.store
        .get()
        .ok_or_else(|| unavailable(format!("ClickHouse not ready: {}", api.store.why())))
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// A value rounded to f32's shortest decimal form (f32's `Display` is the shortest string
/// that reads back as the same f32): seven significant digits are plenty for a chart and
/// roughly halve the JSON.
fn short(v: f64) -> f64 {
    if !v.is_finite() {
        return 0.0;
    }
    (v as f32).to_string().parse().unwrap_or(v)
}

/// A host name as sensors' certificates carry them.
fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// The time window and step of a request: `from`/`to` as Unix seconds or RFC 3339
/// (default: the last hour), `points` (default 1000, at most 5000).
pub struct Window {
    pub from: u64,
    pub to: u64,
    pub step: u64,
}

pub fn window(q: &HashMap<String, String>) -> Result<Window, String> {
    let time = |k: &str| -> Result<Option<u64>, String> {
        match q.get(k) {
            None => Ok(None),
            Some(v) if v.is_empty() => Ok(None),
            Some(v) => crate::detect::backtest::parse_time(v)
                .map(|ms| Some(ms / 1000))
                .map_err(|_| format!("{k}={v:?}: expected Unix seconds or RFC 3339")),
        }
    };
    let to = time("to")?.unwrap_or_else(now_s);
    let from = time("from")?.unwrap_or(to.saturating_sub(3600));
    if from >= to {
        return Err(format!("from ({from}) must be before to ({to})"));
    }
    if to - from > 10 * 366 * 86400 {
        return Err("the range is longer than ten years".into());
    }
    let points = match q.get("points") {
        None => DEFAULT_POINTS,
        Some(p) => p
            .parse::<u64>()
            .map_err(|_| format!("points={p:?}: expected a number"))?
            .clamp(2, MAX_POINTS),
    };
    let step = (to - from).div_ceil(points).max(1);
    Ok(Window { from, to, step })
}

/// The table suffix to read a window from: raw while a bucket is under a minute and the
/// range is inside the raw retention, then the 1-minute tier, the 1-hour one for buckets
/// of an hour or more (or past the minute tier's retention).
pub fn tier_for(w: &Window, store: &Store) -> &'static str {
    let age_days = |t: u64| now_s().saturating_sub(t) / 86400;
    let raw_ok = store.retention_days == 0 || age_days(w.from) < store.retention_days as u64;
    let m1_ok = store.tier_days[0] == 0 || age_days(w.from) < store.tier_days[0] as u64;
    if w.step < 60 && raw_ok {
        ""
    } else if w.step < 3600 && m1_ok {
        "_1m"
    } else {
        "_1h"
    }
}

/// The step, rounded to what the source holds (a minute tier has nothing finer).
fn step_for(w: &Window, tier: &str) -> u64 {
    let unit = match tier {
        "_1m" => 60,
        "_1h" => 3600,
        _ => 1,
    };
    w.step.div_ceil(unit) * unit
}

/// A metric request resolved against the declarations: where to read it and how.
struct Resolved {
    def: &'static protocol::tables::TableDef,
    kind: Kind,
    unit: String,
    labels: Vec<&'static str>,
    /// (label, value) filters from the query string.
    filters: Vec<(String, String)>,
    tier: &'static str,
    step: u64,
    /// The value and its envelope as SQL over the source's columns.
    v: String,
    lo: String,
    hi: String,
}

impl Resolved {
    /// Per-bucket aggregate of `v` (counters per second: a raw row is a count per interval,
    /// a tier row a count per bucket).
    fn agg(&self) -> String {
        if self.kind == Kind::Counter {
            format!("sum(v) / {}", self.step)
        } else {
            "avg(v)".into()
        }
    }

    fn label_sql(&self) -> String {
        if self.labels.is_empty() {
            "emptyArrayString()".to_string()
        } else {
            format!(
                "[{}]",
                self.labels
                    .iter()
                    .map(|l| format!("toString(`{l}`)"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    }

    fn filter_sql(&self) -> String {
        self.filters
            .iter()
            .map(|(k, _)| format!(" AND toString(`{k}`) = ?"))
            .collect()
    }

    /// A series' label values as a JSON object keyed by the label names.
    fn label_map(&self, values: &[String]) -> serde_json::Map<String, serde_json::Value> {
        self.labels
            .iter()
            .zip(values)
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect()
    }

    fn unit(&self) -> String {
        if self.kind == Kind::Counter {
            format!("{}/s", self.unit)
        } else {
            self.unit.clone()
        }
    }
}

fn resolve(
    q: &HashMap<String, String>,
    store: &Store,
    w: &Window,
    extra_params: &[&str],
) -> Result<Resolved, Response> {
    let Some(metric) = q.get("metric") else {
        return Err(bad("metric is required (table.column, e.g. cpu.busy)"));
    };
    let spec = match parse_series(metric) {
        Ok(SeriesSpec::Latency { .. }) => {
            return Err(bad(
                "latency series: use /api/hosts/{host}/heatmap?source=…",
            ))
        }
        Ok(s) => s,
        Err(e) => return Err(bad(format!("metric: {e}"))),
    };
    let SeriesSpec::Column { table, col, .. } = &spec else {
        unreachable!()
    };
    let def = TABLES[*table];
    if !def.rolled_up() {
        return Err(bad(format!("{}: not a time series table", def.name)));
    }
    let tier = tier_for(w, store);
    let step = step_for(w, tier);
    let labels = spec.label_names();
    // Label filters: any query parameter named like one of the table's labels.
    let mut filters = Vec::new();
    for (k, v) in q {
        if labels.contains(&k.as_str()) {
            filters.push((k.clone(), v.clone()));
        } else if !["metric", "from", "to", "points"].contains(&k.as_str())
            && !extra_params.contains(&k.as_str())
        {
            return Err(bad(format!(
                "unknown parameter {k:?} (labels of {}: {})",
                def.name,
                labels.join(", ")
            )));
        }
    }
    filters.sort();
    let (kind, unit, v, lo, hi) = match col {
        Col::Stored(i) => {
            let c = &def.columns[*i];
            let n = c.name;
            let has = |suffix: &str| c.kind.rollup().iter().any(|r| r.suffix == suffix);
            let plain = format!("`{n}`");
            let (lo, hi) = if tier.is_empty() || c.kind == Kind::Counter {
                (plain.clone(), plain.clone())
            } else {
                (
                    if has("_min") {
                        format!("`{n}_min`")
                    } else {
                        plain.clone()
                    },
                    if has("_max") {
                        format!("`{n}_max`")
                    } else {
                        plain.clone()
                    },
                )
            };
            (c.kind, c.unit, plain, lo, hi)
        }
        Col::Derived(j) => {
            let d = &def.derived[*j];
            (
                d.kind,
                d.unit,
                d.sql.to_string(),
                d.sql.to_string(),
                d.sql.to_string(),
            )
        }
    };
    Ok(Resolved {
        def,
        kind,
        unit: unit.to_string(),
        labels,
        filters,
        tier,
        step,
        v,
        lo,
        hi,
    })
}

/// The window, the store and the resolved metric of a series request.
fn prepare(
    api: &Api,
    q: &HashMap<String, String>,
    extra_params: &[&str],
) -> Result<(Window, Store, Resolved), Response> {
    let w = window(q).map_err(bad)?;
    let store = store(api)?;
    let r = resolve(q, &store, &w, extra_params)?;
    Ok((w, store, r))
}

/// `top=N` (1..50): only the N label sets with the highest average over the window.
fn top_param(q: &HashMap<String, String>) -> Result<Option<u32>, Response> {
    match q.get("top") {
        None => Ok(None),
        Some(t) => match t.parse::<u32>() {
            Ok(n) if (1..=50).contains(&n) => Ok(Some(n)),
            _ => Err(bad(format!("top={t:?}: expected a number from 1 to 50"))),
        },
    }
}

/// Runs a series query: binds the host (when there is one), the window and the label
/// filters, in the order the SQL names them.
async fn fetch<T>(
    store: &Store,
    sql: &str,
    host: Option<&str>,
    w: &Window,
    r: &Resolved,
) -> Result<Vec<T>, Response>
where
    T: clickhouse::RowOwned + clickhouse::RowRead,
{
    fetch_n(store, sql, host, w, r, 1).await
}

/// As [`fetch`], with the same parameters bound `times` times (a query that repeats its
/// WHERE in a subquery).
async fn fetch_n<T>(
    store: &Store,
    sql: &str,
    host: Option<&str>,
    w: &Window,
    r: &Resolved,
    times: usize,
) -> Result<Vec<T>, Response>
where
    T: clickhouse::RowOwned + clickhouse::RowRead,
{
    let mut query = store
        .client
        .clone()
        // On 18.x a view's WHERE reaches its table only with this (tier views).
        .with_setting("enable_optimize_predicate_expression", "1")
        .query(sql);
    for _ in 0..times {
        if let Some(h) = host {
            query = query.bind(h);
        }
        query = query.bind(w.from as u32).bind(w.to as u32);
        for (_, v) in &r.filters {
            query = query.bind(v);
        }
    }
    query
        .fetch_all()
        .await
        .map_err(|e| unavailable(format!("ClickHouse: {e}")))
}

#[derive(Row, Deserialize)]
struct Point {
    t: u32,
    labels: Vec<String>,
    v: f64,
    lo: f64,
    hi: f64,
}

/// `GET /api/hosts/{host}/series?metric=cpu.busy&from=&to=&points=&cpu=total&top=`: one
/// series per label set, at most `points` buckets each, with the bucket's min and max;
/// with `top=N`, only the N label sets with the highest average (containers, processes).
pub async fn series(
    State(api): State<Api>,
    Path(host): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let started = std::time::Instant::now();
    if !valid_host(&host) {
        return bad(format!("host {host:?}: not a host name"));
    }
    let (w, store, r) = match prepare(&api, &q, &["top"]) {
        Ok(x) => x,
        Err(e) => return e,
    };
    let top = match top_param(&q) {
        Ok(t) => t,
        Err(e) => return e,
    };
    let where_sql = format!(
        "WHERE host = ? AND ts >= toDateTime(?) AND ts < toDateTime(?){}",
        r.filter_sql()
    );
    let top_sql = match top {
        None => String::new(),
        Some(n) => format!(
            " AND {label_sql} IN (SELECT labels FROM (SELECT {label_sql} AS labels, avg({v}) AS a \
             FROM {db}.{table}{tier} {where_sql} GROUP BY labels ORDER BY a DESC LIMIT {n}))",
            label_sql = r.label_sql(),
            v = r.v,
            db = store.db,
            table = r.def.name,
            tier = r.tier,
        ),
    };
    let sql = format!(
        "SELECT toUInt32(intDiv(toUInt32(ts), {step}) * {step}) AS t, labels, toFloat64({agg}) AS v, \
         toFloat64(min(lo)) AS lo, toFloat64(max(hi)) AS hi FROM (\
         SELECT ts, {label_sql} AS labels, {v} AS v, {lo} AS lo, {hi} AS hi FROM {db}.{table}{tier} \
         {where_sql}{top_sql}) \
         GROUP BY t, labels ORDER BY labels, t",
        step = r.step,
        agg = r.agg(),
        label_sql = r.label_sql(),
        v = r.v,
        lo = r.lo,
        hi = r.hi,
        db = store.db,
        table = r.def.name,
        tier = r.tier,
    );
    let times = if top.is_some() { 2 } else { 1 };
    let rows: Vec<Point> = match fetch_n(&store, &sql, Some(&host), &w, &r, times).await {
        Ok(rows) => rows,
        Err(e) => return e,
    };
    type Columns = (Vec<u32>, Vec<f64>, Vec<f64>, Vec<f64>);
    let mut series: BTreeMap<Vec<String>, Columns> = BTreeMap::new();
    for p in rows {
        let s = series.entry(p.labels).or_default();
        s.0.push(p.t);
        s.1.push(short(p.v));
        s.2.push(short(p.lo));
        s.3.push(short(p.hi));
    }
    let out: Vec<serde_json::Value> = series
        .into_iter()
        .map(|(l, (t, v, lo, hi))| {
            let labels = r.label_map(&l);
            json!({ "labels": labels, "t": t, "v": v, "min": lo, "max": hi })
        })
        .collect();
    Json(json!({
        "host": host,
        "metric": q.get("metric"),
        "kind": r.kind.name(),
        "unit": r.unit(),
        "source": format!("{}{}", r.def.name, r.tier),
        "from": w.from,
        "to": w.to,
        "step": r.step,
        "series": out,
        "server_ms": started.elapsed().as_secs_f64() * 1000.0,
    }))
    .into_response()
}

#[derive(Row, Deserialize)]
struct FleetPoint {
    host: String,
    t: u32,
    v: f64,
}

/// `GET /api/fleet/series?metric=cpu.busy&from=&to=&points=&cpu=total`: one series per
/// host (label sets of a host folded with max: the busiest disk, the busiest interface),
/// for the fleet page's sparklines — one query for every host.
pub async fn fleet_series(
    State(api): State<Api>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let started = std::time::Instant::now();
    let (w, store, r) = match prepare(&api, &q, &[]) {
        Ok(x) => x,
        Err(e) => return e,
    };
    let sql = format!(
        "SELECT host, t, max(v) AS v FROM (\
         SELECT toString(host) AS host, toUInt32(intDiv(toUInt32(ts), {step}) * {step}) AS t, labels, toFloat64({agg}) AS v FROM (\
         SELECT host, ts, {label_sql} AS labels, {v} AS v FROM {db}.{table}{tier} \
         WHERE ts >= toDateTime(?) AND ts < toDateTime(?){filter_sql}) GROUP BY host, t, labels) \
         GROUP BY host, t ORDER BY host, t",
        step = r.step,
        agg = r.agg(),
        label_sql = r.label_sql(),
        v = r.v,
        db = store.db,
        table = r.def.name,
        tier = r.tier,
        filter_sql = r.filter_sql(),
    );
    let rows: Vec<FleetPoint> = match fetch(&store, &sql, None, &w, &r).await {
        Ok(rows) => rows,
        Err(e) => return e,
    };
    // One time axis for all hosts (bucket starts over the window); each host's values
    // aligned to it, null where it has none: the time stamps are not repeated per host.
    let first = (w.from / r.step) * r.step;
    let t: Vec<u64> = (0..)
        .map(|i| first + i * r.step)
        .take_while(|x| *x < w.to)
        .collect();
    let mut hosts: BTreeMap<String, Vec<Option<f64>>> = BTreeMap::new();
    for p in rows {
        let slot = ((p.t as u64).saturating_sub(first) / r.step) as usize;
        if slot >= t.len() {
            continue;
        }
        let h = hosts.entry(p.host).or_insert_with(|| vec![None; t.len()]);
        h[slot] = Some(short(p.v));
    }
    let hosts: serde_json::Map<String, serde_json::Value> =
        hosts.into_iter().map(|(h, v)| (h, json!(v))).collect();
    Json(json!({
        "metric": q.get("metric"),
        "source": format!("{}{}", r.def.name, r.tier),
        "step": r.step,
        "unit": r.unit(),
        "t": t,
        "hosts": hosts,
        "server_ms": started.elapsed().as_secs_f64() * 1000.0,
    }))
    .into_response()
}

#[derive(Row, Deserialize)]
struct HeatRow {
    t: u32,
    uppers: Vec<u64>,
    counts: Vec<u64>,
}

/// The bucket bound holding quantile `q` of one merged histogram (the detector's rule).
fn quantile(uppers: &[u64], counts: &[u64], q: f64) -> Option<u64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    crate::detect::series::bucket_quantile(
        uppers.iter().copied().zip(counts.iter().copied()),
        total,
        q,
    )
}

/// `GET /api/hosts/{host}/forecast?metric=filesystem.used_pct&window=1800&limit=100&<label>=`:
/// per label set, the trend the `forecast` detector fits (Theil–Sen over the last `window`
/// seconds before `to`, the detector's own code) and when it reaches `limit`: `eta_s`
/// (null when not approaching), the fitted line's ends for drawing.
pub async fn forecast(
    State(api): State<Api>,
    Path(host): Path<String>,
    Query(mut q): Query<HashMap<String, String>>,
) -> Response {
    if !valid_host(&host) {
        return bad(format!("host {host:?}: not a host name"));
    }
    let secs = match q.remove("window").map(|v| v.parse::<u64>()) {
        None => 1800,
        Some(Ok(s)) if (60..=7 * 86400).contains(&s) => s,
        Some(_) => return bad("window: expected seconds from 60 to 604800"),
    };
    let limit = match q.remove("limit").map(|v| v.parse::<f64>()) {
        None => 100.0,
        Some(Ok(l)) if l.is_finite() => l,
        Some(_) => return bad("limit: expected a number"),
    };
    let to = match window(&q) {
        Ok(w) => w.to,
        Err(e) => return bad(e),
    };
    q.insert("from".into(), (to - secs).to_string());
    q.insert("to".into(), to.to_string());
    q.insert("points".into(), "600".into());
    let (w, store, r) = match prepare(&api, &q, &[]) {
        Ok(x) => x,
        Err(e) => return e,
    };
    let sql = format!(
        "SELECT toUInt32(intDiv(toUInt32(ts), {step}) * {step}) AS t, {label_sql} AS labels, toFloat64(avg({v})) AS v, \
         toFloat64(0) AS lo, toFloat64(0) AS hi FROM {db}.{table}{tier} \
         WHERE host = ? AND ts >= toDateTime(?) AND ts < toDateTime(?){filter_sql} \
         GROUP BY t, labels ORDER BY labels, t",
        step = r.step,
        label_sql = r.label_sql(),
        v = r.v,
        db = store.db,
        table = r.def.name,
        tier = r.tier,
        filter_sql = r.filter_sql(),
    );
    let rows: Vec<Point> = match fetch(&store, &sql, Some(&host), &w, &r).await {
        Ok(rows) => rows,
        Err(e) => return e,
    };
    let mut fits: BTreeMap<Vec<String>, crate::detect::forecast::Forecast> = BTreeMap::new();
    let mut last: BTreeMap<Vec<String>, (u32, f64)> = BTreeMap::new();
    let mut first: BTreeMap<Vec<String>, u32> = BTreeMap::new();
    let mut eta: BTreeMap<Vec<String>, f64> = BTreeMap::new();
    for p in rows {
        let f = fits.entry(p.labels.clone()).or_insert_with(|| {
            crate::detect::forecast::Forecast::new(
                limit,
                true,
                f64::INFINITY,
                secs * 1000,
                crate::detect::detectors::Severity::Warning,
            )
        });
        let verdict = f.eval(p.t as u64 * 1000, p.v);
        eta.insert(p.labels.clone(), verdict.score);
        first.entry(p.labels.clone()).or_insert(p.t);
        last.insert(p.labels, (p.t, p.v));
    }
    let out: Vec<serde_json::Value> = fits
        .iter()
        .map(|(l, f)| {
            let labels = r.label_map(l);
            let (t1, v_now) = last[l];
            let t0 = first[l];
            match f.trend() {
                Some((slope, icpt)) => {
                    let at = |t: u32| short(icpt + slope * t as f64);
                    let e = eta[l];
                    json!({
                        "labels": labels, "value": short(v_now),
                        "slope_per_hour": short(slope * 3600.0),
                        "eta_s": if e >= 0.0 { json!(e.round()) } else { json!(null) },
                        "line": { "t": [t0, t1], "v": [at(t0), at(t1)] },
                    })
                }
                None => json!({ "labels": labels, "value": short(v_now), "slope_per_hour": null, "eta_s": null, "line": null }),
            }
        })
        .collect();
    Json(json!({
        "host": host, "metric": q.get("metric"), "window_s": secs, "limit": limit,
        "source": format!("{}{}", r.def.name, r.tier), "series": out,
    }))
    .into_response()
}

/// `GET /api/hosts/{host}/heatmap?source=runqueue&from=&to=&points=`: per time bucket the
/// merged log2 histogram, with p50 and p99 (bucket upper bounds).
pub async fn heatmap(
    State(api): State<Api>,
    Path(host): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let started = std::time::Instant::now();
    if !valid_host(&host) {
        return bad(format!("host {host:?}: not a host name"));
    }
    let source = q
        .get("source")
        .cloned()
        .unwrap_or_else(|| "runqueue".into());
    if source.len() > 200 {
        return bad("source is too long");
    }
    let w = match window(&q) {
        Ok(w) => w,
        Err(e) => return bad(e),
    };
    let store = match store(&api) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let tier = tier_for(&w, &store);
    let step = step_for(&w, tier);
    let sql = format!(
        "SELECT t, h.1 AS uppers, h.2 AS counts FROM (SELECT toUInt32(intDiv(toUInt32(ts), {step}) * {step}) AS t, \
         sumMap(bucket_upper, bucket_count) AS h FROM {db}.latency{tier} \
         WHERE host = ? AND source = ? AND ts >= toDateTime(?) AND ts < toDateTime(?) GROUP BY t) ORDER BY t",
        db = store.db
    );
    let rows: Vec<HeatRow> = match store
        .client
        .clone()
        .with_setting("enable_optimize_predicate_expression", "1")
        .query(&sql)
        .bind(&host)
        .bind(&source)
        .bind(w.from as u32)
        .bind(w.to as u32)
        .fetch_all()
        .await
    {
        Ok(r) => r,
        Err(e) => return unavailable(format!("ClickHouse: {e}")),
    };
    let mut bounds: Vec<u64> = rows.iter().flat_map(|r| r.uppers.iter().copied()).collect();
    bounds.sort_unstable();
    bounds.dedup();
    let mut counts = Vec::with_capacity(rows.len());
    let (mut p50, mut p99, mut t) = (Vec::new(), Vec::new(), Vec::new());
    for r in &rows {
        let mut row = vec![0u64; bounds.len()];
        for (u, c) in r.uppers.iter().zip(&r.counts) {
            if let Ok(i) = bounds.binary_search(u) {
                row[i] = *c;
            }
        }
        t.push(r.t);
        p50.push(quantile(&r.uppers, &r.counts, 0.5));
        p99.push(quantile(&r.uppers, &r.counts, 0.99));
        counts.push(row);
    }
    Json(json!({
        "host": host, "source": source, "source_table": format!("latency{tier}"),
        "from": w.from, "to": w.to, "step": step,
        "t": t, "bounds": bounds, "counts": counts, "p50": p50, "p99": p99,
        "server_ms": started.elapsed().as_secs_f64() * 1000.0,
    }))
    .into_response()
}

#[derive(Row, Deserialize)]
struct AlertRow {
    alert_id: String,
    rule: String,
    host: String,
    state: String,
    severity: String,
    labels: String,
    value: f64,
    score: Option<f64>,
    starts_at: u32,
    last: u32,
    ends_at: Option<u32>,
}

/// `GET /api/alerts?state=firing|all&from=&to=&host=`: one row per alert episode with its
/// latest state (`firing` now, or how it ended).
pub async fn alerts(State(api): State<Api>, Query(q): Query<HashMap<String, String>>) -> Response {
    let state = q.get("state").map(String::as_str).unwrap_or("all");
    if !["all", "firing", "pending", "resolved", "cleared"].contains(&state) {
        return bad(format!(
            "state={state:?}: expected all, firing, pending, resolved or cleared"
        ));
    }
    let host = q.get("host").cloned().unwrap_or_default();
    if !host.is_empty() && !valid_host(&host) {
        return bad(format!("host {host:?}: not a host name"));
    }
    let mut qq = q.clone();
    qq.entry("from".into())
        .or_insert_with(|| (now_s() - 7 * 86400).to_string());
    let w = match window(&qq) {
        Ok(w) => w,
        Err(e) => return bad(e),
    };
    let store = match store(&api) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let sql = format!(
        "SELECT alert_id, any(rule) AS a_rule, any(host) AS a_host, argMax(state, ts) AS a_state, any(severity) AS a_severity, \
         any(labels) AS a_labels, argMax(value, ts) AS a_value, argMax(score, ts) AS a_score, toUInt32(min(starts_at)) AS a_starts, \
         toUInt32(max(ts)) AS a_last, argMax(ends_at, ts) AS a_ends FROM {db}.alerts \
         WHERE ts >= toDateTime(?) AND ts < toDateTime(?) AND (? = '' OR host = ?) \
         GROUP BY alert_id HAVING (? = 'all' OR a_state = ?) ORDER BY a_starts DESC LIMIT 1000",
        db = store.db
    );
    let rows: Vec<AlertRow> = match store
        .client
        .query(&sql)
        .bind(w.from as u32)
        .bind(w.to as u32)
        .bind(&host)
        .bind(&host)
        .bind(state)
        .bind(state)
        .fetch_all()
        .await
    {
        Ok(r) => r,
        Err(e) => return unavailable(format!("ClickHouse: {e}")),
    };
    let out: Vec<serde_json::Value> = rows
        .into_iter()
        .map(|r| {
            let end = r
                .ends_at
                .unwrap_or(if r.state == "firing" || r.state == "pending" {
                    now_s() as u32
                } else {
                    r.last
                });
            json!({
                "id": r.alert_id, "rule": r.rule, "host": r.host, "state": r.state,
                "severity": r.severity, "labels": r.labels, "value": r.value, "score": r.score,
                "starts_at": r.starts_at, "ends_at": r.ends_at,
                "duration_s": end.saturating_sub(r.starts_at),
            })
        })
        .collect();
    Json(out).into_response()
}

/// `GET /api/rules`: the loaded rules and their state (series tracked, pending, firing),
/// as of the engine's last one-second tick.
pub async fn rules(State(api): State<Api>) -> Response {
    Json(api.metrics.rules.lock().unwrap().clone()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn windows_are_validated_and_clamped() {
        let w = window(&q(&[("from", "1000"), ("to", "4600")])).unwrap();
        assert_eq!((w.from, w.to, w.step), (1000, 4600, 4));
        let w = window(&q(&[("from", "0"), ("to", "100"), ("points", "999999")])).unwrap();
        assert_eq!(w.step, 1);
        assert!(window(&q(&[("from", "5"), ("to", "5")])).is_err());
        assert!(window(&q(&[("from", "x'; DROP TABLE cpu")])).is_err());
        assert!(window(&q(&[("points", "-1")])).is_err());
    }

    #[test]
    fn host_names_are_checked() {
        assert!(valid_host("web-1.example.net"));
        assert!(!valid_host("a' OR 1=1"));
        assert!(!valid_host(""));
    }

    #[test]
    fn quantiles_are_bucket_bounds() {
        assert_eq!(quantile(&[1, 2, 4], &[50, 49, 1], 0.5), Some(1));
        assert_eq!(quantile(&[1, 2, 4], &[50, 49, 1], 0.99), Some(2));
        assert_eq!(quantile(&[1, 2, 4], &[50, 49, 1], 0.999), Some(4));
        assert_eq!(quantile(&[], &[], 0.5), None);
    }
}
