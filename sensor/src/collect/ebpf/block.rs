//! Block I/O (programs `block_rq_issue`, `block_rq_complete` in sensor-ebpf): per device,
//! latency from issue to completion and request sizes, reads and writes apart.

use super::maps::{hist_delta, hist_words, slot_lat};
use super::{spec, Probes, ProgSpec};
use protocol::LatencyRec;
use sensor_common::{
    block_kind, dev_major_minor, BlockDevHists, BlockHistKey, Hist, BLOCK_DEV_SLOTS,
};

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

    /// Adds one histogram per device and kind that saw I/O in the interval.
    pub(super) fn collect_block(
        &mut self,
        secs: Option<f64>,
        latency: &mut Vec<LatencyRec>,
        nlat: &mut usize,
    ) {
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
