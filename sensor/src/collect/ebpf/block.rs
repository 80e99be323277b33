//! Block I/O: per device, latency and request sizes, reads and writes apart.
//!
//! Designs, chosen at load time:
//! - **one program per I/O** (`block_done_btf`, a BTF tracepoint at completion): latency from
//!   the request's creation (`request.start_time_ns`, the kernel's own stamp) to completion,
//!   the interval /proc/diskstats adds to its read/write ticks (iostat's r_await/w_await).
//!   Needs the kernel's BTF. With `[probes] block_cgroups`, `block_done_cg_btf` also reads
//!   the request's block cgroup (its bios are still attached at completion).
//! - **issue + complete** (`block_rq_issue`, `block_rq_complete`, tracepoint records): latency
//!   from issue to the device to completion, requests matched in a table of slots; with
//!   `block_cgroups`, `block_rq_issue_cg` on the raw tracepoint reads the request's cgroup at
//!   issue. The fallback where BTF tracepoints are refused (or `raw_tracepoints = true`).

use super::maps::{hist_delta, hist_words, slot_lat};
use super::{spec, Probes, ProgSpec};
use crate::collect::btf::Btf;
use protocol::LatencyRec;
use sensor_common::{
    block_kind, dev_major_minor, BlockDevHists, BlockHistKey, Hist, BLOCK_DEV_SLOTS,
};
use std::path::{Path, PathBuf};

pub(super) const PROGRAMS: &[ProgSpec] = &[
    spec(
        "block_rq_issue",
        "block",
        "block_rq_issue",
        &[
            ("dev", 8, 4),
            ("sector", 16, 8),
            ("bytes", 28, 4),
            ("rwbs", 34, 0),
        ],
    ),
    spec(
        "block_rq_complete",
        "block",
        "block_rq_complete",
        &[("dev", 8, 4), ("sector", 16, 8)],
    ),
];

/// One program per I/O, at completion (see the module doc).
pub(super) const BTF: &[ProgSpec] = &[super::tp_btf(
    "block_done_btf",
    "block",
    "block_rq_complete",
)];

/// The same with per-cgroup histograms.
pub(super) const BTF_CGROUP: &[ProgSpec] = &[super::tp_btf(
    "block_done_cg_btf",
    "block",
    "block_rq_complete",
)];

/// Offsets `block_done_btf` reads (from BTF); `None` when one is missing.
#[derive(Debug, Clone, Default)]
pub(super) struct Done {
    pub cmd_flags: u32,
    pub data_len: u32,
    pub start_ns: u32,
    pub q: u32,
    pub q_disk: u32,
    pub disk_major: u32,
    pub disk_minor: u32,
}

impl Done {
    pub fn from_btf(b: &Btf) -> Option<Done> {
        let off = |s: &str, m: &str| b.path_offset(s, m).map(|o| o as u32);
        Some(Done {
            cmd_flags: off("request", "cmd_flags")?,
            data_len: off("request", "__data_len")?,
            start_ns: off("request", "start_time_ns")?,
            q: off("request", "q")?,
            q_disk: off("request_queue", "disk")?,
            disk_major: off("gendisk", "major")?,
            disk_minor: off("gendisk", "first_minor")?,
        })
    }
}

/// With per-cgroup histograms: the issue program on the raw tracepoint (it reads the
/// request), the same completion program.
pub(super) const CGROUP: &[ProgSpec] = &[
    super::raw("block_rq_issue_cg", "block", "block_rq_issue"),
    spec(
        "block_rq_complete",
        "block",
        "block_rq_complete",
        &[("dev", 8, 4), ("sector", 16, 8)],
    ),
];

/// Kernel structure offsets the per-cgroup programs read (from BTF): the request's (those of
/// [`Done`] and its sector) and its cgroup's; and the hierarchy the cgroup ids belong to.
#[derive(Debug, Clone, Default)]
pub(super) struct Layout {
    pub req: Done,
    pub sector: u32,
    pub bio: u32,
    pub bio_blkg: u32,
    pub blkg_blkcg: u32,
    pub blkcg_css: u32,
    pub cgroup_kn: u32,
    pub kn_id: u32,
    pub root: PathBuf,
}

impl Layout {
    /// `None` when a field is missing (no CONFIG_BLK_CGROUP, say) or no hierarchy has the
    /// block controller: the v1 blkio one when mounted, else the v2 tree.
    pub fn from_btf(b: &Btf, blkio_v1: Option<&Path>, v2: Option<&Path>) -> Option<Layout> {
        let off = |s: &str, m: &str| b.path_offset(s, m).map(|o| o as u32);
        Some(Layout {
            req: Done::from_btf(b)?,
            sector: off("request", "__sector")?,
            bio: off("request", "bio")?,
            bio_blkg: off("bio", "bi_blkg")?,
            blkg_blkcg: off("blkcg_gq", "blkcg")?,
            blkcg_css: off("blkcg", "css")?,
            cgroup_kn: off("cgroup", "kn")?,
            kn_id: off("kernfs_node", "id")?,
            root: blkio_v1.or(v2)?.to_path_buf(),
        })
    }
}

