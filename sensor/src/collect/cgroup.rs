//! Per-cgroup CPU, throttling, memory, I/O, pids and pressure, on v1, v2 and hybrid hosts.
//!
//! A cgroup is its path below the hierarchy roots; on a hybrid host one path can exist in
//! the v2 tree and in several v1 controllers. Each metric comes from the v1 controller
//! when one is mounted for it (hybrid hosts: cpu, cpuacct, memory, blkio, pids are v1
//! there) and from the v2 tree otherwise (pure v2 hosts; pressure always).
//!
//! Cost control (measured: `cargo xtask bench`, section 8): the list of cgroups is rebuilt
//! only when it may have changed — a cgroup directory was created or removed (inotify on
//! every cgroup directory), the kernel's per-hierarchy counts in /proc/cgroups or the v2
//! root's `nr_descendants` moved, a tracked cgroup vanished, or `rescan` passed; limits are
//! re-read then too. Each cgroup's files are kept open and re-read with one `pread` each
//! into one shared buffer (beyond the descriptor budget: open, read, close). A cgroup with
//! no CPU time for three reads has only its CPU file read, the rest every `idle_stride`
//! intervals, and is not read at all while an ancestor's (hierarchical) CPU time did not
//! move. State is per tracked cgroup only, bounded by `max_cgroups`; a vanished cgroup
//! leaves nothing behind.

use super::cgnames;
use crate::filter::Filter;
use crate::procfile::{counter_delta, fields, lines, parse_u64, set_str, slot};
use protocol::{CgroupIoRec, CgroupRec};
use std::collections::HashMap;
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
    /// A cgroup without CPU time for 3 reads has only its CPU file read, and the rest
    /// every this many intervals (1 = everything every interval).
    pub idle_stride: u32,
}

/// What one kept file of a cgroup holds.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Metric {
    /// v2 `cpu.stat`: usage/user/system µs, throttling when the cpu controller is on.
    V2Cpu,
    CpuacctUsage,
    CpuacctStat,
    /// v1 cpu `cpu.stat`: throttling (read only for a cgroup with its own quota).
    V1CpuStat,
    V2MemCurrent,
    V2MemStat,
    V2MemSwap,
    V2MemEvents,
    V1MemUsage,
    V1MemStat,
    /// v1 `memory.failcnt` (read only for a cgroup with its own limit).
    V1Failcnt,
    V1OomControl,
    V2Io,
    V1BlkioBytes,
    V1BlkioOps,
    Pids,
    /// `{cpu,memory,io}.pressure` (0, 1, 2).
    Psi(usize),
}

/// A file kept open and re-read with `pread` (one syscall per interval), or, once the
/// descriptor budget is spent, its path (open, read, close each time).
enum Handle {
    Open(std::fs::File),
    Closed(PathBuf),
}

struct Source {
    metric: Metric,
    handle: Handle,
}

/// The cgroup's directory in each hierarchy that has it.
#[derive(Default)]
struct Dirs {
    v2: Option<PathBuf>,
    cpu: Option<PathBuf>,
    cpuacct: Option<PathBuf>,
    memory: Option<PathBuf>,
    blkio: Option<PathBuf>,
    pids: Option<PathBuf>,
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
    sources: Vec<Source>,
    cpu_limit: f32,
    memory_limit: u64,
    pids_limit: u32,
    prev: Counters,
    /// (device number, [rbytes, wbytes, rios, wios]) at the last read.
    io_prev: Vec<(u64, [u64; 4])>,
    primed: bool,
    /// Seconds of intervals skipped since the last full read, consecutive full reads
    /// without CPU time, and the
    /// gauges of the last full read (usage, working set, rss, cache, swap, pids).
    pending: f64,
    idle: u32,
    /// Spreads the full reads of idle cgroups over the stride (from the path).
    spread: u64,
    last: [u64; 6],
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
    buf: Buf,
    devnames: HashMap<u64, String>,
    user_hz: f64,
    idle_stride: u64,
    round: u64,
    watch: Option<Watch>,
    /// Descriptors kept open, and how many may be.
    open_fds: usize,
    fd_budget: usize,
    truncated_logged: bool,
}

