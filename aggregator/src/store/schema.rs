//! The ClickHouse schema, generated for the server generation at hand.
//!
//! One column list per table drives the DDL for both generations: on
//! 18.x-era servers plain types; on current servers LowCardinality label
//! columns, per-column codecs and a TTL.

use protocol::tables::TableDef;
use protocol::TABLES;

/// Every table with day partitions (retention drops these on old servers).
pub fn partitioned_tables() -> impl Iterator<Item = &'static str> {
    TABLES
        .iter()
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

fn label_type(modern: bool) -> &'static str {
    if modern {
        "LowCardinality(String)"
    } else {
        "String"
    }
}

fn ts_type(modern: bool) -> &'static str {
    if modern {
        "DateTime CODEC(Delta, ZSTD(1))"
    } else {
        "DateTime"
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

    pub fn metric_table(&self, t: &TableDef) -> String {
        let cols: Vec<String> = t
            .stored_columns()
            .iter()
            .map(|c| format!("    `{}` {}", c.name, c.ch_type(self.modern)))
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
        let l = label_type(self.modern);
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.hosts (\n    `host` {l},\n    `first_seen` DateTime,\n    `last_seen` DateTime,\n    \
             `sensor_version` String,\n    `kernel` String,\n    `os` String,\n    `arch` {l},\n    `cpus` UInt32,\n    \
             `memory_bytes` UInt64,\n    `kernel_boot_id` String,\n    `sensor_boot_id` String\n) ENGINE = ReplacingMergeTree(last_seen)\nORDER BY host",
            db = self.db
        )
    }

    pub fn batches(&self) -> String {
        let l = label_type(self.modern);
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.batches (\n    `host` {l},\n    `sensor_boot_id` String,\n    `seq` UInt64,\n    \
             `received` DateTime,\n    `snapshots` UInt32,\n    `samples` UInt32,\n    `bytes` UInt32\n) ENGINE = MergeTree()\n\
             PARTITION BY toDate(received)\nORDER BY (host, sensor_boot_id, seq){}",
            self.ttl("received"),
            db = self.db
        )
    }

    pub fn alerts(&self) -> String {
        let l = label_type(self.modern);
        let ts = ts_type(self.modern);
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
        let l = label_type(self.modern);
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
        let l = label_type(self.modern);
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.batch_intents (\n    `host` {l},\n    `sensor_boot_id` String,\n    `seq` UInt64,\n    \
             `created` DateTime\n) ENGINE = MergeTree()\nPARTITION BY toDate(created)\nORDER BY (host, sensor_boot_id, seq){}",
            self.ttl("created"),
            db = self.db
        )
    }

    /// Versioned migrations, applied in order and recorded in `schema_migrations`.
    pub fn migrations(&self) -> Vec<(u32, &'static str, Vec<String>)> {
        let created = |v: u32| TABLES.iter().filter(move |t| t.since == v);
        let mut v1: Vec<String> = created(1).map(|t| self.metric_table(t)).collect();
        v1.push(self.hosts());
        v1.push(self.batches());
        let mut v2: Vec<String> = created(2).map(|t| self.metric_table(t)).collect();
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
        // Metric tables declared later than migration 4 are created by `sync`.
    }

    /// The metric tables and columns the versioned migrations create (what `sync`
    /// starts from on a new database).
    pub fn after_migrations(&self) -> std::collections::HashMap<String, Vec<String>> {
        TABLES
            .iter()
            .filter(|t| t.since <= SCHEMA_VERSION)
            .map(|t| {
                let cols = t
                    .stored_columns()
                    .iter()
                    .map(|c| c.name.to_string())
                    .collect();
                (t.name.to_string(), cols)
            })
            .collect()
    }

    /// What brings the metric tables in line with their declarations, given the columns
    /// the server has (`existing`: table → column names; a missing table is absent):
    /// a CREATE for a declared table that does not exist, an ADD COLUMN for each declared
    /// column a table lacks. Forward only: nothing is dropped or retyped; old rows read
    /// an added column as its type's default (0, empty).
    pub fn sync(&self, existing: &std::collections::HashMap<String, Vec<String>>) -> Vec<String> {
        let mut out = Vec::new();
        for t in TABLES {
            let Some(have) = existing.get(t.name) else {
                out.push(self.metric_table(t));
                continue;
            };
            for c in t.stored_columns() {
                if !have.iter().any(|h| h == c.name) {
                    out.push(format!(
                        "ALTER TABLE {}.{} ADD COLUMN `{}` {}",
                        self.db,
                        t.name,
                        c.name,
                        c.ch_type(self.modern)
                    ));
                }
            }
        }
        out
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
        let cpu = m.metric_table(TABLES[0]);
        assert!(
            cpu.contains("LowCardinality(String)")
                && cpu.contains("TTL ts + INTERVAL 30 DAY")
                && cpu.contains("ORDER BY (host, cpu, ts)"),
            "{cpu}"
        );
    }

    #[test]
    fn sync_creates_missing_tables_and_adds_missing_columns() {
        let d = Ddl {
            db: "sonde",
            modern: false,
            retention_days: 0,
        };
        let mut have = d.after_migrations();
        assert!(d.sync(&have).is_empty());
        have.get_mut("tcp")
            .unwrap()
            .retain(|c| c != "listen_drops_per_s");
        have.remove("tcp_ports");
        let stmts = d.sync(&have);
        assert_eq!(stmts.len(), 2, "{stmts:?}");
        assert_eq!(
            stmts[0],
            "ALTER TABLE sonde.tcp ADD COLUMN `listen_drops_per_s` Float32"
        );
        assert!(stmts[1].starts_with("CREATE TABLE IF NOT EXISTS sonde.tcp_ports"));
    }

    /// The DDL of the tables that existed before they were declared in one place, as
    /// the hand-written schema of that release created them: the declarations must keep
    /// creating exactly these types (existing databases are not retyped).
    #[test]
    fn declared_types_match_the_previous_hand_written_schema() {
        let d = Ddl {
            db: "s",
            modern: false,
            retention_days: 0,
        };
        let ddl: String = TABLES.iter().map(|t| d.metric_table(t)).collect();
        for want in [
            "`cpu` String",
            "`user` Float32",
            "`procs_running` UInt32",
            "`total` UInt64",
            "`resource` String",
            "`in_flight` UInt32",
            "`inodes_used` UInt64",
            "`curr_estab` UInt32",
            "`bucket_upper` Array(UInt64)",
            "`bucket_count` Array(UInt64)",
            "`pid` UInt32",
            "`comm` String",
            "`detail` String",
            "`oom_kills` UInt32",
            "`port` UInt32",
            "`retransmits` UInt32",
            "ORDER BY (host, source, ts)",
            "ORDER BY (host, kind, ts)",
            "ORDER BY (host, port, ts)",
        ] {
            assert!(ddl.contains(want), "{want} missing");
        }
        let m = Ddl { modern: true, ..d };
        let ddl: String = TABLES.iter().map(|t| m.metric_table(t)).collect();
        for want in [
            "`cpu` LowCardinality(String)",
            "`comm` LowCardinality(String)",
            "`cgroup` String,",
            "`pid` UInt32 CODEC(T64, ZSTD(1))",
            "`user` Float32 CODEC(Gorilla, ZSTD(1))",
        ] {
            assert!(ddl.contains(want), "{want} missing");
        }
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
