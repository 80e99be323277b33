//! Series selection: `table.column` names (the declared columns of a metric table, its
//! derived columns such as `cpu.busy` and its aliases, all from `protocol::TABLES`)
//! resolved once to (table, column) indices and evaluated straight on decoded snapshots.
//! Histograms are selected by statistic: `latency.<source glob>.<p99|mean|...>`.

use protocol::tables::{Kind, TableDef, Val};
#[cfg(test)]
use protocol::BucketRec;
use protocol::{LatencyRec, Snapshot, TABLES};

/// Every `table.column` the detector can select (aliases and capacities such as
/// `memory.total` left out), plus per-source latency p99 and mean: what the corpus
/// evaluation runs each detector on.
pub fn all_series() -> Vec<String> {
    let mut v = Vec::new();
    for t in TABLES.iter().filter(|t| !t.has_histogram()) {
        for c in t.columns {
            if c.kind.is_value() && c.kind != Kind::Capacity {
                v.push(format!("{}.{}", t.name, c.name));
            }
        }
        for d in t.derived {
            v.push(format!("{}.{}", t.name, d.name));
        }
    }
    v.push("latency.*.p99".into());
    v.push("latency.*.mean".into());
    v
}

/// A statistic of a latency histogram.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LatStat {
    Quantile(f64),
    Mean,
    Count,
}

/// A column of a table: stored (index into `columns`) or derived (into `derived`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Col {
    Stored(usize),
    Derived(usize),
}

/// A resolved `table.column`.
#[derive(Debug, Clone)]
pub enum SeriesSpec {
    Column {
        /// Index into `protocol::TABLES`.
        table: usize,
        col: Col,
        /// The name as written (an alias stays an alias).
        name: String,
    },
    /// `latency.<source glob>.<p50|p90|p99|p999|mean|count>`
    Latency { source: String, stat: LatStat },
}

fn table_names() -> String {
    TABLES
        .iter()
        .map(|t| t.name)
        .filter(|n| *n != "events")
        .collect::<Vec<_>>()
        .join(", ")
}

fn find(t: &TableDef, c: &str) -> Result<Col, String> {
    let target = t.aliases.iter().find(|a| a.0 == c).map_or(c, |a| a.1);
    if let Some(i) = t.column(target) {
        if t.columns[i].kind.is_value() && t.columns[i].kind != Kind::Histogram {
            return Ok(Col::Stored(i));
        }
    }
    if let Some(j) = t.derived.iter().position(|d| d.name == c) {
        return Ok(Col::Derived(j));
    }
    let names: Vec<&str> = t
        .columns
        .iter()
        .filter(|c| c.kind.is_value())
        .map(|c| c.name)
        .chain(t.derived.iter().map(|d| d.name))
        .chain(t.aliases.iter().map(|a| a.0))
        .collect();
    Err(format!(
        "{} has no value column {c:?} (columns: {})",
        t.name,
        names.join(", ")
    ))
}

pub fn parse_series(s: &str) -> Result<SeriesSpec, String> {
    let s = s.trim();
    if let Some(rest) = s.strip_prefix("latency.") {
        let (source, stat) = rest.rsplit_once('.').ok_or_else(|| {
            format!("{s:?}: expected latency.<source>.<p50|p90|p99|p999|mean|count>")
        })?;
        let stat = match stat {
            "p50" => LatStat::Quantile(0.5),
            "p90" => LatStat::Quantile(0.9),
            "p99" => LatStat::Quantile(0.99),
            "p999" => LatStat::Quantile(0.999),
            "mean" => LatStat::Mean,
            "count" => LatStat::Count,
            other => {
                return Err(format!(
                    "{s:?}: unknown statistic {other:?} (p50, p90, p99, p999, mean, count)"
                ))
            }
        };
        if source.is_empty() {
            return Err(format!("{s:?}: empty latency source"));
        }
        return Ok(SeriesSpec::Latency {
            source: source.to_string(),
            stat,
        });
    }
    let (t, c) = s
        .split_once('.')
        .ok_or_else(|| format!("{s:?} is not table.column (e.g. cpu.busy, disk.w_await_ms)"))?;
    let table = TABLES
        .iter()
        .position(|d| d.name == t && !d.has_histogram() && d.value_columns() > 0)
        .ok_or_else(|| format!("unknown table {t:?} ({})", table_names()))?;
    Ok(SeriesSpec::Column {
        table,
        col: find(TABLES[table], c)?,
        name: s.to_string(),
    })
}

