//! Per-cgroup CPU, throttling, memory, I/O, pids and pressure, on v1, v2 and hybrid hosts.
//!
//! A cgroup is its path below the hierarchy roots; on a hybrid host one path can exist in
//! the v2 tree and in several v1 controllers. Each metric comes from the v1 controller
//! when one is mounted for it (hybrid hosts: cpu, cpuacct, memory, blkio, pids are v1
//! there) and from the v2 tree otherwise (pure v2 hosts; pressure always).
//!
//! Cost control: the list of cgroups is rebuilt only when it may have changed (the
//! kernel's per-hierarchy count in /proc/cgroups or the v2 root's `nr_descendants` moved,
//! a tracked cgroup vanished, or `rescan` passed); limits are re-read then too. Each
//! interval reads one small file per metric group with one open/read/close through a
//! shared buffer: no descriptor or buffer per cgroup, so memory is bounded by
//! `max_cgroups` and a vanished cgroup leaves nothing behind.

use super::cgnames;
use crate::filter::Filter;
use crate::procfile::{counter_delta, fields, lines, parse_u64, set_str, slot};
use protocol::{CgroupIoRec, CgroupRec};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Roots {
    pub v2: Option<PathBuf>,
    pub cpu: Option<PathBuf>,
    pub cpuacct: Option<PathBuf>,
    pub memory: Option<PathBuf>,
    pub blkio: Option<PathBuf>,
    pub pids: Option<PathBuf>,
}

