//! Framing and compression.

use crate::codec::{put_varint, Decode, Encode, Reader};
use crate::{Batch, Error, HostInfo, Limits, Result, Snapshot};

pub const MAGIC: [u8; 4] = *b"SOND";
/// The wire version this build writes in batch frames (3: snapshots column by column, see
/// `columnar.rs`; 2: length-delimited records, see `tables.rs`).
pub const VERSION: u8 = 3;
/// The oldest version this build still reads.
pub const MIN_VERSION: u8 = 1;
pub const FRAME_HEADER_LEN: usize = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Sensor → aggregator: a zstd-compressed batch.
    Batch = 1,
    /// Aggregator → sensor: the batch with this sequence number is durably stored.
    Ack = 2,
    /// Aggregator → sensor: the batch was not stored; the text says why.
    Error = 3,
    /// Sensor → aggregator: batches the sensor dropped for good (spool full).
    Gap = 4,
}

impl FrameKind {
    fn from_u8(v: u8) -> Result<Self> {
        match v {
            1 => Ok(FrameKind::Batch),
            2 => Ok(FrameKind::Ack),
            3 => Ok(FrameKind::Error),
            4 => Ok(FrameKind::Gap),
            k => Err(Error::UnknownKind(k)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub version: u8,
    pub kind: FrameKind,
    pub flags: u8,
    pub len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<'a> {
    pub header: FrameHeader,
    pub payload: &'a [u8],
}

/// Parses the fixed 12-byte header and checks the payload length against
/// `limits.max_frame` so a reader knows how much to read before reading it.
pub fn decode_frame_header(buf: &[u8], limits: &Limits) -> Result<FrameHeader> {
    if buf.len() < FRAME_HEADER_LEN {
        return Err(Error::Truncated {
            offset: buf.len(),
            needed: FRAME_HEADER_LEN - buf.len(),
        });
    }
    let magic = [buf[0], buf[1], buf[2], buf[3]];
    if magic != MAGIC {
        return Err(Error::BadMagic(magic));
    }
    let version = buf[4];
    if !(MIN_VERSION..=VERSION).contains(&version) {
        return Err(Error::UnsupportedVersion(version));
    }
    let kind = FrameKind::from_u8(buf[5])?;
    let flags = buf[6];
    let len = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
    if len > limits.max_frame {
        return Err(Error::FrameTooLarge {
            len,
            max: limits.max_frame,
        });
    }
    Ok(FrameHeader {
        version,
        kind,
        flags,
        len,
    })
}

/// Parses one complete frame occupying all of `buf`.
pub fn decode_frame<'a>(buf: &'a [u8], limits: &Limits) -> Result<Frame<'a>> {
    let header = decode_frame_header(buf, limits)?;
    let body = &buf[FRAME_HEADER_LEN..];
    if body.len() < header.len {
        return Err(Error::Truncated {
            offset: buf.len(),
            needed: header.len - body.len(),
        });
    }
    if body.len() > header.len {
        return Err(Error::TrailingFrameBytes(body.len() - header.len));
    }
    Ok(Frame {
        header,
        payload: body,
    })
}

/// Writes a frame. Only batch payloads changed in version 2; acks, errors and gaps are
/// written as version 1 so sensors of the previous release still understand the acks
/// of this aggregator.
pub fn encode_frame(kind: FrameKind, payload: &[u8], out: &mut Vec<u8>) {
    let v = if kind == FrameKind::Batch { VERSION } else { 1 };
    encode_frame_version(kind, v, payload, out)
}

fn encode_frame_version(kind: FrameKind, version: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&MAGIC);
    out.push(version);
    out.push(kind as u8);
    out.push(0);
    out.push(0);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Encodes and compresses a batch into a complete frame (this build's version).
/// `scratch` is reused between calls to avoid allocation.
pub fn encode_batch(batch: &Batch, level: i32, scratch: &mut Vec<u8>) -> Vec<u8> {
    scratch.clear();
    put_batch_head(scratch, &parts_of(batch), batch.snapshots.len() as u64);
    Snapshot::encode_columns(&batch.snapshots, scratch);
    compress_frame(scratch, VERSION, level)
}

/// A batch frame in wire version `version` (1, 2 or 3), for an aggregator that reads no
/// newer (columns and tables a version did not have are left out of it).
pub fn encode_batch_version(batch: &Batch, version: u8, level: i32) -> Vec<u8> {
    match version {
        1 => encode_batch_v1(batch, level),
        2 => {
            let mut raw = Vec::new();
            put_batch_head(&mut raw, &parts_of(batch), batch.snapshots.len() as u64);
            for s in &batch.snapshots {
                s.encode(&mut raw);
            }
            compress_frame(&raw, 2, level)
        }
        _ => encode_batch(batch, level, &mut Vec::new()),
    }
}

fn parts_of(batch: &Batch) -> BatchParts<'_> {
    BatchParts {
        host: &batch.host,
        boot_id: &batch.boot_id,
        seq: batch.seq,
        info: batch.info.as_ref(),
    }
}

fn put_batch_head(out: &mut Vec<u8>, parts: &BatchParts<'_>, count: u64) {
    crate::codec::put_str(out, parts.host);
    crate::codec::put_str(out, parts.boot_id);
    put_varint(out, parts.seq);
    match parts.info {
        None => out.push(0),
        Some(i) => {
            out.push(1);
            i.encode(out);
        }
    }
    put_varint(out, count);
}

fn compress_frame(raw: &[u8], version: u8, level: i32) -> Vec<u8> {
    let compressed =
        zstd::bulk::compress(raw, level).expect("zstd compression of an in-memory buffer");
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + compressed.len());
    encode_frame_version(FrameKind::Batch, version, &compressed, &mut out);
    out
}

