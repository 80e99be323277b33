//! What a metric table *is*, and the macro that declares one.
//!
//! Every metric table is declared once, in `records.rs`, with [`tables!`]: per column its
//! name, Rust/wire type, [`Kind`], unit and a one-line description. From that declaration
//! follow the wire record and its encoding, the rows the aggregator inserts (RowBinary,
//! see [`Record::for_each_val`]), the ClickHouse DDL on both server generations, the series
//! the detector can select, `sensor once --json` and the README's table of tables.
//!
//! Wire format. Version 2 (this build) writes every table record and every snapshot
//! length-delimited (a varint byte length, then the fields in declaration order), so a
//! column appended to a declaration needs no version bump: a decoder fills columns a
//! sender did not send with zero/empty and skips columns it does not know. Version 1
//! frames (no length prefixes, a fixed field list per record) still decode: each table
//! says how many of its leading columns version 1 had (`v1 N`; 0 for tables added later).

use crate::codec::{put_varint, Decode, Encode, Reader};
use crate::{BucketRec, Result};

/// What a column holds; picks its ClickHouse type, what a sample is, and how a rollup
/// tier aggregates it over a time bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A dimension people filter and group by (device, interface, cpu, ...).
    Label,
    /// A level sampled at the instant (percent, bytes in use, queue length).
    Gauge,
    /// A per-second rate over the interval.
    Rate,
    /// A count of events over the interval (not per second).
    Counter,
    /// A size that bounds other columns (total memory, filesystem size): a gauge that
    /// rarely changes; not a detection target on its own.
    Capacity,
    /// A log2 histogram over the interval (stored as `bucket_upper` / `bucket_count`).
    Histogram,
    /// Free text kept with the row (not a dimension, not a value).
    Text,
    /// The row's own time (Unix ms on the wire), stored as `ts` instead of the
    /// snapshot's time.
    Time,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Label => "label",
            Kind::Gauge => "gauge",
            Kind::Rate => "rate",
            Kind::Counter => "counter",
            Kind::Capacity => "capacity",
            Kind::Histogram => "histogram",
            Kind::Text => "text",
            Kind::Time => "time",
        }
    }

    /// A numeric measurement (one sample per value).
    pub fn is_value(self) -> bool {
        matches!(
            self,
            Kind::Gauge | Kind::Rate | Kind::Counter | Kind::Capacity | Kind::Histogram
        )
    }

    /// What a rollup tier keeps of a column over one time bucket: the tier's column
    /// `<column><suffix>` is the ClickHouse aggregate `func` of the bucket's samples
    /// (`argMax` is the last value, by time). Empty for labels (they are the grouping
    /// key) and for the row time (tables with one are not rolled up).
    pub fn rollup(self) -> &'static [Rollup] {
        match self {
            Kind::Gauge => &[
                Rollup {
                    suffix: "",
                    func: "avg",
                },
                Rollup {
                    suffix: "_min",
                    func: "min",
                },
                Rollup {
                    suffix: "_max",
                    func: "max",
                },
                Rollup {
                    suffix: "_last",
                    func: "argMax",
                },
            ],
            // A rate times its interval is a count: `_total` is the exact number of
            // events in the bucket at the default 1 s interval (multiply by the
            // interval in seconds otherwise).
            Kind::Rate => &[
                Rollup {
                    suffix: "",
                    func: "avg",
                },
                Rollup {
                    suffix: "_max",
                    func: "max",
                },
                Rollup {
                    suffix: "_total",
                    func: "sum",
                },
            ],
            Kind::Counter => &[Rollup {
                suffix: "",
                func: "sum",
            }],
            Kind::Capacity => &[Rollup {
                suffix: "",
                func: "max",
            }],
            // Buckets are sparse (only non-empty ones are stored): merged by bucket bound.
            Kind::Histogram => &[Rollup {
                suffix: "",
                func: "sumMap",
            }],
            Kind::Text => &[Rollup {
                suffix: "",
                func: "any",
            }],
            Kind::Label | Kind::Time => &[],
        }
    }
}

/// One aggregate of a column in a rollup tier (see [`Kind::rollup`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rollup {
    pub suffix: &'static str,
    pub func: &'static str,
}

