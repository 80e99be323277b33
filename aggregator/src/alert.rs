//! Alert stage: every alert transition goes to ClickHouse's `alerts` table and firing /
//! resolved notifications go to the configured sinks — generic JSON webhooks (optionally
//! HMAC-SHA256 signed) and Alertmanager's v2 API. Each sink has its own bounded queue and
//! worker with timeouts and exponential backoff, so a slow receiver never stalls ingest or
//! the other sinks; what cannot be queued or delivered is counted, never silently lost.

use crate::detect::AlertEvent;
use crate::metrics::Metrics;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertingConfig {
    /// Generic JSON webhooks.
    pub webhook: Vec<WebhookConfig>,
    /// Alertmanager instances (base URL, e.g. http://127.0.0.1:9093).
    pub alertmanager: Vec<AlertmanagerConfig>,
    /// Notifications waiting per sink; beyond it new ones are dropped (and counted).
    pub queue: usize,
}

impl Default for AlertingConfig {
    fn default() -> Self {
        AlertingConfig {
            webhook: Vec::new(),
            alertmanager: Vec::new(),
            queue: 10_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub url: String,
    /// When set, each POST carries `X-Sonde-Signature: sha256=<hex HMAC-SHA256 of the body>`.
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Give up on a notification after retrying this long.
    #[serde(default = "default_retry_for", with = "humantime_serde")]
    pub retry_for: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertmanagerConfig {
    pub url: String,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default = "default_retry_for", with = "humantime_serde")]
    pub retry_for: Duration,
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_retry_for() -> Duration {
    Duration::from_secs(3600)
}

pub fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// The documented webhook body.
pub fn webhook_body(e: &AlertEvent) -> serde_json::Value {
    let labels: serde_json::Map<String, serde_json::Value> = e
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    serde_json::json!({
        "version": "1",
        "id": e.id,
        "status": e.state,
        "rule": e.rule,
        "severity": e.severity,
        "host": e.host,
        "labels": labels,
        "value": e.value,
        "threshold": e.threshold,
        "score": e.score,
        "starts_at": rfc3339_ms(e.starts_at_ms),
        "ends_at": e.ends_at_ms.map(rfc3339_ms),
        "repeat": e.repeat,
        "summary": e.summary,
    })
}

/// One alert in Alertmanager's v2 `postableAlert` shape.
pub fn alertmanager_body(e: &AlertEvent) -> serde_json::Value {
    let mut labels = serde_json::Map::new();
    labels.insert("alertname".into(), e.rule.clone().into());
    labels.insert("severity".into(), e.severity.into());
    for (k, v) in &e.labels {
        labels.insert(k.clone(), v.clone().into());
    }
    let mut ann = serde_json::Map::new();
    ann.insert("value".into(), format!("{}", e.value).into());
    if let Some(t) = e.threshold {
        ann.insert("threshold".into(), format!("{t}").into());
    }
    if let Some(s) = e.score {
        ann.insert("score".into(), format!("{s:.3}").into());
    }
    ann.insert("sonde_id".into(), e.id.clone().into());
    if !e.summary.is_empty() {
        ann.insert("summary".into(), e.summary.clone().into());
    }
    let mut a = serde_json::json!({
        "labels": labels,
        "annotations": ann,
        "startsAt": rfc3339_ms(e.starts_at_ms),
    });
    if let Some(end) = e.ends_at_ms {
        a["endsAt"] = rfc3339_ms(end).into();
    }
    a
}

pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    m.update(body);
    format!("sha256={}", hex::encode(m.finalize().into_bytes()))
}

enum SinkKind {
    Webhook { secret: Option<String> },
    Alertmanager,
}

struct Sink {
    name: String,
    url: String,
    kind: SinkKind,
    timeout: Duration,
    retry_for: Duration,
}

/// A notification and when its batch arrived (for the delivery-latency figure).
pub struct Note {
    pub event: Arc<AlertEvent>,
    pub arrived: Option<Instant>,
}

/// Fans alert events out to ClickHouse and the sinks.
#[derive(Clone)]
pub struct Alerter {
    sinks: Vec<(String, mpsc::Sender<Arc<Note>>)>,
    store: Option<mpsc::Sender<Arc<AlertEvent>>>,
    metrics: Arc<Metrics>,
}

impl Alerter {
    pub fn start(
        cfg: &AlertingConfig,
        store: Option<mpsc::Sender<Arc<AlertEvent>>>,
        metrics: Arc<Metrics>,
    ) -> Alerter {
        let client = reqwest::Client::builder()
            .user_agent(concat!("sonde-aggregator/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("http client");
        let mut sinks = Vec::new();
        let mut specs: Vec<Sink> = cfg
            .webhook
            .iter()
            .map(|w| Sink {
                name: format!("webhook {}", w.url),
                url: w.url.clone(),
                kind: SinkKind::Webhook {
                    secret: w.secret.clone(),
                },
                timeout: w.timeout,
                retry_for: w.retry_for,
            })
            .collect();
        specs.extend(cfg.alertmanager.iter().map(|a| Sink {
            name: format!("alertmanager {}", a.url),
            url: format!("{}/api/v2/alerts", a.url.trim_end_matches('/')),
            kind: SinkKind::Alertmanager,
            timeout: a.timeout,
            retry_for: a.retry_for,
        }));
        for s in specs {
            let (tx, rx) = mpsc::channel(cfg.queue.max(1));
            sinks.push((s.name.clone(), tx));
            tokio::spawn(sink_worker(s, rx, client.clone(), metrics.clone()));
        }
        Alerter {
            sinks,
            store,
            metrics,
        }
    }

    pub fn dispatch(&self, e: AlertEvent, arrived: Option<Instant>) {
        self.metrics.alert_events.fetch_add(1, Relaxed);
        let e = Arc::new(e);
        tracing::info!(id = %e.id, rule = %e.rule, state = e.state, host = %e.host, severity = e.severity, value = e.value, repeat = e.repeat, "alert");
        if !e.repeat {
            if let Some(tx) = &self.store {
                if tx.try_send(e.clone()).is_err() {
                    self.metrics.alerts_store_dropped.fetch_add(1, Relaxed);
                }
            }
        }
        if !matches!(e.state, "firing" | "resolved") {
            return;
        }
        let note = Arc::new(Note { event: e, arrived });
        for (name, tx) in &self.sinks {
            if tx.try_send(note.clone()).is_err() {
                self.metrics
                    .alert_notifications_dropped
                    .fetch_add(1, Relaxed);
                tracing::warn!(sink = %name, "notification queue full; notification dropped");
            }
        }
    }
}

async fn sink_worker(
    s: Sink,
    mut rx: mpsc::Receiver<Arc<Note>>,
    client: reqwest::Client,
    metrics: Arc<Metrics>,
) {
    while let Some(note) = rx.recv().await {
        let e = &note.event;
        let body = match s.kind {
            SinkKind::Webhook { .. } => webhook_body(e),
            SinkKind::Alertmanager => serde_json::Value::Array(vec![alertmanager_body(e)]),
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let first = Instant::now();
        let mut backoff = Duration::from_millis(200);
        loop {
            let mut req = client
                .post(&s.url)
                .timeout(s.timeout)
                .header("content-type", "application/json")
                .body(bytes.clone());
            if let SinkKind::Webhook {
                secret: Some(secret),
            } = &s.kind
            {
                req = req.header("X-Sonde-Signature", sign(secret, &bytes));
            }
            req = req.header("X-Sonde-Alert-Id", e.id.as_str());
            let err = match req.send().await {
                Ok(r) if r.status().is_success() => None,
                Ok(r) => Some(format!("HTTP {}", r.status())),
                Err(er) => Some(er.to_string()),
            };
            match err {
                None => {
                    metrics.alert_notifications_sent.fetch_add(1, Relaxed);
                    if let Some(a) = note.arrived {
                        metrics.observe_alert_latency(a.elapsed().as_micros() as u64);
                    }
                    break;
                }
                Some(why) => {
                    metrics.alert_notification_failures.fetch_add(1, Relaxed);
                    if first.elapsed() >= s.retry_for {
                        metrics.alert_notifications_dropped.fetch_add(1, Relaxed);
                        tracing::error!(sink = %s.name, id = %e.id, error = %why, "giving up on a notification after retrying for {:?}", s.retry_for);
                        break;
                    }
                    tracing::warn!(sink = %s.name, id = %e.id, error = %why, retry_in = ?backoff, "notification failed; will retry");
                    // Jitter spreads retries of many aggregators hitting one receiver.
                    let jitter = rand_jitter(backoff);
                    tokio::time::sleep(backoff + jitter).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}

fn rand_jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0) as u64;
    Duration::from_nanos(nanos % (d.as_nanos() as u64 / 5 + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev() -> AlertEvent {
        AlertEvent {
            id: "00ff".into(),
            rule: "cpu busy".into(),
            state: "firing",
            severity: "critical",
            host: "h1".into(),
            labels: vec![("host".into(), "h1".into()), ("cpu".into(), "total".into())],
            value: 93.5,
            threshold: Some(80.0),
            score: None,
            starts_at_ms: 1_700_000_000_000,
            ends_at_ms: None,
            at_ms: 1_700_000_005_000,
            repeat: false,
            summary: String::new(),
        }
    }

    #[test]
    fn webhook_payload_and_signature() {
        let b = webhook_body(&ev());
        assert_eq!(b["status"], "firing");
        assert_eq!(b["labels"]["cpu"], "total");
        assert_eq!(b["threshold"], 80.0);
        assert_eq!(b["starts_at"], "2023-11-14T22:13:20.000Z");
        assert!(b["ends_at"].is_null());
        // RFC 4231 test case 2.
        assert_eq!(
            sign("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn alertmanager_payload() {
        let mut e = ev();
        e.state = "resolved";
        e.ends_at_ms = Some(1_700_000_060_000);
        let a = alertmanager_body(&e);
        assert_eq!(a["labels"]["alertname"], "cpu busy");
        assert_eq!(a["labels"]["severity"], "critical");
        assert_eq!(a["annotations"]["sonde_id"], "00ff");
        assert_eq!(a["endsAt"], "2023-11-14T22:14:20.000Z");
    }
}