/// The batch header fields, for [`encode_batch_parts`].
pub struct BatchParts<'a> {
    pub host: &'a str,
    pub boot_id: &'a str,
    pub seq: u64,
    pub info: Option<&'a HostInfo>,
}

/// Builds a batch frame from snapshots that were already encoded one by one (version 2
/// records) into `snapshots` (how the sensor batches without keeping typed copies): they
/// are read back and written column by column. Produces exactly the bytes of
/// [`encode_batch`] for the same batch.
pub fn encode_batch_parts(
    parts: &BatchParts<'_>,
    count: u64,
    snapshots: &[u8],
    level: i32,
    scratch: &mut Vec<u8>,
) -> Vec<u8> {
    let mut r = Reader::new(snapshots, Limits::default()).with_version(2);
    let snaps: Vec<Snapshot> = (0..count)
        .map_while(|_| Snapshot::decode(&mut r).ok())
        .collect();
    debug_assert_eq!(
        snaps.len() as u64,
        count,
        "snapshots the sensor encoded itself"
    );
    scratch.clear();
    put_batch_head(scratch, parts, snaps.len() as u64);
    Snapshot::encode_columns(&snaps, scratch);
    compress_frame(scratch, VERSION, level)
}

/// A batch frame in wire version 1, for an aggregator of the previous release (columns and
/// tables version 1 did not have are left out).
pub fn encode_batch_v1(batch: &Batch, level: i32) -> Vec<u8> {
    let mut raw = Vec::new();
    crate::codec::put_str(&mut raw, &batch.host);
    crate::codec::put_str(&mut raw, &batch.boot_id);
    put_varint(&mut raw, batch.seq);
    batch.info.encode(&mut raw);
    put_varint(&mut raw, batch.snapshots.len() as u64);
    for s in &batch.snapshots {
        s.encode_v1(&mut raw);
    }
    let compressed =
        zstd::bulk::compress(&raw, level).expect("zstd compression of an in-memory buffer");
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + compressed.len());
    encode_frame_version(FrameKind::Batch, 1, &compressed, &mut out);
    out
}

