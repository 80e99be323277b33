//! /proc/stat (per-CPU and total time split, context switches, forks,
//! interrupts, running/blocked) and /proc/loadavg.

use crate::procfile::{counter_delta, fields, lines, parse_f32, parse_u64, rate, slot, ProcFile};
use protocol::{CpuRec, SystemRec, CPU_TOTAL};

#[derive(Clone, Copy, Default)]
struct Times([u64; 10]); // user nice system idle iowait irq softirq steal guest guest_nice

pub struct Cpu {
    stat: ProcFile,
    loadavg: ProcFile,
    prev: Vec<(u32, Times)>,
    prev_ctxt: u64,
    prev_forks: u64,
    prev_intr: u64,
}

impl Cpu {
    pub fn new(proc: &str) -> Self {
        Cpu {
            stat: ProcFile::new(format!("{proc}/stat")),
            loadavg: ProcFile::new(format!("{proc}/loadavg")),
            prev: Vec::new(),
            prev_ctxt: 0,
            prev_forks: 0,
            prev_intr: 0,
        }
    }

    /// Fills `cpu` and `sys`; returns false on the priming read.
    pub fn collect(
        &mut self,
        secs: Option<f64>,
        cpu: &mut Vec<CpuRec>,
        sys: &mut SystemRec,
    ) -> std::io::Result<()> {
        let buf = self.stat.read()?;
        let mut n = 0;
        for line in lines(buf) {
            let mut f = fields(line);
            let name = f.next().unwrap_or_default();
            if let Some(rest) = name.strip_prefix(b"cpu") {
                let id = if rest.is_empty() {
                    CPU_TOTAL
                } else {
                    parse_u64(rest) as u32
                };
                let mut t = Times::default();
                for (i, v) in f.take(10).enumerate() {
                    t.0[i] = parse_u64(v);
                }
                let prev = self.prev.iter().find(|(c, _)| *c == id).map(|(_, t)| *t);
                if let (Some(p), Some(_)) = (prev, secs) {
                    fill_cpu(slot(cpu, n), id, &p, &t);
                    n += 1;
                }
                match self.prev.iter_mut().find(|(c, _)| *c == id) {
                    Some(e) => e.1 = t,
                    None => self.prev.push((id, t)),
                }
                continue;
            }
            let v = f.next().map(parse_u64).unwrap_or(0);
            match name {
                b"ctxt" => {
                    if let Some(s) = secs {
                        sys.ctxt_per_s = rate(self.prev_ctxt, v, s);
                    }
                    self.prev_ctxt = v;
                }
                b"processes" => {
                    if let Some(s) = secs {
                        sys.forks_per_s = rate(self.prev_forks, v, s);
                    }
                    self.prev_forks = v;
                }
                b"intr" => {
                    if let Some(s) = secs {
                        sys.interrupts_per_s = rate(self.prev_intr, v, s);
                    }
                    self.prev_intr = v;
                }
                b"procs_running" => sys.procs_running = v as u32,
                b"procs_blocked" => sys.procs_blocked = v as u32,
                _ => {}
            }
        }
        cpu.truncate(n);
        let la = self.loadavg.read()?;
        let mut f = fields(la);
        sys.load1 = f.next().map(parse_f32).unwrap_or(0.0);
        sys.load5 = f.next().map(parse_f32).unwrap_or(0.0);
        sys.load15 = f.next().map(parse_f32).unwrap_or(0.0);
        Ok(())
    }
}

fn fill_cpu(r: &mut CpuRec, id: u32, p: &Times, c: &Times) {
    let d: [u64; 10] = std::array::from_fn(|i| counter_delta(p.0[i], c.0[i]));
    // guest and guest_nice are already included in user and nice.
    let total: u64 = d[..8].iter().sum();
    let pct = |x: u64| {
        if total == 0 {
            0.0
        } else {
            (x as f64 * 100.0 / total as f64) as f32
        }
    };
    r.cpu = id;
    r.user = pct(d[0].saturating_sub(d[8]));
    r.nice = pct(d[1].saturating_sub(d[9]));
    r.system = pct(d[2]);
    r.idle = pct(d[3]);
    r.iowait = pct(d[4]);
    r.irq = pct(d[5]);
    r.softirq = pct(d[6]);
    r.steal = pct(d[7]);
    r.guest = pct(d[8] + d[9]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_from_fake_proc() {
        let dir = std::env::temp_dir().join(format!("sonde-cpu-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.to_str().unwrap().to_string();
        std::fs::write(dir.join("loadavg"), "0.50 0.25 0.10 1/100 123\n").unwrap();
        std::fs::write(dir.join("stat"), "cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 100 0 100 800 0 0 0 0 0 0\nctxt 1000\nprocesses 50\nprocs_running 3\nprocs_blocked 1\n").unwrap();
        let mut c = Cpu::new(&p);
        let (mut cpu, mut sys) = (Vec::new(), SystemRec::default());
        c.collect(None, &mut cpu, &mut sys).unwrap();
        assert!(cpu.is_empty());
        std::fs::write(dir.join("stat"), "cpu  150 0 150 900 0 0 0 0 0 0\ncpu0 150 0 150 900 0 0 0 0 0 0\nctxt 3000\nprocesses 60\nprocs_running 3\nprocs_blocked 1\n").unwrap();
        c.collect(Some(2.0), &mut cpu, &mut sys).unwrap();
        assert_eq!(cpu.len(), 2);
        assert_eq!(cpu[0].cpu, CPU_TOTAL);
        assert_eq!(cpu[0].user, 25.0);
        assert_eq!(cpu[0].system, 25.0);
        assert_eq!(cpu[0].idle, 50.0);
        assert_eq!(sys.ctxt_per_s, 1000.0);
        assert_eq!(sys.forks_per_s, 5.0);
        assert_eq!(sys.procs_running, 3);
        assert_eq!(sys.load1, 0.5);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
