//! The spool: every closed batch is written to disk before it is sent and
//! removed only when the aggregator acknowledges it (it is then durably in
//! ClickHouse). It survives sensor restarts and is replayed oldest first.
//!
//! Bounded by bytes: when a new batch does not fit, the oldest batches are
//! dropped and the loss becomes a *gap* item (host, boot, sequence and time
//! range) that is itself spooled and delivered, so the aggregator records it in
//! the `gaps` table. Nothing is dropped silently.
//!
//! On disk, one file per item, `<id>.b` (batch) or `<id>.g` (gap), ids
//! increasing. A file starts with a small header (magic, kind, seq range,
//! time range, samples, boot id) followed by the frame exactly as sent. Files
//! are written to a temporary name and renamed, so a crash never leaves a
//! half-written item. There is no fsync: the spool survives process crashes,
//! restarts and `kill -9`; a power loss can lose the last batches written.
//! An exclusive lock (`.lock`) keeps two sensors from sharing one directory.
//!
//! With no directory configured the spool lives in memory only.

use anyhow::{bail, Context, Result};
use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

const MAGIC: &[u8; 4] = b"SSP1";
/// Frames of items written by this process are also kept in memory up to this
/// many bytes, so the common case (deliver soon after closing) never reads back.
const MEM_CACHE: usize = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Batch,
    Gap,
}

/// What the spool knows of an item without reading its frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub kind: Kind,
    pub boot_id: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub from_ms: u64,
    pub to_ms: u64,
    pub batches: u64,
    pub samples: u64,
}

struct Item {
    id: u64,
    meta: Meta,
    len: usize,
    frame: Option<Arc<Vec<u8>>>,
    in_flight: bool,
    retry_at: Option<Instant>,
    /// A batch sent at least once by this process: the aggregator may have stored it
    /// though its ack never came. A gap made of one such batch stays its own record, so
    /// that the aggregator can tell it was stored after all.
    sent: bool,
}

#[derive(Default)]
struct Inner {
    items: VecDeque<Item>,
    /// Bytes of batch frames (what the bound applies to).
    bytes: usize,
    cached: usize,
    next_id: u64,
    dropped_batches: u64,
}

pub struct Spool {
    dir: Option<PathBuf>,
    host: String,
    max_bytes: usize,
    inner: Mutex<Inner>,
    _lock: Option<File>,
    pub notify: Notify,
    pub drained: Notify,
}

fn encode_header(m: &Meta) -> Vec<u8> {
    let mut h = Vec::with_capacity(64 + m.boot_id.len());
    h.extend_from_slice(MAGIC);
    h.push(match m.kind {
        Kind::Batch => b'b',
        Kind::Gap => b'g',
    });
    for v in [
        m.first_seq,
        m.last_seq,
        m.from_ms,
        m.to_ms,
        m.batches,
        m.samples,
    ] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    h.extend_from_slice(&(m.boot_id.len() as u16).to_le_bytes());
    h.extend_from_slice(m.boot_id.as_bytes());
    h
}

/// Parses a spool file: (meta, offset of the frame).
fn decode_header(buf: &[u8]) -> Option<(Meta, usize)> {
    if buf.len() < 5 + 48 + 2 || &buf[..4] != MAGIC {
        return None;
    }
    let kind = match buf[4] {
        b'b' => Kind::Batch,
        b'g' => Kind::Gap,
        _ => return None,
    };
    let u = |i: usize| u64::from_le_bytes(buf[5 + i * 8..13 + i * 8].try_into().unwrap());
    let bl = u16::from_le_bytes([buf[53], buf[54]]) as usize;
    let boot_id = std::str::from_utf8(buf.get(55..55 + bl)?).ok()?.to_string();
    Some((
        Meta {
            kind,
            boot_id,
            first_seq: u(0),
            last_seq: u(1),
            from_ms: u(2),
            to_ms: u(3),
            batches: u(4),
            samples: u(5),
        },
        55 + bl,
    ))
}

