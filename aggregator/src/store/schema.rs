//! The ClickHouse schema, generated for the server generation at hand.
//!
//! One column list per table drives the DDL for both generations: on
//! 18.x-era servers plain types; on current servers LowCardinality label
//! columns, per-column codecs and a TTL.

/// Column kinds; the SQL type and codec follow from the kind.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Ts,
    /// A label people filter and group by (host, device, ...).
    Label,
    Text,
    F32,
    U32,
    U64,
    /// Array(UInt64), for histogram buckets.
    ArrU64,
}

pub struct Table {
    pub name: &'static str,
    pub columns: &'static [(&'static str, Kind)],
    /// Sort key after `host` and before `ts`.
    pub key: &'static [&'static str],
}

use Kind::*;

pub const METRIC_TABLES: &[Table] = &[
    Table {
        name: "cpu",
        columns: &[
            ("ts", Ts),
            ("host", Label),
            ("cpu", Label),
            ("user", F32),
            ("nice", F32),
            ("system", F32),
            ("idle", F32),
            ("iowait", F32),
            ("irq", F32),
            ("softirq", F32),
            ("steal", F32),
            ("guest", F32),
        ],
        key: &["cpu"],
    },
    Table {
        name: "system",
        columns: &[
            ("ts", Ts),
            ("host", Label),
            ("load1", F32),
            ("load5", F32),
            ("load15", F32),
            ("ctxt_per_s", F32),
            ("forks_per_s", F32),
            ("interrupts_per_s", F32),
            ("procs_running", U32),
            ("procs_blocked", U32),
        ],
        key: &[],
    },
    Table {
        name: "memory",
        columns: &[
            ("ts", Ts),
            ("host", Label),
            ("total", U64),
            ("available", U64),
            ("free", U64),
            ("buffers", U64),
            ("cached", U64),
            ("dirty", U64),
            ("swap_total", U64),
            ("swap_free", U64),
            ("page_faults_per_s", F32),
            ("major_faults_per_s", F32),
            ("swap_in_per_s", F32),
            ("swap_out_per_s", F32),
            ("oom_kills_per_s", F32),
        ],
        key: &[],
    },
    Table {
        name: "pressure",
        columns: &[
            ("ts", Ts),
            ("host", Label),
            ("resource", Label),
            ("some_avg10", F32),
            ("some_avg60", F32),
            ("some_avg300", F32),
            ("some_stall_pct", F32),
            ("full_avg10", F32),
            ("full_avg60", F32),
            ("full_avg300", F32),
            ("full_stall_pct", F32),
        ],
        key: &["resource"],
    },
    Table {
        name: "disk",
        columns: &[
            ("ts", Ts),
            ("host", Label),
            ("device", Label),
            ("reads_per_s", F32),
            ("writes_per_s", F32),
            ("read_bytes_per_s", F32),
            ("write_bytes_per_s", F32),
            ("r_await_ms", F32),
            ("w_await_ms", F32),
            ("util_pct", F32),
            ("in_flight", U32),
        ],
        key: &["device"],
    },
    Table {
        name: "filesystem",
        columns: &[
            ("ts", Ts),
            ("host", Label),
            ("mount", Label),
            ("device", Label),
            ("fstype", Label),
            ("size_bytes", U64),
            ("used_bytes", U64),
            ("avail_bytes", U64),
            ("inodes_total", U64),
            ("inodes_used", U64),
        ],
        key: &["mount"],
    },
    Table {
        name: "net",
        columns: &[
            ("ts", Ts),
            ("host", Label),
            ("interface", Label),
            ("rx_bytes_per_s", F32),
            ("tx_bytes_per_s", F32),
            ("rx_packets_per_s", F32),
            ("tx_packets_per_s", F32),
            ("rx_errors_per_s", F32),
            ("tx_errors_per_s", F32),
            ("rx_drops_per_s", F32),
            ("tx_drops_per_s", F32),
        ],
        key: &["interface"],
    },
    Table {
        name: "tcp",
        columns: &[
            ("ts", Ts),
            ("host", Label),
            ("retrans_segs_per_s", F32),
            ("active_opens_per_s", F32),
            ("passive_opens_per_s", F32),
            ("attempt_fails_per_s", F32),
            ("estab_resets_per_s", F32),
            ("out_rsts_per_s", F32),
            ("in_errs_per_s", F32),
            ("in_segs_per_s", F32),
            ("out_segs_per_s", F32),
            ("curr_estab", U32),
            ("udp_in_datagrams_per_s", F32),
            ("udp_out_datagrams_per_s", F32),
            ("udp_in_errors_per_s", F32),
            ("udp_rcvbuf_errors_per_s", F32),
            ("udp_no_ports_per_s", F32),
        ],
        key: &[],
    },
];

