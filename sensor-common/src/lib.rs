#![no_std]
//! `#[repr(C)]` types and constants shared by the eBPF programs (`sensor-ebpf`) and the
//! sensor that reads their maps. Everything here is plain data: no pointers, no padding
//! left implicit, so both sides agree on the layout byte for byte.

/// Number of log2 buckets in a histogram. Bucket `i` counts values `v` with
/// `2^(i-1) <= v < 2^i` (bucket 0 counts `v == 0`); the last bucket also takes anything larger.
pub const HIST_BUCKETS: usize = 32;

/// Size of the lock-free wakeup-timestamp table (indexed by `pid & (RUNQ_TABLE - 1)`).
pub const RUNQ_TABLE_BITS: u32 = 16;
pub const RUNQ_TABLE: u32 = 1 << RUNQ_TABLE_BITS;
/// Low bits of a packed wakeup entry hold the timestamp in microseconds; the high bits hold
/// the rest of the pid (`pid >> RUNQ_TABLE_BITS`) to detect a slot reused by another task.
pub const RUNQ_TS_BITS: u32 = 40;
pub const RUNQ_TS_MASK: u64 = (1 << RUNQ_TS_BITS) - 1;

/// Entries of the per-cgroup run-queue histogram map (`RUNQ_CG_HIST`, keyed by cgroup id).
/// When it is full, further cgroups are counted under key [`RUNQ_CG_OTHER`].
pub const RUNQ_CGROUPS_MAX: u32 = 1024;
/// Id of the per-cgroup entry that sums cgroups a map had no room for.
pub const RUNQ_CG_OTHER: u64 = 0;

/// How the single-program run-queue probe finds the woken task's cgroup (`RQ_CG_MODE`).
pub mod rq_cg_mode {
    /// No per-cgroup histograms.
    pub const OFF: u32 = 0;
    /// A v1 controller's cgroup: `task->cgroups->subsys[i]->cgroup`.
    pub const V1_CSS: u32 = 1;
    /// The v2 (default hierarchy) cgroup: `task->cgroups->dfl_cgrp`.
    pub const V2: u32 = 2;
}

/// Indices into the `COUNTERS` per-CPU array.
pub mod counter {
    pub const EXECS: u32 = 0;
    pub const EXITS: u32 = 1;
    pub const SHORT_LIVED: u32 = 2;
    pub const FORKS: u32 = 3;
    pub const TCP_RETRANS: u32 = 4;
    pub const TCP_RST_SENT: u32 = 5;
    pub const TCP_RST_RECV: u32 = 6;
    pub const OOM_KILLS: u32 = 7;
    pub const BLOCK_UNMATCHED: u32 = 8;
    pub const EVENTS_DROPPED: u32 = 9;
    pub const TCP_RETRANS_FAILED: u32 = 10;
    /// Block completions not counted: the per-CPU device table had no room for the device.
    pub const BLOCK_DEVS_FULL: u32 = 11;
    pub const COUNT: u32 = 16;
}

/// All counters in one per-CPU value, so the sensor reads them with one syscall.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Counters {
    pub v: [u64; counter::COUNT as usize],
}

/// Kinds of block histograms (the `kind` of a [`BlockHistKey`]).
pub mod block_kind {
    pub const READ_LATENCY: u32 = 0;
    pub const WRITE_LATENCY: u32 = 1;
    pub const READ_SIZE: u32 = 2;
    pub const WRITE_SIZE: u32 = 3;
}

/// A log2 histogram: value units are the source's (microseconds for latency, bytes for size).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Hist {
    pub buckets: [u64; HIST_BUCKETS],
    pub sum: u64,
    pub count: u64,
}

impl Hist {
    pub const ZERO: Hist = Hist {
        buckets: [0; HIST_BUCKETS],
        sum: 0,
        count: 0,
    };
}

/// Key of the in-flight block request table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockReqKey {
    /// Kernel-internal dev_t: `major << 20 | minor`.
    pub dev: u32,
    pub _pad: u32,
    pub sector: u64,
}

/// What the issue probe remembers about an in-flight block request.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockReqStart {
    pub ts_ns: u64,
    pub bytes: u32,
    /// 0 read, 1 write.
    pub op: u32,
}

/// Slots of the in-flight block request table (`BLOCK_INFLIGHT`, an array indexed by a hash
/// of device and sector; a request takes the first free of two neighbouring slots).
pub const BLOCK_INFLIGHT_SLOTS: u32 = 1 << 14;
/// Slots of the per-CPU device table (`BLOCK_DEVS`; a device takes one of two slots).
pub const BLOCK_DEV_SLOTS: u32 = 32;