/// Rewrites a batch frame of a newer version as version 1 (what a sensor sends to an
/// aggregator of the release before last); a version-1 frame is returned as it is.
pub fn downgrade_batch_frame(frame: &[u8], limits: &Limits) -> Result<Vec<u8>> {
    downgrade_batch_frame_to(frame, 1, limits)
}

/// Rewrites a batch frame of a newer version than `version` in `version` (what a sensor
/// sends to an aggregator that reads no newer); an older or equal frame is returned as is.
pub fn downgrade_batch_frame_to(frame: &[u8], version: u8, limits: &Limits) -> Result<Vec<u8>> {
    let h = decode_frame_header(frame, limits)?;
    if h.version <= version {
        return Ok(frame.to_vec());
    }
    Ok(encode_batch_version(
        &decode_batch(frame, limits)?,
        version,
        3,
    ))
}

/// Decodes a complete batch frame: header, bounded zstd, records.
pub fn decode_batch(buf: &[u8], limits: &Limits) -> Result<Batch> {
    let frame = decode_frame(buf, limits)?;
    if frame.header.kind != FrameKind::Batch {
        return Err(Error::UnexpectedKind {
            expected: FrameKind::Batch,
            got: frame.header.kind,
        });
    }
    let raw = decompress_bounded(frame.payload, limits.max_decompressed)?;
    let mut r = Reader::new(&raw, *limits).with_version(frame.header.version);
    let batch = Batch::decode(&mut r)?;
    if r.remaining() != 0 {
        return Err(Error::TrailingBytes(r.remaining()));
    }
    Ok(batch)
}

/// Streams zstd output and stops as soon as it would exceed `max`: the
/// frame's declared content size is never trusted for allocation.
///
/// Each thread keeps one decompression context (about 100 kB of tables) and
/// resets it per call: creating one per batch was 1 % of the aggregator's CPU at
/// 2 M samples/s, and its allocation churn more.
pub fn decompress_bounded(input: &[u8], max: usize) -> Result<Vec<u8>> {
    use zstd::zstd_safe::{get_error_name, DCtx, InBuffer, OutBuffer, ResetDirective};
    thread_local! {
        static DCTX: std::cell::RefCell<Option<DCtx<'static>>> = const { std::cell::RefCell::new(None) };
    }
    let zerr = |c| Error::Zstd(get_error_name(c).to_string());
    DCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        let dctx = slot.get_or_insert_with(DCtx::create);
        dctx.reset(ResetDirective::SessionOnly).map_err(zerr)?;
        let cap = input
            .len()
            .saturating_mul(4)
            .clamp(64, max.saturating_add(1));
        let mut out: Vec<u8> = Vec::with_capacity(cap);
        let mut inb = InBuffer::around(input);
        // Whether the last call ended a frame: input that stops inside one is an error.
        let frame_done = loop {
            if out.len() == out.capacity() {
                if out.len() > max {
                    return Err(Error::DecompressedTooLarge { max });
                }
                let grow = out.len().max(4096).min(max + 1 - out.len());
                out.reserve_exact(grow);
            }
            let before = (inb.pos(), out.len());
            let pos = out.len();
            let mut ob = OutBuffer::around_pos(&mut out, pos);
            let hint = dctx.decompress_stream(&mut ob, &mut inb).map_err(zerr)?;
            drop(ob);
            if out.len() > max {
                return Err(Error::DecompressedTooLarge { max });
            }
            if inb.pos() == input.len() {
                // All input given: done when the frame ended and zstd has nothing
                // more to write (a full output buffer may hide more).
                if hint == 0 {
                    break true;
                }
                if out.len() < out.capacity() && (inb.pos(), out.len()) == before {
                    break false;
                }
            }
        };
        if !frame_done {
            return Err(Error::Zstd("incomplete zstd frame".into()));
        }
        Ok(out)
    })
}

