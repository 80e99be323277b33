//! Raw access to the probes' per-CPU maps through the `bpf(2)` syscall, with buffers
//! allocated once (a steady-state collection allocates nothing), and the histogram
//! arithmetic shared by the run-queue and block probes.

use aya::maps::{Map, MapData};
use protocol::{BucketRec, LatencyRec};
use sensor_common::{Hist, HIST_BUCKETS};
use std::os::fd::{AsFd, AsRawFd, RawFd};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn bpf_elem(cmd: libc::c_long, fd: RawFd, key: *const u8, value: *mut u8) -> std::io::Result<bool> {
    let attr = ElemAttr {
        map_fd: fd as u32,
        _pad: 0,
        key: key as u64,
        value: value as u64,
        flags: 0,
    };
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &attr as *const ElemAttr,
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOENT) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// A per-CPU map read with a buffer allocated once.
pub(super) struct PerCpu {
    map: MapData,
    stride: usize,
    buf: Vec<u64>,
}

impl PerCpu {
    pub(super) fn new(map: MapData, value_size: usize, ncpu: usize) -> Self {
        let stride = value_size.div_ceil(8) * 8;
        PerCpu {
            map,
            stride,
            buf: vec![0u64; stride / 8 * ncpu],
        }
    }

    pub(super) fn fd(&self) -> RawFd {
        self.map.fd().as_fd().as_raw_fd()
    }

    /// Looks `key` up and sums the per-CPU values (as u64 words) into `out`.
    pub(super) fn sum_into(&mut self, key: *const u8, out: &mut [u64]) -> std::io::Result<bool> {
        let words = self.stride_words();
        let Some(vals) = self.per_cpu(key)? else {
            return Ok(false);
        };
        out.iter_mut().for_each(|x| *x = 0);
        for cpu in vals.chunks(words) {
            for (o, v) in out.iter_mut().zip(cpu) {
                *o = o.wrapping_add(*v);
            }
        }
        Ok(true)
    }

    /// Looks `key` up and returns each CPU's value as u64 words (`stride_words()` apart).
    pub(super) fn per_cpu(&mut self, key: *const u8) -> std::io::Result<Option<&[u64]>> {
        if !bpf_elem(
            BPF_MAP_LOOKUP_ELEM,
            self.fd(),
            key,
            self.buf.as_mut_ptr() as *mut u8,
        )? {
            return Ok(None);
        }
        Ok(Some(&self.buf))
    }

    pub(super) fn stride_words(&self) -> usize {
        self.stride / 8
    }

    pub(super) fn next_key(&self, key: Option<*const u8>, next: *mut u8) -> std::io::Result<bool> {
        bpf_elem(
            BPF_MAP_GET_NEXT_KEY,
            self.fd(),
            key.unwrap_or(std::ptr::null()),
            next,
        )
    }

    pub(super) fn delete(&self, key: *const u8) {
        let _ = bpf_elem(BPF_MAP_DELETE_ELEM, self.fd(), key, std::ptr::null_mut());
    }
}

pub(super) fn hist_words(h: &mut Hist) -> &mut [u64] {
    // Hist is repr(C) and all u64: view it as words.
    unsafe {
        std::slice::from_raw_parts_mut(h as *mut Hist as *mut u64, std::mem::size_of::<Hist>() / 8)
    }
}

pub(super) fn take_data(m: Map) -> Option<MapData> {
    match m {
        Map::Array(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuHashMap(d)
        | Map::HashMap(d)
        | Map::LruHashMap(d) => Some(d),
        _ => None,
    }
}

/// Per-interval difference of two cumulative histograms, into `out` (only non-empty buckets).
pub(super) fn hist_delta(cur: &Hist, prev: &Hist, out: &mut LatencyRec) {
    hist_to(
        &hist_sub(cur, prev),
        &mut out.count,
        &mut out.sum,
        &mut out.buckets,
    );
}

/// `cur - prev` of two cumulative histograms (all of `cur` when the map went backwards).
pub(super) fn hist_sub(cur: &Hist, prev: &Hist) -> Hist {
    let p = if cur.count < prev.count {
        &Hist::ZERO
    } else {
        prev
    };
    let mut d = Hist::ZERO;
    for i in 0..HIST_BUCKETS {
        d.buckets[i] = cur.buckets[i].saturating_sub(p.buckets[i]);
    }
    d.count = cur.count - p.count;
    d.sum = cur.sum.wrapping_sub(p.sum);
    d
}

/// A histogram as stored: count, sum and the non-empty buckets.
pub(super) fn hist_to(h: &Hist, count: &mut u64, sum: &mut u64, buckets: &mut Vec<BucketRec>) {
    *count = h.count;
    *sum = h.sum;
    buckets.clear();
    for (i, &n) in h.buckets.iter().enumerate() {
        if n > 0 {
            buckets.push(BucketRec {
                index: i as u32,
                count: n,
            });
        }
    }
}

/// The `i`-th latency record of this collection, reusing what the last one left.
pub(super) fn slot_lat(v: &mut Vec<LatencyRec>, i: usize) -> &mut LatencyRec {
    if i == v.len() {
        v.push(LatencyRec::default());
    }
    &mut v[i]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_delta_and_reset() {
        let mut prev = Hist::ZERO;
        prev.buckets[3] = 5;
        prev.count = 5;
        prev.sum = 20;
        let mut cur = prev;
        cur.buckets[3] = 7;
        cur.buckets[10] = 1;
        cur.count = 8;
        cur.sum = 20 + 8 + 700;
        let mut rec = LatencyRec::default();
        hist_delta(&cur, &prev, &mut rec);
        assert_eq!(rec.count, 3);
        assert_eq!(rec.sum, 708);
        assert_eq!(
            rec.buckets,
            vec![
                BucketRec { index: 3, count: 2 },
                BucketRec {
                    index: 10,
                    count: 1
                }
            ]
        );
        // A map that went backwards (reloaded) counts from zero.
        hist_delta(&prev, &cur, &mut rec);
        assert_eq!(rec.count, 5);
    }
}
