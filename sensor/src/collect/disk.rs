//! /proc/diskstats: per block device rates, await, utilisation.

use crate::filter::Filter;
use crate::procfile::{counter_delta, fields, lines, parse_u64, rate, set_str, slot, ProcFile};
use protocol::DiskRec;
use std::path::Path;

struct Dev {
    name: String,
    allowed: bool,
    prev: [u64; 11],
    seen: bool,
}

pub struct Disk {
    stats: ProcFile,
    sys_block: String,
    filter: Filter,
    partitions: bool,
    devs: Vec<Dev>,
}

impl Disk {
    pub fn new(proc: &str, sys: &str, filter: Filter, partitions: bool) -> Self {
        Disk {
            stats: ProcFile::new(format!("{proc}/diskstats")),
            sys_block: format!("{sys}/class/block"),
            filter,
            partitions,
            devs: Vec::new(),
        }
    }

    pub fn collect(&mut self, secs: Option<f64>, out: &mut Vec<DiskRec>) -> std::io::Result<()> {
        let buf = self.stats.read()?;
        for d in &mut self.devs {
            d.seen = false;
        }
        let mut n = 0;
        for line in lines(buf) {
            let mut f = fields(line).skip(2);
            let Some(name) = f.next() else { continue };
            let mut cur = [0u64; 11];
            for (i, v) in f.take(11).enumerate() {
                cur[i] = parse_u64(v);
            }
            let idx = match self.devs.iter().position(|d| d.name.as_bytes() == name) {
                Some(i) => i,
                None => {
                    // New device: decide once whether it is collected.
                    let name = String::from_utf8_lossy(name).into_owned();
                    let is_part = Path::new(&self.sys_block)
                        .join(&name)
                        .join("partition")
                        .exists();
                    let allowed = self.filter.allows(&name) && (self.partitions || !is_part);
                    self.devs.push(Dev {
                        name,
                        allowed,
                        prev: cur,
                        seen: false,
                    });
                    self.devs.len() - 1
                }
            };
            let d = &mut self.devs[idx];
            d.seen = true;
            // Devices that never did I/O (unused loop devices) are skipped until they do.
            if d.allowed && cur.iter().any(|v| *v != 0) {
                if let Some(s) = secs {
                    fill(slot(out, n), &d.name, &d.prev, &cur, s);
                    n += 1;
                }
            }
            d.prev = cur;
        }
        out.truncate(n);
        self.devs.retain(|d| d.seen);
        Ok(())
    }
}

// Fields after the name: 0 reads, 1 reads merged, 2 sectors read, 3 ms reading,
// 4 writes, 5 writes merged, 6 sectors written, 7 ms writing, 8 in flight,
// 9 ms doing I/O, 10 weighted ms.
fn fill(r: &mut DiskRec, name: &str, p: &[u64; 11], c: &[u64; 11], secs: f64) {
    set_str(&mut r.device, name.as_bytes());
    let d = |i: usize| counter_delta(p[i], c[i]);
    r.reads_per_s = rate(p[0], c[0], secs);
    r.writes_per_s = rate(p[4], c[4], secs);
    r.read_bytes_per_s = ((d(2) * 512) as f64 / secs) as f32;
    r.write_bytes_per_s = ((d(6) * 512) as f64 / secs) as f32;
    r.r_await_ms = if d(0) == 0 {
        0.0
    } else {
        d(3) as f32 / d(0) as f32
    };
    r.w_await_ms = if d(4) == 0 {
        0.0
    } else {
        d(7) as f32 / d(4) as f32
    };
    r.util_pct = (d(9) as f64 / (secs * 10.0)).min(100.0) as f32;
    r.in_flight = c[8] as u32;
}