pub fn encode_ack(seq: u64) -> Vec<u8> {
    let mut p = Vec::with_capacity(10);
    put_varint(&mut p, seq);
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + p.len());
    encode_frame(FrameKind::Ack, &p, &mut out);
    out
}

pub fn encode_error(seq: u64, msg: &str) -> Vec<u8> {
    let mut p = Vec::new();
    put_varint(&mut p, seq);
    let msg = &msg[..msg.len().min(1024)];
    crate::codec::put_str(&mut p, msg);
    let mut out = Vec::new();
    encode_frame(FrameKind::Error, &p, &mut out);
    out
}

/// Decodes the aggregator's reply to a batch: `Ok(seq)` for an ack,
/// `Err((seq, message))` for an error frame.
pub fn decode_ack(buf: &[u8]) -> Result<std::result::Result<u64, (u64, String)>> {
    let limits = Limits {
        max_frame: 4096,
        ..Limits::default()
    };
    let frame = decode_frame(buf, &limits)?;
    let mut r = Reader::new(frame.payload, limits);
    let seq = r.varint()?;
    match frame.header.kind {
        FrameKind::Ack => Ok(Ok(seq)),
        FrameKind::Error => Ok(Err((seq, r.string("error.message")?))),
        got => Err(Error::UnexpectedKind {
            expected: FrameKind::Ack,
            got,
        }),
    }
}

/// Batches a sensor had to drop before they were acknowledged (its spool was
/// full): sequence numbers `first_seq..=last_seq` of one sensor boot, covering
/// samples taken from `from_ms` to `to_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Gap {
    pub host: String,
    pub boot_id: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub from_ms: u64,
    pub to_ms: u64,
    pub batches: u64,
    pub samples: u64,
}

pub fn encode_gap(g: &Gap) -> Vec<u8> {
    let mut p = Vec::with_capacity(64 + g.host.len() + g.boot_id.len());
    crate::codec::put_str(&mut p, &g.host);
    crate::codec::put_str(&mut p, &g.boot_id);
    for v in [
        g.first_seq,
        g.last_seq,
        g.from_ms,
        g.to_ms,
        g.batches,
        g.samples,
    ] {
        put_varint(&mut p, v);
    }
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + p.len());
    encode_frame(FrameKind::Gap, &p, &mut out);
    out
}

pub fn decode_gap(buf: &[u8], limits: &Limits) -> Result<Gap> {
    let frame = decode_frame(buf, limits)?;
    if frame.header.kind != FrameKind::Gap {
        return Err(Error::UnexpectedKind {
            expected: FrameKind::Gap,
            got: frame.header.kind,
        });
    }
    let mut r = Reader::new(frame.payload, *limits);
    let g = Gap {
        host: r.string("gap.host")?,
        boot_id: r.string("gap.boot_id")?,
        first_seq: r.varint()?,
        last_seq: r.varint()?,
        from_ms: r.varint()?,
        to_ms: r.varint()?,
        batches: r.varint()?,
        samples: r.varint()?,
    };
    if g.first_seq == 0 || g.last_seq < g.first_seq {
        return Err(Error::InvalidValue {
            what: "gap.last_seq",
            value: g.last_seq,
        });
    }
    if r.remaining() != 0 {
        return Err(Error::TrailingBytes(r.remaining()));
    }
    Ok(g)
}

#[cfg(test)]
mod gap_tests {
    use super::*;

    #[test]
    fn gap_round_trip_and_rejects() {
        let g = Gap {
            host: "h".into(),
            boot_id: "b".into(),
            first_seq: 3,
            last_seq: 9,
            from_ms: 1000,
            to_ms: 35000,
            batches: 7,
            samples: 700,
        };
        let f = encode_gap(&g);
        assert_eq!(decode_gap(&f, &Limits::default()).unwrap(), g);
        let bad = encode_gap(&Gap {
            last_seq: 2,
            ..g.clone()
        });
        assert!(decode_gap(&bad, &Limits::default()).is_err());
        assert!(matches!(
            decode_batch(&f, &Limits::default()),
            Err(Error::UnexpectedKind { .. })
        ));
        let mut trailing = f.clone();
        trailing.push(0);
        assert!(decode_gap(&trailing, &Limits::default()).is_err());
    }
}

