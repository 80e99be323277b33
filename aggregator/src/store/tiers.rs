//! Rollup tiers: per-minute and per-hour copies of every metric table, maintained by
//! ClickHouse itself.
//!
//! For a raw table `t` and a tier `1m` there are three objects:
//! - `t_1m_agg`: an `AggregatingMergeTree` holding, per host, label set and minute, the
//!   aggregate *states* of each column (what [`Kind::rollup`] says for the column's kind)
//!   and `samples` (how many raw rows went in);
//! - `t_1m_mv`: a materialized view that aggregates every block inserted into `t` into
//!   `t_1m_agg` (no work in the aggregator's hot path; late rows simply add to their
//!   bucket's state, which merges combine);
//! - `t_1h_mv` (from migration [`CASCADE_SINCE`]) reads what `t_1m_mv` produces, not `t`:
//!   it merges the block's minute states into hour states (`avgMergeState`, ...), so each
//!   insert aggregates the raw rows once. Before, both views aggregated the raw block,
//!   and the second view cost about as much as the first (a profile of ClickHouse at
//!   2 M samples/s: a quarter of its CPU in the views, inside the insert);
//! - `t_1m`: a plain view that finalises the states, with the raw table's column names
//!   (`ts` is the bucket's start; a gauge `c` is its average, with `c_min`, `c_max`,
//!   `c_last`; a rate `c` is its average with `c_max` and `c_total`; counters are sums;
//!   histograms are merged bucket by bucket), so a query on `t` runs on `t_1m` by
//!   changing the table name.
//!
//! Tables whose rows carry their own time (`events`) are not rolled up, nor are the
//! aggregator's bookkeeping tables (`alerts`, `gaps`, `batches`, ...).

use super::schema::Ddl;
use protocol::tables::{Kind, StoredColumn, TableDef};

/// The schema migration that created the tiers; tables declared later get theirs in
/// their own creating migration, and columns added later are added to the tiers too.
pub const TIERS_SINCE: u32 = 6;

/// The schema migration from which the 1h tier's view reads the 1m tier's view (a
/// cascade) instead of the raw table.
pub const CASCADE_SINCE: u32 = 11;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tier {
    /// Table suffix: `1m`, `1h`.
    pub name: &'static str,
    pub seconds: u32,
    /// ClickHouse function giving a bucket's start.
    bucket_fn: &'static str,
    /// Partition expression over `bucket` (retention on 18.16 drops whole partitions).
    pub partition: &'static str,
    /// Retention when the configuration says nothing.
    pub default_days: u32,
}

pub const TIERS: [Tier; 2] = [
    Tier {
        name: "1m",
        seconds: 60,
        bucket_fn: "toStartOfMinute",
        partition: "toDate(bucket)",
        default_days: 90,
    },
    Tier {
        name: "1h",
        seconds: 3600,
        bucket_fn: "toStartOfHour",
        partition: "toYYYYMM(bucket)",
        default_days: 730,
    },
];

impl Tier {
    pub fn by_name(name: &str) -> Option<Tier> {
        TIERS.iter().copied().find(|t| t.name == name)
    }

    /// Whether the tier partitions by month (`toYYYYMM`) rather than by day.
    pub fn monthly(&self) -> bool {
        self.partition.starts_with("toYYYYMM")
    }
}

/// The plain ClickHouse type of a stored column as an aggregate function argument.
fn arg_type(c: &StoredColumn) -> &'static str {
    let t = c.ch_type(false);
    match t {
        "DateTime" => "DateTime",
        _ => t,
    }
}

/// One column of a tier's state table: (name, type, state expression, finalised
/// expression).
struct StateCol {
    name: String,
    /// The aggregate function (`avg`, `count`, `sumMap`, ...).
    func: String,
    ty: String,
    state: String,
    merge: String,
}