impl Spool {
    /// Opens (creating it if needed) the spool in `dir`, loading what a previous
    /// run left; `None` keeps it in memory.
    pub fn open(dir: Option<&Path>, host: &str, max_bytes: usize) -> Result<Spool> {
        let mut inner = Inner {
            next_id: 1,
            ..Default::default()
        };
        let mut lock = None;
        if let Some(d) = dir {
            std::fs::create_dir_all(d)
                .with_context(|| format!("spool_dir {}: cannot create it", d.display()))?;
            let lf = File::create(d.join(".lock"))
                .with_context(|| format!("spool_dir {}: not writable", d.display()))?;
            if unsafe { libc::flock(lf.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                bail!(
                    "spool_dir {}: in use by another sensor (locked); give each sensor its own",
                    d.display()
                );
            }
            lock = Some(lf);
            let mut found: Vec<(u64, PathBuf)> = Vec::new();
            for e in std::fs::read_dir(d).with_context(|| format!("reading {}", d.display()))? {
                let p = e?.path();
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if name.ends_with(".tmp") {
                    let _ = std::fs::remove_file(&p);
                    continue;
                }
                let Some((stem, ext)) = name.split_once('.') else {
                    continue;
                };
                if (ext == "b" || ext == "g") && stem.len() == 16 {
                    if let Ok(id) = u64::from_str_radix(stem, 16) {
                        found.push((id, p));
                    }
                }
            }
            found.sort();
            for (id, p) in found {
                let data = match std::fs::read(&p) {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::warn!(file = %p.display(), error = %e, "unreadable spool file skipped");
                        continue;
                    }
                };
                let Some((meta, off)) = decode_header(&data) else {
                    tracing::warn!(file = %p.display(), "corrupt spool file removed");
                    let _ = std::fs::remove_file(&p);
                    continue;
                };
                let len = data.len() - off;
                if meta.kind == Kind::Batch {
                    inner.bytes += len;
                }
                inner.next_id = inner.next_id.max(id + 1);
                inner.items.push_back(Item {
                    id,
                    meta,
                    len,
                    frame: None,
                    in_flight: false,
                    retry_at: None,
                    sent: false,
                });
            }
            if !inner.items.is_empty() {
                tracing::info!(
                    items = inner.items.len(),
                    bytes = inner.bytes,
                    dir = %d.display(),
                    "spool holds batches from an earlier run; they are sent first"
                );
            }
        }
        let s = Spool {
            dir: dir.map(Path::to_path_buf),
            host: host.to_string(),
            max_bytes,
            inner: Mutex::new(inner),
            _lock: lock,
            notify: Notify::new(),
            drained: Notify::new(),
        };
        // A spool left by a run with a larger bound is trimmed now.
        let mut g = s.inner.lock().unwrap();
        s.enforce_bound(&mut g);
        drop(g);
        Ok(s)
    }

    fn path(&self, id: u64, kind: Kind) -> Option<PathBuf> {
        let ext = if kind == Kind::Batch { "b" } else { "g" };
        self.dir
            .as_ref()
            .map(|d| d.join(format!("{id:016x}.{ext}")))
    }