/// A recording (`sensor record`): `SREC`, the wire version, three zero bytes, then per
/// snapshot its length (u32 LE) and its encoding. Files without the header were written
/// by version 1 (the snapshots are version-1 encoded).
pub const RECORDING_MAGIC: [u8; 4] = *b"SREC";

pub fn recording_header() -> [u8; 8] {
    let m = RECORDING_MAGIC;
    [m[0], m[1], m[2], m[3], VERSION, 0, 0, 0]
}

/// Appends one snapshot to a recording being written.
pub fn record_snapshot(s: &crate::Snapshot, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    s.encode(out);
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

/// Decodes a recording. A last snapshot cut short (a recording stopped mid-write) is
/// left out and reported as `Ok((snaps, true))`; an error names the snapshot (from 1;
/// 0 for the header).
pub fn read_recording(
    data: &[u8],
) -> std::result::Result<(Vec<crate::Snapshot>, bool), (usize, Error)> {
    let (version, mut at) = if data.starts_with(&RECORDING_MAGIC) && data.len() >= 8 {
        (data[4], 8)
    } else {
        (1, 0)
    };
    if !(MIN_VERSION..=VERSION).contains(&version) {
        return Err((0, Error::UnsupportedVersion(version)));
    }
    let mut out = Vec::new();
    while at + 4 <= data.len() {
        let len = u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize;
        at += 4;
        if at + len > data.len() {
            return Ok((out, true));
        }
        let mut r = Reader::new(&data[at..at + len], Limits::default()).with_version(version);
        out.push(crate::Snapshot::decode(&mut r).map_err(|e| (out.len() + 1, e))?);
        at += len;
    }
    Ok((out, false))
}

#[cfg(test)]
mod decompress_tests {
    use super::*;

    #[test]
    fn one_context_serves_many_inputs_good_and_bad() {
        let data: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let z = zstd::bulk::compress(&data, 3).unwrap();
        // Output grows past the first guess (4 x input), several times over.
        assert_eq!(decompress_bounded(&z, 1 << 24).unwrap(), data);
        // A truncated frame is an error, and the thread's context is fine afterwards.
        for cut in [1, z.len() / 2, z.len() - 1] {
            assert!(
                matches!(decompress_bounded(&z[..cut], 1 << 24), Err(Error::Zstd(_))),
                "cut at {cut}"
            );
            assert_eq!(decompress_bounded(&z, 1 << 24).unwrap(), data);
        }
        // Garbage, empty input and an exact limit.
        assert!(decompress_bounded(b"not zstd at all", 1 << 20).is_err());
        assert!(decompress_bounded(&[], 1 << 20).is_err());
        assert_eq!(
            decompress_bounded(&z, data.len()).unwrap().len(),
            data.len()
        );
        assert!(matches!(
            decompress_bounded(&z, data.len() - 1),
            Err(Error::DecompressedTooLarge { .. })
        ));
        // Two frames back to back decode as their concatenation, as zstd's reader did.
        let mut two = zstd::bulk::compress(b"abc", 1).unwrap();
        two.extend(zstd::bulk::compress(b"def", 1).unwrap());
        assert_eq!(decompress_bounded(&two, 100).unwrap(), b"abcdef");
        // A frame followed by garbage is an error.
        let mut tail = zstd::bulk::compress(b"abc", 1).unwrap();
        tail.extend_from_slice(b"xyz");
        assert!(decompress_bounded(&tail, 100).is_err());
    }
}
