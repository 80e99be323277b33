//! The schema on a ClickHouse cluster (`[clickhouse] cluster = "NAME"`).
//!
//! The single-server schema is written once (`schema.rs`, `tiers.rs`); on a cluster each
//! of its statements becomes its cluster form here:
//! - a table `T` becomes `T_local`, a `Replicated*MergeTree` per shard
//!   (`/clickhouse/tables/{shard}/DB/T_local`, replica `{replica}`), plus `T`, a
//!   `Distributed` table over it sharded by `sipHash64(toString(host))`: every query
//!   that names `T` runs unchanged, and one host's rows (and its `batches` and
//!   `batch_intents`) live on one shard;
//! - `schema_migrations` is one replicated table on every server (one ZooKeeper path), so
//!   every aggregator sees the same applied migrations;
//! - `ALTER … ADD COLUMN` goes to both tables; other ALTERs (TTL, codecs, partitions) to
//!   the local one;
//! - a rollup tier's materialized view reads the shard's `T_local` (the 1h view: the 1m
//!   view, as on one server) and writes its `T_1m_agg_local` (each shard aggregates its
//!   own hosts, on insert); the tier views read the Distributed `_agg` tables;
//! - every statement runs `ON CLUSTER` (ClickHouse's distributed DDL through ZooKeeper
//!   or Keeper).

/// A statement of the single-server schema in its cluster form (one or two statements).
pub fn rewrite(stmt: &str, db: &str, cluster: &str) -> Vec<String> {
    let on = format!("ON CLUSTER {cluster}");
    let table_prefix = "CREATE TABLE IF NOT EXISTS ";
    if let Some(rest) = stmt.strip_prefix("CREATE DATABASE IF NOT EXISTS ") {
        return vec![format!(
            "CREATE DATABASE IF NOT EXISTS {} {on}",
            rest.trim()
        )];
    }
    if let Some(rest) = stmt.strip_prefix(table_prefix) {
        let end = rest
            .find(|c: char| c == ' ' || c == '(' || c == '\n')
            .unwrap_or(rest.len());
        let (name, body) = rest.split_at(end);
        let short = name.strip_prefix(&format!("{db}.")).unwrap_or(name);
        let Some(e) = body.find(" ENGINE = ") else {
            // `CREATE TABLE x AS y` (copies): on every server, as the single-server form.
            return vec![format!("{table_prefix}{name} {on}{body}")];
        };
        let (cols, engine_part) = body.split_at(e);
        let engine_part = &engine_part[" ENGINE = ".len()..];
        let open = engine_part.find('(').unwrap_or(engine_part.len());
        let engine = &engine_part[..open];
        let close = engine_part[open..]
            .find(')')
            .map(|i| open + i)
            .unwrap_or(engine_part.len());
        let args = engine_part.get(open + 1..close).unwrap_or("").trim();
        let after = engine_part.get(close + 1..).unwrap_or("");
        let args = if args.is_empty() {
            String::new()
        } else {
            format!(", {args}")
        };
        if short == "schema_migrations" {
            return vec![format!(
                "{table_prefix}{name} {on}{cols} ENGINE = Replicated{engine}('/clickhouse/tables/all/{db}/{short}', '{{replica}}'{args}){after}"
            )];
        }
        return vec![
            format!(
                "{table_prefix}{name}_local {on}{cols} ENGINE = Replicated{engine}('/clickhouse/tables/{{shard}}/{db}/{short}_local', '{{replica}}'{args}){after}"
            ),
            distributed(name, short, db, cluster),
        ];
    }
    if let Some(rest) = stmt.strip_prefix("ALTER TABLE ") {
        let end = rest.find(' ').unwrap_or(rest.len());
        let (name, op) = rest.split_at(end);
        let op = op.trim_start();
        let local = format!("ALTER TABLE {name}_local {on} {op}");
        if op.starts_with("ADD COLUMN") {
            // ClickHouse 18.16 refuses ALTER ON CLUSTER on a Distributed table over
            // replicated shards; it holds no data (inserts are synchronous), so it is
            // created again with the new columns.
            let short = name.strip_prefix(&format!("{db}.")).unwrap_or(name);
            return vec![
                local,
                format!("DROP TABLE IF EXISTS {name} {on}"),
                distributed(name, short, db, cluster),
            ];
        }
        return vec![local];
    }
    let mv_prefix = "CREATE MATERIALIZED VIEW IF NOT EXISTS ";
    if let Some(rest) = stmt.strip_prefix(mv_prefix) {
        // `DB.X_mv TO DB.T_tier_agg AS SELECT … FROM DB.T …`
        let Some((name, rest)) = rest.split_once(" TO ") else {
            return vec![stmt.to_string()];
        };
        let Some((target, select)) = rest.split_once(" AS ") else {
            return vec![stmt.to_string()];
        };
        return vec![format!(
            "{mv_prefix}{name} {on} TO {target}_local AS {}",
            local_sources(select, db)
        )];
    }
    for p in ["CREATE VIEW IF NOT EXISTS ", "DROP TABLE IF EXISTS "] {
        if let Some(rest) = stmt.strip_prefix(p) {
            let end = rest.find(' ').unwrap_or(rest.len());
            let (name, body) = rest.split_at(end);
            return vec![format!("{p}{name} {on}{body}")];
        }
    }
    vec![stmt.to_string()]
}

