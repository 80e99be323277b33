//! Counters exported at /metrics in Prometheus text format.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

const BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Default)]
pub struct Metrics {
    pub batches_received: AtomicU64,
    pub batches_stored: AtomicU64,
    pub batches_duplicate: AtomicU64,
    pub batches_failed: AtomicU64,
    pub batches_deferred: AtomicU64,
    pub batches_awaited: AtomicU64,
    pub bytes_received: AtomicU64,
    pub samples_stored: AtomicU64,
    pub rows_inserted: AtomicU64,
    pub insert_errors: AtomicU64,
    pub decode_errors: AtomicU64,
    pub connections_accepted: AtomicU64,
    pub connections_rejected: AtomicU64,
    pub sensors_connected: AtomicU64,
    pub queue_depth: AtomicU64,
    pub rounds_in_flight: AtomicU64,
    pub quorum_retries: AtomicU64,
    pub rounds_overlapped: AtomicU64,
    pub clickhouse_down: AtomicU64,
    pub schema_change_hold: AtomicU64,
    pub gaps_reported: AtomicU64,
    pub gaps_stored: AtomicU64,
    pub streams_waiting: AtomicU64,
    insert_buckets: [AtomicU64; 11],
    insert_count: AtomicU64,
    insert_sum_us: AtomicU64,
    pub alert_events: AtomicU64,
    pub alert_notifications_sent: AtomicU64,
    pub alert_notification_failures: AtomicU64,
    pub alert_notifications_dropped: AtomicU64,
    pub alerts_store_dropped: AtomicU64,
    pub detect_evaluations: AtomicU64,
    pub detect_replayed_skipped: AtomicU64,
    pub detect_dropped: AtomicU64,
    pub detect_series: AtomicU64,
    pub detect_state_bytes: AtomicU64,
    pub detect_hosts_warmed: AtomicU64,
    pub detect_warm_samples: AtomicU64,
    pub detect_hosts_caught_up: AtomicU64,
    pub detect_hosts_cold: AtomicU64,
    pub detect_hosts_waiting: AtomicU64,
    pub detect_alerts_held: AtomicU64,
    /// Batch arrival → notification POST answered, microseconds (recent samples for p50/p99).
    pub alert_latency_us: Mutex<std::collections::VecDeque<u64>>,
    /// Last time (Unix seconds) each host's batch was stored.
    pub last_seen: Mutex<HashMap<String, u32>>,
    /// The detection engine's rules and their state, refreshed every second (`/api/rules`).
    pub rules: Mutex<Vec<serde_json::Value>>,
}

impl Metrics {
    pub fn observe_insert(&self, secs: f64) {
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.insert_buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.insert_count.fetch_add(1, Relaxed);
        self.insert_sum_us.fetch_add((secs * 1e6) as u64, Relaxed);
    }