/// An in-flight block request: `ts_ns` 0 = free slot.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockSlot {
    pub sector: u64,
    pub ts_ns: u64,
    /// Kernel-internal dev_t.
    pub dev: u32,
    pub bytes: u32,
    /// 0 read, 1 write.
    pub op: u32,
    pub _pad: u32,
    /// The cgroup id of the request's blkcg (per-cgroup histograms on), else 0.
    pub cgroup: u64,
}

/// Key of the per-cgroup histogram maps: a cgroup id (its directory's inode number; 0 =
/// the cgroups the map had no room for) and what is measured (`kind`: for block I/O 0 read
/// latency, 1 write latency; for the run queue 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CgKey {
    pub id: u64,
    pub kind: u64,
}

/// Entries of the per-cgroup block latency map (`BLOCK_CG_HIST`).
pub const BLOCK_CGROUPS_MAX: u32 = 1024;

/// One device's block histograms on one CPU, indexed by [`block_kind`]; `dev` 0 = free.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BlockDevHists {
    pub dev: u32,
    pub _pad: u32,
    pub hists: [Hist; 4],
}

/// Slot of a request in the in-flight table (the first of its two).
#[inline(always)]
pub fn block_slot(dev: u32, sector: u64) -> u32 {
    let h = (sector ^ ((dev as u64) << 40)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((h >> 32) as u32) & (BLOCK_INFLIGHT_SLOTS - 1) & !1
}

/// Slot of a device in the per-CPU device table (the first of its two).
#[inline(always)]
pub fn block_dev_slot(dev: u32) -> u32 {
    (((dev as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as u32) & (BLOCK_DEV_SLOTS - 1) & !1
}

/// Key of the per-device block histograms.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockHistKey {
    pub dev: u32,
    pub kind: u32,
}

/// Kinds of [`Event`].
pub mod event_kind {
    pub const OOM_KILL: u32 = 1;
}

/// A discrete kernel event sent through the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Event {
    pub kind: u32,
    pub pid: u32,
    pub ts_ns: u64,
    /// Kind-specific numbers. OOM kill: total_vm, anon_rss, file_rss, shmem_rss (pages).
    pub args: [u64; 4],
    pub uid: u32,
    pub _pad: u32,
    pub comm: [u8; 16],
}

/// Split a kernel dev_t (as tracepoints report it) into (major, minor).
pub const fn dev_major_minor(dev: u32) -> (u32, u32) {
    (dev >> 20, dev & ((1 << 20) - 1))
}

/// Log2 bucket index of a value (see [`HIST_BUCKETS`]).
#[inline(always)]
pub fn log2_bucket(v: u64) -> u32 {
    // 64 - leading_zeros, written with shifts so the eBPF verifier sees no loop.
    let mut v = v;
    let mut n: u32 = 0;
    if v >> 32 != 0 {
        v >>= 32;
        n += 32;
    }
    if v >> 16 != 0 {
        v >>= 16;
        n += 16;
    }
    if v >> 8 != 0 {
        v >>= 8;
        n += 8;
    }
    if v >> 4 != 0 {
        v >>= 4;
        n += 4;
    }
    if v >> 2 != 0 {
        v >>= 2;
        n += 2;
    }
    if v >> 1 != 0 {
        v >>= 1;
        n += 1;
    }
    n += v as u32;
    if n >= HIST_BUCKETS as u32 {
        HIST_BUCKETS as u32 - 1
    } else {
        n
    }
}

/// Upper bound (exclusive) of bucket `i`, in the histogram's unit.
pub const fn bucket_upper(i: usize) -> u64 {
    1u64 << i
}

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::Hist {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::BlockReqKey {}
    unsafe impl aya::Pod for super::BlockReqStart {}
    unsafe impl aya::Pod for super::BlockHistKey {}
    unsafe impl aya::Pod for super::Event {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log2() {
        assert_eq!(log2_bucket(0), 0);
        assert_eq!(log2_bucket(1), 1);
        assert_eq!(log2_bucket(2), 2);
        assert_eq!(log2_bucket(3), 2);
        assert_eq!(log2_bucket(4), 3);
        assert_eq!(log2_bucket(1023), 10);
        assert_eq!(log2_bucket(1024), 11);
        assert_eq!(log2_bucket(u64::MAX), HIST_BUCKETS as u32 - 1);
        for v in [1u64, 5, 77, 1000, 65535, 1 << 20] {
            let b = log2_bucket(v) as usize;
            assert!(
                v < bucket_upper(b) && (b == 0 || v >= bucket_upper(b - 1)),
                "{v} in {b}"
            );
        }
    }

    #[test]
    fn dev_split() {
        assert_eq!(dev_major_minor((7 << 20) | 3), (7, 3));
        assert_eq!(dev_major_minor((259 << 20) | 1), (259, 1));
    }
}