impl Rollup {
    /// How the docs name it: `last` for `argMax`.
    pub fn describe(&self) -> &'static str {
        match self.func {
            "argMax" => "last",
            "sumMap" => "sum per bucket",
            f => f,
        }
    }
}

/// The Rust (and wire) type of a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireType {
    U32,
    U64,
    F32,
    Str,
    /// `Vec<BucketRec>`: non-empty log2 buckets; stored as two arrays.
    Buckets,
}

/// Implemented by the types a column may have.
pub trait WireValue {
    const WIRE: WireType;
    fn val(&self) -> Val<'_>;
}
impl WireValue for u32 {
    const WIRE: WireType = WireType::U32;
    fn val(&self) -> Val<'_> {
        Val::U32(*self)
    }
}
impl WireValue for u64 {
    const WIRE: WireType = WireType::U64;
    fn val(&self) -> Val<'_> {
        Val::U64(*self)
    }
}
impl WireValue for f32 {
    const WIRE: WireType = WireType::F32;
    fn val(&self) -> Val<'_> {
        Val::F32(*self)
    }
}
impl WireValue for String {
    const WIRE: WireType = WireType::Str;
    fn val(&self) -> Val<'_> {
        Val::Str(self)
    }
}
impl WireValue for Vec<BucketRec> {
    const WIRE: WireType = WireType::Buckets;
    fn val(&self) -> Val<'_> {
        Val::Buckets(self)
    }
}

/// One column's value as stored (label codes already mapped to their names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Val<'a> {
    U32(u32),
    U64(u64),
    F32(f32),
    Str(&'a str),
    Buckets(&'a [BucketRec]),
}

impl Val<'_> {
    /// The numeric value (NaN for text and histograms).
    pub fn as_f64(&self) -> f64 {
        match *self {
            Val::U32(v) => v as f64,
            Val::U64(v) => v as f64,
            Val::F32(v) => v as f64,
            Val::Str(_) | Val::Buckets(_) => f64::NAN,
        }
    }
}

/// Upper bound of log2 bucket `index` (`2^index`, saturating).
pub fn bucket_upper(index: u32) -> u64 {
    1u64.checked_shl(index).unwrap_or(u64::MAX)
}

/// How many records of a table one snapshot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Card {
    /// Exactly one (`system`, `memory`, `tcp`).
    One,
    /// Zero or one (`probes`: only with eBPF probes attached).
    Optional,
    /// A list (one per CPU, device, mount, ...).
    Many,
}

#[derive(Debug)]
pub struct Column {
    pub name: &'static str,
    pub wire: WireType,
    pub kind: Kind,
    pub unit: &'static str,
    pub doc: &'static str,
    /// A numeric code on the wire stored as its name (cpu number, PSI resource).
    pub mapped: bool,
    /// The schema migration that added the column to an existing table (`since N` in the
    /// declaration); 0 = it came with its table.
    pub since: u32,
}

/// A column computed from the stored ones (`cpu.busy = 100 - idle`): selectable by the
/// detector and documented, not stored.
#[derive(Debug)]
pub struct Derived {
    pub name: &'static str,
    pub kind: Kind,
    pub unit: &'static str,
    pub doc: &'static str,
    /// The same computation as a ClickHouse expression over the stored columns.
    pub sql: &'static str,
}

#[derive(Debug)]
pub struct TableDef {
    /// The ClickHouse table and the detector's `table.` prefix.
    pub name: &'static str,
    /// The `Snapshot` field holding its records.
    pub field: &'static str,
    pub doc: &'static str,
    /// Where the sensor reads it.
    pub source: &'static str,
    pub card: Card,
    /// Sort key after `host`, before `ts`.
    pub key: &'static [&'static str],
    /// Schema migration that created the table; a column added later says which
    /// migration added it (`since N`). Released migrations are frozen: a new column or
    /// table takes the next number (see the aggregator's `store/schema.rs`).
    pub since: u32,
    /// Leading columns a version-1 frame carries (0: the table is newer than version 1).
    pub v1_fields: usize,
    pub columns: &'static [Column],
    pub derived: &'static [Derived],
    /// Other accepted names for columns: (alias, column).
    pub aliases: &'static [(&'static str, &'static str)],
}

/// The schema migration that moved value columns on current servers to the codecs chosen
/// by measurement (see [`StoredColumn::ch_type_at`]).
pub const CODECS_SINCE: u32 = 7;

