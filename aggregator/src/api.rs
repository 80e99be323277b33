//! HTTP: /healthz, /readyz, /metrics, /api/hosts.

use crate::metrics::Metrics;
use crate::store::StoreHandle;
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
    pub store: StoreHandle,
    pub metrics: Arc<Metrics>,
    /// When set, `/api/*` (and `/metrics` unless `open_metrics`) need `Authorization: Bearer <token>`.
    pub token: Option<Arc<str>>,
    pub open_metrics: bool,
    /// Console sessions (cookie id -> expiry), created by `POST /login` with the token.
    pub sessions: Arc<std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>>,
}

/// How long a console session lasts.
const SESSION_TTL: std::time::Duration = std::time::Duration::from_secs(12 * 3600);
const SESSION_COOKIE: &str = "sonde_session";

impl Api {
    fn session_valid(&self, cookies: Option<&str>) -> bool {
        let Some(id) = cookies.and_then(|c| {
            c.split(';')
                .filter_map(|kv| kv.trim().split_once('='))
                .find(|(k, _)| *k == SESSION_COOKIE)
                .map(|(_, v)| v.to_string())
        }) else {
            return false;
        };
        let now = std::time::Instant::now();
        let s = self.sessions.lock().unwrap();
        s.iter()
            .any(|(k, exp)| same(k.as_bytes(), id.as_bytes()) && *exp > now)
    }
}

/// Constant-time comparison, so a wrong token's timing tells nothing about the right one.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether a request for `path` with this Authorization header may proceed.
pub fn authorized(token: Option<&str>, open_metrics: bool, path: &str, auth: Option<&str>) -> bool {
    let Some(token) = token else { return true };
    let guarded = path.starts_with("/api/") || (path == "/metrics" && !open_metrics);
    if !guarded {
        return true;
    }
    auth.and_then(|h| h.strip_prefix("Bearer "))
        .is_some_and(|t| same(t.trim().as_bytes(), token.as_bytes()))
}

async fn auth(
    State(api): State<Api>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let header = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let cookie = req
        .headers()
        .get(axum::http::header::COOKIE)
        .and_then(|v| v.to_str().ok());
    if authorized(
        api.token.as_deref(),
        api.open_metrics,
        req.uri().path(),
        header,
    ) || (req.uri().path().starts_with("/api/") && api.session_valid(cookie))
    {
        next.run(req).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", "Bearer")],
            "a bearer token is required (Authorization: Bearer <token>)\n",
        )
            .into_response()
    }
}

pub fn router(api: Api) -> Router {
    Router::new()
        .route("/", get(console_page))
        .route("/login", axum::routing::post(login))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/hosts", get(hosts))
        .route("/api/hosts/{host}/series", get(crate::console::series))
        .route("/api/hosts/{host}/heatmap", get(crate::console::heatmap))
        .route("/api/hosts/{host}/forecast", get(crate::console::forecast))
        .route("/api/alerts", get(crate::console::alerts))
        .route("/api/fleet/series", get(crate::console::fleet_series))
        .route("/api/rules", get(crate::console::rules))
        .layer(axum::middleware::from_fn_with_state(api.clone(), auth))
        .with_state(api)
}

/// The console: one embedded page (no data in it; it reads `/api/*`).
async fn console_page() -> Response {
    (
        [
            ("content-type", "text/html; charset=utf-8"),
            ("cache-control", "no-cache"),
            (
                "content-security-policy",
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:",
            ),
            ("x-frame-options", "DENY"),
        ],
        include_str!("console/index.html"),
    )
        .into_response()
}

#[derive(Deserialize)]
struct LoginBody {
    token: String,
}