    pub fn observe_alert_latency(&self, us: u64) {
        let mut l = self.alert_latency_us.lock().unwrap();
        if l.len() >= 1000 {
            l.pop_front();
        }
        l.push_back(us);
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        let c = |s: &mut String, name: &str, help: &str, kind: &str, v: u64| {
            let _ = writeln!(
                s,
                "# HELP sonde_{name} {help}\n# TYPE sonde_{name} {kind}\nsonde_{name} {v}"
            );
        };
        c(
            &mut s,
            "batches_received_total",
            "Batches decoded from sensors.",
            "counter",
            self.batches_received.load(Relaxed),
        );
        c(
            &mut s,
            "batches_stored_total",
            "Batches committed to ClickHouse and acknowledged.",
            "counter",
            self.batches_stored.load(Relaxed),
        );
        c(
            &mut s,
            "batches_duplicate_total",
            "Batches already stored (acknowledged, not stored again).",
            "counter",
            self.batches_duplicate.load(Relaxed),
        );
        c(
            &mut s,
            "batches_deferred_total",
            "Batches whose sensor connection closed before they were stored: stored once ClickHouse has answered for 60 s without a break, unless another aggregator stored them meanwhile.",
            "counter",
            self.batches_deferred.load(Relaxed),
        );
        c(
            &mut s,
            "batches_awaited_total",
            "Batches another aggregator was still inserting when they arrived here (their sensor moved): stored, or found stored, once that insert ended.",
            "counter",
            self.batches_awaited.load(Relaxed),
        );
        c(
            &mut s,
            "batches_failed_total",
            "Batches not stored (the sensor retries).",
            "counter",
            self.batches_failed.load(Relaxed),
        );
        c(
            &mut s,
            "bytes_received_total",
            "Compressed batch bytes received.",
            "counter",
            self.bytes_received.load(Relaxed),
        );
        c(
            &mut s,
            "samples_stored_total",
            "Samples (one value of one series at one time) stored.",
            "counter",
            self.samples_stored.load(Relaxed),
        );
        c(
            &mut s,
            "rows_inserted_total",
            "Rows inserted into ClickHouse.",
            "counter",
            self.rows_inserted.load(Relaxed),
        );
        c(
            &mut s,
            "insert_errors_total",
            "Failed ClickHouse insert rounds.",
            "counter",
            self.insert_errors.load(Relaxed),
        );
        c(
            &mut s,
            "decode_errors_total",
            "Malformed frames (the connection is closed).",
            "counter",
            self.decode_errors.load(Relaxed),
        );
        c(
            &mut s,
            "connections_accepted_total",
            "Sensor connections authenticated.",
            "counter",
            self.connections_accepted.load(Relaxed),
        );
        c(
            &mut s,
            "connections_rejected_total",
            "Connections refused in the handshake (bad or missing certificate).",
            "counter",
            self.connections_rejected.load(Relaxed),
        );
        c(
            &mut s,
            "sensors_connected",
            "Sensors connected now.",
            "gauge",
            self.sensors_connected.load(Relaxed),
        );
        c(
            &mut s,
            "queue_depth",
            "Decoded batches waiting for the writer.",
            "gauge",
            self.queue_depth.load(Relaxed),
        );
        c(
            &mut s,
            "insert_rounds_in_flight",
            "Insert rounds being written to ClickHouse now (at most clickhouse.insert_rounds).",
            "gauge",
            self.rounds_in_flight.load(Relaxed),
        );
        c(
            &mut s,
            "insert_rounds_overlapped_total",
            "Insert rounds started while another was still being written (clickhouse.insert_rounds > 1).",
            "counter",
            self.rounds_overlapped.load(Relaxed),
        );
        c(
            &mut s,
            "quorum_retries_total",
            "Insert rounds retried because another quorum insert into the same table was pending (ClickHouse < 20.10 on a cluster).",
            "counter",
            self.quorum_retries.load(Relaxed),
        );
        c(
            &mut s,
            "clickhouse_down",
            "1 while ClickHouse is unreachable (ingest is held, sensors spool).",
            "gauge",
            self.clickhouse_down.load(Relaxed),
        );
        c(
            &mut s,
            "schema_change_hold",
            "1 while inserts are held because another aggregator is changing the schema (sensors spool).",
            "gauge",
            self.schema_change_hold.load(Relaxed),
        );
        c(
            &mut s,
            "gaps_reported_total",
            "Gaps (batches a sensor dropped because its spool was full) recorded.",
            "counter",
            self.gaps_reported.load(Relaxed),
        );
        c(
            &mut s,
            "gaps_stored_total",
            "Gaps a sensor reported whose batches were stored after all (sent, their ack lost, then dropped from its spool): not recorded.",
            "counter",
            self.gaps_stored.load(Relaxed),
        );
        c(
            &mut s,
            "streams_waiting",
            "Batch streams not read yet because the ingest queue is full (backpressure).",
            "gauge",
            self.streams_waiting.load(Relaxed),
        );
        for (name, help, kind, v) in [
            (
                "alert_events_total",
                "Alert transitions and repeats produced by detection.",
                "counter",
                &self.alert_events,
            ),
            (
                "alert_notifications_sent_total",
                "Notifications accepted by a webhook or Alertmanager.",
                "counter",
                &self.alert_notifications_sent,
            ),
            (
                "alert_notification_failures_total",
                "Notification attempts that failed (each retry counts).",
                "counter",
                &self.alert_notification_failures,
            ),
            (
                "alert_notifications_dropped_total",
                "Notifications dropped: sink queue full or retries exhausted.",
                "counter",
                &self.alert_notifications_dropped,
            ),
            (
                "alerts_store_dropped_total",
                "Alert rows not written to ClickHouse (queue full).",
                "counter",
                &self.alerts_store_dropped,
            ),
            (
                "detect_evaluations_total",
                "Samples evaluated by detection rules.",
                "counter",
                &self.detect_evaluations,
            ),
            (
                "detect_replayed_skipped_total",
                "Live samples a detector did not judge because it had replayed them from the host's stored history (a batch that reached detection after a newer one).",
                "counter",
                &self.detect_replayed_skipped,
            ),
            (
                "detect_dropped_total",
                "Batches not evaluated by detection because its queue was full.",
                "counter",
                &self.detect_dropped,
            ),
            (
                "detect_series",
                "Series with detector state.",
                "gauge",
                &self.detect_series,
            ),
            (
                "detect_state_bytes",
                "Approximate memory held by detector state.",
                "gauge",
                &self.detect_state_bytes,
            ),
            (
                "detect_hosts_warmed_total",
                "Hosts new to this aggregator (a move, a restart) whose statistical detectors replayed their stored history before their first batch was evaluated.",
                "counter",
                &self.detect_hosts_warmed,
            ),
            (
                "detect_hosts_caught_up_total",
                "Hosts that started without their history (too many at once) whose statistical detectors later caught up with it.",
                "counter",
                &self.detect_hosts_caught_up,
            ),
            (
                "detect_warm_samples_total",
                "Samples of stored history replayed into detectors of hosts new to this aggregator.",
                "counter",
                &self.detect_warm_samples,
            ),
            (
                "detect_hosts_cold_total",
                "Hosts new to this aggregator whose detectors started without their history (ClickHouse did not answer in time, or too many hosts arrived at once).",
                "counter",
                &self.detect_hosts_cold,
            ),
            (
                "detect_hosts_waiting",
                "Hosts whose first batches wait while their alerts and history are read.",
                "gauge",
                &self.detect_hosts_waiting,
            ),
            (
                "detect_alerts_held",
                "Alert events of hosts judged here before their firing alerts could be read, held (neither stored nor notified) until they are or for at most 60 s.",
                "gauge",
                &self.detect_alerts_held,
            ),
        ] {
            c(&mut s, name, help, kind, v.load(Relaxed));
        }
        {
            let lat = self.alert_latency_us.lock().unwrap();
            let mut v: Vec<u64> = lat.iter().copied().collect();
            v.sort_unstable();
            let q = |p: f64| -> f64 {
                if v.is_empty() {
                    0.0
                } else {
                    v[((v.len() - 1) as f64 * p).round() as usize] as f64 / 1e6
                }
            };
            let _ = writeln!(s, "# HELP sonde_alert_delivery_seconds Batch arrival to notification delivered, over the last 1000 notifications.\n# TYPE sonde_alert_delivery_seconds summary");
            let _ = writeln!(
                s,
                "sonde_alert_delivery_seconds{{quantile=\"0.5\"}} {}",
                q(0.5)
            );
            let _ = writeln!(
                s,
                "sonde_alert_delivery_seconds{{quantile=\"0.99\"}} {}",
                q(0.99)
            );
            let _ = writeln!(s, "sonde_alert_delivery_seconds_count {}", v.len());
        }
        let _ = writeln!(s, "# HELP sonde_insert_duration_seconds Time of one insert round into ClickHouse.\n# TYPE sonde_insert_duration_seconds histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                s,
                "sonde_insert_duration_seconds_bucket{{le=\"{b}\"}} {}",
                self.insert_buckets[i].load(Relaxed)
            );
        }
        let n = self.insert_count.load(Relaxed);
        let _ = writeln!(s, "sonde_insert_duration_seconds_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(
            s,
            "sonde_insert_duration_seconds_sum {}",
            self.insert_sum_us.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(s, "sonde_insert_duration_seconds_count {n}");
        s
    }
}