impl Roots {
    /// The hierarchies mounted at or below `root` (`/sys/fs/cgroup`), from a mounts table.
    pub fn from_mounts(mounts: &str, root: &str) -> Roots {
        let mut r = Roots::default();
        let root = root.trim_end_matches('/');
        for line in mounts.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 {
                continue;
            }
            let (dir, fstype, opts) = (f[1], f[2], f[3]);
            if dir != root && !dir.starts_with(&format!("{root}/")) {
                continue;
            }
            let dir = PathBuf::from(dir);
            match fstype {
                "cgroup2" if r.v2.is_none() => r.v2 = Some(dir),
                "cgroup" => {
                    for o in opts.split(',') {
                        let slot = match o {
                            "cpu" => &mut r.cpu,
                            "cpuacct" => &mut r.cpuacct,
                            "memory" => &mut r.memory,
                            "blkio" => &mut r.blkio,
                            "pids" => &mut r.pids,
                            _ => continue,
                        };
                        if slot.is_none() {
                            *slot = Some(dir.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        r
    }

    fn all(&self) -> impl Iterator<Item = &PathBuf> {
        [
            &self.v2,
            &self.cpu,
            &self.cpuacct,
            &self.memory,
            &self.blkio,
            &self.pids,
        ]
        .into_iter()
        .flatten()
    }

    pub fn is_empty(&self) -> bool {
        self.all().next().is_none()
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub max_cgroups: usize,
    pub filter: Filter,
    pub rescan: Duration,
}

/// Which file each metric group is read from, decided when the cgroup is found.
#[derive(Default)]
struct Sources {
    /// v2 `cpu.stat` (usage/user/system µs; throttling when the cpu controller is on).
    v2_cpu: Option<PathBuf>,
    /// v1 cpuacct directory (`cpuacct.usage`, `cpuacct.stat`).
    cpuacct: Option<PathBuf>,
    /// v1 cpu `cpu.stat` (throttling).
    v1_cpu_stat: Option<PathBuf>,
    /// v2 memory directory, or v1 memory directory.
    v2_mem: Option<PathBuf>,
    v1_mem: Option<PathBuf>,
    v2_io: Option<PathBuf>,
    v1_blkio: Option<PathBuf>,
    pids: Option<PathBuf>,
    /// v2 directory with `{cpu,memory,io}.pressure`.
    psi: Option<PathBuf>,
}

#[derive(Default, Clone, Copy)]
struct Counters {
    usage_us: u64,
    user_us: u64,
    system_us: u64,
    periods: u64,
    throttled: u64,
    throttled_us: u64,
    high: u64,
    max: u64,
    oom: u64,
    oom_kill: u64,
    /// some/full µs totals: cpu, memory, io.
    psi: [u64; 6],
}

struct Cg {
    path: String,
    container: String,
    pod: String,
    src: Sources,
    cpu_limit: f32,
    memory_limit: u64,
    pids_limit: u32,
    prev: Counters,
    /// (device number, [rbytes, wbytes, rios, wios]) at the last read.
    io_prev: Vec<(u64, [u64; 4])>,
    primed: bool,
}

pub struct Cgroups {
    roots: Roots,
    opts: Options,
    proc_cgroups: PathBuf,
    diskstats: PathBuf,
    cgs: Vec<Cg>,
    /// Fingerprint of the hierarchy sizes at the last scan.
    fingerprint: Vec<u64>,
    last_scan: Option<Instant>,
    buf: Vec<u8>,
    devnames: HashMap<u64, String>,
    user_hz: f64,
    pub truncated_logged: bool,
    /// Cgroups found at the last scan before the limit (for the log and tests).
    pub found: usize,
}

fn devnum(maj: u64, min: u64) -> u64 {
    (maj << 20) | min
}

impl Cgroups {
    pub fn new(proc: &str, roots: Roots, opts: Options) -> Self {
        Cgroups {
            roots,
            opts,
            proc_cgroups: format!("{proc}/cgroups").into(),
            diskstats: format!("{proc}/diskstats").into(),
            cgs: Vec::new(),
            fingerprint: Vec::new(),
            last_scan: None,
            buf: Vec::with_capacity(8192),
            devnames: HashMap::new(),
            user_hz: 100.0,
            truncated_logged: false,
            found: 0,
        }
    }

    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.cgs.len()
    }

    /// Reads `path` into the shared buffer.
    fn read(buf: &mut Vec<u8>, path: &Path) -> std::io::Result<()> {
        buf.clear();
        std::fs::File::open(path)?.read_to_end(buf)?;
        Ok(())
    }

    fn fingerprint(&mut self) -> Vec<u64> {
        let mut fp = Vec::new();
        if Self::read(&mut self.buf, &self.proc_cgroups).is_ok() {
            for l in lines(&self.buf) {
                if let Some(n) = fields(l).nth(2) {
                    fp.push(parse_u64(n));
                }
            }
        }
        if let Some(v2) = &self.roots.v2 {
            if Self::read(&mut self.buf, &v2.join("cgroup.stat")).is_ok() {
                for l in lines(&self.buf) {
                    let mut f = fields(l);
                    if f.next() == Some(b"nr_descendants") {
                        fp.push(f.next().map(parse_u64).unwrap_or(0));
                    }
                }
            }
        }
        fp
    }

    fn scan(&mut self) {
        // Every cgroup path in every hierarchy, below the roots.
        let mut paths: Vec<String> = Vec::new();
        for root in self.roots.all() {
            walk(root, root, &mut paths);
        }
        paths.sort_unstable();
        paths.dedup();
        paths.retain(|p| self.opts.filter.allows(p));
        self.found = paths.len();
        if paths.len() > self.opts.max_cgroups {
            if !self.truncated_logged {
                self.truncated_logged = true;
                tracing::warn!(
                    found = paths.len(),
                    max_cgroups = self.opts.max_cgroups,
                    "more cgroups than max_cgroups: the first by path are reported; narrow [cgroups] include/exclude or raise max_cgroups"
                );
            }
            paths.truncate(self.opts.max_cgroups);
        }
        self.read_devnames();
        let mut old: HashMap<String, Cg> =
            self.cgs.drain(..).map(|c| (c.path.clone(), c)).collect();
        for p in paths {
            let mut cg = match old.remove(&p) {
                Some(c) => c,
                None => {
                    let (container, pod) = cgnames::resolve(&p);
                    Cg {
                        path: p,
                        container,
                        pod,
                        src: Sources::default(),
                        cpu_limit: 0.0,
                        memory_limit: 0,
                        pids_limit: 0,
                        prev: Counters::default(),
                        io_prev: Vec::new(),
                        primed: false,
                    }
                }
            };
            cg.src = self.sources(&cg.path);
            self.read_limits(&mut cg);
            self.cgs.push(cg);
        }
        // `old` now holds the cgroups that are gone: dropped with their state.
    }

    fn sources(&self, rel: &str) -> Sources {
        let at = |root: &Option<PathBuf>, file: &str| -> Option<PathBuf> {
            let dir = root.as_ref()?.join(rel.trim_start_matches('/'));
            dir.join(file).exists().then_some(dir)
        };
        let v2_cpu = at(&self.roots.v2, "cpu.stat").map(|d| d.join("cpu.stat"));
        Sources {
            v2_cpu,
            cpuacct: at(&self.roots.cpuacct, "cpuacct.usage"),
            v1_cpu_stat: at(&self.roots.cpu, "cpu.stat").map(|d| d.join("cpu.stat")),
            v2_mem: at(&self.roots.v2, "memory.current").filter(|_| self.roots.memory.is_none()),
            v1_mem: at(&self.roots.memory, "memory.usage_in_bytes"),
            v2_io: at(&self.roots.v2, "io.stat").filter(|_| self.roots.blkio.is_none()),
            v1_blkio: at(
                &self.roots.blkio,
                "blkio.throttle.io_service_bytes_recursive",
            ),
            pids: at(&self.roots.pids, "pids.current")
                .or_else(|| at(&self.roots.v2, "pids.current")),
            psi: at(&self.roots.v2, "cpu.pressure"),
        }
    }

    fn read_devnames(&mut self) {
        self.devnames.clear();
        if Self::read(&mut self.buf, &self.diskstats).is_ok() {
            for l in lines(&self.buf) {
                let mut f = fields(l);
                let (Some(maj), Some(min), Some(name)) = (f.next(), f.next(), f.next()) else {
                    continue;
                };
                self.devnames.insert(
                    devnum(parse_u64(maj), parse_u64(min)),
                    String::from_utf8_lossy(name).into_owned(),
                );
            }
        }
    }

    fn read_limits(&mut self, cg: &mut Cg) {
        let buf = &mut self.buf;
        let first = |buf: &mut Vec<u8>, p: PathBuf| -> Option<String> {
            Self::read(buf, &p).ok()?;
            Some(String::from_utf8_lossy(buf).trim().to_string())
        };
        cg.cpu_limit = 0.0;
        let v2_max = self
            .roots
            .v2
            .as_ref()
            .map(|r| r.join(cg.path.trim_start_matches('/')).join("cpu.max"));
        if let Some(s) = v2_max.and_then(|p| first(buf, p)) {
            let mut f = s.split_whitespace();
            if let (Some(q), Some(p)) = (f.next(), f.next()) {
                if let (Ok(q), Ok(p)) = (q.parse::<f64>(), p.parse::<f64>()) {
                    cg.cpu_limit = (q / p.max(1.0)) as f32;
                }
            }
        } else if let Some(cpu) = &self.roots.cpu {
            let d = cpu.join(cg.path.trim_start_matches('/'));
            let q = first(buf, d.join("cpu.cfs_quota_us")).and_then(|s| s.parse::<i64>().ok());
            let p = first(buf, d.join("cpu.cfs_period_us")).and_then(|s| s.parse::<i64>().ok());
            if let (Some(q), Some(p)) = (q, p) {
                if q > 0 && p > 0 {
                    cg.cpu_limit = (q as f64 / p as f64) as f32;
                }
            }
        }
        // "max" (v2) or a huge page-rounded number (v1) means no limit.
        let bytes = |s: Option<String>| -> u64 {
            match s.and_then(|s| s.parse::<u64>().ok()) {
                Some(v) if v < (1u64 << 60) => v,
                _ => 0,
            }
        };
        cg.memory_limit = if let Some(d) = &cg.src.v2_mem {
            bytes(first(buf, d.join("memory.max")))
        } else if let Some(d) = &cg.src.v1_mem {
            bytes(first(buf, d.join("memory.limit_in_bytes")))
        } else {
            0
        };
        cg.pids_limit = cg
            .src
            .pids
            .as_ref()
            .and_then(|d| first(buf, d.join("pids.max")))
            .and_then(|s| s.parse::<u32>().ok())
            .unwrap_or(0);
    }

    /// One interval: fills `out` and `io` (nothing on the priming call, `secs` None).
    pub fn collect(
        &mut self,
        secs: Option<f64>,
        out: &mut Vec<CgroupRec>,
        io: &mut Vec<CgroupIoRec>,
    ) {
        let fp = self.fingerprint();
        let due = self
            .last_scan
            .is_none_or(|t| t.elapsed() >= self.opts.rescan);
        if due || fp != self.fingerprint {
            self.scan();
            self.fingerprint = fp;
            self.last_scan = Some(Instant::now());
        }
        let (mut n, mut nio) = (0, 0);
        let mut vanished = false;
        let mut i = 0;
        while i < self.cgs.len() {
            let mut rec = std::mem::take(slot(out, n));
            match self.read_one(i, secs, &mut rec, io, &mut nio) {
                Ok(true) => {
                    out[n] = rec;
                    n += 1;
                }
                Ok(false) => out[n] = rec,
                Err(_) => {
                    // Gone since the scan: its last interval was already reported; drop
                    // its state now and look for newcomers next time.
                    out[n] = rec;
                    vanished = true;
                    self.cgs.swap_remove(i);
                    continue;
                }
            }
            i += 1;
        }
        if vanished {
            self.last_scan = None;
        }
        out.truncate(n);
        io.truncate(nio);
    }

    /// Reads cgroup `i`; Ok(false) while priming, Err when it vanished.
    fn read_one(
        &mut self,
        i: usize,
        secs: Option<f64>,
        rec: &mut CgroupRec,
        io: &mut Vec<CgroupIoRec>,
        nio: &mut usize,
    ) -> std::io::Result<bool> {
        let buf = &mut self.buf;
        let cg = &mut self.cgs[i];
        let mut cur = cg.prev;
        *rec = CgroupRec {
            cgroup: std::mem::take(&mut rec.cgroup),
            container: std::mem::take(&mut rec.container),
            pod: std::mem::take(&mut rec.pod),
            ..Default::default()
        };
        // CPU usage.
        if let Some(p) = &cg.src.v2_cpu {
            Self::read(buf, p)?;
            for l in lines(buf) {
                let mut f = fields(l);
                let (Some(k), Some(v)) = (f.next(), f.next()) else {
                    continue;
                };
                let v = parse_u64(v);
                match k {
                    b"usage_usec" => cur.usage_us = v,
                    b"user_usec" => cur.user_us = v,
                    b"system_usec" => cur.system_us = v,
                    b"nr_periods" => cur.periods = v,
                    b"nr_throttled" => cur.throttled = v,
                    b"throttled_usec" => cur.throttled_us = v,
                    _ => {}
                }
            }
        }
        if let Some(d) = &cg.src.cpuacct {
            // v1 cpuacct first: on a hybrid host it is the controller the tasks are
            // accounted in (the v2 tree there has every cgroup's `cpu.stat`, but tasks
            // may not be in the same v2 cgroup); pure v2 hosts have no cpuacct.
            Self::read(buf, &d.join("cpuacct.usage"))?;
            cur.usage_us = parse_u64(String::from_utf8_lossy(buf).trim().as_bytes()) / 1000;
            Self::read(buf, &d.join("cpuacct.stat"))?;
            // user/system in USER_HZ ticks: split the exact usage in their proportion.
            let (mut u, mut s) = (0u64, 0u64);
            for l in lines(buf) {
                let mut f = fields(l);
                match (f.next(), f.next()) {
                    (Some(b"user"), Some(v)) => u = parse_u64(v),
                    (Some(b"system"), Some(v)) => s = parse_u64(v),
                    _ => {}
                }
            }
            cur.user_us = (u as f64 * 1e6 / self.user_hz) as u64;
            cur.system_us = (s as f64 * 1e6 / self.user_hz) as u64;
        }
        if let Some(p) = &cg.src.v1_cpu_stat {
            Self::read(buf, p)?;
            for l in lines(buf) {
                let mut f = fields(l);
                let (Some(k), Some(v)) = (f.next(), f.next()) else {
                    continue;
                };
                match k {
                    b"nr_periods" => cur.periods = parse_u64(v),
                    b"nr_throttled" => cur.throttled = parse_u64(v),
                    b"throttled_time" => cur.throttled_us = parse_u64(v) / 1000,
                    _ => {}
                }
            }
        }
        // Memory.
        if let Some(d) = &cg.src.v2_mem {
            Self::read(buf, &d.join("memory.current"))?;
            rec.memory_usage = parse_u64(buf);
            let mut inactive_file = 0;
            if Self::read(buf, &d.join("memory.stat")).is_ok() {
                for l in lines(buf) {
                    let mut f = fields(l);
                    let (Some(k), Some(v)) = (f.next(), f.next()) else {
                        continue;
                    };
                    match k {
                        b"anon" => rec.memory_rss = parse_u64(v),
                        b"file" => rec.memory_cache = parse_u64(v),
                        b"inactive_file" => inactive_file = parse_u64(v),
                        _ => {}
                    }
                }
            }
            rec.memory_working_set = rec.memory_usage.saturating_sub(inactive_file);
            if Self::read(buf, &d.join("memory.swap.current")).is_ok() {
                rec.memory_swap = parse_u64(buf);
            }
            if Self::read(buf, &d.join("memory.events")).is_ok() {
                for l in lines(buf) {
                    let mut f = fields(l);
                    let (Some(k), Some(v)) = (f.next(), f.next()) else {
                        continue;
                    };
                    match k {
                        b"high" => cur.high = parse_u64(v),
                        b"max" => cur.max = parse_u64(v),
                        b"oom" => cur.oom = parse_u64(v),
                        b"oom_kill" => cur.oom_kill = parse_u64(v),
                        _ => {}
                    }
                }
            }
        } else if let Some(d) = &cg.src.v1_mem {
            Self::read(buf, &d.join("memory.usage_in_bytes"))?;
            rec.memory_usage = parse_u64(buf);
            let mut inactive_file = 0;
            if Self::read(buf, &d.join("memory.stat")).is_ok() {
                for l in lines(buf) {
                    let mut f = fields(l);
                    let (Some(k), Some(v)) = (f.next(), f.next()) else {
                        continue;
                    };
                    match k {
                        b"total_rss" => rec.memory_rss = parse_u64(v),
                        b"total_cache" => rec.memory_cache = parse_u64(v),
                        b"total_swap" => rec.memory_swap = parse_u64(v),
                        b"total_inactive_file" => inactive_file = parse_u64(v),
                        _ => {}
                    }
                }
            }
            rec.memory_working_set = rec.memory_usage.saturating_sub(inactive_file);
            if Self::read(buf, &d.join("memory.failcnt")).is_ok() {
                cur.max = parse_u64(buf);
            }
            if Self::read(buf, &d.join("memory.oom_control")).is_ok() {
                for l in lines(buf) {
                    let mut f = fields(l);
                    if let (Some(b"oom_kill"), Some(v)) = (f.next(), f.next()) {
                        cur.oom_kill = parse_u64(v);
                    }
                }
            }
        }
        // Pids.
        if let Some(d) = &cg.src.pids {
            if Self::read(buf, &d.join("pids.current")).is_ok() {
                rec.pids = parse_u64(buf) as u32;
            }
        }
        // Pressure (v2).
        if let Some(d) = &cg.src.psi {
            for (r, file) in ["cpu.pressure", "memory.pressure", "io.pressure"]
                .iter()
                .enumerate()
            {
                if Self::read(buf, &d.join(file)).is_err() {
                    continue;
                }
                for l in lines(buf) {
                    let mut f = fields(l);
                    let which = match f.next() {
                        Some(b"some") => 0,
                        Some(b"full") => 1,
                        _ => continue,
                    };
                    for kv in f {
                        if let Some(v) = kv.strip_prefix(b"total=") {
                            cur.psi[r * 2 + which] = parse_u64(v);
                        }
                    }
                }
            }
        }
        // I/O per device: (dev, [rbytes, wbytes, rios, wios]).
        let mut devs: Vec<(u64, [u64; 4])> = Vec::new();
        if let Some(d) = &cg.src.v2_io {
            if Self::read(buf, &d.join("io.stat")).is_ok() {
                for l in lines(buf) {
                    let mut f = fields(l);
                    let Some(dev) = f.next().and_then(parse_dev) else {
                        continue;
                    };
                    let mut v = [0u64; 4];
                    for kv in f {
                        let mut s = kv.splitn(2, |b| *b == b'=');
                        let (Some(k), Some(x)) = (s.next(), s.next()) else {
                            continue;
                        };
                        let i = match k {
                            b"rbytes" => 0,
                            b"wbytes" => 1,
                            b"rios" => 2,
                            b"wios" => 3,
                            _ => continue,
                        };
                        v[i] = parse_u64(x);
                    }
                    devs.push((dev, v));
                }
            }
        } else if let Some(d) = &cg.src.v1_blkio {
            for (file, off) in [
                ("blkio.throttle.io_service_bytes_recursive", 0),
                ("blkio.throttle.io_serviced_recursive", 2),
            ] {
                if Self::read(buf, &d.join(file)).is_err() {
                    continue;
                }
                for l in lines(buf) {
                    let mut f = fields(l);
                    let (Some(dev), Some(op), Some(v)) = (f.next(), f.next(), f.next()) else {
                        continue;
                    };
                    let Some(dev) = parse_dev(dev) else { continue };
                    let i = match op {
                        b"Read" => off,
                        b"Write" => off + 1,
                        _ => continue,
                    };
                    let e = match devs.iter().position(|(d, _)| *d == dev) {
                        Some(e) => e,
                        None => {
                            devs.push((dev, [0; 4]));
                            devs.len() - 1
                        }
                    };
                    devs[e].1[i] = parse_u64(v);
                }
            }
        }
        let prev = std::mem::replace(&mut cg.prev, cur);
        let primed = std::mem::replace(&mut cg.primed, true);
        let io_prev = std::mem::replace(&mut cg.io_prev, devs);
        let Some(s) = secs.filter(|_| primed) else {
            return Ok(false);
        };
        let d = |a: u64, b: u64| counter_delta(a, b);
        let per = |us: u64| (us as f64 / (s * 1e4)) as f32; // µs in the interval -> % of one CPU
        set_str(&mut rec.cgroup, cg.path.as_bytes());
        set_str(&mut rec.container, cg.container.as_bytes());
        set_str(&mut rec.pod, cg.pod.as_bytes());
        rec.cpu_pct = per(d(prev.usage_us, cur.usage_us));
        rec.cpu_user_pct = per(d(prev.user_us, cur.user_us));
        rec.cpu_system_pct = per(d(prev.system_us, cur.system_us));
        rec.cpu_limit = cg.cpu_limit;
        rec.cpu_periods = d(prev.periods, cur.periods) as u32;
        rec.cpu_throttled_periods = d(prev.throttled, cur.throttled) as u32;
        rec.cpu_throttled_ms_per_s =
            (d(prev.throttled_us, cur.throttled_us) as f64 / 1e3 / s) as f32;
        rec.memory_limit = cg.memory_limit;
        rec.memory_high_events = d(prev.high, cur.high) as u32;
        rec.memory_max_events = d(prev.max, cur.max) as u32;
        rec.oom_events = d(prev.oom, cur.oom) as u32;
        rec.oom_kills = d(prev.oom_kill, cur.oom_kill) as u32;
        rec.pids_limit = cg.pids_limit;
        let psi = |k: usize| (d(prev.psi[k], cur.psi[k]) as f64 / (s * 1e4)).min(100.0) as f32;
        if cg.src.psi.is_some() {
            rec.cpu_some_pct = psi(0);
            rec.memory_some_pct = psi(2);
            rec.memory_full_pct = psi(3);
            rec.io_some_pct = psi(4);
            rec.io_full_pct = psi(5);
        }
        for (dev, v) in &cg.io_prev {
            let p = io_prev
                .iter()
                .find(|(x, _)| x == dev)
                .map(|(_, p)| *p)
                .unwrap_or([0; 4]);
            let r = |k: usize| (d(p[k], v[k]) as f64 / s) as f32;
            let rates = [r(0), r(1), r(2), r(3)];
            rec.read_bytes_per_s += rates[0];
            rec.write_bytes_per_s += rates[1];
            rec.reads_per_s += rates[2];
            rec.writes_per_s += rates[3];
            let e = slot(io, *nio);
            *nio += 1;
            set_str(&mut e.cgroup, cg.path.as_bytes());
            match self.devnames.get(dev) {
                Some(name) => set_str(&mut e.device, name.as_bytes()),
                None => {
                    let s = format!("{}:{}", dev >> 20, dev & 0xfffff);
                    set_str(&mut e.device, s.as_bytes())
                }
            }
            (
                e.read_bytes_per_s,
                e.write_bytes_per_s,
                e.reads_per_s,
                e.writes_per_s,
            ) = (rates[0], rates[1], rates[2], rates[3]);
        }
        Ok(true)
    }
}

fn parse_dev(f: &[u8]) -> Option<u64> {
    let mut s = f.splitn(2, |b| *b == b':');
    let (maj, min) = (s.next()?, s.next()?);
    if maj.is_empty() || min.is_empty() {
        return None;
    }
    Some(devnum(parse_u64(maj), parse_u64(min)))
}

/// Appends the cgroup directories below `root` (not `root` itself) as `/a/b` paths.
fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            continue;
        }
        let p = e.path();
        if let Ok(rel) = p.strip_prefix(root) {
            out.push(format!("/{}", rel.to_string_lossy()));
        }
        walk(root, &p, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(dir: &Path, file: &str, text: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(file), text).unwrap();
    }

    fn opts() -> Options {
        Options {
            max_cgroups: 500,
            filter: Filter::default(),
            rescan: Duration::from_secs(3600),
        }
    }

    #[test]
    fn mounts_hybrid_and_v2() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
            cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,relatime,cpu,cpuacct 0 0\n\
            cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n\
            cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n\
            cgroup2 /tmp/other cgroup2 rw 0 0\n";
        let r = Roots::from_mounts(hybrid, "/sys/fs/cgroup");
        assert_eq!(r.v2.as_deref(), Some(Path::new("/sys/fs/cgroup/unified")));
        assert_eq!(r.cpu, r.cpuacct);
        assert_eq!(
            r.memory.as_deref(),
            Some(Path::new("/sys/fs/cgroup/memory"))
        );
        assert!(r.blkio.is_none());
        let v2 = Roots::from_mounts("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n", "/sys/fs/cgroup/");
        assert_eq!(v2.v2.as_deref(), Some(Path::new("/sys/fs/cgroup")));
        assert!(Roots::from_mounts(hybrid, "/nowhere").is_empty());
    }

    /// A pure-v2 tree written by the test (the layout of a host with cgroup2 only), read
    /// twice with known counter steps.
    #[test]
    fn v2_tree_values() {
        let root = std::env::temp_dir().join(format!("sonde-cg2-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let proc = root.join("proc");
        w(&proc, "cgroups", "");
        w(&proc, "diskstats", "   8       0 sda 1 2 3\n");
        let id = "3f4e5d6c7b8a99887766554433221100ffeeddccbbaa00112233445566778899";
        let cg = root.join(format!("fs/system.slice/docker-{id}.scope"));
        w(&root.join("fs"), "cgroup.stat", "nr_descendants 2\n");
        let write = |usage: u64, thr: u64, io: u64, psi: u64, oomk: u64| {
            w(&cg, "cpu.stat", &format!("usage_usec {usage}\nuser_usec {}\nsystem_usec {}\nnr_periods {}\nnr_throttled {thr}\nthrottled_usec {}\n", usage * 3 / 4, usage / 4, 10 * (thr + 1), thr * 1000));
            w(&cg, "cpu.max", "50000 100000\n");
            w(&cg, "memory.current", "104857600\n");
            w(&cg, "memory.max", "209715200\n");
            w(
                &cg,
                "memory.stat",
                "anon 60000000\nfile 40000000\ninactive_file 30000000\n",
            );
            w(&cg, "memory.swap.current", "4096\n");
            w(
                &cg,
                "memory.events",
                &format!("low 0\nhigh 0\nmax {oomk}\noom {oomk}\noom_kill {oomk}\n"),
            );
            w(
                &cg,
                "io.stat",
                &format!(
                    "8:0 rbytes={io} wbytes={} rios={} wios=0 dbytes=0 dios=0\n",
                    io * 2,
                    io / 4096
                ),
            );
            w(&cg, "pids.current", "7\n");
            w(&cg, "pids.max", "max\n");
            for r in ["cpu", "memory", "io"] {
                w(&cg, &format!("{r}.pressure"), &format!("some avg10=0.00 avg60=0.00 avg300=0.00 total={psi}\nfull avg10=0.00 avg60=0.00 avg300=0.00 total={}\n", psi / 2));
            }
        };
        write(1_000_000, 0, 0, 0, 0);
        let roots = Roots {
            v2: Some(root.join("fs")),
            ..Default::default()
        };
        let mut c = Cgroups::new(proc.to_str().unwrap(), roots, opts());
        let (mut out, mut io) = (Vec::new(), Vec::new());
        c.collect(None, &mut out, &mut io);
        assert!(out.is_empty(), "priming reports nothing");
        // 2 s later: 0.5 s of CPU (25 % of one CPU), 3 throttled periods, 8 MiB read.
        write(1_500_000, 3, 8 << 20, 200_000, 1);
        c.collect(Some(2.0), &mut out, &mut io);
        let recs: Vec<_> = out.iter().map(|r| r.cgroup.as_str()).collect();
        assert_eq!(
            recs,
            ["/system.slice", &format!("/system.slice/docker-{id}.scope")]
        );
        let r = &out[1];
        assert_eq!(r.container, "docker:3f4e5d6c7b8a");
        assert_eq!(r.cpu_pct, 25.0);
        assert_eq!(r.cpu_user_pct, 18.75);
        assert_eq!(r.cpu_limit, 0.5);
        assert_eq!((r.cpu_periods, r.cpu_throttled_periods), (30, 3));
        assert_eq!(r.cpu_throttled_ms_per_s, 1.5);
        assert_eq!(r.memory_usage, 104857600);
        assert_eq!(r.memory_working_set, 104857600 - 30000000);
        assert_eq!(
            (r.memory_rss, r.memory_cache, r.memory_swap),
            (60000000, 40000000, 4096)
        );
        assert_eq!(r.memory_limit, 209715200);
        assert_eq!((r.memory_max_events, r.oom_events, r.oom_kills), (1, 1, 1));
        assert_eq!((r.pids, r.pids_limit), (7, 0));
        assert_eq!(r.read_bytes_per_s, (4 << 20) as f32);
        assert_eq!(r.reads_per_s, 1024.0);
        assert_eq!(r.cpu_some_pct, 10.0);
        assert_eq!(r.memory_full_pct, 5.0);
        assert_eq!(io.len(), 1);
        assert_eq!(
            (io[0].device.as_str(), io[0].write_bytes_per_s),
            ("sda", (8 << 20) as f32)
        );
        use protocol::tables::Record;
        // Derived: throttled share of periods, CPU against the limit, working set vs limit.
        assert_eq!(r.derived(0), 10.0);
        assert_eq!(r.derived(1), 50.0);
        assert_eq!(r.derived(2).round(), 36.0);
        // The cgroup vanishes: no row for it, its state is gone, the parent stays.
        std::fs::remove_dir_all(&cg).unwrap();
        c.collect(Some(1.0), &mut out, &mut io);
        assert_eq!(
            out.len(),
            1,
            "{:?}",
            out.iter().map(|r| &r.cgroup).collect::<Vec<_>>()
        );
        assert_eq!(c.tracked(), 1);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
