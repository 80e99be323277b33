//! Wire version 3: a batch's snapshots written column by column before zstd, each value
//! predicted from the same series in the previous snapshot (the row with the same key
//! labels: the same CPU, device, cgroup or process).
//!
//! Per table, one length-delimited block: the number of columns the sender wrote and one
//! type code per column (none when the table has no rows in the batch), a stream of row
//! counts (one per snapshot), a stream of row references (which row of the previous
//! snapshot each row continues: 0 none, else its position relative to the row's own, so an
//! unchanged order is all ones), then the columns back to back, one value per row each,
//! without lengths (a reader steps over a column it does not know by its type code):
//! - `u32`/`u64`: the difference from the previous value, zigzag varint;
//! - `f32`: most values the sensor sends are exact functions of an integer: a rate is a
//!   counter's increase over the snapshot's interval (`k * 1000 / interval_ms`), PSI has
//!   two decimals (`k / 100`). The encoder finds that integer and writes its difference
//!   from the previous value's (a zigzag varint with a 2-bit tag), and only where neither
//!   formula gives back the value's exact bits writes the 4 bytes as they are. Lossless by
//!   construction: the decoder recomputes the float with the same formula;
//! - strings (labels, command lines): 0 when equal to the previous value, the index of an
//!   earlier string of the same column in the batch, or the string itself;
//! - histograms: bucket count, then each bucket's index step and count as varints.
//!
//! Timestamps are a first value and deltas. Forward and backward compatible like version 2:
//! a table or column the sender did not write decodes as empty/default, and tables or
//! columns a reader does not know are skipped.

use crate::codec::{put_varint, Reader};
use crate::tables::{put_delimited, read_delimited, Record, WireType};
use crate::{BucketRec, Error, Result};

/// One column's output while a batch is encoded.
pub struct ColOut {
    bytes: Vec<u8>,
    /// Strings written so far in this column (a string seen earlier in the batch is sent
    /// as its index).
    dict: std::collections::HashMap<String, u32>,
    /// The interval of the snapshot being written (rates are reconstructed from it).
    interval_ms: u32,
    prev_interval_ms: u32,
}

impl ColOut {
    fn new() -> ColOut {
        ColOut {
            bytes: Vec::new(),
            dict: std::collections::HashMap::new(),
            interval_ms: 0,
            prev_interval_ms: 0,
        }
    }

    fn finish(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.bytes);
    }
}

/// One column's input while a batch is decoded (absent: the sender did not write it).
pub struct ColIn<'a> {
    r: Option<Reader<'a>>,
    dict: Vec<String>,
    interval_ms: u32,
    prev_interval_ms: u32,
}

