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
    /// Days the 1-minute and 1-hour tiers keep (see `tiers.rs`); 0 keeps everything.
    pub tier_days: [u32; 2],
}

impl Ddl<'_> {
    fn ttl(&self, col: &str) -> String {
        if self.modern && self.retention_days > 0 {
            format!("\nTTL {col} + INTERVAL {} DAY", self.retention_days)
        } else {
            String::new()
        }
    }

    /// The CREATE of a metric table as its migration created it: the columns declared
    /// with the table (later columns come with their own migration).
    pub fn metric_table(&self, t: &TableDef) -> String {
        let cols: Vec<String> = t
            .stored_columns()
            .iter()
            .filter(|c| c.since == 0)
            .map(|c| format!("    `{}` {}", c.name, c.ch_type_at(self.modern, t.since)))
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

    /// The whole schema as this build has it, in one go: every table with all its
    /// columns, the tiers at the newest version. A new cluster is created this way, with
    /// no `ALTER` (ClickHouse 18.16's distributed DDL can wedge on an `ALTER … ON CLUSTER`
    /// of a replicated table).
    pub fn current_schema(&self) -> Vec<String> {
        let v = SCHEMA_VERSION;
        let mut out = vec![
            self.hosts().replace(
                "`sensor_boot_id` String\n)",
                "`sensor_boot_id` String,\n    `probes` String\n)",
            ),
            self.batches(),
            self.alerts(),
            self.gaps(),
            self.batch_intents().replace(
                "`created` DateTime\n)",
                "`created` DateTime,\n    `writer` String\n)",
            ),
        ];
        for t in TABLES.iter() {
            let cols: Vec<String> = t
                .stored_columns()
                .iter()
                .map(|c| format!("    `{}` {}", c.name, c.ch_type_at(self.modern, v)))
                .collect();
            let mut order = vec!["host"];
            order.extend_from_slice(t.key);
            order.push("ts");
            out.push(format!(
                "CREATE TABLE IF NOT EXISTS {}.{} (\n{}\n) ENGINE = MergeTree()\nPARTITION BY toDate(ts)\nORDER BY ({}){}",
                self.db,
                t.name,
                cols.join(",\n"),
                order.join(", "),
                self.ttl("ts")
            ));
        }
        for t in TABLES.iter().filter(|t| t.rolled_up()) {
            for tier in &super::tiers::TIERS {
                out.push(self.tier_table(t, tier, v));
                out.push(self.tier_mv(t, tier, v));
                out.push(self.tier_view(t, tier, v));
            }
        }
        out
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
    ///
    /// Frozen once released: migration N creates the tables declared `since N` with the
    /// columns they were declared with, and adds the columns declared `since N` to the
    /// tables that existed before; nothing in an earlier migration changes when a column
    /// or table is declared later (a test holds migrations 1-4 to the DDL that release
    /// shipped, `aggregator/tests/data/schema-v4-*.sql`).
    pub fn migrations(&self) -> Vec<(u32, String, Vec<String>)> {
        let fixed = |v: u32| -> (&'static str, Vec<String>) {
            match v {
                1 => (
                    "metric tables, hosts, batches",
                    vec![self.hosts(), self.batches()],
                ),
                2 => (
                    "eBPF tables (latency, events, probes, tcp_ports), hosts.probes",
                    vec![format!(
                        "ALTER TABLE {}.hosts ADD COLUMN probes String",
                        self.db
                    )],
                ),
                3 => ("alerts", vec![self.alerts()]),
                4 => (
                    "gaps, batch_intents",
                    vec![self.gaps(), self.batch_intents()],
                ),
                7 => (
                    "value codecs chosen by measurement (current servers)",
                    self.recodec(),
                ),
                super::tiers::CASCADE_SINCE => (
                    "the 1h tier's views read the 1m tier's views (a cascade)",
                    Vec::new(),
                ),
                INTENT_WRITER_SINCE => (
                    "batch_intents.writer",
                    vec![format!(
                        "ALTER TABLE {}.batch_intents ADD COLUMN `writer` String",
                        self.db
                    )],
                ),
                _ => ("", Vec::new()),
            }
        };
        (1..=SCHEMA_VERSION)
            .map(|v| {
                let (name, extra) = fixed(v);
                let mut stmts: Vec<String> = TABLES
                    .iter()
                    .filter(|t| t.since == v)
                    .map(|t| self.metric_table(t))
                    .collect();
                let mut named: Vec<String> = TABLES
                    .iter()
                    .filter(|t| t.since == v)
                    .map(|t| t.name.to_string())
                    .collect();
                for t in TABLES.iter().filter(|t| t.since < v) {
                    for c in t.stored_columns().iter().filter(|c| c.since == v) {
                        stmts.push(format!(
                            "ALTER TABLE {}.{} ADD COLUMN `{}` {}",
                            self.db,
                            t.name,
                            c.name,
                            c.ch_type_at(self.modern, v)
                        ));
                        named.push(format!("{}.{}", t.name, c.name));
                    }
                }
                stmts.extend(extra);
                stmts.extend(self.tier_migration(v));
                if v == super::tiers::TIERS_SINCE {
                    named.insert(0, "rollup tiers 1m and 1h".into());
                }
                let name = if name.is_empty() {
                    named.join(", ")
                } else {
                    name.to_string()
                };
                (v, name, stmts)
            })
            .collect()
    }

    /// Migration 7 on current servers: value columns of the tables created before it take
    /// the codecs chosen by measurement (new parts; merges rewrite old ones). Nothing on
    /// 18.x, which has no codecs.
    fn recodec(&self) -> Vec<String> {
        if !self.modern {
            return Vec::new();
        }
        let v = protocol::tables::CODECS_SINCE;
        let mut out = Vec::new();
        for t in TABLES.iter().filter(|t| t.since < v) {
            for c in t.stored_columns().iter().filter(|c| c.since < v) {
                let (old, new) = (c.ch_type_at(true, v - 1), c.ch_type_at(true, v));
                if old != new {
                    out.push(format!(
                        "ALTER TABLE {}.{} MODIFY COLUMN `{}` {new}",
                        self.db, t.name, c.name
                    ));
                }
            }
        }
        out
    }

    /// The schema script up to migration `upto` (what `aggregator schema` prints).
    pub fn script(&self, upto: u32) -> String {
        let mut out = format!(
            "CREATE DATABASE IF NOT EXISTS {};\n{};\n",
            self.db,
            self.migrations_table()
        );
        for (v, _, stmts) in self.migrations() {
            if v > upto {
                break;
            }
            for s in stmts {
                out.push_str(&s);
                out.push_str(";\n");
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

/// The migration that records which aggregator process wrote each intent
/// (`batch_intents.writer`): another aggregator waits while that one's insert of a batch
/// is still running (see `writer::await_writers`).
pub const INTENT_WRITER_SINCE: u32 = 12;

/// The newest migration: 7 (codecs by measurement), 11 (the tier cascade), 12 (the
/// intents' writer) or the highest `since` of a declared table or column.
pub const SCHEMA_VERSION: u32 = {
    let mut v = protocol::tables::CODECS_SINCE;
    if super::tiers::CASCADE_SINCE > v {
        v = super::tiers::CASCADE_SINCE;
    }
    if INTENT_WRITER_SINCE > v {
        v = INTENT_WRITER_SINCE;
    }
    let mut i = 0;
    while i < TABLES.len() {
        if TABLES[i].since > v {
            v = TABLES[i].since;
        }
        let cols = TABLES[i].columns;
        let mut j = 0;
        while j < cols.len() {
            if cols[j].since > v {
                v = cols[j].since;
            }
            j += 1;
        }
        i += 1;
    }
    v
};

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
            tier_days: [90, 730],
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
            tier_days: [90, 730],
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
    fn a_declared_column_is_its_own_migration() {
        let d = Ddl {
            db: "sonde",
            modern: false,
            retention_days: 0,
            tier_days: [0, 0],
        };
        let m = d.migrations();
        let v5 = m.iter().find(|x| x.0 == 5).expect("migration 5");
        assert_eq!(v5.1, "tcp.listen_overflows_per_s, tcp.listen_drops_per_s");
        assert_eq!(
            v5.2,
            [
                "ALTER TABLE sonde.tcp ADD COLUMN `listen_overflows_per_s` Float32",
                "ALTER TABLE sonde.tcp ADD COLUMN `listen_drops_per_s` Float32"
            ]
        );
        // Not in the CREATE of migration 1: that one is frozen.
        assert!(!m[0].2.iter().any(|s| s.contains("listen_")));
    }

    /// Migrations 1-4 as the release before the declarations shipped them (the output of
    /// its `aggregator schema` at commit 77408c3, committed): released migrations never
    /// change. Declaring a column without `since N`, or changing a released column's type,
    /// fails here.
    #[test]
    fn released_migrations_are_frozen() {
        for (version, file) in [
            ("18.16.1", "schema-v4-18.16.sql"),
            ("26.9.1", "schema-v4-26.9.sql"),
        ] {
            let path = format!("{}/tests/data/{file}", env!("CARGO_MANIFEST_DIR"));
            let want = std::fs::read_to_string(&path).unwrap();
            let d = Ddl {
                db: "sonde",
                modern: is_modern(version),
                retention_days: 30,
                tier_days: [90, 730],
            };
            // The same statements (the order of independent CREATEs inside one migration
            // follows the declarations and may differ from that release's).
            let stmts = |t: &str| {
                let mut v: Vec<String> = t.split(";\n").map(str::to_string).collect();
                v.sort();
                v
            };
            assert_eq!(
                stmts(&d.script(4)),
                stmts(&want),
                "migrations 1-4 differ from {file}"
            );
        }
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
            tier_days: [0, 0],
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
            tier_days: [0, 0],
        };
        let m = d.migrations();
        assert!(m.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(m.last().unwrap().0, SCHEMA_VERSION);
    }
}
