//! /proc/meminfo (gauges, bytes) and /proc/vmstat (rates).

use crate::procfile::{fields, lines, parse_u64, rate, ProcFile};
use protocol::MemoryRec;

pub struct Memory {
    meminfo: ProcFile,
    vmstat: ProcFile,
    prev: [u64; 5], // pgfault pgmajfault pswpin pswpout oom_kill
}

impl Memory {
    pub fn new(proc: &str) -> Self {
        Memory {
            meminfo: ProcFile::new(format!("{proc}/meminfo")),
            vmstat: ProcFile::new(format!("{proc}/vmstat")),
            prev: [0; 5],
        }
    }

    pub fn collect(&mut self, secs: Option<f64>, m: &mut MemoryRec) -> std::io::Result<()> {
        for line in lines(self.meminfo.read()?) {
            let mut f = fields(line);
            let (Some(k), Some(v)) = (f.next(), f.next()) else {
                continue;
            };
            let bytes = parse_u64(v) * 1024;
            match k {
                b"MemTotal:" => m.total = bytes,
                b"MemAvailable:" => m.available = bytes,
                b"MemFree:" => m.free = bytes,
                b"Buffers:" => m.buffers = bytes,
                b"Cached:" => m.cached = bytes,
                b"Dirty:" => m.dirty = bytes,
                b"SwapTotal:" => m.swap_total = bytes,
                b"SwapFree:" => m.swap_free = bytes,
                _ => {}
            }
        }
        let mut cur = self.prev;
        for line in lines(self.vmstat.read()?) {
            let mut f = fields(line);
            let (Some(k), Some(v)) = (f.next(), f.next()) else {
                continue;
            };
            let i = match k {
                b"pgfault" => 0,
                b"pgmajfault" => 1,
                b"pswpin" => 2,
                b"pswpout" => 3,
                b"oom_kill" => 4,
                _ => continue,
            };
            cur[i] = parse_u64(v);
        }
        if let Some(s) = secs {
            m.page_faults_per_s = rate(self.prev[0], cur[0], s);
            m.major_faults_per_s = rate(self.prev[1], cur[1], s);
            m.swap_in_per_s = rate(self.prev[2], cur[2], s);
            m.swap_out_per_s = rate(self.prev[3], cur[3], s);
            m.oom_kills_per_s = rate(self.prev[4], cur[4], s);
        }
        self.prev = cur;
        Ok(())
    }
}