pub(super) struct BlockDev {
    key: BlockHistKey,
    source: String,
    unit: &'static str,
    allowed: bool,
    prev: Hist,
    cur: Hist,
}

impl Probes {
    fn dev_name(&mut self, major: u32, minor: u32) -> Option<String> {
        if let Some(n) = self.dev_names.get(&(major, minor)) {
            return Some(n.clone());
        }
        // Unknown device: reread /proc/diskstats (happens once per new device).
        let text = std::fs::read_to_string(format!("{}/diskstats", self.proc_root)).ok()?;
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 3 {
                if let (Ok(ma), Ok(mi)) = (f[0].parse(), f[1].parse()) {
                    self.dev_names.insert((ma, mi), f[2].to_string());
                }
            }
        }
        self.dev_names.get(&(major, minor)).cloned()
    }

    /// Sums every CPU's copy of every slot by device (a device may sit in different slots
    /// on different CPUs) into the known devices' cumulative histograms; unknown devices go
    /// to `new_devs`.
    fn sum_block_devs(&mut self) -> std::io::Result<()> {
        for d in self.devs.iter_mut() {
            d.cur = Hist::ZERO;
        }
        let Some(m) = self.block.as_mut() else {
            return Ok(());
        };
        let words = m.stride_words();
        let n = std::mem::size_of::<Hist>() / 8;
        for slot in 0..BLOCK_DEV_SLOTS {
            let Some(vals) = m.per_cpu(&slot as *const u32 as *const u8)? else {
                continue;
            };
            for cpu in vals.chunks(words) {
                let dev = (cpu[0] & 0xffff_ffff) as u32;
                if dev == 0 {
                    continue;
                }
                for kind in 0..4u32 {
                    let key = BlockHistKey { dev, kind };
                    let Some(d) = self.devs.iter_mut().find(|d| d.key == key) else {
                        self.new_devs.push(key);
                        continue;
                    };
                    let h = &cpu[1 + kind as usize * n..1 + (kind as usize + 1) * n];
                    for (o, v) in hist_words(&mut d.cur).iter_mut().zip(h) {
                        *o = o.wrapping_add(*v);
                    }
                }
            }
        }
        Ok(())
    }

    fn add_new_devs(&mut self) {
        let mut new = std::mem::take(&mut self.new_devs);
        new.sort_unstable_by_key(|k| (k.dev, k.kind));
        new.dedup();
        for key in new {
            let (ma, mi) = dev_major_minor(key.dev);
            let name = self
                .dev_name(ma, mi)
                .unwrap_or_else(|| format!("{ma}:{mi}"));
            let allowed = self.disk_filter.allows(&name);
            let (suffix, unit) = match key.kind {
                block_kind::READ_LATENCY => ("read", "us"),
                block_kind::WRITE_LATENCY => ("write", "us"),
                block_kind::READ_SIZE => ("read_bytes", "bytes"),
                _ => ("write_bytes", "bytes"),
            };
            self.devs.push(BlockDev {
                key,
                source: format!("disk:{name}:{suffix}"),
                unit,
                allowed,
                prev: Hist::ZERO,
                cur: Hist::ZERO,
            });
        }
    }

    /// Adds one histogram per device and kind that saw I/O in the interval, and the
    /// per-cgroup rows (when on) to `cg_latency`.
    pub(super) fn collect_block(
        &mut self,
        secs: Option<f64>,
        latency: &mut Vec<LatencyRec>,
        nlat: &mut usize,
        cg_latency: &mut Vec<protocol::CgroupLatencyRec>,
    ) {
        let report = self.primed && secs.is_some();
        if let Some(c) = self.block_cg.as_mut() {
            if let Err(e) = c.collect(report, cg_latency) {
                self.warn("BLOCK_CG_HIST", e);
            }
        }
        if self.block.is_none() {
            return;
        }
        // Two passes when a device is new: it is named, then summed with the others.
        for _ in 0..2 {
            if let Err(e) = self.sum_block_devs() {
                self.warn("BLOCK_DEVS", e);
                return;
            }
            if self.new_devs.is_empty() {
                break;
            }
            self.add_new_devs();
        }
        for dev in self.devs.iter_mut() {
            if dev.allowed && secs.is_some() && self.primed && dev.cur.count != dev.prev.count {
                let rec = slot_lat(latency, *nlat);
                *nlat += 1;
                if rec.source != dev.source {
                    rec.source.clear();
                    rec.source.push_str(&dev.source);
                }
                rec.unit.clear();
                rec.unit.push_str(dev.unit);
                hist_delta(&dev.cur, &dev.prev, rec);
            }
            dev.prev = dev.cur;
        }
    }
}

const _: () = assert!(std::mem::size_of::<BlockDevHists>() == 8 + 4 * std::mem::size_of::<Hist>());