impl TableDef {
    /// Whether the table has rollup tiers: every table with values, but not those whose
    /// rows carry their own time (`events`: discrete, not a series).
    pub fn rolled_up(&self) -> bool {
        !self.columns.iter().any(|c| c.kind == Kind::Time)
            && self.columns.iter().any(|c| c.kind.is_value())
    }
}

/// A ClickHouse column of a table: name and kind, with the wire type it comes from.
pub struct StoredColumn {
    pub name: &'static str,
    pub kind: Kind,
    pub wire: WireType,
    pub mapped: bool,
    /// See [`Column::since`].
    pub since: u32,
}

impl StoredColumn {
    /// The ClickHouse type a column has after schema migration `migration`: from
    /// [`CODECS_SINCE`] on, current servers compress values with the codecs chosen by
    /// measurement on a recorded host (docs/STORAGE.md: plain ZSTD(3) beat Gorilla and T64
    /// for gauges and capacities; T64 stays for counters); before it, as [`Self::ch_type`].
    pub fn ch_type_at(&self, modern: bool, migration: u32) -> &'static str {
        if !modern || migration < CODECS_SINCE {
            return self.ch_type(modern);
        }
        match (self.kind, self.wire) {
            (Kind::Label | Kind::Time | Kind::Text, _) => self.ch_type(modern),
            (Kind::Counter, WireType::U32) => "UInt32 CODEC(T64, ZSTD(1))",
            (Kind::Counter, WireType::U64) => "UInt64 CODEC(T64, ZSTD(1))",
            (_, WireType::F32) => "Float32 CODEC(ZSTD(3))",
            (_, WireType::U32) => "UInt32 CODEC(ZSTD(3))",
            (_, WireType::U64) => "UInt64 CODEC(ZSTD(3))",
            _ => self.ch_type(modern),
        }
    }

    /// The ClickHouse type on an old (18.x: plain types) or current (≥ 20.3: labels
    /// LowCardinality, codecs per value type) server, as the first migrations created it.
    pub fn ch_type(&self, modern: bool) -> &'static str {
        let string_label = self.kind == Kind::Label && (self.wire == WireType::Str || self.mapped);
        match (self.kind, self.wire, modern) {
            (Kind::Time, _, false) => "DateTime",
            (Kind::Time, _, true) => "DateTime CODEC(Delta, ZSTD(1))",
            _ if string_label && modern => "LowCardinality(String)",
            _ if string_label || self.wire == WireType::Str => "String",
            (_, WireType::F32, false) => "Float32",
            (_, WireType::F32, true) => "Float32 CODEC(Gorilla, ZSTD(1))",
            (_, WireType::U32, false) => "UInt32",
            (_, WireType::U32, true) => "UInt32 CODEC(T64, ZSTD(1))",
            (_, WireType::U64, false) => "UInt64",
            (_, WireType::U64, true) => "UInt64 CODEC(T64, ZSTD(1))",
            (_, WireType::Buckets, false) => "Array(UInt64)",
            (_, WireType::Buckets, true) => "Array(UInt64) CODEC(ZSTD(1))",
            (_, WireType::Str, _) => "String",
        }
    }
}

impl TableDef {
    /// The columns as stored, in insert order: `ts`, `host`, then the declared columns
    /// (a histogram is two array columns; the row-time column is `ts` itself).
    pub fn stored_columns(&self) -> Vec<StoredColumn> {
        let mut v = vec![
            StoredColumn {
                name: "ts",
                kind: Kind::Time,
                wire: WireType::U32,
                mapped: false,
                since: 0,
            },
            StoredColumn {
                name: "host",
                kind: Kind::Label,
                wire: WireType::Str,
                mapped: false,
                since: 0,
            },
        ];
        for c in self.columns {
            match (c.kind, c.wire) {
                (Kind::Time, _) => {}
                (_, WireType::Buckets) => {
                    for name in ["bucket_upper", "bucket_count"] {
                        v.push(StoredColumn {
                            name,
                            kind: c.kind,
                            wire: WireType::Buckets,
                            mapped: false,
                            since: c.since,
                        })
                    }
                }
                _ => v.push(StoredColumn {
                    name: c.name,
                    kind: c.kind,
                    wire: c.wire,
                    mapped: c.mapped,
                    since: c.since,
                }),
            }
        }
        v
    }

