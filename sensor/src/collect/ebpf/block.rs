//! Block I/O (programs `block_rq_issue`, `block_rq_complete` in sensor-ebpf): per device,
//! latency from issue to completion and request sizes, reads and writes apart.

use super::maps::{hist_delta, hist_words, slot_lat};
use super::{spec, Probes, ProgSpec};
use protocol::LatencyRec;
use sensor_common::{block_kind, dev_major_minor, BlockHistKey, Hist};

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

    /// Adds one histogram per device and kind that saw I/O in the interval.
    pub(super) fn collect_block(
        &mut self,
        secs: Option<f64>,
        latency: &mut Vec<LatencyRec>,
        nlat: &mut usize,
    ) {
        // Block histograms: walk the keys; new devices are resolved once.
        if self.block.is_some() {
            let mut key = BlockHistKey { dev: 0, kind: 0 };
            let mut next = BlockHistKey { dev: 0, kind: 0 };
            let mut first = true;
            loop {
                let m = self.block.as_ref().unwrap();
                let prev_ptr = if first {
                    None
                } else {
                    Some(&key as *const BlockHistKey as *const u8)
                };
                match m.next_key(prev_ptr, &mut next as *mut BlockHistKey as *mut u8) {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        self.warn("BLOCK_HIST", e);
                        break;
                    }
                }
                first = false;
                key = next;
                let idx = match self.devs.iter().position(|d| d.key == key) {
                    Some(i) => i,
                    None => {
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
                        self.devs.len() - 1
                    }
                };
                let m = self.block.as_mut().unwrap();
                let dev = &mut self.devs[idx];
                if let Ok(true) = m.sum_into(
                    &key as *const BlockHistKey as *const u8,
                    hist_words(&mut dev.cur),
                ) {
                    if dev.allowed
                        && secs.is_some()
                        && self.primed
                        && dev.cur.count != dev.prev.count
                    {
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
    }
}