/// Upper bound of the bucket holding quantile `q` of a histogram (same rule as the README's SQL).
pub fn hist_quantile(l: &LatencyRec, q: f64) -> f64 {
    let buckets = l
        .buckets
        .iter()
        .map(|b| (1u64.checked_shl(b.index).unwrap_or(u64::MAX), b.count));
    bucket_quantile(buckets, l.count, q).unwrap_or(0) as f64
}

/// Upper bound of the bucket holding quantile `q` of `total` values, given (upper bound,
/// count) buckets in increasing order; None when no bucket reaches it.
pub fn bucket_quantile(
    buckets: impl Iterator<Item = (u64, u64)>,
    total: u64,
    q: f64,
) -> Option<u64> {
    let target = (total as f64 * q).ceil().max(1.0) as u64;
    let mut acc = 0;
    for (upper, count) in buckets {
        acc += count;
        if acc >= target {
            return Some(upper);
        }
    }
    None
}

impl PartialEq for SeriesSpec {
    fn eq(&self, o: &Self) -> bool {
        self.name() == o.name()
    }
}

impl SeriesSpec {
    /// The `table.column` this spec was parsed from.
    pub fn name(&self) -> String {
        match self {
            SeriesSpec::Column { name, .. } => name.clone(),
            SeriesSpec::Latency { source, stat } => {
                let st = match stat {
                    LatStat::Quantile(q) if *q == 0.5 => "p50".to_string(),
                    LatStat::Quantile(q) if *q == 0.9 => "p90".to_string(),
                    LatStat::Quantile(q) if *q == 0.99 => "p99".to_string(),
                    LatStat::Quantile(_) => "p999".to_string(),
                    LatStat::Mean => "mean".to_string(),
                    LatStat::Count => "count".to_string(),
                };
                format!("latency.{source}.{st}")
            }
        }
    }

