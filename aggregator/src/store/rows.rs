//! Rows for inserts. The metric tables have no hand-written row type: their rows are
//! written as RowBinary straight from the decoded records, column by column in the
//! order of the table's declaration (`protocol::tables`), which is also the order the
//! INSERT names them in. Labels are copied from the decoded batch; nothing else is
//! allocated per row. The aggregator's own tables (alerts, hosts, batches, gaps,
//! intents) keep typed rows below.

use clickhouse::Row;
use protocol::tables::{bucket_upper, Record, StoredColumn, TableDef, Val, Visitor};
use protocol::{Batch, TABLES};
use serde::Serialize;

/// The rows of one metric table, encoded as RowBinary.
pub struct TableRows<'a> {
    pub def: &'static TableDef,
    pub columns: Vec<StoredColumn>,
    buf: Vec<u8>,
    /// (host, ts, end offset in `buf`) per row.
    keys: Vec<(&'a str, u32, usize)>,
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// Appends one value in ClickHouse RowBinary (a histogram is two arrays).
fn put_val(out: &mut Vec<u8>, v: Val<'_>) {
    match v {
        Val::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Val::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Val::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Val::Str(x) => put_str(out, x),
        Val::Buckets(b) => {
            put_varint(out, b.len() as u64);
            for x in b {
                out.extend_from_slice(&bucket_upper(x.index).to_le_bytes());
            }
            put_varint(out, b.len() as u64);
            for x in b {
                out.extend_from_slice(&x.count.to_le_bytes());
            }
        }
    }
}

impl<'a> TableRows<'a> {
    pub fn new(def: &'static TableDef) -> Self {
        TableRows {
            def,
            columns: def.stored_columns(),
            buf: Vec::new(),
            keys: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// The column list of the INSERT, in RowBinary order.
    pub fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| format!("`{}`", c.name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn push<R: Record>(&mut self, host: &'a str, ts: u32, r: &R) {
        let ts = r.time_ms().map_or(ts, |ms| (ms / 1000) as u32);
        self.buf.extend_from_slice(&ts.to_le_bytes());
        put_str(&mut self.buf, host);
        let kinds = R::TABLE.columns;
        let mut i = 0;
        let buf = &mut self.buf;
        r.for_each_val(|v| {
            if kinds[i].kind != protocol::tables::Kind::Time {
                put_val(buf, v);
            }
            i += 1;
        });
        self.keys.push((host, ts, self.buf.len()));
    }

    pub fn keys(&self) -> impl Iterator<Item = (&'a str, u32)> + '_ {
        self.keys.iter().map(|k| (k.0, k.1))
    }

    /// Keeps the rows for which `keep(host, ts)` holds.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, u32) -> bool) {
        let mut buf = Vec::with_capacity(self.buf.len());
        let mut keys = Vec::with_capacity(self.keys.len());
        let mut start = 0;
        for &(h, t, end) in &self.keys {
            if keep(h, t) {
                buf.extend_from_slice(&self.buf[start..end]);
                keys.push((h, t, buf.len()));
            }
            start = end;
        }
        self.buf = buf;
        self.keys = keys;
    }

    /// Moves all rows of `other` (same table) to the end of these.
    pub fn append(&mut self, other: &mut TableRows<'a>) {
        let base = self.buf.len();
        self.buf.append(&mut other.buf);
        self.keys
            .extend(other.keys.drain(..).map(|(h, t, e)| (h, t, e + base)));
    }
}

/// All rows of many batches, one `TableRows` per declared table (in `TABLES` order).
pub struct Rows<'a> {
    pub tables: Vec<TableRows<'a>>,
}

impl Default for Rows<'_> {
    fn default() -> Self {
        Rows {
            tables: TABLES.iter().map(|t| TableRows::new(t)).collect(),
        }
    }
}

impl<'a> Rows<'a> {
    pub fn len(&self) -> usize {
        self.tables.iter().map(TableRows::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds every row of `b`, labelled with `host` (the certificate's name).
    pub fn add(&mut self, host: &'a str, b: &'a Batch) {
        struct Add<'r, 'a> {
            rows: &'r mut Rows<'a>,
            host: &'a str,
            ts: u32,
        }
        impl Visitor for Add<'_, '_> {
            fn record<R: Record>(&mut self, table: usize, r: &R) {
                self.rows.tables[table].push(self.host, self.ts, r);
            }
        }
        for s in &b.snapshots {
            s.visit(&mut Add {
                rows: self,
                host,
                ts: (s.ts_ms / 1000) as u32,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{BucketRec, CpuRec, EventRec, LatencyRec, Snapshot, CPU_TOTAL};

    #[test]
    fn rowbinary_follows_the_declaration() {
        let b = Batch {
            snapshots: vec![Snapshot {
                ts_ms: 1_700_000_000_999,
                cpu: vec![CpuRec {
                    cpu: CPU_TOTAL,
                    user: 1.5,
                    ..Default::default()
                }],
                latency: vec![LatencyRec {
                    source: "runqueue".into(),
                    unit: "us".into(),
                    count: 3,
                    sum: 10,
                    buckets: vec![BucketRec { index: 2, count: 3 }],
                }],
                events: vec![EventRec {
                    kind: "oom_kill".into(),
                    ts_ms: 1_600_000_000_000,
                    pid: 7,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut rows = Rows::default();
        rows.add("h1", &b);
        let t = |name: &str| rows.tables.iter().find(|t| t.def.name == name).unwrap();
        let cpu = t("cpu");
        assert_eq!(cpu.len(), 1);
        let mut want = 1_700_000_000u32.to_le_bytes().to_vec();
        want.extend_from_slice(b"\x02h1\x05total");
        want.extend_from_slice(&1.5f32.to_le_bytes());
        want.extend_from_slice(&[0; 4 * 8]);
        assert_eq!(cpu.bytes(), &want[..]);
        assert!(cpu.column_list().starts_with("`ts`, `host`, `cpu`, `user`"));
        let lat = t("latency");
        assert!(lat
            .column_list()
            .ends_with("`bucket_upper`, `bucket_count`"));
        assert!(lat
            .bytes()
            .ends_with(&[1, 4, 0, 0, 0, 0, 0, 0, 0, 1, 3, 0, 0, 0, 0, 0, 0, 0]));
        // An event is stored at its own time, and its ms column is not a column.
        let ev = t("events");
        assert_eq!(ev.keys().next(), Some(("h1", 1_600_000_000)));
        assert!(!ev.column_list().contains("ts_ms"));
        // The system/memory/tcp rows exist even when zero.
        assert_eq!(t("system").len(), 1);
        assert_eq!(rows.len(), 6);
    }

    #[test]
    fn retain_and_append_keep_row_boundaries() {
        let mut b = Batch::default();
        for i in 0..3 {
            b.snapshots.push(Snapshot {
                ts_ms: i * 1000,
                ..Default::default()
            });
        }
        let mut a = Rows::default();
        a.add("x", &b);
        let mut c = Rows::default();
        c.add("y", &b);
        let sys = |r: &Rows| {
            r.tables
                .iter()
                .position(|t| t.def.name == "system")
                .unwrap()
        };
        let i = sys(&a);
        c.tables[i].retain(|_, ts| ts != 1);
        assert_eq!(c.tables[i].keys().collect::<Vec<_>>(), [("y", 0), ("y", 2)]);
        let (left, right) = (&mut a, &mut c);
        left.tables[i].append(&mut right.tables[i]);
        assert_eq!(left.tables[i].len(), 5);
        let one = left.tables[i].bytes().len() / 5;
        assert_eq!(
            left.tables[i].bytes()[one * 4..one * 4 + 4],
            2u32.to_le_bytes()
        );
    }
}

#[derive(Row, Serialize)]
pub struct AlertRow<'a> {
    pub ts: u32,
    pub alert_id: &'a str,
    pub rule: &'a str,
    pub host: &'a str,
    pub state: &'a str,
    pub severity: &'a str,
    pub labels: String,
    pub value: f64,
    pub threshold: Option<f64>,
    pub score: Option<f64>,
    pub starts_at: u32,
    pub ends_at: Option<u32>,
}

#[derive(Row, Serialize)]
pub struct HostRow<'a> {
    pub host: &'a str,
    pub first_seen: u32,
    pub last_seen: u32,
    pub sensor_version: &'a str,
    pub kernel: &'a str,
    pub os: &'a str,
    pub arch: &'a str,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub kernel_boot_id: &'a str,
    pub sensor_boot_id: &'a str,
    pub probes: &'a str,
}

#[derive(Row, Serialize)]
pub struct BatchRow<'a> {
    pub host: &'a str,
    pub sensor_boot_id: &'a str,
    pub seq: u64,
    pub received: u32,
    pub snapshots: u32,
    pub samples: u32,
    pub bytes: u32,
}

#[derive(Row, Serialize)]
pub struct GapRow<'a> {
    pub host: &'a str,
    pub sensor_boot_id: &'a str,
    pub first_seq: u64,
    pub last_seq: u64,
    pub from_ts: u32,
    pub to_ts: u32,
    pub batches: u64,
    pub samples: u64,
    pub received: u32,
}

#[derive(Row, Serialize)]
pub struct IntentRow<'a> {
    pub host: &'a str,
    pub sensor_boot_id: &'a str,
    pub seq: u64,
    pub created: u32,
    /// The aggregator process that wrote it (`store::writer_id`).
    pub writer: &'a str,
}