fn devnum(maj: u64, min: u64) -> u64 {
    (maj << 20) | min
}

impl Cgroups {
    pub fn new(proc: &str, roots: Roots, opts: Options) -> Self {
        let idle_stride = opts.idle_stride.max(1) as u64;
        Cgroups {
            roots,
            opts,
            proc_cgroups: format!("{proc}/cgroups").into(),
            diskstats: format!("{proc}/diskstats").into(),
            cgs: Vec::new(),
            fingerprint: Vec::new(),
            last_scan: None,
            buf: Buf::new(),
            devnames: HashMap::new(),
            user_hz: 100.0,
            open_fds: 0,
            fd_budget: super::fd_budget() / 2,
            idle_stride,
            round: 0,
            watch: Watch::new(),
            truncated_logged: false,
        }
    }

    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.cgs.len()
    }

    /// Reads `path` into the shared buffer.
    fn read(buf: &mut Buf, path: &Path) -> std::io::Result<()> {
        read_file(&std::fs::File::open(path)?, buf)
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
            walk(root, root, &mut paths, self.watch.as_ref());
        }
        paths.sort_unstable();
        paths.dedup();
        paths.retain(|p| self.opts.filter.allows(p));
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
                    let spread = p
                        .bytes()
                        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
                    Cg {
                        path: p,
                        container,
                        pod,
                        sources: Vec::new(),
                        cpu_limit: 0.0,
                        memory_limit: 0,
                        pids_limit: 0,
                        prev: Counters::default(),
                        io_prev: Vec::new(),
                        primed: false,
                        pending: 0.0,
                        idle: 0,
                        spread,
                        last: [0; 6],
                    }
                }
            };
            let dirs = self.dirs(&cg.path);
            self.read_limits(&mut cg, &dirs);
            // Close the old descriptors before opening the new ones.
            self.open_fds -= cg
                .sources
                .iter()
                .filter(|s| matches!(s.handle, Handle::Open(_)))
                .count();
            cg.sources.clear();
            self.open_sources(&mut cg, &dirs);
            self.cgs.push(cg);
        }
        // `old` now holds the cgroups that are gone: dropped with their state.
        for c in old.values() {
            self.open_fds -= c
                .sources
                .iter()
                .filter(|s| matches!(s.handle, Handle::Open(_)))
                .count();
        }
    }

    fn dirs(&self, rel: &str) -> Dirs {
        let at = |root: &Option<PathBuf>| -> Option<PathBuf> {
            let dir = root.as_ref()?.join(rel.trim_start_matches('/'));
            dir.is_dir().then_some(dir)
        };
        Dirs {
            v2: at(&self.roots.v2),
            cpu: at(&self.roots.cpu),
            cpuacct: at(&self.roots.cpuacct),
            memory: at(&self.roots.memory),
            blkio: at(&self.roots.blkio),
            pids: at(&self.roots.pids),
        }
    }

    /// Chooses and opens the files read each interval: per metric group the v1
    /// controller's when one is mounted, else the v2 tree's; files that only matter
    /// with a limit (throttling, failcnt) only when the cgroup has one.
    fn open_sources(&mut self, cg: &mut Cg, d: &Dirs) {
        use Metric::*;
        let mut want: Vec<(Metric, PathBuf)> = Vec::new();
        let has =
            |d: &Option<PathBuf>, f: &str| d.as_ref().map(|d| d.join(f)).filter(|p| p.exists());
        // cpuacct.usage is exact (ns); user/system (cpuacct.stat, usage_all) are the
        // kernel's tick-based cputime, used only to split it.
        if let Some(p) = has(&d.cpuacct, "cpuacct.usage") {
            want.push((CpuacctUsage, p));
            if let Some(p) = has(&d.cpuacct, "cpuacct.stat") {
                want.push((CpuacctStat, p));
            }
        } else if let Some(p) = has(&d.v2, "cpu.stat") {
            want.push((V2Cpu, p));
        }
        if cg.cpu_limit > 0.0 {
            if let Some(p) = has(&d.cpu, "cpu.stat") {
                want.push((V1CpuStat, p));
            }
        }
        if self.roots.memory.is_some() {
            if let Some(p) = has(&d.memory, "memory.usage_in_bytes") {
                want.push((V1MemUsage, p));
                want.extend(has(&d.memory, "memory.stat").map(|p| (V1MemStat, p)));
                want.extend(has(&d.memory, "memory.oom_control").map(|p| (V1OomControl, p)));
                if cg.memory_limit > 0 {
                    want.extend(has(&d.memory, "memory.failcnt").map(|p| (V1Failcnt, p)));
                }
            }
        } else if let Some(p) = has(&d.v2, "memory.current") {
            want.push((V2MemCurrent, p));
            want.extend(has(&d.v2, "memory.stat").map(|p| (V2MemStat, p)));
            want.extend(has(&d.v2, "memory.events").map(|p| (V2MemEvents, p)));
            want.extend(has(&d.v2, "memory.swap.current").map(|p| (V2MemSwap, p)));
        }
        if self.roots.blkio.is_some() {
            if let Some(p) = has(&d.blkio, "blkio.throttle.io_service_bytes_recursive") {
                want.push((V1BlkioBytes, p));
                want.extend(
                    has(&d.blkio, "blkio.throttle.io_serviced_recursive").map(|p| (V1BlkioOps, p)),
                );
            }
        } else if let Some(p) = has(&d.v2, "io.stat") {
            want.push((V2Io, p));
        }
        if let Some(p) = has(&d.pids, "pids.current").or_else(|| has(&d.v2, "pids.current")) {
            want.push((Pids, p));
        }
        for (i, f) in ["cpu.pressure", "memory.pressure", "io.pressure"]
            .iter()
            .enumerate()
        {
            if let Some(p) = has(&d.v2, f) {
                want.push((Psi(i), p));
            }
        }
        for (metric, path) in want {
            let handle = if self.open_fds < self.fd_budget {
                match std::fs::File::open(&path) {
                    Ok(f) => {
                        self.open_fds += 1;
                        Handle::Open(f)
                    }
                    Err(_) => Handle::Closed(path),
                }
            } else {
                Handle::Closed(path)
            };
            cg.sources.push(Source { metric, handle });
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

    fn read_limits(&mut self, cg: &mut Cg, dirs: &Dirs) {
        let buf = &mut self.buf;
        let first = |buf: &mut Buf, p: PathBuf| -> Option<String> {
            Self::read(buf, &p).ok()?;
            Some(String::from_utf8_lossy(&buf[..]).trim().to_string())
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
        } else if let Some(d) = &dirs.cpu {
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
        cg.memory_limit = if self.roots.memory.is_some() {
            dirs.memory
                .as_ref()
                .map(|d| bytes(first(buf, d.join("memory.limit_in_bytes"))))
                .unwrap_or(0)
        } else {
            dirs.v2
                .as_ref()
                .map(|d| bytes(first(buf, d.join("memory.max"))))
                .unwrap_or(0)
        };
        cg.pids_limit = dirs
            .pids
            .as_ref()
            .or(dirs.v2.as_ref())
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
        let created = self.watch.as_ref().is_some_and(|w| w.changed());
        if due || created || fp != self.fingerprint {
            self.scan();
            self.fingerprint = fp;
            self.last_scan = Some(Instant::now());
        }
        self.round += 1;
        let (mut n, mut nio) = (0, 0);
        let mut vanished = false;
        let mut i = 0;
        // Cgroups are in path order, so ancestors come first: when an ancestor's CPU time
        // (hierarchical) did not move this interval, neither did any descendant's, and
        // an idle descendant is not even read (unless due for its full read).
        let mut idle_anc: Vec<usize> = Vec::new();
        while i < self.cgs.len() {
            while let Some(&j) = idle_anc.last() {
                let (a, b) = (&self.cgs[j], &self.cgs[i]);
                let below = b.path.len() > a.path.len()
                    && b.path.starts_with(a.path.as_str())
                    && b.path.as_bytes()[a.path.len()] == b'/'
                    && a.sources.first().map(|s| s.metric) == b.sources.first().map(|s| s.metric);
                if below {
                    break;
                }
                idle_anc.pop();
            }
            let mut rec = std::mem::take(slot(out, n));
            match self.read_one(i, secs, !idle_anc.is_empty(), &mut rec, io, &mut nio) {
                Ok((reported, idle_now)) => {
                    out[n] = rec;
                    if reported {
                        n += 1;
                    }
                    if idle_now {
                        idle_anc.push(i);
                    }
                }
                Err(_) => {
                    self.open_fds -= self.cgs[i]
                        .sources
                        .iter()
                        .filter(|s| matches!(s.handle, Handle::Open(_)))
                        .count();
                    // Gone since the scan: its last interval was already reported; drop
                    // its state now and look for newcomers next time.
                    out[n] = rec;
                    vanished = true;
                    self.cgs.remove(i);
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
        ancestor_idle: bool,
        rec: &mut CgroupRec,
        io: &mut Vec<CgroupIoRec>,
        nio: &mut usize,
    ) -> std::io::Result<(bool, bool)> {
        let buf = &mut self.buf;
        let cg = &mut self.cgs[i];
        let mut cur = cg.prev;
        *rec = CgroupRec {
            cgroup: std::mem::take(&mut rec.cgroup),
            container: std::mem::take(&mut rec.container),
            pod: std::mem::take(&mut rec.pod),
            ..Default::default()
        };
        let mut devs: Vec<(u64, [u64; 4])> = Vec::new();
        let mut inactive_file = 0u64;
        let (mut acct_user, mut acct_system) = (None, None);
        // v1: OOM and limit counters only move under a limit (own or an ancestor's, as
        // memory.stat's hierarchical_memory_limit says); ops only when bytes moved.
        let mut limited = cg.memory_limit > 0;
        let mut bytes_moved = true;
        let due =
            self.idle_stride <= 1 || (self.round + cg.spread).is_multiple_of(self.idle_stride);
        // Idle below an ancestor that was idle this interval: nothing to read.
        let mut skipped = ancestor_idle && cg.idle >= 3 && !due && cg.primed;
        for (k, src) in cg.sources.iter().enumerate() {
            if skipped {
                break;
            }
            if k == 1
                && cg.idle >= 3
                && !due
                && matches!(cg.sources[0].metric, Metric::V2Cpu | Metric::CpuacctUsage)
                && cur.usage_us == cg.prev.usage_us
            {
                // Idle (no CPU time for 3 reads and none now): the rest is read every
                // idle_stride-th interval only.
                skipped = true;
                break;
            }
            match src.metric {
                Metric::V1OomControl if !limited => continue,
                Metric::V1BlkioOps if !bytes_moved => {
                    for (dev, v) in devs.iter_mut() {
                        if let Some((_, p)) = cg.io_prev.iter().find(|(d, _)| d == dev) {
                            (v[2], v[3]) = (p[2], p[3]);
                        }
                    }
                    continue;
                }
                _ => {}
            }
            read_handle(&src.handle, buf)?;
            let kv = || {
                lines(buf).filter_map(|l| {
                    let mut f = fields(l);
                    Some((f.next()?, parse_u64(f.next()?)))
                })
            };
            match src.metric {
                Metric::V2Cpu => {
                    for (k, v) in kv() {
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
                Metric::CpuacctUsage => cur.usage_us = parse_u64(buf) / 1000,
                Metric::CpuacctStat => {
                    for (k, v) in kv() {
                        match k {
                            b"user" => acct_user = Some(v),
                            b"system" => acct_system = Some(v),
                            _ => {}
                        }
                    }
                }
                Metric::V1CpuStat => {
                    for (k, v) in kv() {
                        match k {
                            b"nr_periods" => cur.periods = v,
                            b"nr_throttled" => cur.throttled = v,
                            b"throttled_time" => cur.throttled_us = v / 1000,
                            _ => {}
                        }
                    }
                }
                Metric::V2MemCurrent | Metric::V1MemUsage => rec.memory_usage = parse_u64(buf),
                Metric::V2MemStat => {
                    for (k, v) in kv() {
                        match k {
                            b"anon" => rec.memory_rss = v,
                            b"file" => rec.memory_cache = v,
                            b"inactive_file" => inactive_file = v,
                            _ => {}
                        }
                    }
                }
                Metric::V1MemStat => {
                    for (k, v) in kv() {
                        match k {
                            b"total_rss" => rec.memory_rss = v,
                            b"total_cache" => rec.memory_cache = v,
                            b"total_swap" => rec.memory_swap = v,
                            b"total_inactive_file" => inactive_file = v,
                            b"hierarchical_memory_limit" => limited |= v < (1 << 60),
                            _ => {}
                        }
                    }
                }
                Metric::V2MemSwap => rec.memory_swap = parse_u64(buf),
                Metric::V2MemEvents => {
                    for (k, v) in kv() {
                        match k {
                            b"high" => cur.high = v,
                            b"max" => cur.max = v,
                            b"oom" => cur.oom = v,
                            b"oom_kill" => cur.oom_kill = v,
                            _ => {}
                        }
                    }
                }
                Metric::V1Failcnt => cur.max = parse_u64(buf),
                Metric::V1OomControl => {
                    for (k, v) in kv() {
                        if k == b"oom_kill" {
                            cur.oom_kill = v;
                        }
                    }
                }
                Metric::Pids => rec.pids = parse_u64(buf) as u32,
                Metric::Psi(r) => {
                    for l in lines(buf) {
                        let mut f = fields(l);
                        let which = match f.next() {
                            Some(b"some") => 0,
                            Some(b"full") => 1,
                            _ => continue,
                        };
                        for x in f {
                            if let Some(v) = x.strip_prefix(b"total=") {
                                cur.psi[r * 2 + which] = parse_u64(v);
                            }
                        }
                    }
                }
                Metric::V2Io => {
                    for l in lines(buf) {
                        let mut f = fields(l);
                        let Some(dev) = f.next().and_then(parse_dev) else {
                            continue;
                        };
                        let mut v = [0u64; 4];
                        for x in f {
                            let mut kv = x.splitn(2, |b| *b == b'=');
                            let (Some(k), Some(n)) = (kv.next(), kv.next()) else {
                                continue;
                            };
                            let i = match k {
                                b"rbytes" => 0,
                                b"wbytes" => 1,
                                b"rios" => 2,
                                b"wios" => 3,
                                _ => continue,
                            };
                            v[i] = parse_u64(n);
                        }
                        devs.push((dev, v));
                    }
                }
                Metric::V1BlkioBytes | Metric::V1BlkioOps => {
                    let off = if src.metric == Metric::V1BlkioBytes {
                        0
                    } else {
                        2
                    };
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
                    if src.metric == Metric::V1BlkioBytes {
                        bytes_moved = devs.len() != cg.io_prev.len()
                            || devs
                                .iter()
                                .zip(&cg.io_prev)
                                .any(|(a, b)| a.0 != b.0 || a.1[0] != b.1[0] || a.1[1] != b.1[1]);
                    }
                }
            }
        }
        rec.memory_working_set = rec.memory_usage.saturating_sub(inactive_file);
        let ticks = acct_user.is_some();
        if let (Some(u), Some(s)) = (acct_user, acct_system) {
            // cpuacct.stat is in USER_HZ ticks: kept as µs, used below only for the split.
            cur.user_us = (u as f64 * 1e6 / self.user_hz) as u64;
            cur.system_us = (s as f64 * 1e6 / self.user_hz) as u64;
        }
        if skipped {
            cg.idle += 1;
            cg.pending += secs.unwrap_or(0.0);
            set_str(&mut rec.cgroup, cg.path.as_bytes());
            set_str(&mut rec.container, cg.container.as_bytes());
            set_str(&mut rec.pod, cg.pod.as_bytes());
            (rec.cpu_limit, rec.memory_limit, rec.pids_limit) =
                (cg.cpu_limit, cg.memory_limit, cg.pids_limit);
            [
                rec.memory_usage,
                rec.memory_working_set,
                rec.memory_rss,
                rec.memory_cache,
                rec.memory_swap,
            ] = [cg.last[0], cg.last[1], cg.last[2], cg.last[3], cg.last[4]];
            rec.pids = cg.last[5] as u32;
            return Ok((secs.is_some(), true));
        }
        cg.idle = if cur.usage_us == cg.prev.usage_us && cg.primed {
            cg.idle + 1
        } else {
            0
        };
        cg.last = [
            rec.memory_usage,
            rec.memory_working_set,
            rec.memory_rss,
            rec.memory_cache,
            rec.memory_swap,
            rec.pids as u64,
        ];
        let prev = std::mem::replace(&mut cg.prev, cur);
        let primed = std::mem::replace(&mut cg.primed, true);
        let io_prev = std::mem::replace(&mut cg.io_prev, devs);
        // Rates over the time since this cgroup's previous read: the interval, plus the
        // intervals skipped while it was idle.
        let window = secs.map(|s| s + std::mem::take(&mut cg.pending));
        let idle_now = cg.idle > 0;
        let Some(s) = window.filter(|w| primed && *w > 0.0) else {
            return Ok((false, idle_now));
        };
        let d = |a: u64, b: u64| counter_delta(a, b);
        let per = |us: u64| (us as f64 / (s * 1e4)) as f32; // µs in the interval -> % of one CPU
        set_str(&mut rec.cgroup, cg.path.as_bytes());
        set_str(&mut rec.container, cg.container.as_bytes());
        set_str(&mut rec.pod, cg.pod.as_bytes());
        rec.cpu_pct = per(d(prev.usage_us, cur.usage_us));
        rec.cpu_user_pct = per(d(prev.user_us, cur.user_us));
        rec.cpu_system_pct = per(d(prev.system_us, cur.system_us));
        if ticks {
            // v1: the exact usage split in the proportion of the tick-based user/system.
            let (u, sy) = (rec.cpu_user_pct as f64, rec.cpu_system_pct as f64);
            let share = if u + sy > 0.0 { u / (u + sy) } else { 1.0 };
            rec.cpu_user_pct = (rec.cpu_pct as f64 * share) as f32;
            rec.cpu_system_pct = rec.cpu_pct - rec.cpu_user_pct;
        }
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
        if cg
            .sources
            .iter()
            .any(|s| matches!(s.metric, Metric::Psi(_)))
        {
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
        Ok((true, idle_now))
    }
}

/// Reads a kept file (one `pread` at offset 0) or opens, reads and closes it.
fn read_handle(h: &Handle, buf: &mut Buf) -> std::io::Result<()> {
    match h {
        Handle::Open(f) => read_file(f, buf),
        Handle::Closed(p) => read_file(&std::fs::File::open(p)?, buf),
    }
}

/// A read buffer zeroed once and reused: `Deref` gives the bytes of the last read.
pub struct Buf {
    data: Vec<u8>,
    n: usize,
}

impl Buf {
    pub fn new() -> Buf {
        Buf {
            data: vec![0; 16384],
            n: 0,
        }
    }
}

impl std::ops::Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data[..self.n]
    }
}

/// The whole file from offset 0 into `buf` (one `pread` for files smaller than the
/// buffer: cgroup and proc files are generated whole, so a short read is the end).
pub fn read_file(f: &std::fs::File, buf: &mut Buf) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut len = 0;
    loop {
        if buf.data.len() < len + 4096 {
            let l = buf.data.len();
            buf.data.resize(l * 2, 0);
        }
        match f.read_at(&mut buf.data[len..], len as u64) {
            Ok(0) => break,
            Ok(n) => {
                len += n;
                if len < buf.data.len() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                buf.n = 0;
                return Err(e);
            }
        }
    }
    buf.n = len;
    Ok(())
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
fn walk(root: &Path, dir: &Path, out: &mut Vec<String>, watch: Option<&Watch>) {
    if let Some(w) = watch {
        w.add(dir);
    }
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
        walk(root, &p, out, watch);
    }
}

/// An inotify instance watching every cgroup directory for children created or removed
/// (mkdir and rmdir on cgroupfs raise IN_CREATE / IN_DELETE like on any filesystem): a
/// new cgroup is found at the next collection, whatever the kernel's counts say.
struct Watch {
    fd: std::os::fd::OwnedFd,
    /// Watches refused (the user's inotify limit): the counts and `rescan` still apply.
    refused: std::cell::Cell<bool>,
}

impl Watch {
    fn new() -> Option<Watch> {
        use std::os::fd::FromRawFd;
        // SAFETY: inotify_init1 returns a new descriptor we own, or -1.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        (fd >= 0).then(|| Watch {
            fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) },
            refused: std::cell::Cell::new(false),
        })
    }

    fn add(&self, dir: &Path) {
        use std::os::fd::AsRawFd;
        use std::os::unix::ffi::OsStrExt;
        let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
            return;
        };
        let mask = libc::IN_CREATE
            | libc::IN_DELETE
            | libc::IN_MOVED_TO
            | libc::IN_MOVED_FROM
            | libc::IN_ONLYDIR;
        // SAFETY: a valid descriptor and a NUL-terminated path.
        if unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), mask) } < 0 {
            self.refused.set(true);
        }
    }

    /// Whether anything happened since the last call (drains the queue).
    fn changed(&self) -> bool {
        use std::os::fd::AsRawFd;
        let mut buf = [0u8; 4096];
        let mut any = false;
        loop {
            // SAFETY: reading into a local buffer of the given size.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return any;
            }
            any = true;
        }
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
            idle_stride: 5,
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
        // (Here plain files: an open one stays readable, so the count in cgroup.stat is
        // what tells; on cgroupfs a read of a removed cgroup also fails, see cgroup_tests.)
        std::fs::remove_dir_all(&cg).unwrap();
        w(&root.join("fs"), "cgroup.stat", "nr_descendants 1\n");
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

    /// Idle cgroups: after 3 reads without CPU time only the CPU file is read; rows in
    /// between repeat the last gauges with zero rates; the next full read (within
    /// `idle_stride` intervals) reports what moved over all the intervals since the last.
    #[test]
    fn idle_cgroups_are_read_in_full_every_stride() {
        let root = std::env::temp_dir().join(format!("sonde-cgidle-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let proc = root.join("proc");
        w(&proc, "cgroups", "");
        w(&proc, "diskstats", "   8       0 sda 1 2 3\n");
        let cg = root.join("fs/idle");
        let write = |mem: u64, rbytes: u64| {
            w(
                &cg,
                "cpu.stat",
                "usage_usec 1000\nuser_usec 600\nsystem_usec 400\n",
            );
            w(&cg, "memory.current", &format!("{mem}\n"));
            w(
                &cg,
                "io.stat",
                &format!("8:0 rbytes={rbytes} wbytes=0 rios=0 wios=0\n"),
            );
        };
        write(100, 0);
        let roots = Roots {
            v2: Some(root.join("fs")),
            ..Default::default()
        };
        let mut c = Cgroups::new(proc.to_str().unwrap(), roots, opts());
        let (mut out, mut io) = (Vec::new(), Vec::new());
        c.collect(None, &mut out, &mut io);
        for _ in 0..3 {
            c.collect(Some(1.0), &mut out, &mut io);
            assert_eq!(out[0].memory_usage, 100);
        }
        // Idle now. Memory and I/O move while CPU does not.
        write(200, 6000);
        let mut skipped = 0;
        let mut full = None;
        for k in 1..=5 {
            c.collect(Some(1.0), &mut out, &mut io);
            let r = &out[0];
            if r.memory_usage == 100 {
                assert_eq!(r.read_bytes_per_s, 0.0, "a skipped interval has zero rates");
                skipped += 1;
            } else {
                assert_eq!(r.memory_usage, 200);
                full = Some((k, r.read_bytes_per_s));
                break;
            }
        }
        let (k, rate) = full.expect("a full read within idle_stride (5) intervals");
        assert!(
            skipped >= 1 && skipped == k - 1,
            "skipped {skipped} before read {k}"
        );
        // 6000 bytes over the k intervals since the last full read.
        assert_eq!(rate, 6000.0 / k as f32);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