    fn def(&self) -> &'static TableDef {
        match self {
            SeriesSpec::Column { table, .. } => TABLES[*table],
            SeriesSpec::Latency { .. } => TABLES.iter().find(|t| t.name == "latency").unwrap(),
        }
    }

    pub fn table_name(&self) -> &'static str {
        self.def().name
    }

    /// Labels (besides host) a series of this table has.
    pub fn label_names(&self) -> Vec<&'static str> {
        match self {
            SeriesSpec::Latency { .. } => vec!["source"],
            _ => self.def().label_columns().map(|(_, c)| c.name).collect(),
        }
    }

    /// The value as a ClickHouse expression over the table's columns.
    pub fn sql(&self) -> String {
        match self {
            SeriesSpec::Column { table, col, .. } => match col {
                Col::Stored(i) => format!("`{}`", TABLES[*table].columns[*i].name),
                Col::Derived(j) => TABLES[*table].derived[*j].sql.to_string(),
            },
            SeriesSpec::Latency { .. } => "count".into(),
        }
    }

    /// Calls `f(labels, value)` for every series of this spec in `snap`.
    pub fn for_each(&self, snap: &Snapshot, mut f: impl FnMut(&[(&'static str, &str)], f64)) {
        match self {
            SeriesSpec::Column { table, col, .. } => {
                let def = TABLES[*table];
                let nl = def.label_columns().count().min(8);
                snap.each_of(*table, &mut |r| {
                    let v = match *col {
                        Col::Stored(i) => r.val(i).as_f64(),
                        Col::Derived(j) => r.derived(j),
                    };
                    // Numeric labels (a port) are named as text.
                    let nums: Vec<String> = def
                        .label_columns()
                        .filter_map(|(i, _)| match r.val(i) {
                            Val::Str(_) => None,
                            x => Some(format!("{}", x.as_f64())),
                        })
                        .collect();
                    let mut labels: [(&'static str, &str); 8] = [("", ""); 8];
                    let mut k = 0;
                    for (n, (i, c)) in def.label_columns().take(nl).enumerate() {
                        labels[n] = match r.val(i) {
                            Val::Str(s) => (c.name, s),
                            _ => {
                                k += 1;
                                (c.name, nums[k - 1].as_str())
                            }
                        };
                    }
                    f(&labels[..nl], v);
                });
            }
            SeriesSpec::Latency { source, stat } => {
                for l in &snap.latency {
                    if !crate::detect::glob(source, &l.source) || l.count == 0 {
                        continue;
                    }
                    let v = match stat {
                        LatStat::Quantile(q) => hist_quantile(l, *q),
                        LatStat::Mean => l.sum as f64 / l.count as f64,
                        LatStat::Count => l.count as f64,
                    };
                    f(&[("source", &l.source)], v)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_or_explain() {
        assert!(matches!(
            parse_series("cpu.busy"),
            Ok(SeriesSpec::Column {
                col: Col::Derived(0),
                ..
            })
        ));
        let w = parse_series("disk.w_await").unwrap();
        assert_eq!(w.table_name(), "disk");
        assert_eq!(w.sql(), "`w_await_ms`");
        assert_eq!(w.name(), "disk.w_await");
        assert_eq!(
            parse_series("filesystem.used_pct").unwrap().label_names(),
            ["mount", "device", "fstype"]
        );
        assert!(parse_series("cpu.cpu").is_err(), "a label is not a value");
        assert!(matches!(
            parse_series("latency.runqueue.p99"),
            Ok(SeriesSpec::Latency { stat: LatStat::Quantile(q), .. }) if q == 0.99
        ));
        assert!(matches!(
            parse_series("latency.disk:sda:write.mean"),
            Ok(SeriesSpec::Latency { ref source, stat: LatStat::Mean }) if source == "disk:sda:write"
        ));
        let e = parse_series("cpu.bussy").unwrap_err();
        assert!(e.contains("busy") && e.contains("bussy"), "{e}");
        assert!(parse_series("nope.x")
            .unwrap_err()
            .contains("unknown table"));
        assert!(parse_series("latency.runqueue.p42").is_err());
        assert!(parse_series("events.pid")
            .unwrap_err()
            .contains("unknown table"));
    }

    #[test]
    fn values_and_labels_come_from_the_declaration() {
        let snap = Snapshot {
            cpu: vec![protocol::CpuRec {
                cpu: protocol::CPU_TOTAL,
                idle: 75.0,
                ..Default::default()
            }],
            tcp_ports: vec![protocol::PortRec {
                port: 443,
                retransmits: 4,
            }],
            tcp: protocol::TcpRec {
                listen_overflows_per_s: 2.5,
                ..Default::default()
            },
            ..Default::default()
        };
        let got = |name: &str| {
            let mut v = Vec::new();
            parse_series(name).unwrap().for_each(&snap, |l, x| {
                v.push((
                    l.iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>(),
                    x,
                ))
            });
            v
        };
        assert_eq!(got("cpu.busy"), [(vec!["cpu=total".to_string()], 25.0)]);
        assert_eq!(
            got("tcp_ports.retransmits"),
            [(vec!["port=443".to_string()], 4.0)]
        );
        assert_eq!(got("tcp.listen_overflows_per_s"), [(vec![], 2.5)]);
        assert!(all_series().contains(&"tcp.listen_drops_per_s".to_string()));
        assert!(!all_series().contains(&"memory.total".to_string()));
    }

    #[test]
    fn quantiles_from_buckets() {
        let l = LatencyRec {
            count: 100,
            buckets: vec![
                BucketRec {
                    index: 2,
                    count: 90,
                },
                BucketRec {
                    index: 10,
                    count: 10,
                },
            ],
            ..Default::default()
        };
        assert_eq!(hist_quantile(&l, 0.5), 4.0);
        assert_eq!(hist_quantile(&l, 0.9), 4.0);
        assert_eq!(hist_quantile(&l, 0.99), 1024.0);
    }
}
