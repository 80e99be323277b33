//! /proc/pressure/{cpu,memory,io}: the kernel's averages plus the exact
//! stalled share of the interval from the `total=` microsecond counters.

use crate::procfile::{counter_delta, fields, lines, parse_f32, parse_u64, slot, ProcFile};
use protocol::{PressureRec, PRESSURE_RESOURCES};

pub struct Psi {
    files: Vec<(u32, ProcFile, [u64; 2])>,
}

impl Psi {
    pub fn new(proc: &str) -> Self {
        let files = PRESSURE_RESOURCES
            .iter()
            .enumerate()
            .map(|(i, r)| {
                (
                    i as u32,
                    ProcFile::new(format!("{proc}/pressure/{r}")),
                    [0u64; 2],
                )
            })
            .collect();
        Psi { files }
    }

    /// PSI is optional (kernels without CONFIG_PSI, or psi=0): missing files
    /// produce no records rather than an error.
    pub fn collect(&mut self, secs: Option<f64>, out: &mut Vec<PressureRec>) {
        let mut n = 0;
        for (res, file, prev) in &mut self.files {
            let Ok(buf) = file.read() else { continue };
            let mut rec = PressureRec {
                resource: *res,
                ..Default::default()
            };
            let mut cur = *prev;
            for line in lines(buf) {
                let mut f = fields(line);
                let which = match f.next() {
                    Some(b"some") => 0,
                    Some(b"full") => 1,
                    _ => continue,
                };
                let mut avg = [0f32; 3];
                for kv in f {
                    if let Some(v) = kv.strip_prefix(b"avg10=") {
                        avg[0] = parse_f32(v);
                    } else if let Some(v) = kv.strip_prefix(b"avg60=") {
                        avg[1] = parse_f32(v);
                    } else if let Some(v) = kv.strip_prefix(b"avg300=") {
                        avg[2] = parse_f32(v);
                    } else if let Some(v) = kv.strip_prefix(b"total=") {
                        cur[which] = parse_u64(v);
                    }
                }
                let stall = secs
                    .map(|s| {
                        (counter_delta(prev[which], cur[which]) as f64 / (s * 10_000.0)).min(100.0)
                            as f32
                    })
                    .unwrap_or(0.0);
                if which == 0 {
                    (
                        rec.some_avg10,
                        rec.some_avg60,
                        rec.some_avg300,
                        rec.some_stall_pct,
                    ) = (avg[0], avg[1], avg[2], stall);
                } else {
                    (
                        rec.full_avg10,
                        rec.full_avg60,
                        rec.full_avg300,
                        rec.full_stall_pct,
                    ) = (avg[0], avg[1], avg[2], stall);
                }
            }
            *prev = cur;
            if secs.is_some() {
                *slot(out, n) = rec;
                n += 1;
            }
        }
        out.truncate(n);
    }
}