/// The Distributed table `name` (`DB.T`) over `T_local`, sharded by host.
fn distributed(name: &str, short: &str, db: &str, cluster: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {name} ON CLUSTER {cluster} AS {name}_local ENGINE = Distributed({cluster}, {db}, {short}_local, sipHash64(toString(host)))"
    )
}

/// The column an `ALTER TABLE DB.T ADD COLUMN `c` …` statement adds: (`T`, `c`).
pub fn added_column<'a>(stmt: &'a str, db: &str) -> Option<(&'a str, &'a str)> {
    let rest = stmt.strip_prefix("ALTER TABLE ")?;
    let (name, op) = rest.split_once(' ')?;
    let table = name.strip_prefix(db)?.strip_prefix('.')?;
    let op = op.trim_start();
    let op = op.strip_prefix("ON CLUSTER ").map_or(op, |o| {
        o.split_once(' ').map(|(_, r)| r.trim_start()).unwrap_or("")
    });
    let col = op.strip_prefix("ADD COLUMN ")?.trim_start();
    let col = match col.strip_prefix('`') {
        Some(c) => c.split('`').next()?,
        None => col.split_whitespace().next()?,
    };
    Some((table, col))
}

/// `FROM DB.T` → `FROM DB.T_local` in a SELECT (a view that reads what its shard stores).
fn local_sources(select: &str, db: &str) -> String {
    let pat = format!("FROM {db}.");
    let mut out = String::with_capacity(select.len() + 16);
    let mut rest = select;
    while let Some(i) = rest.find(&pat) {
        let after = &rest[i + pat.len()..];
        let end = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        out.push_str(&rest[..i + pat.len()]);
        out.push_str(&after[..end]);
        // A view read by a view (the tier cascade) exists on every server as it is.
        if !after[..end].ends_with("_mv") {
            out.push_str("_local");
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// The quorum an insert waits for when none is configured: a majority of the shard's
/// replicas (2 of 2, 2 of 3).
pub fn default_quorum(replicas: u32) -> u32 {
    replicas / 2 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_become_replicated_local_plus_distributed() {
        let s = "CREATE TABLE IF NOT EXISTS sonde.hosts (\n    `host` String,\n    `last_seen` DateTime\n) ENGINE = ReplacingMergeTree(last_seen)\nORDER BY host";
        let r = rewrite(s, "sonde", "c1");
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], "CREATE TABLE IF NOT EXISTS sonde.hosts_local ON CLUSTER c1 (\n    `host` String,\n    `last_seen` DateTime\n) ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/sonde/hosts_local', '{replica}', last_seen)\nORDER BY host");
        assert_eq!(r[1], "CREATE TABLE IF NOT EXISTS sonde.hosts ON CLUSTER c1 AS sonde.hosts_local ENGINE = Distributed(c1, sonde, hosts_local, sipHash64(toString(host)))");
        let m = rewrite(
            "CREATE TABLE IF NOT EXISTS sonde.cpu (\n `x` Nullable(Float32)\n) ENGINE = MergeTree()\nPARTITION BY toDate(ts)\nORDER BY (host, ts)",
            "sonde",
            "c1",
        );
        assert!(m[0].contains(") ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/sonde/cpu_local', '{replica}')\nPARTITION BY toDate(ts)\nORDER BY (host, ts)"), "{}", m[0]);
        let sm = rewrite("CREATE TABLE IF NOT EXISTS sonde.schema_migrations (`version` UInt32) ENGINE = MergeTree() ORDER BY version", "sonde", "c1");
        assert_eq!(sm, vec!["CREATE TABLE IF NOT EXISTS sonde.schema_migrations ON CLUSTER c1 (`version` UInt32) ENGINE = ReplicatedMergeTree('/clickhouse/tables/all/sonde/schema_migrations', '{replica}') ORDER BY version"]);
    }

    #[test]
    fn alters_views_and_drops() {
        assert_eq!(
            rewrite("ALTER TABLE sonde.cpu ADD COLUMN `x` Float32", "sonde", "c"),
            vec![
                "ALTER TABLE sonde.cpu_local ON CLUSTER c ADD COLUMN `x` Float32",
                "DROP TABLE IF EXISTS sonde.cpu ON CLUSTER c",
                "CREATE TABLE IF NOT EXISTS sonde.cpu ON CLUSTER c AS sonde.cpu_local ENGINE = Distributed(c, sonde, cpu_local, sipHash64(toString(host)))"
            ]
        );
        assert_eq!(
            added_column(
                "ALTER TABLE sonde.cpu_local ON CLUSTER c ADD COLUMN `x` Float32",
                "sonde"
            ),
            Some(("cpu_local", "x"))
        );
        assert_eq!(
            added_column("ALTER TABLE sonde.hosts ADD COLUMN probes String", "sonde"),
            Some(("hosts", "probes"))
        );
        assert_eq!(
            added_column("ALTER TABLE sonde.cpu DROP PARTITION 1", "sonde"),
            None
        );
        assert_eq!(
            rewrite(
                "ALTER TABLE sonde.cpu DROP PARTITION '2026-01-01'",
                "sonde",
                "c"
            ),
            vec!["ALTER TABLE sonde.cpu_local ON CLUSTER c DROP PARTITION '2026-01-01'"]
        );
        assert_eq!(
            rewrite("CREATE MATERIALIZED VIEW IF NOT EXISTS sonde.cpu_1m_mv TO sonde.cpu_1m_agg AS SELECT a FROM sonde.cpu GROUP BY a", "sonde", "c"),
            vec!["CREATE MATERIALIZED VIEW IF NOT EXISTS sonde.cpu_1m_mv ON CLUSTER c TO sonde.cpu_1m_agg_local AS SELECT a FROM sonde.cpu_local GROUP BY a"]
        );
        // The hour view of the cascade reads the minute view, which every server has.
        assert_eq!(
            rewrite("CREATE MATERIALIZED VIEW IF NOT EXISTS sonde.cpu_1h_mv TO sonde.cpu_1h_agg AS SELECT a FROM sonde.cpu_1m_mv GROUP BY a", "sonde", "c"),
            vec!["CREATE MATERIALIZED VIEW IF NOT EXISTS sonde.cpu_1h_mv ON CLUSTER c TO sonde.cpu_1h_agg_local AS SELECT a FROM sonde.cpu_1m_mv GROUP BY a"]
        );
        assert_eq!(
            rewrite("CREATE VIEW IF NOT EXISTS sonde.cpu_1m AS SELECT a FROM sonde.cpu_1m_agg GROUP BY a", "sonde", "c"),
            vec!["CREATE VIEW IF NOT EXISTS sonde.cpu_1m ON CLUSTER c AS SELECT a FROM sonde.cpu_1m_agg GROUP BY a"]
        );
        assert_eq!(
            rewrite("DROP TABLE IF EXISTS sonde.cpu_1m_mv", "sonde", "c"),
            vec!["DROP TABLE IF EXISTS sonde.cpu_1m_mv ON CLUSTER c"]
        );
        assert_eq!(
            rewrite("CREATE DATABASE IF NOT EXISTS sonde", "sonde", "c"),
            vec!["CREATE DATABASE IF NOT EXISTS sonde ON CLUSTER c"]
        );
        assert_eq!(default_quorum(2), 2);
        assert_eq!(default_quorum(3), 2);
        assert_eq!(default_quorum(1), 1);
    }
}