/// Tables filled by the eBPF probes (migration 2).
pub const EBPF_TABLES: &[Table] = &[
    Table {
        name: "latency",
        columns: &[
            ("ts", Ts),
            ("host", Label),
            ("source", Label),
            ("unit", Label),
            ("count", U64),
            ("sum", U64),
            ("bucket_upper", ArrU64),
            ("bucket_count", ArrU64),
        ],
        key: &["source"],
    },
    Table {
        name: "events",
        columns: &[
            ("ts", Ts),
            ("host", Label),
            ("kind", Label),
            ("pid", U32),
            ("comm", Label),
            ("cgroup", Text),
            ("detail", Text),
        ],
        key: &["kind"],
    },
    Table {
        name: "probes",
        columns: &[
            ("ts", Ts),
            ("host", Label),
            ("execs_per_s", F32),
            ("exits_per_s", F32),
            ("short_lived_per_s", F32),
            ("retransmits_per_s", F32),
            ("resets_sent_per_s", F32),
            ("resets_received_per_s", F32),
            ("oom_kills", U32),
        ],
        key: &[],
    },
    Table {
        name: "tcp_ports",
        columns: &[
            ("ts", Ts),
            ("host", Label),
            ("port", U32),
            ("retransmits", U32),
        ],
        key: &["port"],
    },
];

/// Every table with day partitions (retention drops these on old servers).
pub fn partitioned_tables() -> impl Iterator<Item = &'static str> {
    METRIC_TABLES
        .iter()
        .chain(EBPF_TABLES)
        .map(|t| t.name)
        .chain(["batches", "alerts", "gaps", "batch_intents"])
}

/// Whether a server supports codecs, TTL and LowCardinality without
/// experimental settings (20.3 LTS and later).
pub fn is_modern(version: &str) -> bool {
    let mut it = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    (major, minor) >= (20, 3)
}

fn col_type(kind: Kind, modern: bool) -> &'static str {
    match (kind, modern) {
        (Ts, false) => "DateTime",
        (Ts, true) => "DateTime CODEC(Delta, ZSTD(1))",
        (Label, false) | (Text, _) => "String",
        (Label, true) => "LowCardinality(String)",
        (F32, false) => "Float32",
        (F32, true) => "Float32 CODEC(Gorilla, ZSTD(1))",
        (U32, false) => "UInt32",
        (U32, true) => "UInt32 CODEC(T64, ZSTD(1))",
        (U64, false) => "UInt64",
        (U64, true) => "UInt64 CODEC(T64, ZSTD(1))",
        (ArrU64, false) => "Array(UInt64)",
        (ArrU64, true) => "Array(UInt64) CODEC(ZSTD(1))",
    }
}

pub struct Ddl<'a> {
    pub db: &'a str,
    pub modern: bool,
    pub retention_days: u32,
}