    fn write_file(&self, id: u64, meta: &Meta, frame: &[u8]) {
        let Some(p) = self.path(id, meta.kind) else {
            return;
        };
        let tmp = p.with_extension("tmp");
        let r = (|| -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&encode_header(meta))?;
            f.write_all(frame)?;
            drop(f);
            std::fs::rename(&tmp, &p)
        })();
        if let Err(e) = r {
            // Keep going from memory: losing durability beats losing data now.
            tracing::warn!(file = %p.display(), error = %e, "cannot write to the spool; this batch is kept in memory only");
        }
    }

    fn remove_file(&self, id: u64, kind: Kind) {
        if let Some(p) = self.path(id, kind) {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Adds a closed batch (written to disk first).
    pub fn push(&self, meta: Meta, frame: Vec<u8>) {
        let mut g = self.inner.lock().unwrap();
        let id = g.next_id;
        g.next_id += 1;
        self.write_file(id, &meta, &frame);
        let len = frame.len();
        let keep = self.dir.is_none() || g.cached + len <= MEM_CACHE;
        if keep && self.dir.is_some() {
            g.cached += len;
        }
        if meta.kind == Kind::Batch {
            g.bytes += len;
        }
        g.items.push_back(Item {
            id,
            meta,
            len,
            frame: keep.then(|| Arc::new(frame)),
            in_flight: false,
            retry_at: None,
            sent: false,
        });
        self.enforce_bound(&mut g);
        drop(g);
        self.notify.notify_one();
    }

    /// Drops the oldest batches (not in flight) until the bound holds, recording
    /// each run of dropped batches as a gap.
    fn enforce_bound(&self, g: &mut Inner) {
        while g.bytes > self.max_bytes {
            let Some(pos) = g
                .items
                .iter()
                .position(|i| i.meta.kind == Kind::Batch && !i.in_flight)
            else {
                break;
            };
            // Never drop the only batch: a single batch larger than the bound is still sent.
            if g.items
                .iter()
                .filter(|i| i.meta.kind == Kind::Batch)
                .count()
                <= 1
            {
                break;
            }
            let it = g.items.remove(pos).unwrap();
            g.bytes -= it.len;
            if it.frame.is_some() && self.dir.is_some() {
                g.cached -= it.len;
            }
            g.dropped_batches += 1;
            self.remove_file(it.id, Kind::Batch);
            tracing::warn!(
                seq = it.meta.first_seq,
                spool_max_bytes = self.max_bytes,
                "spool full: dropped the oldest unacknowledged batch; the gap will be reported"
            );
            self.record_gap(g, &it.meta, it.sent);
        }
    }

    /// Records a dropped batch as a gap. `sent`: it was sent and may be stored (its ack
    /// lost): it gets a record of its own, which no later drop extends.
    fn record_gap(&self, g: &mut Inner, m: &Meta, sent: bool) {
        // Extend the newest unsent gap when this drop continues it.
        if let Some(gi) = g.items.iter_mut().rev().find(|i| {
            !sent
                && i.meta.kind == Kind::Gap
                && !i.in_flight
                && !i.sent
                && i.meta.boot_id == m.boot_id
                && i.meta.last_seq + 1 == m.first_seq
        }) {
            gi.meta.last_seq = m.last_seq;
            gi.meta.to_ms = gi.meta.to_ms.max(m.to_ms);
            gi.meta.from_ms = gi.meta.from_ms.min(m.from_ms);
            gi.meta.batches += m.batches;
            gi.meta.samples += m.samples;
            let frame = self.gap_frame(&gi.meta);
            self.write_file(gi.id, &gi.meta, &frame);
            gi.len = frame.len();
            gi.frame = Some(Arc::new(frame));
            return;
        }
        let meta = Meta {
            kind: Kind::Gap,
            ..m.clone()
        };
        let frame = self.gap_frame(&meta);
        let id = g.next_id;
        g.next_id += 1;
        self.write_file(id, &meta, &frame);
        // Gaps go to the front: the aggregator learns of a loss before newer data.
        let len = frame.len();
        g.items.push_front(Item {
            id,
            meta,
            len,
            frame: Some(Arc::new(frame)),
            in_flight: false,
            retry_at: None,
            sent,
        });
    }

    fn gap_frame(&self, m: &Meta) -> Vec<u8> {
        protocol::encode_gap(&protocol::Gap {
            host: self.host.clone(),
            boot_id: m.boot_id.clone(),
            first_seq: m.first_seq,
            last_seq: m.last_seq,
            from_ms: m.from_ms,
            to_ms: m.to_ms,
            batches: m.batches,
            samples: m.samples,
        })
    }

    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> usize {
        self.inner.lock().unwrap().bytes
    }

    pub fn dropped_batches(&self) -> u64 {
        self.inner.lock().unwrap().dropped_batches
    }

    /// The oldest item that is neither in flight nor waiting for a retry; its
    /// frame is read back from disk when it is not cached.
    pub fn next_to_send(&self) -> Option<(u64, Arc<Vec<u8>>)> {
        let now = Instant::now();
        let mut g = self.inner.lock().unwrap();
        loop {
            let pos = g
                .items
                .iter()
                .position(|i| !i.in_flight && i.retry_at.is_none_or(|t| t <= now))?;
            let it = &mut g.items[pos];
            let frame = match &it.frame {
                Some(f) => f.clone(),
                None => {
                    let p = self.path(it.id, it.meta.kind)?;
                    match std::fs::read(&p)
                        .ok()
                        .and_then(|d| decode_header(&d).map(|(_, off)| d[off..].to_vec()))
                    {
                        Some(f) => Arc::new(f),
                        None => {
                            tracing::warn!(file = %p.display(), "spool file vanished or is corrupt; skipping it");
                            let it = g.items.remove(pos).unwrap();
                            if it.meta.kind == Kind::Batch {
                                g.bytes -= it.len;
                            }
                            continue;
                        }
                    }
                }
            };
            it.in_flight = true;
            // (A gap's `sent` says it holds a batch that was sent: it is not reset.)
            it.sent |= it.meta.kind == Kind::Batch;
            it.retry_at = None;
            return Some((it.id, frame));
        }
    }

    pub fn acked(&self, id: u64) {
        let mut g = self.inner.lock().unwrap();
        if let Some(pos) = g.items.iter().position(|i| i.id == id) {
            let it = g.items.remove(pos).unwrap();
            if it.meta.kind == Kind::Batch {
                g.bytes -= it.len;
            }
            if it.frame.is_some() && self.dir.is_some() && it.meta.kind == Kind::Batch {
                g.cached -= it.len;
            }
            self.remove_file(it.id, it.meta.kind);
        }
        if g.items.is_empty() {
            self.drained.notify_waiters();
        }
    }

    pub fn retry_later(&self, id: u64, after: Duration) {
        let mut g = self.inner.lock().unwrap();
        if let Some(it) = g.items.iter_mut().find(|i| i.id == id) {
            it.in_flight = false;
            it.retry_at = Some(Instant::now() + after);
        }
    }

    pub fn unmark_all(&self) {
        let mut g = self.inner.lock().unwrap();
        for it in g.items.iter_mut() {
            it.in_flight = false;
        }
        self.enforce_bound(&mut g);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(seq: u64) -> Meta {
        Meta {
            kind: Kind::Batch,
            boot_id: "boot".into(),
            first_seq: seq,
            last_seq: seq,
            from_ms: seq * 5000,
            to_ms: seq * 5000 + 4000,
            batches: 1,
            samples: 100,
        }
    }

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sonde-spool-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn survives_reopen_and_replays_oldest_first() {
        let d = tmpdir("reopen");
        {
            let s = Spool::open(Some(&d), "h", 1 << 20).unwrap();
            for seq in 1..=3 {
                s.push(meta(seq), vec![seq as u8; 100]);
            }
            let (id, _) = s.next_to_send().unwrap();
            s.acked(id);
        }
        let s = Spool::open(Some(&d), "h", 1 << 20).unwrap();
        assert_eq!(s.len(), 2);
        let (_, f) = s.next_to_send().unwrap();
        assert_eq!(f[0], 2, "oldest unacknowledged batch first");
        let (_, f) = s.next_to_send().unwrap();
        assert_eq!(f[0], 3);
        assert!(s.next_to_send().is_none(), "both in flight");
        // A second sensor on the same directory is refused.
        let e = Spool::open(Some(&d), "h", 1 << 20).err().unwrap();
        assert!(e.to_string().contains("in use"), "{e}");
        drop(s);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn full_spool_drops_oldest_and_records_one_merged_gap() {
        let d = tmpdir("gap");
        let s = Spool::open(Some(&d), "h", 1000).unwrap();
        for seq in 1..=25 {
            s.push(meta(seq), vec![0u8; 100]);
        }
        // 10 batches fit; 15 dropped, recorded as one gap 1..=15.
        assert_eq!(s.bytes(), 1000);
        assert_eq!(s.dropped_batches(), 15);
        let (_, f) = s.next_to_send().unwrap();
        let g = protocol::decode_gap(&f, &protocol::Limits::default()).unwrap();
        assert_eq!((g.first_seq, g.last_seq, g.batches), (1, 15, 15));
        assert_eq!((g.from_ms, g.to_ms), (5000, 15 * 5000 + 4000));
        assert_eq!(g.samples, 1500);
        // The gap survives a restart too.
        drop(s);
        let s = Spool::open(Some(&d), "h", 1000).unwrap();
        assert_eq!(s.len(), 11);
        let (_, f) = s.next_to_send().unwrap();
        assert!(protocol::decode_gap(&f, &protocol::Limits::default()).is_ok());
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A batch that was sent (its connection then failed: stored or not, the sensor cannot
    /// tell) and is dropped gets a gap record of its own; the batches never sent that are
    /// dropped after it merge into another, and none of them extends the first.
    #[test]
    fn a_dropped_batch_that_was_sent_is_a_gap_of_its_own() {
        let s = Spool::open(None, "h", 1000).unwrap();
        for seq in 1..=10 {
            s.push(meta(seq), vec![0u8; 100]);
        }
        let (id, _) = s.next_to_send().unwrap();
        s.unmark_all();
        assert!(
            s.next_to_send().is_some_and(|(i, _)| i == id),
            "batch 1 is sent again first"
        );
        s.unmark_all();
        for seq in 11..=13 {
            s.push(meta(seq), vec![0u8; 100]);
        }
        assert_eq!(s.dropped_batches(), 3);
        // Both gaps, then batch 4, are sent; the connection fails again; batch 4 is
        // dropped: it does not extend the gap of 2 and 3 either.
        for _ in 0..3 {
            assert!(s.next_to_send().is_some());
        }
        s.unmark_all();
        s.push(meta(14), vec![0u8; 100]);
        assert_eq!(s.dropped_batches(), 4);
        let mut gaps = Vec::new();
        while let Some((_, f)) = s.next_to_send() {
            if let Ok(g) = protocol::decode_gap(&f, &protocol::Limits::default()) {
                gaps.push((g.first_seq, g.last_seq, g.batches));
            }
        }
        gaps.sort();
        assert_eq!(gaps, vec![(1, 1, 1), (2, 3, 2), (4, 4, 1)]);
    }

    #[test]
    fn torn_and_corrupt_files_are_ignored() {
        let d = tmpdir("torn");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("0000000000000001.tmp"), b"half").unwrap();
        std::fs::write(d.join("0000000000000002.b"), b"garbage").unwrap();
        let s = Spool::open(Some(&d), "h", 1 << 20).unwrap();
        assert!(s.is_empty());
        assert!(!d.join("0000000000000001.tmp").exists());
        s.push(meta(1), vec![1; 10]);
        assert_eq!(s.len(), 1);
        let _ = std::fs::remove_dir_all(&d);
    }
}
