//! HTTP: /healthz, /readyz, /metrics, /api/hosts.

use crate::metrics::Metrics;
use crate::store::Store;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use axum::Router;
use clickhouse::Row;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Clone)]
pub struct Api {
    pub store: Store,
    pub metrics: Arc<Metrics>,
}

pub fn router(api: Api) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/hosts", get(hosts))
        .with_state(api)
}

async fn readyz(State(api): State<Api>) -> Response {
    if api.store.ready().await {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "ClickHouse unreachable or schema not current\n",
        )
            .into_response()
    }
}

async fn metrics(State(api): State<Api>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        api.metrics.render(),
    )
        .into_response()
}

#[derive(Row, Deserialize)]
struct HostDbRow {
    host: String,
    first_seen: u32,
    last_seen: u32,
    sensor_version: String,
    kernel: String,
    os: String,
    arch: String,
    cpus: u32,
    memory_bytes: u64,
    probes: String,
}

#[derive(Serialize)]
struct HostJson {
    host: String,
    first_seen: String,
    last_seen: String,
    last_seen_unix: u32,
    sensor_version: String,
    kernel: String,
    os: String,
    arch: String,
    cpus: u32,
    memory_bytes: u64,
    /// Active eBPF probes, comma-separated.
    probes: String,
}

fn rfc3339(t: u32) -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(t as u64),
    )
    .to_string()
}

async fn hosts(State(api): State<Api>) -> Response {
    let q = format!(
        "SELECT host, toUInt32(min(first_seen)) AS first_ts, toUInt32(max(last_seen)) AS last_ts, \
         argMax(sensor_version, last_seen) AS v, argMax(kernel, last_seen) AS k, \
         argMax(os, last_seen) AS o, argMax(arch, last_seen) AS a, argMax(cpus, last_seen) AS c, \
         argMax(memory_bytes, last_seen) AS m, argMax(probes, last_seen) AS p FROM {}.hosts GROUP BY host ORDER BY host",
        api.store.db
    );
    let rows: Vec<HostDbRow> = match api.store.client.query(&q).fetch_all().await {
        Ok(r) => r,
        Err(e) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({ "error": e.to_string() })),
            )
                .into_response()
        }
    };
    let live = api.metrics.last_seen.lock().unwrap().clone();
    let out: Vec<HostJson> = rows
        .into_iter()
        .map(|r| {
            let last = live.get(&r.host).copied().unwrap_or(0).max(r.last_seen);
            HostJson {
                first_seen: rfc3339(r.first_seen),
                last_seen: rfc3339(last),
                last_seen_unix: last,
                host: r.host,
                sensor_version: r.sensor_version,
                kernel: r.kernel,
                os: r.os,
                arch: r.arch,
                cpus: r.cpus,
                memory_bytes: r.memory_bytes,
                probes: r.probes,
            }
        })
        .collect();
    Json(out).into_response()
}