impl Ddl<'_> {
    fn ttl(&self, col: &str) -> String {
        if self.modern && self.retention_days > 0 {
            format!("\nTTL {col} + INTERVAL {} DAY", self.retention_days)
        } else {
            String::new()
        }
    }

    pub fn metric_table(&self, t: &Table) -> String {
        let cols: Vec<String> = t
            .columns
            .iter()
            .map(|(n, k)| format!("    `{n}` {}", col_type(*k, self.modern)))
            .collect();
        let mut order = vec!["host"];
        order.extend_from_slice(t.key);
        order.push("ts");
        format!(
            "CREATE TABLE IF NOT EXISTS {}.{} (\n{}\n) ENGINE = MergeTree()\nPARTITION BY toDate(ts)\nORDER BY ({}){}",
            self.db,
            t.name,
            cols.join(",\n"),
            order.join(", "),
            self.ttl("ts")
        )
    }

    pub fn hosts(&self) -> String {
        let l = col_type(Label, self.modern);
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.hosts (\n    `host` {l},\n    `first_seen` DateTime,\n    `last_seen` DateTime,\n    \
             `sensor_version` String,\n    `kernel` String,\n    `os` String,\n    `arch` {l},\n    `cpus` UInt32,\n    \
             `memory_bytes` UInt64,\n    `kernel_boot_id` String,\n    `sensor_boot_id` String\n) ENGINE = ReplacingMergeTree(last_seen)\nORDER BY host",
            db = self.db
        )
    }

    pub fn batches(&self) -> String {
        let l = col_type(Label, self.modern);
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.batches (\n    `host` {l},\n    `sensor_boot_id` String,\n    `seq` UInt64,\n    \
             `received` DateTime,\n    `snapshots` UInt32,\n    `samples` UInt32,\n    `bytes` UInt32\n) ENGINE = MergeTree()\n\
             PARTITION BY toDate(received)\nORDER BY (host, sensor_boot_id, seq){}",
            self.ttl("received"),
            db = self.db
        )
    }

    pub fn alerts(&self) -> String {
        let l = col_type(Label, self.modern);
        let ts = col_type(Ts, self.modern);
        let (f64c, nf64) = if self.modern {
            (
                "Float64 CODEC(Gorilla, ZSTD(1))",
                "Nullable(Float64) CODEC(ZSTD(1))",
            )
        } else {
            ("Float64", "Nullable(Float64)")
        };
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.alerts (\n    `ts` {ts},\n    `alert_id` String,\n    `rule` {l},\n    \
             `host` {l},\n    `state` {l},\n    `severity` {l},\n    `labels` String,\n    `value` {f64c},\n    \
             `threshold` {nf64},\n    `score` {nf64},\n    `starts_at` DateTime,\n    \
             `ends_at` Nullable(DateTime)\n) ENGINE = MergeTree()\nPARTITION BY toDate(ts)\nORDER BY (rule, host, ts){}",
            self.ttl("ts"),
            db = self.db
        )
    }

    /// Batches a sensor dropped for good (its spool was full), as ranges.
    pub fn gaps(&self) -> String {
        let l = col_type(Label, self.modern);
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.gaps (\n    `host` {l},\n    `sensor_boot_id` String,\n    `first_seq` UInt64,\n    \
             `last_seq` UInt64,\n    `from_ts` DateTime,\n    `to_ts` DateTime,\n    `batches` UInt64,\n    `samples` UInt64,\n    \
             `received` DateTime\n) ENGINE = ReplacingMergeTree(received)\nPARTITION BY toDate(from_ts)\n\
             ORDER BY (host, sensor_boot_id, first_seq){}",
            self.ttl("from_ts"),
            db = self.db
        )
    }

    /// Written before a round's rows: a batch here but not in `batches` may be
    /// partly stored (the aggregator died or ClickHouse failed mid-round); its rows
    /// are then checked table by table before they are inserted again.
    pub fn batch_intents(&self) -> String {
        let l = col_type(Label, self.modern);
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.batch_intents (\n    `host` {l},\n    `sensor_boot_id` String,\n    `seq` UInt64,\n    \
             `created` DateTime\n) ENGINE = MergeTree()\nPARTITION BY toDate(created)\nORDER BY (host, sensor_boot_id, seq){}",
            self.ttl("created"),
            db = self.db
        )
    }

    /// Versioned migrations, applied in order and recorded in `schema_migrations`.
    pub fn migrations(&self) -> Vec<(u32, &'static str, Vec<String>)> {
        let mut v1: Vec<String> = METRIC_TABLES.iter().map(|t| self.metric_table(t)).collect();
        v1.push(self.hosts());
        v1.push(self.batches());
        let mut v2: Vec<String> = EBPF_TABLES.iter().map(|t| self.metric_table(t)).collect();
        v2.push(format!(
            "ALTER TABLE {}.hosts ADD COLUMN probes String",
            self.db
        ));
        vec![
            (1, "metric tables, hosts, batches", v1),
            (
                2,
                "eBPF tables (latency, events, probes, tcp_ports), hosts.probes",
                v2,
            ),
            (3, "alerts", vec![self.alerts()]),
            (
                4,
                "gaps, batch_intents",
                vec![self.gaps(), self.batch_intents()],
            ),
        ]
    }

    pub fn migrations_table(&self) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {}.schema_migrations (`version` UInt32, `name` String, `applied` DateTime) \
             ENGINE = MergeTree() ORDER BY version",
            self.db
        )
    }
}

pub const SCHEMA_VERSION: u32 = 4;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert!(!is_modern("18.16.1"));
        assert!(!is_modern("19.17.4.11"));
        assert!(is_modern("20.3.1"));
        assert!(is_modern("26.9.1.1"));
    }

    #[test]
    fn old_ddl_has_no_modern_extras() {
        let d = Ddl {
            db: "sonde",
            modern: false,
            retention_days: 30,
        };
        for (_, _, stmts) in d.migrations() {
            for s in stmts {
                assert!(
                    !s.contains("CODEC") && !s.contains("TTL") && !s.contains("LowCardinality"),
                    "{s}"
                );
            }
        }
        let m = Ddl {
            db: "sonde",
            modern: true,
            retention_days: 30,
        };
        let cpu = m.metric_table(&METRIC_TABLES[0]);
        assert!(
            cpu.contains("LowCardinality(String)")
                && cpu.contains("TTL ts + INTERVAL 30 DAY")
                && cpu.contains("ORDER BY (host, cpu, ts)"),
            "{cpu}"
        );
    }

    #[test]
    fn migration_versions_increase() {
        let d = Ddl {
            db: "x",
            modern: false,
            retention_days: 0,
        };
        let m = d.migrations();
        assert!(m.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(m.last().unwrap().0, SCHEMA_VERSION);
    }
}