impl<'a> ColIn<'a> {
    fn absent() -> ColIn<'a> {
        ColIn {
            r: None,
            dict: Vec::new(),
            interval_ms: 0,
            prev_interval_ms: 0,
        }
    }

    fn done(&self) -> bool {
        self.r.as_ref().map(|r| r.remaining() == 0).unwrap_or(true)
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// A column type's version-3 encoding.
pub trait ColValue: Sized + Default + Clone {
    fn put(&self, prev: Option<&Self>, c: &mut ColOut);
    fn get(prev: Option<&Self>, c: &mut ColIn<'_>) -> Result<Self>;
}

impl ColValue for u64 {
    fn put(&self, prev: Option<&Self>, c: &mut ColOut) {
        let p = prev.copied().unwrap_or(0);
        put_varint(&mut c.bytes, zigzag(self.wrapping_sub(p) as i64));
    }
    fn get(prev: Option<&Self>, c: &mut ColIn<'_>) -> Result<Self> {
        let Some(r) = c.r.as_mut() else {
            return Ok(0);
        };
        let d = unzigzag(r.varint()?);
        Ok(prev.copied().unwrap_or(0).wrapping_add(d as u64))
    }
}

impl ColValue for u32 {
    fn put(&self, prev: Option<&Self>, c: &mut ColOut) {
        let p = prev.copied().unwrap_or(0) as i64;
        put_varint(&mut c.bytes, zigzag(*self as i64 - p));
    }
    fn get(prev: Option<&Self>, c: &mut ColIn<'_>) -> Result<Self> {
        let Some(r) = c.r.as_mut() else {
            return Ok(0);
        };
        let at = r.position();
        let v = prev.copied().unwrap_or(0) as i64 + unzigzag(r.varint()?);
        u32::try_from(v).map_err(|_| Error::VarintOverflow(at))
    }
}

/// Tags of an `f32` value (low 2 bits of its varint).
const F_RATE: u64 = 0;
const F_HUNDREDTHS: u64 = 1;
const F_RAW: u64 = 2;

/// The float a rate integer stands for over `interval_ms` (how the sensor computes rates).
fn rate_value(k: i64, interval_ms: u32) -> f32 {
    (k as f64 * 1000.0 / interval_ms as f64) as f32
}

fn hundredths_value(k: i64) -> f32 {
    (k as f64 / 100.0) as f32
}

/// The integer behind `v`, when one of the formulas gives back exactly its bits.
fn f32_integer(v: f32, interval_ms: u32) -> Option<(u64, i64)> {
    if !v.is_finite() || v.abs() > 1e15 {
        return None;
    }
    if interval_ms > 0 {
        let k = (v as f64 * interval_ms as f64 / 1000.0).round() as i64;
        if rate_value(k, interval_ms).to_bits() == v.to_bits() {
            return Some((F_RATE, k));
        }
    }
    let k = (v as f64 * 100.0).round() as i64;
    if hundredths_value(k).to_bits() == v.to_bits() {
        return Some((F_HUNDREDTHS, k));
    }
    None
}

impl ColValue for f32 {
    fn put(&self, prev: Option<&Self>, c: &mut ColOut) {
        match f32_integer(*self, c.interval_ms) {
            Some((tag, k)) => {
                // Relative to the previous value's integer of the same kind, if it had one.
                let pk = prev
                    .and_then(|p| f32_integer(*p, c.prev_interval_ms))
                    .filter(|(t, _)| *t == tag)
                    .map(|(_, k)| k)
                    .unwrap_or(0);
                put_varint(&mut c.bytes, zigzag(k.wrapping_sub(pk)) << 2 | tag);
            }
            None => {
                put_varint(&mut c.bytes, F_RAW);
                c.bytes.extend_from_slice(&self.to_bits().to_le_bytes());
            }
        }
    }
    fn get(prev: Option<&Self>, c: &mut ColIn<'_>) -> Result<Self> {
        let Some(r) = c.r.as_mut() else {
            return Ok(0.0);
        };
        let at = r.position();
        let v = r.varint()?;
        let tag = v & 3;
        if tag == F_RAW {
            if v != F_RAW {
                return Err(Error::InvalidValue {
                    what: "column f32 tag",
                    value: v,
                });
            }
            let b = r.bytes(4)?;
            return Ok(f32::from_bits(u32::from_le_bytes([b[0], b[1], b[2], b[3]])));
        }
        if tag != F_RATE && tag != F_HUNDREDTHS {
            return Err(Error::InvalidValue {
                what: "column f32 tag",
                value: v,
            });
        }
        let pk = prev
            .and_then(|p| f32_integer(*p, c.prev_interval_ms))
            .filter(|(t, _)| *t == tag)
            .map(|(_, k)| k)
            .unwrap_or(0);
        let k = pk.wrapping_add(unzigzag(v >> 2));
        if tag == F_RATE {
            if c.interval_ms == 0 {
                return Err(Error::VarintOverflow(at));
            }
            Ok(rate_value(k, c.interval_ms))
        } else {
            Ok(hundredths_value(k))
        }
    }
}

/// Strings one column may hold in its batch dictionary (beyond it, literals only).
const DICT_MAX: usize = 4096;

impl ColValue for String {
    /// 0: the previous value; 1: a new literal (length, bytes), added to the column's
    /// dictionary; n >= 2: dictionary entry n - 2.
    fn put(&self, prev: Option<&Self>, c: &mut ColOut) {
        if prev == Some(self) {
            c.bytes.push(0);
        } else if let Some(&i) = c.dict.get(self) {
            put_varint(&mut c.bytes, i as u64 + 2);
        } else {
            c.bytes.push(1);
            put_varint(&mut c.bytes, self.len() as u64);
            c.bytes.extend_from_slice(self.as_bytes());
            if c.dict.len() < DICT_MAX {
                let n = c.dict.len() as u32;
                c.dict.insert(self.clone(), n);
            }
        }
    }
    fn get(prev: Option<&Self>, c: &mut ColIn<'_>) -> Result<Self> {
        let Some(r) = c.r.as_mut() else {
            return Ok(String::new());
        };
        match r.varint()? {
            0 => prev.cloned().ok_or(Error::InvalidValue {
                what: "column string: 'same as previous' without a previous row",
                value: 0,
            }),
            1 => {
                let s = r.string("column string")?;
                if c.dict.len() < DICT_MAX {
                    c.dict.push(s.clone());
                }
                Ok(s)
            }
            n => c
                .dict
                .get((n - 2) as usize)
                .cloned()
                .ok_or(Error::InvalidValue {
                    what: "column string: dictionary entry not yet sent",
                    value: n,
                }),
        }
    }
}

impl ColValue for Vec<BucketRec> {
    fn put(&self, _prev: Option<&Self>, c: &mut ColOut) {
        put_varint(&mut c.bytes, self.len() as u64);
        let mut last = 0u32;
        for b in self {
            put_varint(&mut c.bytes, b.index.wrapping_sub(last) as u64);
            put_varint(&mut c.bytes, b.count);
            last = b.index;
        }
    }
    fn get(_prev: Option<&Self>, c: &mut ColIn<'_>) -> Result<Self> {
        let Some(r) = c.r.as_mut() else {
            return Ok(Vec::new());
        };
        let n = r.count("histogram buckets", r.limits.max_items, 2)?;
        let mut v = Vec::with_capacity(n);
        let mut last = 0u32;
        for _ in 0..n {
            let at = r.position();
            let step = u32::try_from(r.varint()?).map_err(|_| Error::VarintOverflow(at))?;
            last = last.wrapping_add(step);
            v.push(BucketRec {
                index: last,
                count: r.varint()?,
            });
        }
        Ok(v)
    }
}

/// A column's type code in a table block (so a reader can step over a column it does not
/// know: every value's length follows from its type).
fn wire_code(w: WireType) -> u8 {
    match w {
        WireType::U32 => 0,
        WireType::U64 => 1,
        WireType::F32 => 2,
        WireType::Str => 3,
        WireType::Buckets => 4,
    }
}

/// Steps over `n` values of type code `ty` (bounded by the input: every value takes at
/// least one byte).
fn skip_values(r: &mut Reader<'_>, ty: u8, n: u64) -> Result<()> {
    for _ in 0..n {
        match ty {
            0 | 1 => {
                r.varint()?;
            }
            2 => {
                if r.varint()? == F_RAW {
                    r.bytes(4)?;
                }
            }
            3 => {
                if r.varint()? == 1 {
                    let len = r.varint()?;
                    if len > r.limits.max_string {
                        return Err(Error::StringTooLong {
                            what: "column string",
                            len,
                            max: r.limits.max_string,
                        });
                    }
                    r.bytes(len as usize)?;
                }
            }
            4 => {
                let k = r.count("histogram buckets", r.limits.max_items, 2)?;
                for _ in 0..2 * k {
                    r.varint()?;
                }
            }
            t => {
                return Err(Error::InvalidValue {
                    what: "column type code",
                    value: t as u64,
                })
            }
        }
    }
    Ok(())
}

/// The key labels of a record, as one string (rows of consecutive snapshots with the same
/// key are the same series).
fn key_of<R: Record>(r: &R, key_cols: &[usize]) -> String {
    let mut k = String::new();
    for &i in key_cols {
        k.push_str(&format!("{:?}\u{0}", r.val(i)));
    }
    k
}

/// Writes one table's block for all snapshots (`rows(s)` = the table's records in `s`,
/// `interval(s)` its interval in ms).
pub fn put_table<'s, R: Record + 's, S: 's>(
    snaps: &'s [S],
    rows: impl Fn(&'s S) -> &'s [R],
    interval: impl Fn(&'s S) -> u32,
    out: &mut Vec<u8>,
) {
    let t = R::TABLE;
    let key_cols: Vec<usize> = t.key.iter().filter_map(|k| t.column(k)).collect();
    let ncols = t.columns.len();
    let mut counts = Vec::new();
    let mut refs = Vec::new();
    let mut cols: Vec<ColOut> = (0..ncols).map(|_| ColOut::new()).collect();
    let mut prev: &[R] = &[];
    let mut prev_interval = 0u32;
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for s in snaps {
        let cur = rows(s);
        let iv = interval(s);
        for c in cols.iter_mut() {
            c.interval_ms = iv;
            c.prev_interval_ms = prev_interval;
        }
        put_varint(&mut counts, cur.len() as u64);
        index.clear();
        let mut indexed = false;
        for (i, r) in cur.iter().enumerate() {
            // The previous row of the same series: usually at the same position.
            let same_pos = prev
                .get(i)
                .filter(|p| key_cols.iter().all(|&k| p.val(k) == r.val(k)));
            let j = match same_pos {
                Some(_) => Some(i),
                None if key_cols.is_empty() || prev.is_empty() => None,
                None => {
                    if !indexed {
                        for (j, p) in prev.iter().enumerate() {
                            index.entry(key_of(p, &key_cols)).or_insert(j);
                        }
                        indexed = true;
                    }
                    index.get(&key_of(r, &key_cols)).copied()
                }
            };
            put_varint(
                &mut refs,
                match j {
                    None => 0,
                    Some(j) => zigzag(j as i64 - i as i64) + 1,
                },
            );
            r.put_cols(j.map(|j| &prev[j]), &mut cols);
        }
        prev = cur;
        prev_interval = iv;
    }
    // A table without rows in the batch declares no columns.
    let empty = snaps.iter().all(|s| rows(s).is_empty());
    put_delimited(out, |o| {
        if empty {
            o.push(0);
        } else {
            put_varint(o, ncols as u64);
            o.extend(t.columns.iter().map(|c| wire_code(c.wire)));
        }
        put_delimited(o, |o| o.extend_from_slice(&counts));
        put_delimited(o, |o| o.extend_from_slice(&refs));
        for c in &cols {
            c.finish(o);
        }
    });
}

/// Reads one table's block: its records per snapshot (`intervals`: each snapshot's
/// interval in ms). A table the sender did not write (its block is missing at the end) is
/// empty.
pub fn get_table<R: Record>(r: &mut Reader<'_>, intervals: &[u32]) -> Result<Vec<Vec<R>>> {
    let n = intervals.len();
    if r.remaining() == 0 {
        return Ok(vec![Vec::new(); n]);
    }
    let name = R::TABLE.name;
    read_delimited(r, name, |r| {
        let ncols = r.count("table columns", 4096, 1)?;
        let types = r.bytes(ncols)?;
        let limits = r.limits;
        let sub = |r: &mut Reader<'_>, what: &'static str| -> Result<Vec<u8>> {
            read_delimited(r, what, |c| Ok(c.bytes(c.remaining())?.to_vec()))
        };
        let counts_b = sub(r, "row counts")?;
        let refs_b = sub(r, "row references")?;
        // Rows in the batch: each column holds one value per row, back to back.
        let mut total = 0u64;
        {
            let mut c = Reader::new(&counts_b, limits);
            while c.remaining() > 0 {
                total = total.saturating_add(c.varint()?);
            }
        }
        let mut counts = Reader::new(&counts_b, limits);
        let mut refs = Reader::new(&refs_b, limits);
        let known = R::TABLE.columns.len();
        let mut cols: Vec<ColIn<'_>> = Vec::with_capacity(known);
        for (j, &ty) in types.iter().enumerate() {
            let body = r.rest();
            let mut probe = Reader::new(body, limits);
            skip_values(&mut probe, ty, total)?;
            let len = probe.position();
            let b = r.bytes(len)?;
            if j < known {
                if ty != wire_code(R::TABLE.columns[j].wire) {
                    return Err(Error::InvalidValue {
                        what: "column type differs from this build's declaration",
                        value: j as u64,
                    });
                }
                cols.push(ColIn {
                    r: Some(Reader::new(b, limits)),
                    dict: Vec::new(),
                    interval_ms: 0,
                    prev_interval_ms: 0,
                });
            }
        }
        if r.remaining() != 0 {
            return Err(Error::TrailingBytes(r.remaining()));
        }
        while cols.len() < known {
            cols.push(ColIn::absent());
        }
        let mut out: Vec<Vec<R>> = Vec::with_capacity(n);
        let mut prev_interval = 0u32;
        for &iv in intervals {
            for c in cols.iter_mut() {
                c.interval_ms = iv;
                c.prev_interval_ms = prev_interval;
            }
            let k = counts.varint()?;
            if k > limits.max_items {
                return Err(Error::CountTooLarge {
                    what: name,
                    count: k,
                    max: limits.max_items,
                });
            }
            let k = k as usize;
            // Every row takes at least one byte of the first column: no column, no rows.
            if k > 0 && ncols == 0 {
                return Err(Error::InvalidValue {
                    what: "table rows without columns",
                    value: k as u64,
                });
            }
            let mut rows = Vec::with_capacity(k.min(4096));
            for i in 0..k {
                let at = refs.position();
                let rf = refs.varint()?;
                let prev = match rf {
                    0 => None,
                    rf => {
                        let j = i as i64 + unzigzag(rf - 1);
                        let p = out
                            .last()
                            .and_then(|p: &Vec<R>| usize::try_from(j).ok().and_then(|j| p.get(j)));
                        if p.is_none() {
                            return Err(Error::InvalidValue {
                                what: "row reference past the previous snapshot's rows",
                                value: at as u64,
                            });
                        }
                        p
                    }
                };
                rows.push(R::get_cols(prev, &mut cols)?);
            }
            out.push(rows);
            prev_interval = iv;
        }
        if counts.remaining() != 0 || refs.remaining() != 0 {
            return Err(Error::TrailingBytes(counts.remaining() + refs.remaining()));
        }
        if let Some(j) = cols.iter().position(|c| !c.done()) {
            return Err(Error::InvalidValue {
                what: "column stream longer than its rows",
                value: j as u64,
            });
        }
        Ok(out)
    })
}

/// Snapshot times: the first, then differences.
pub fn put_times(ts: impl Iterator<Item = (u64, u32)>, out: &mut Vec<u8>) {
    put_delimited(out, |o| {
        let (mut pt, mut pi) = (0u64, 0u32);
        for (t, i) in ts {
            put_varint(o, zigzag(t.wrapping_sub(pt) as i64));
            put_varint(o, zigzag(i as i64 - pi as i64));
            (pt, pi) = (t, i);
        }
    });
}

pub fn get_times(r: &mut Reader<'_>, n: usize) -> Result<Vec<(u64, u32)>> {
    read_delimited(r, "snapshot times", |r| {
        let (mut pt, mut pi) = (0u64, 0i64);
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            pt = pt.wrapping_add(unzigzag(r.varint()?) as u64);
            pi += unzigzag(r.varint()?);
            let at = r.position();
            v.push((
                pt,
                u32::try_from(pi).map_err(|_| Error::VarintOverflow(at))?,
            ));
        }
        if r.remaining() != 0 {
            return Err(Error::TrailingBytes(r.remaining()));
        }
        Ok(v)
    })
}
