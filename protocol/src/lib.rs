//! sonde wire protocol, sans-I/O.
//!
//! A *frame* is what crosses a QUIC stream:
//!
//! ```text
//! +-------+---------+------+-------+----------------+-----------------+
//! | magic | version | kind | flags | payload length | payload         |
//! | SOND  | u8 = 3  | u8   | u8    | u32 LE         | length bytes    |
//! +-------+---------+------+-------+----------------+-----------------+
//! ```
//!
//! A `Batch` frame's payload is zstd-compressed; inside is the compact binary
//! encoding of [`Batch`] (LEB128 varints for integers, little-endian `f32`
//! for rates and percentages, length-prefixed strings and lists; from version 2 every
//! table record and snapshot is length-delimited, see `tables.rs`; from version 3 a
//! batch's snapshots are written column by column, see `columnar.rs`). Every length
//! and count is checked against [`Limits`] and against the bytes actually
//! remaining *before* anything is allocated, and decompression stops at
//! `Limits::max_decompressed`, so hostile input costs bounded memory and never
//! panics.

mod codec;
pub mod columnar;
pub mod docs;
mod frame;
mod records;
pub mod tables;

pub use codec::{Decode, Encode, Reader};
pub use frame::{
    decode_ack, decode_batch, decode_frame, decode_frame_header, decode_gap, decompress_bounded,
    downgrade_batch_frame, downgrade_batch_frame_to, encode_ack, encode_batch, encode_batch_parts,
    encode_batch_v1, encode_batch_version, encode_error, encode_frame, encode_gap, read_recording,
    record_snapshot, recording_header, BatchParts, Frame, FrameHeader, FrameKind, Gap,
    FRAME_HEADER_LEN, MAGIC, MIN_VERSION, VERSION,
};
pub use records::*;

/// Everything that can be wrong with bytes received from a peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("input truncated: needed {needed} more bytes at offset {offset}")]
    Truncated { offset: usize, needed: usize },
    #[error("bad magic {0:02x?}: not a sonde frame")]
    BadMagic([u8; 4]),
    #[error("unsupported protocol version {0} (this build reads {MIN_VERSION} to {VERSION})")]
    UnsupportedVersion(u8),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame payload of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { len: usize, max: usize },
    #[error("frame has {0} bytes after its payload")]
    TrailingFrameBytes(usize),
    #[error("decompressed batch exceeds the limit of {max} bytes")]
    DecompressedTooLarge { max: usize },
    #[error("zstd: {0}")]
    Zstd(String),
    #[error("{what}: count {count} exceeds the limit of {max}")]
    CountTooLarge {
        what: &'static str,
        count: u64,
        max: u64,
    },
    #[error("{what}: string of {len} bytes exceeds the limit of {max}")]
    StringTooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("{what}: invalid UTF-8")]
    BadUtf8 { what: &'static str },
    #[error("varint overflows 64 bits at offset {0}")]
    VarintOverflow(usize),
    #[error("invalid value {value} for {what}")]
    InvalidValue { what: &'static str, value: u64 },
    #[error("{0} bytes left over after the batch")]
    TrailingBytes(usize),
    #[error("expected a {expected:?} frame, got {got:?}")]
    UnexpectedKind { expected: FrameKind, got: FrameKind },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Bounds applied while decoding. The defaults are generous for a real host
/// (hundreds of disks and interfaces) and small enough that a hostile frame
/// cannot make the aggregator allocate more than a few tens of MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame payload accepted (compressed bytes on the wire).
    pub max_frame: usize,
    /// Largest decompressed batch.
    pub max_decompressed: usize,
    /// Most snapshots in one batch.
    pub max_snapshots: u64,
    /// Most entries in any per-snapshot list (CPUs, disks, interfaces, mounts...).
    pub max_items: u64,
    /// Longest string (host names, device names, mount points...).
    pub max_string: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame: 8 << 20,
            max_decompressed: 64 << 20,
            max_snapshots: 4096,
            max_items: 4096,
            max_string: 4096,
        }
    }
}