fn state_cols(t: &TableDef, upto: u32) -> Vec<StateCol> {
    let mut v = vec![StateCol {
        name: "samples".into(),
        func: "count".into(),
        ty: "AggregateFunction(count)".into(),
        state: "countState()".into(),
        merge: "countMerge(samples) AS samples".into(),
    }];
    for c in columns_upto(t, upto) {
        if !c.kind.is_value() && c.kind != Kind::Text {
            continue;
        }
        if c.kind == Kind::Histogram {
            // Two stored arrays, one state: sumMap by bucket bound.
            if c.name == "bucket_upper" {
                v.push(StateCol {
                    name: "s_buckets".into(),
                    func: "sumMap".into(),
                    ty: "AggregateFunction(sumMap, Array(UInt64), Array(UInt64))".into(),
                    state: "sumMapState(bucket_upper, bucket_count)".into(),
                    merge: "sumMapMerge(s_buckets) AS buckets".into(),
                });
            }
            continue;
        }
        for r in c.kind.rollup() {
            let name = format!("s_{}_{}", r.func, c.name);
            let (ty, args) = if r.func == "argMax" {
                (
                    format!("AggregateFunction(argMax, {}, DateTime)", arg_type(&c)),
                    format!("{}, ts", c.name),
                )
            } else {
                (
                    format!("AggregateFunction({}, {})", r.func, arg_type(&c)),
                    c.name.to_string(),
                )
            };
            v.push(StateCol {
                merge: format!("{}Merge({name}) AS {}{}", r.func, c.name, r.suffix),
                state: format!("{}State({args})", r.func),
                func: r.func.to_string(),
                name,
                ty,
            });
        }
    }
    v
}

/// The stored columns that exist at migration `upto`.
fn columns_upto(t: &TableDef, upto: u32) -> impl Iterator<Item = StoredColumn> {
    t.stored_columns()
        .into_iter()
        .filter(move |c| c.since <= upto)
}

/// The labels a tier groups by, in sort-key order: host, the table's key, then any
/// other label column (they belong to the series' identity too).
fn labels(t: &TableDef, upto: u32) -> Vec<StoredColumn> {
    let mut all: Vec<StoredColumn> = columns_upto(t, upto)
        .filter(|c| c.kind == Kind::Label)
        .collect();
    let rank = |c: &StoredColumn| {
        if c.name == "host" {
            0
        } else if let Some(i) = t.key.iter().position(|k| *k == c.name) {
            1 + i
        } else {
            1000
        }
    };
    all.sort_by_key(rank);
    all
}

fn names(cols: &[StoredColumn]) -> Vec<&'static str> {
    cols.iter().map(|c| c.name).collect()
}