/// `POST /login {"token": "…"}`: with the API token, a session cookie for the console
/// (HttpOnly, SameSite=Strict, 12 h). A wrong token waits half a second.
async fn login(State(api): State<Api>, body: axum::body::Bytes) -> Response {
    let Some(token) = api.token.as_deref() else {
        return (StatusCode::OK, "no token configured\n").into_response();
    };
    let given = serde_json::from_slice::<LoginBody>(&body)
        .map(|b| b.token)
        .unwrap_or_default();
    if !same(given.trim().as_bytes(), token.as_bytes()) {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        return (StatusCode::UNAUTHORIZED, "wrong token\n").into_response();
    }
    let mut raw = [0u8; 32];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut raw))
        .is_err()
    {
        return (StatusCode::INTERNAL_SERVER_ERROR, "no randomness\n").into_response();
    }
    let id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    {
        let now = std::time::Instant::now();
        let mut s = api.sessions.lock().unwrap();
        s.retain(|_, exp| *exp > now);
        if s.len() >= 10_000 {
            return (StatusCode::SERVICE_UNAVAILABLE, "too many sessions\n").into_response();
        }
        s.insert(id.clone(), now + SESSION_TTL);
    }
    (
        StatusCode::OK,
        [(
            "set-cookie",
            format!(
                "{SESSION_COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
                SESSION_TTL.as_secs()
            ),
        )],
        "ok\n",
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::authorized;

    #[test]
    fn bearer_token_guards_api_only() {
        assert!(authorized(None, true, "/api/hosts", None));
        let t = Some("s3cret");
        assert!(!authorized(t, true, "/api/hosts", None));
        assert!(!authorized(t, true, "/api/hosts", Some("Bearer wrong")));
        assert!(!authorized(t, true, "/api/hosts", Some("Basic s3cret")));
        assert!(authorized(t, true, "/api/hosts", Some("Bearer s3cret")));
        assert!(authorized(t, true, "/healthz", None));
        assert!(authorized(t, true, "/readyz", None));
        assert!(authorized(t, true, "/metrics", None));
        assert!(!authorized(t, false, "/metrics", None));
        assert!(authorized(t, false, "/metrics", Some("Bearer s3cret")));
    }
}

async fn readyz(State(api): State<Api>) -> Response {
    let Some(store) = api.store.get() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "ClickHouse not ready (ingest held, sensors spool): {}\n",
                api.store.why()
            ),
        )
            .into_response();
    };
    if store.ready().await {
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
    /// The host's labels (its sensor's `labels`), as of its latest batch that carried them.
    labels: std::collections::BTreeMap<String, String>,
}

fn rfc3339(t: u32) -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(t as u64),
    )
    .to_string()
}

async fn hosts(State(api): State<Api>) -> Response {
    let Some(store) = api.store.get() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "error": format!("ClickHouse not ready: {}", api.store.why()) })),
        )
            .into_response();
    };
    let q = format!(
        "SELECT host, toUInt32(min(first_seen)) AS first_ts, toUInt32(max(last_seen)) AS last_ts, \
         argMax(sensor_version, last_seen) AS v, argMax(kernel, last_seen) AS k, \
         argMax(os, last_seen) AS o, argMax(arch, last_seen) AS a, argMax(cpus, last_seen) AS c, \
         argMax(memory_bytes, last_seen) AS m, argMax(probes, last_seen) AS p FROM {}.hosts GROUP BY host ORDER BY host",
        store.db
    );
    let rows: Vec<HostDbRow> = match store.client.query(&q).fetch_all().await {
        Ok(r) => r,
        Err(e) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({ "error": e.to_string() })),
            )
                .into_response()
        }
    };
    #[derive(Row, Deserialize)]
    struct LabelsRow {
        host: String,
        names: Vec<String>,
        values: Vec<String>,
    }
    let lq = format!(
        "SELECT toString(host) AS h, groupArray(name) AS names, groupArray(value) AS vals FROM {db}.host_labels \
         WHERE (host, ts) IN (SELECT host, max(ts) FROM {db}.host_labels GROUP BY host) GROUP BY h",
        db = store.db
    );
    let mut labels: std::collections::HashMap<String, std::collections::BTreeMap<String, String>> =
        match store.client.query(&lq).fetch_all::<LabelsRow>().await {
            Ok(rows) => rows
                .into_iter()
                .map(|r| (r.host, r.names.into_iter().zip(r.values).collect()))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "reading host labels");
                Default::default()
            }
        };
    let live = api.metrics.last_seen.lock().unwrap().clone();
    let out: Vec<HostJson> = rows
        .into_iter()
        .map(|r| {
            let last = live.get(&r.host).copied().unwrap_or(0).max(r.last_seen);
            let host_labels = labels.remove(&r.host).unwrap_or_default();
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
                labels: host_labels,
            }
        })
        .collect();
    Json(out).into_response()
}