    /// Index of a declared column.
    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }

    /// Columns that are dimensions of a series (labels), by index.
    pub fn label_columns(&self) -> impl Iterator<Item = (usize, &'static Column)> {
        self.columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.kind == Kind::Label)
    }

    /// Number of value columns (a histogram counts once here).
    pub fn value_columns(&self) -> usize {
        self.columns.iter().filter(|c| c.kind.is_value()).count()
    }

    pub fn has_histogram(&self) -> bool {
        self.columns.iter().any(|c| c.kind == Kind::Histogram)
    }
}

/// A table record: the generated struct of one declaration.
pub trait Record: Encode + Decode + Default + Clone + std::fmt::Debug {
    const TABLE: &'static TableDef;
    /// Calls `f` with every declared column's stored value, in declaration order.
    fn for_each_val<F: FnMut(Val<'_>)>(&self, f: F);
    /// Declared column `i`'s stored value.
    fn val(&self, i: usize) -> Val<'_>;
    /// Derived column `j` (index into `TABLE.derived`).
    fn derived(&self, j: usize) -> f64;
    /// The record's own time in Unix ms (a `Time` column), if the table has one.
    fn time_ms(&self) -> Option<u64>;
    /// The version-1 encoding (the first `TABLE.v1_fields` columns, no length prefix), for
    /// an aggregator of the previous release.
    fn encode_v1(&self, out: &mut Vec<u8>);
    /// Version 3: appends each column's value, predicted from `prev`, to its stream.
    fn put_cols(&self, prev: Option<&Self>, cols: &mut [crate::columnar::ColOut]);
    /// Version 3: the next record from the column streams.
    fn get_cols(prev: Option<&Self>, cols: &mut [crate::columnar::ColIn<'_>]) -> Result<Self>;
    /// Samples this record carries: one per value column, one per histogram bucket,
    /// at least one.
    fn samples(&self) -> usize {
        let mut n = 0;
        self.for_each_val(|v| {
            if let Val::Buckets(b) = v {
                n += b.len();
            }
        });
        (n + Self::TABLE.value_columns()).max(1)
    }
}

/// Object-safe view of any record (what the detector selects from).
pub trait DynRecord {
    fn table(&self) -> &'static TableDef;
    fn val(&self, i: usize) -> Val<'_>;
    fn derived(&self, j: usize) -> f64;
}
impl<R: Record> DynRecord for R {
    fn table(&self) -> &'static TableDef {
        R::TABLE
    }
    fn val(&self, i: usize) -> Val<'_> {
        Record::val(self, i)
    }
    fn derived(&self, j: usize) -> f64 {
        Record::derived(self, j)
    }
}

/// Version-1 encoding of a snapshot field (a record, a list or an optional record).
pub trait EncodeV1 {
    fn encode_v1(&self, out: &mut Vec<u8>);
}
impl<R: Record> EncodeV1 for R {
    fn encode_v1(&self, out: &mut Vec<u8>) {
        Record::encode_v1(self, out)
    }
}
impl<R: Record> EncodeV1 for Vec<R> {
    fn encode_v1(&self, out: &mut Vec<u8>) {
        put_varint(out, self.len() as u64);
        for r in self {
            r.encode_v1(out);
        }
    }
}
impl<R: Record> EncodeV1 for Option<R> {
    fn encode_v1(&self, out: &mut Vec<u8>) {
        match self {
            None => out.push(0),
            Some(r) => {
                out.push(1);
                r.encode_v1(out);
            }
        }
    }
}

/// Visits every record of a snapshot, table by table (see `Snapshot::visit`).
pub trait Visitor {
    /// `table` is the index into [`crate::TABLES`].
    fn record<R: Record>(&mut self, table: usize, r: &R);
}

/// Writes `body` preceded by its length in bytes as a varint.
pub fn put_delimited(out: &mut Vec<u8>, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.push(0);
    body(out);
    let len = out.len() - start - 1;
    if len < 0x80 {
        out[start] = len as u8;
    } else {
        let mut hdr = Vec::with_capacity(4);
        put_varint(&mut hdr, len as u64);
        out.splice(start..start + 1, hdr);
    }
}

/// Reads a length-delimited body: `f` gets a reader over exactly its bytes and must
/// stop at its end; bytes it leaves (fields of a newer sender) are skipped.
pub fn read_delimited<'a, T>(
    r: &mut Reader<'a>,
    what: &'static str,
    f: impl FnOnce(&mut Reader<'a>) -> Result<T>,
) -> Result<T> {
    let len = r.count(what, r.limits.max_decompressed as u64, 1)?;
    let body = r.bytes(len)?;
    let mut sub = Reader::new(body, r.limits).with_version(r.version);
    f(&mut sub)
}

/// Decodes `T` unless the delimited body is exhausted (a column the sender did not
/// know): then the default.
pub fn field_or_default<T: Decode + Default>(r: &mut Reader<'_>, delimited: bool) -> Result<T> {
    if delimited && r.remaining() == 0 {
        Ok(T::default())
    } else {
        T::decode(r)
    }
}

/// Declares the metric tables and the `Snapshot` that carries them; see `records.rs`.
#[macro_export]
macro_rules! tables {
    ($(
        $(#[doc = $tdoc:literal])*
        table $tname:ident ($field:ident : $card:ident $rec:ident) from $source:literal,
            key [$($key:ident),*], since $since:literal, v1 $v1:literal {
            $($cols:tt)*
        }
        derived { $($der:tt)* }
        aliases { $($al:tt)* }
    )*) => {
        $(
            $crate::table! {
                $(#[doc = $tdoc])*
                table $tname ($field : $card $rec) from $source,
                    key [$($key),*], since $since, v1 $v1 { $($cols)* }
                derived { $($der)* }
                aliases { $($al)* }
            }
        )*

        /// Every metric table, in wire order.
        pub const TABLES: &[&$crate::tables::TableDef] = &[$(<$rec as $crate::tables::Record>::TABLE),*];

        /// Everything collected at one instant.
        #[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
        pub struct Snapshot {
            /// Unix time, milliseconds.
            pub ts_ms: u64,
            /// The interval the rates in this snapshot cover, milliseconds.
            pub interval_ms: u32,
            $(
                $(#[doc = $tdoc])*
                pub $field: $crate::card_type!($card $rec),
            )*
        }

        impl Snapshot {
            /// Calls the visitor with every record, table by table in `TABLES` order.
            pub fn visit<V: $crate::tables::Visitor>(&self, v: &mut V) {
                let mut _i = 0usize;
                $(
                    $crate::card_each!($card, &self.$field, |r| v.record(_i, r));
                    _i += 1;
                )*
            }

            /// Calls `f` with every record of table `table` (index into `TABLES`).
            pub fn each_of(&self, table: usize, f: &mut dyn FnMut(&dyn $crate::tables::DynRecord)) {
                let mut _i = 0usize;
                $(
                    if table == _i {
                        $crate::card_each!($card, &self.$field, |r| f(r));
                        return;
                    }
                    _i += 1;
                )*
            }
        }

        impl Snapshot {
            /// The version-1 encoding: only the tables version 1 had, records as version 1
            /// wrote them.
            pub fn encode_v1(&self, out: &mut Vec<u8>) {
                $crate::Encode::encode(&self.ts_ms, out);
                $crate::Encode::encode(&self.interval_ms, out);
                $(
                    if <$rec as $crate::tables::Record>::TABLE.v1_fields > 0 {
                        $crate::tables::EncodeV1::encode_v1(&self.$field, out);
                    }
                )*
            }
        }

        impl Snapshot {
            /// Wire version 3: `snaps` column by column (see `columnar.rs`).
            pub fn encode_columns(snaps: &[Snapshot], out: &mut Vec<u8>) {
                $crate::columnar::put_times(snaps.iter().map(|s| (s.ts_ms, s.interval_ms)), out);
                $(
                    $crate::columnar::put_table::<$rec, Snapshot>(snaps, |s| $crate::card_slice!($card, &s.$field), |s| s.interval_ms, out);
                )*
            }

            /// Reads what [`Snapshot::encode_columns`] wrote for `n` snapshots; blocks of
            /// tables this build does not know are skipped.
            pub fn decode_columns(r: &mut $crate::Reader<'_>, n: usize) -> $crate::Result<Vec<Snapshot>> {
                let times = $crate::columnar::get_times(r, n)?;
                let intervals: Vec<u32> = times.iter().map(|t| t.1).collect();
                let mut snaps: Vec<Snapshot> = times
                    .into_iter()
                    .map(|(ts_ms, interval_ms)| Snapshot { ts_ms, interval_ms, ..Default::default() })
                    .collect();
                $(
                    let t = $crate::columnar::get_table::<$rec>(r, &intervals)?;
                    for (s, rows) in snaps.iter_mut().zip(t) {
                        s.$field = $crate::card_from!($card, rows);
                    }
                )*
                while r.remaining() > 0 {
                    $crate::tables::read_delimited(r, "table of a newer sender", |t| t.bytes(t.remaining()).map(|_| ()))?;
                }
                Ok(snaps)
            }
        }

        impl $crate::Encode for Snapshot {
            fn encode(&self, out: &mut Vec<u8>) {
                $crate::tables::put_delimited(out, |out| {
                    $crate::Encode::encode(&self.ts_ms, out);
                    $crate::Encode::encode(&self.interval_ms, out);
                    $($crate::Encode::encode(&self.$field, out);)*
                });
            }
        }

        impl $crate::Decode for Snapshot {
            fn decode(r: &mut $crate::Reader<'_>) -> $crate::Result<Self> {
                fn fields(r: &mut $crate::Reader<'_>, delimited: bool) -> $crate::Result<Snapshot> {
                    let mut s = Snapshot {
                        ts_ms: $crate::Decode::decode(r)?,
                        interval_ms: $crate::Decode::decode(r)?,
                        ..Default::default()
                    };
                    $(
                        // A version-1 snapshot has only the tables version 1 had.
                        if delimited || <$rec as $crate::tables::Record>::TABLE.v1_fields > 0 {
                            s.$field = $crate::tables::field_or_default(r, delimited)?;
                        }
                    )*
                    Ok(s)
                }
                if r.version >= 2 {
                    $crate::tables::read_delimited(r, "snapshot", |r| fields(r, true))
                } else {
                    fields(r, false)
                }
            }
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! card_type {
    (One $rec:ident) => { $rec };
    (Optional $rec:ident) => { Option<$rec> };
    (Many $rec:ident) => { Vec<$rec> };
}

#[doc(hidden)]
#[macro_export]
macro_rules! card_slice {
    (One, $x:expr) => {
        std::slice::from_ref($x)
    };
    (Optional, $x:expr) => {
        $x.as_slice()
    };
    (Many, $x:expr) => {
        &$x[..]
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! card_from {
    (One, $rows:expr) => {
        $rows.into_iter().next().unwrap_or_default()
    };
    (Optional, $rows:expr) => {
        $rows.into_iter().next()
    };
    (Many, $rows:expr) => {
        $rows
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! card_each {
    (One, $x:expr, |$r:ident| $body:expr) => {{
        let $r = $x;
        $body;
    }};
    (Optional, $x:expr, |$r:ident| $body:expr) => {{
        if let Some($r) = $x {
            $body;
        }
    }};
    (Many, $x:expr, |$r:ident| $body:expr) => {{
        for $r in $x.iter() {
            $body;
        }
    }};
}

#[doc(hidden)]
#[macro_export]
macro_rules! col_val {
    ($x:expr) => {
        $crate::tables::WireValue::val(&$x)
    };
    ($x:expr, $conv:path) => {
        $crate::tables::Val::Str($conv($x))
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! col_mapped {
    () => {
        false
    };
    ($conv:path) => {
        true
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! col_time {
    (Time, $x:expr) => {
        return Some($x as u64)
    };
    ($kind:ident, $x:expr) => {
        let _ = &$x;
    };
}

/// One table of [`tables!`].
#[doc(hidden)]
#[macro_export]
macro_rules! table {
    (
        $(#[doc = $tdoc:literal])*
        table $tname:ident ($field:ident : $card:ident $rec:ident) from $source:literal,
            key [$($key:ident),*], since $since:literal, v1 $v1:literal {
            $(
                $(#[doc = $cdoc:literal])*
                $f:ident : $ft:ty = $kind:ident($unit:literal) $(as $conv:ident)? $(since $csince:literal)?
            ),* $(,)?
        }
        derived { $(
            $(#[doc = $ddoc:literal])*
            $d:ident = $dkind:ident($dunit:literal) sql $dsql:literal |$r:ident| $e:expr
        ),* $(,)? }
        aliases { $($a:ident = $target:ident),* $(,)? }
    ) => {
        $(#[doc = $tdoc])*
        #[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
        pub struct $rec {
            $($(#[doc = $cdoc])* pub $f: $ft,)*
        }

        impl $crate::tables::Record for $rec {
            const TABLE: &'static $crate::tables::TableDef = &$crate::tables::TableDef {
                name: stringify!($tname),
                field: stringify!($field),
                doc: concat!($($tdoc),*),
                source: $source,
                card: $crate::tables::Card::$card,
                key: &[$(stringify!($key)),*],
                since: $since,
                v1_fields: $v1,
                columns: &[$($crate::tables::Column {
                    name: stringify!($f),
                    wire: <$ft as $crate::tables::WireValue>::WIRE,
                    kind: $crate::tables::Kind::$kind,
                    unit: $unit,
                    doc: concat!($($cdoc),*),
                    mapped: $crate::col_mapped!($($conv)?),
                    since: 0 $(+ $csince)?,
                }),*],
                derived: &[$($crate::tables::Derived {
                    name: stringify!($d),
                    kind: $crate::tables::Kind::$dkind,
                    unit: $dunit,
                    doc: concat!($($ddoc),*),
                    sql: $dsql,
                }),*],
                aliases: &[$((stringify!($a), stringify!($target))),*],
            };

            fn for_each_val<F: FnMut($crate::tables::Val<'_>)>(&self, mut f: F) {
                $(f($crate::col_val!(self.$f $(, $conv)?));)*
            }

            #[allow(unused_assignments)]
            fn val(&self, i: usize) -> $crate::tables::Val<'_> {
                let mut k = 0usize;
                $(
                    if i == k {
                        return $crate::col_val!(self.$f $(, $conv)?);
                    }
                    k += 1;
                )*
                panic!("{} has no column {i}", stringify!($tname))
            }

            fn derived(&self, j: usize) -> f64 {
                const F: &[fn(&$rec) -> f64] = &[$({
                    fn d($r: &$rec) -> f64 { $e }
                    d
                }),*];
                F[j](self)
            }

            #[allow(unused_assignments, unused_comparisons)]
            fn encode_v1(&self, out: &mut Vec<u8>) {
                let mut k = 0usize;
                $(
                    if k < $v1 {
                        $crate::Encode::encode(&self.$f, out);
                    }
                    k += 1;
                )*
            }

            #[allow(unused_assignments)]
            fn put_cols(&self, prev: Option<&Self>, cols: &mut [$crate::columnar::ColOut]) {
                let mut k = 0usize;
                $(
                    $crate::columnar::ColValue::put(&self.$f, prev.map(|p| &p.$f), &mut cols[k]);
                    k += 1;
                )*
            }

            #[allow(unused_assignments)]
            fn get_cols(prev: Option<&Self>, cols: &mut [$crate::columnar::ColIn<'_>]) -> $crate::Result<Self> {
                let mut v = $rec::default();
                let mut k = 0usize;
                $(
                    v.$f = $crate::columnar::ColValue::get(prev.map(|p| &p.$f), &mut cols[k])?;
                    k += 1;
                )*
                Ok(v)
            }

            #[allow(unreachable_code)]
            fn time_ms(&self) -> Option<u64> {
                $($crate::col_time!($kind, self.$f);)*
                None
            }
        }

        impl $crate::Encode for $rec {
            fn encode(&self, out: &mut Vec<u8>) {
                $crate::tables::put_delimited(out, |out| {
                    $($crate::Encode::encode(&self.$f, out);)*
                });
            }
        }

        impl $crate::Decode for $rec {
            #[allow(unused_assignments)]
            fn decode(r: &mut $crate::Reader<'_>) -> $crate::Result<Self> {
                fn fields(r: &mut $crate::Reader<'_>, delimited: bool, max: usize) -> $crate::Result<$rec> {
                    let mut v = $rec::default();
                    let mut k = 0usize;
                    $(
                        if k < max {
                            v.$f = $crate::tables::field_or_default(r, delimited)?;
                        }
                        k += 1;
                    )*
                    Ok(v)
                }
                if r.version >= 2 {
                    $crate::tables::read_delimited(r, stringify!($tname), |r| fields(r, true, usize::MAX))
                } else {
                    fields(r, false, $v1)
                }
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DiskRec, Limits, TcpRec, TABLES};

    #[test]
    fn declarations_are_consistent() {
        let mut names = std::collections::HashSet::new();
        for t in TABLES {
            assert!(names.insert(t.name), "table {} declared twice", t.name);
            let stored: Vec<&str> = t.stored_columns().iter().map(|c| c.name).collect();
            let unique: std::collections::HashSet<_> = stored.iter().collect();
            assert_eq!(unique.len(), stored.len(), "{}: a column twice", t.name);
            for k in t.key {
                let i = t.column(k).unwrap_or_else(|| panic!("{}: key {k}", t.name));
                assert_eq!(t.columns[i].kind, Kind::Label, "{}: key {k}", t.name);
            }
            for (a, target) in t.aliases {
                assert!(t.column(target).is_some(), "{}: alias {a}", t.name);
                assert!(t.column(a).is_none(), "{}: alias {a} shadows", t.name);
            }
            for d in t.derived {
                assert!(t.column(d.name).is_none(), "{}: derived {}", t.name, d.name);
                assert!(!d.sql.is_empty() && !d.doc.is_empty());
            }
            assert!(t.v1_fields <= t.columns.len());
            for c in t.columns {
                assert!(
                    c.since == 0 || c.since > t.since,
                    "{}.{}: since {} is not after its table's {}",
                    t.name,
                    c.name,
                    c.since,
                    t.since
                );
            }
            assert!(!t.doc.is_empty() && t.columns.iter().all(|c| !c.doc.is_empty()));
        }
    }

    fn body(r: &impl Encode) -> Vec<u8> {
        let mut v = Vec::new();
        r.encode(&mut v);
        assert_eq!(v[0] as usize, v.len() - 1, "one-byte length prefix");
        v[1..].to_vec()
    }

    fn delimited(body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        put_delimited(&mut v, |o| o.extend_from_slice(body));
        v
    }

    /// A sender one column behind (no `listen_drops_per_s`) and one a column ahead
    /// (something after it) both decode; the records after them are not disturbed.
    #[test]
    fn columns_added_or_unknown_are_tolerated() {
        let t = TcpRec {
            retrans_segs_per_s: 1.5,
            curr_estab: 9,
            listen_overflows_per_s: 2.0,
            listen_drops_per_s: 3.0,
            ..Default::default()
        };
        let full = body(&t);
        let older = delimited(&full[..full.len() - 4]);
        let got = TcpRec::decode(&mut Reader::new(&older, Limits::default())).unwrap();
        assert_eq!(
            got,
            TcpRec {
                listen_drops_per_s: 0.0,
                ..t.clone()
            }
        );

        let d1 = DiskRec {
            device: "sda".into(),
            util_pct: 50.0,
            ..Default::default()
        };
        let d2 = DiskRec {
            device: "sdb".into(),
            in_flight: 3,
            ..Default::default()
        };
        let mut newer = body(&d1);
        newer.extend_from_slice(&[0xaa, 0xbb, 0x01]); // a column this build does not know
        let mut list = vec![2u8];
        list.extend(delimited(&newer));
        d2.encode(&mut list);
        let got = Vec::<DiskRec>::decode(&mut Reader::new(&list, Limits::default())).unwrap();
        assert_eq!(got, vec![d1, d2]);
    }

    #[test]
    fn long_bodies_get_a_longer_prefix() {
        let mut v = vec![7u8];
        put_delimited(&mut v, |o| o.extend_from_slice(&[1u8; 300]));
        assert_eq!(&v[..3], &[7, 0xac, 0x02]);
        assert_eq!(v.len(), 3 + 300);
        let mut r = Reader::new(&v[1..], Limits::default());
        let n = read_delimited(&mut r, "x", |s| Ok(s.remaining())).unwrap();
        assert_eq!((n, r.remaining()), (300, 0));
    }

    #[test]
    fn a_delimited_length_past_the_end_is_an_error() {
        let v = [5u8, 1, 2];
        let e = TcpRec::decode(&mut Reader::new(&v, Limits::default())).unwrap_err();
        assert!(matches!(e, crate::Error::Truncated { .. }), "{e:?}");
    }
}