impl Ddl<'_> {
    pub fn tier_days(&self, tier: &Tier) -> u32 {
        match tier.name {
            "1m" => self.tier_days[0],
            _ => self.tier_days[1],
        }
    }

    /// `t_1m_agg` as of migration `upto`.
    pub fn tier_table(&self, t: &TableDef, tier: &Tier, upto: u32) -> String {
        let labels = labels(t, upto);
        let mut cols = vec!["    `bucket` DateTime".to_string()];
        cols.extend(
            labels
                .iter()
                .map(|c| format!("    `{}` {}", c.name, c.ch_type(self.modern))),
        );
        let codec = if self.modern { " CODEC(ZSTD(1))" } else { "" };
        cols.extend(
            state_cols(t, upto)
                .iter()
                .map(|s| format!("    `{}` {}{codec}", s.name, s.ty)),
        );
        let mut order = names(&labels);
        order.push("bucket");
        let days = self.tier_days(tier);
        let ttl = if self.modern && days > 0 {
            format!("\nTTL bucket + INTERVAL {days} DAY")
        } else {
            String::new()
        };
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.{t}_{tier}_agg (\n{}\n) ENGINE = AggregatingMergeTree()\nPARTITION BY {}\nORDER BY ({}){ttl}",
            cols.join(",\n"),
            tier.partition,
            order.join(", "),
            db = self.db,
            t = t.name,
            tier = tier.name,
        )
    }

    /// The SELECT that turns raw rows of `source` into the tier's states (the
    /// materialized view's query, and the backfill's with a WHERE). Its columns are in
    /// the order of [`Ddl::tier_columns`].
    pub fn tier_select(
        &self,
        t: &TableDef,
        tier: &Tier,
        upto: u32,
        source: &str,
        filter: &str,
    ) -> String {
        let labels = names(&labels(t, upto));
        let mut sel = vec![format!("{}(ts) AS bucket", tier.bucket_fn)];
        sel.extend(labels.iter().map(|l| l.to_string()));
        sel.extend(
            state_cols(t, upto)
                .into_iter()
                .map(|s| format!("{} AS {}", s.state, s.name)),
        );
        let filter = if filter.is_empty() {
            String::new()
        } else {
            format!(" WHERE {filter}")
        };
        format!(
            "SELECT {} FROM {}.{source}{filter} GROUP BY {}, bucket",
            sel.join(", "),
            self.db,
            labels.join(", ")
        )
    }

    /// The tier table's columns, in the order of [`Ddl::tier_select`].
    pub fn tier_columns(&self, t: &TableDef, upto: u32) -> String {
        let mut v = vec!["bucket".to_string()];
        v.extend(labels(t, upto).iter().map(|c| c.name.to_string()));
        v.extend(state_cols(t, upto).into_iter().map(|s| s.name));
        v.iter()
            .map(|c| format!("`{c}`"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `t_1m_mv` as of migration `upto`.
    pub fn tier_mv(&self, t: &TableDef, tier: &Tier, upto: u32) -> String {
        let select = match self.cascade_source(tier, upto) {
            Some(from) => self.tier_cascade_select(t, tier, from, upto),
            None => self.tier_select(t, tier, upto, t.name, ""),
        };
        format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{t}_{tier}_mv TO {db}.{t}_{tier}_agg AS {select}",
            db = self.db,
            t = t.name,
            tier = tier.name,
        )
    }

    /// The finer tier whose view feeds `tier`'s view at migration `upto`, if any.
    fn cascade_source(&self, tier: &Tier, upto: u32) -> Option<&'static Tier> {
        if upto < CASCADE_SINCE {
            return None;
        }
        let i = TIERS.iter().position(|x| x.name == tier.name)?;
        i.checked_sub(1).map(|j| &TIERS[j])
    }

    /// The cascade's SELECT: the states of the finer tier's view output, merged into
    /// `tier`'s buckets (the states stay states: `-MergeState`).
    fn tier_cascade_select(&self, t: &TableDef, tier: &Tier, from: &Tier, upto: u32) -> String {
        let labels = names(&labels(t, upto));
        let mut sel = vec![format!("{}(bucket) AS bucket", tier.bucket_fn)];
        sel.extend(labels.iter().map(|l| l.to_string()));
        sel.extend(
            state_cols(t, upto)
                .into_iter()
                .map(|s| format!("{}MergeState({n}) AS {n}", s.func, n = s.name)),
        );
        // 18.16 runs a view on what another view produces only when it reads that view;
        // current servers, when it reads the view's target table.
        let src = if self.modern { "agg" } else { "mv" };
        format!(
            "SELECT {} FROM {}.{}_{}_{src} GROUP BY {}, bucket",
            sel.join(", "),
            self.db,
            t.name,
            from.name,
            labels.join(", ")
        )
    }

    /// Migration [`CASCADE_SINCE`]: every tier fed by a finer one gets its view again,
    /// reading the finer tier's view. (Rows inserted between the two statements by an
    /// aggregator still running reach the finer tier but not this one.)
    fn cascade_migration(&self, v: u32) -> Vec<String> {
        let mut out = Vec::new();
        if v != CASCADE_SINCE {
            return out;
        }
        for t in protocol::TABLES
            .iter()
            .filter(|t| t.rolled_up() && t.since < v && t.since >= 1)
        {
            for tier in TIERS.iter().filter(|x| self.cascade_source(x, v).is_some()) {
                out.push(format!(
                    "DROP TABLE IF EXISTS {}.{}_{}_mv",
                    self.db, t.name, tier.name
                ));
                out.push(self.tier_mv(t, tier, v));
            }
        }
        out
    }

    /// `t_1m` (finalised, raw column names) as of migration `upto`.
    pub fn tier_view(&self, t: &TableDef, tier: &Tier, upto: u32) -> String {
        let labels = names(&labels(t, upto));
        let states = state_cols(t, upto);
        let hist = states.iter().any(|s| s.name == "s_buckets");
        let mut sel = vec!["bucket AS ts".to_string()];
        sel.extend(labels.iter().map(|l| l.to_string()));
        sel.extend(states.iter().map(|s| s.merge.clone()));
        let inner = format!(
            "SELECT {} FROM {}.{}_{}_agg GROUP BY {}, bucket",
            sel.join(", "),
            self.db,
            t.name,
            tier.name,
            labels.join(", ")
        );
        let query = if hist {
            // The merged histogram as the raw table's two arrays.
            let mut outer = vec!["ts".to_string()];
            outer.extend(labels.iter().map(|l| l.to_string()));
            outer.extend(
                states
                    .iter()
                    .filter(|s| s.name != "s_buckets")
                    .map(|s| s.merge.rsplit(" AS ").next().unwrap().to_string()),
            );
            outer.push("buckets.1 AS bucket_upper".into());
            outer.push("buckets.2 AS bucket_count".into());
            format!("SELECT {} FROM ({inner})", outer.join(", "))
        } else {
            inner
        };
        format!(
            "CREATE VIEW IF NOT EXISTS {db}.{t}_{tier} AS {query}",
            db = self.db,
            t = t.name,
            tier = tier.name,
        )
    }

    /// Everything migration `v` does to the tiers: create them (for every rolled-up
    /// table at [`TIERS_SINCE`], for a new table in its creating migration), and for a
    /// column added to a table that has tiers, add its states and rebuild the views.
    pub fn tier_migration(&self, v: u32) -> Vec<String> {
        let mut out = self.cascade_migration(v);
        if v < TIERS_SINCE {
            return out;
        }
        for t in protocol::TABLES.iter().filter(|t| t.rolled_up()) {
            if (v == TIERS_SINCE && t.since <= v) || (v > TIERS_SINCE && t.since == v) {
                for tier in &TIERS {
                    out.push(self.tier_table(t, tier, v));
                    out.push(self.tier_mv(t, tier, v));
                    out.push(self.tier_view(t, tier, v));
                }
            } else if t.since < v {
                let added: Vec<StoredColumn> = t
                    .stored_columns()
                    .into_iter()
                    .filter(|c| c.since == v)
                    .collect();
                if added.is_empty() {
                    continue;
                }
                let alters = |tier: &Tier| -> Vec<String> {
                    let before: Vec<String> =
                        state_cols(t, v - 1).into_iter().map(|s| s.name).collect();
                    state_cols(t, v)
                        .into_iter()
                        .filter(|s| !before.contains(&s.name))
                        .map(|s| {
                            format!(
                                "ALTER TABLE {}.{}_{}_agg ADD COLUMN `{}` {}",
                                self.db, t.name, tier.name, s.name, s.ty
                            )
                        })
                        .collect()
                };
                let drops = |tier: &Tier| -> Vec<String> {
                    ["mv", ""]
                        .iter()
                        .map(|obj| {
                            let sep = if obj.is_empty() { "" } else { "_" };
                            format!(
                                "DROP TABLE IF EXISTS {}.{}_{}{sep}{obj}",
                                self.db, t.name, tier.name
                            )
                        })
                        .collect()
                };
                if v < CASCADE_SINCE {
                    // As released: per tier, its new states, then its views again.
                    for tier in &TIERS {
                        out.extend(alters(tier));
                        out.extend(drops(tier));
                        out.push(self.tier_mv(t, tier, v));
                        out.push(self.tier_view(t, tier, v));
                    }
                } else {
                    // Views feed views: the coarser ones are dropped first (each reads
                    // the one before it) and created last.
                    for tier in &TIERS {
                        out.extend(alters(tier));
                    }
                    for tier in TIERS.iter().rev() {
                        out.extend(drops(tier));
                    }
                    for tier in &TIERS {
                        out.push(self.tier_mv(t, tier, v));
                        out.push(self.tier_view(t, tier, v));
                    }
                }
            }
        }
        out
    }
}

/// Every tier state table: (raw table, tier, `t_tier_agg`).
pub fn tier_tables() -> impl Iterator<Item = (&'static TableDef, Tier, String)> {
    protocol::TABLES
        .iter()
        .filter(|t| t.rolled_up())
        .flat_map(|t| {
            TIERS
                .iter()
                .map(move |tier| (*t, *tier, format!("{}_{}_agg", t.name, tier.name)))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::TABLES;

    fn ddl(modern: bool) -> Ddl<'static> {
        Ddl {
            db: "s",
            modern,
            retention_days: 30,
            tier_days: [90, 730],
        }
    }

    #[test]
    fn a_gauge_keeps_avg_min_max_last_under_its_own_name() {
        let cpu = TABLES.iter().find(|t| t.name == "cpu").unwrap();
        let v = ddl(false).tier_view(cpu, &TIERS[0], TIERS_SINCE);
        for want in [
            "bucket AS ts",
            "avgMerge(s_avg_user) AS user,",
            "minMerge(s_min_user) AS user_min",
            "maxMerge(s_max_user) AS user_max",
            "argMaxMerge(s_argMax_user) AS user_last",
            "countMerge(samples) AS samples",
            "GROUP BY host, cpu, bucket",
        ] {
            assert!(v.contains(want), "{want} not in {v}");
        }
        let mv = ddl(false).tier_mv(cpu, &TIERS[1], TIERS_SINCE);
        assert!(
            mv.contains("toStartOfHour(ts) AS bucket")
                && mv.contains("argMaxState(user, ts) AS s_argMax_user"),
            "{mv}"
        );
    }

    #[test]
    fn labels_are_the_sort_key_and_histograms_merge_by_bucket() {
        let lat = TABLES.iter().find(|t| t.name == "latency").unwrap();
        let t = ddl(false).tier_table(lat, &TIERS[0], TIERS_SINCE);
        assert!(t.contains("ORDER BY (host, source, unit, bucket)"), "{t}");
        assert!(t.contains("sumMap, Array(UInt64), Array(UInt64)"), "{t}");
        let v = ddl(false).tier_view(lat, &TIERS[0], TIERS_SINCE);
        assert!(
            v.contains("buckets.1 AS bucket_upper") && !v.contains("sum(count)"),
            "{v}"
        );
        assert!(v.contains("sumMerge(s_sum_count) AS count"), "{v}");
    }

    #[test]
    fn events_are_not_rolled_up_and_modern_tiers_have_ttl() {
        let m = ddl(true).tier_migration(TIERS_SINCE);
        assert!(!m.iter().any(|s| s.contains("events_")));
        assert!(m
            .iter()
            .any(|s| s.contains("cpu_1h_agg") && s.contains("TTL bucket + INTERVAL 730 DAY")));
        assert_eq!(
            m.len(),
            TABLES
                .iter()
                .filter(|t| t.rolled_up() && t.since <= TIERS_SINCE)
                .count()
                * TIERS.len()
                * 3
        );
        assert!(ddl(false).tier_migration(TIERS_SINCE - 1).is_empty());
        assert!(!ddl(false)
            .tier_migration(TIERS_SINCE)
            .iter()
            .any(|s| s.contains("TTL") || s.contains("CODEC")));
    }

    #[test]
    fn the_hour_view_merges_the_minute_views_states_from_the_cascade_on() {
        let cpu = TABLES.iter().find(|t| t.name == "cpu").unwrap();
        let d = ddl(false);
        // Before the cascade (as released): the hour view aggregates raw rows.
        let old = d.tier_mv(cpu, &TIERS[1], CASCADE_SINCE - 1);
        assert!(old.contains("FROM s.cpu GROUP BY"), "{old}");
        let mv = d.tier_mv(cpu, &TIERS[1], CASCADE_SINCE);
        for want in [
            "TO s.cpu_1h_agg AS SELECT toStartOfHour(bucket) AS bucket, host, cpu,",
            "countMergeState(samples) AS samples",
            "avgMergeState(s_avg_user) AS s_avg_user",
            "argMaxMergeState(s_argMax_user) AS s_argMax_user",
            "FROM s.cpu_1m_mv GROUP BY host, cpu, bucket",
        ] {
            assert!(mv.contains(want), "{want} not in {mv}");
        }
        // The minute view still reads the raw table.
        let m = d.tier_mv(cpu, &TIERS[0], CASCADE_SINCE);
        assert!(m.contains("FROM s.cpu GROUP BY"), "{m}");
        let lat = TABLES.iter().find(|t| t.name == "latency").unwrap();
        assert!(d
            .tier_mv(lat, &TIERS[1], CASCADE_SINCE)
            .contains("sumMapMergeState(s_buckets) AS s_buckets"));
        // The migration replaces every hour view (drop, then create), and nothing else.
        let m = d.tier_migration(CASCADE_SINCE);
        let rolled = TABLES
            .iter()
            .filter(|t| t.rolled_up() && t.since < CASCADE_SINCE)
            .count();
        assert_eq!(m.len(), 2 * rolled, "{m:#?}");
        for pair in m.chunks(2) {
            assert!(
                pair[0].starts_with("DROP TABLE IF EXISTS s.") && pair[0].ends_with("_1h_mv"),
                "{}",
                pair[0]
            );
            assert!(pair[1].contains("_1m_mv GROUP BY"), "{}", pair[1]);
        }
        // A new database gets the cascade directly.
        assert!(d
            .current_schema()
            .iter()
            .any(|s| s.contains("cpu_1h_mv") && s.contains("FROM s.cpu_1m_mv")));
    }

    #[test]
    fn a_rate_keeps_its_exact_total() {
        let net = TABLES.iter().find(|t| t.name == "net").unwrap();
        let v = ddl(false).tier_view(net, &TIERS[0], TIERS_SINCE);
        assert!(v.contains("sumMerge(s_sum_rx_bytes_per_s) AS rx_bytes_per_s_total"));
        assert!(v.contains("avgMerge(s_avg_rx_bytes_per_s) AS rx_bytes_per_s,"));
    }
}
