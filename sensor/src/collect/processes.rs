//! Top processes: each interval the union of the top N by CPU, by resident memory and by
//! I/O bytes, plus one `other` row summing the rest.
//!
//! Cost control (measured by `cargo xtask bench`, section "processes"): per process and
//! interval one read of `/proc/PID/stat` (CPU, RSS, threads, start time); `/proc/PID/io`
//! is read only for processes whose CPU time moved since their last I/O read (a process
//! that ran no code issued no I/O; writeback is charged to the writer when it dirtied
//! the pages), and its rate is over the time since that read. Command line, user and
//! cgroup are read once per process, and only when it first makes the top list.

use super::cgroup::{read_file, Buf};
use crate::procfile::{fields, parse_u64, set_str, slot};
use protocol::ProcessRec;
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Instant;

struct Proc {
    /// When /proc/PID/stat was last read, and the time the CPU deltas cover.
    read_at: Option<Instant>,
    window: f64,
    /// Consecutive reads without CPU time.
    idle: u32,
    /// `/proc/PID/stat`, kept open (one `pread` per interval) while descriptors last.
    stat: Option<std::fs::File>,
    /// Start time in ticks after boot: a reused pid has another.
    start: u64,
    utime: u64,
    stime: u64,
    /// CPU ticks at the last /proc/PID/io read, its values and when.
    io_cpu: u64,
    io: (u64, u64),
    io_at: Option<Instant>,
    /// This interval's figures.
    d_user: u64,
    d_system: u64,
    rss: u64,
    threads: u32,
    rbps: f32,
    wbps: f32,
    comm: String,
    /// Filled once, when it first makes the list.
    detail: Option<(String, String, String)>,
    seen: bool,
}

impl Proc {
    /// A process first seen with these start time and CPU counters.
    fn new(start: u64, utime: u64, stime: u64) -> Proc {
        Proc {
            stat: None,
            read_at: None,
            window: 0.0,
            idle: 0,
            start,
            utime,
            stime,
            io_cpu: u64::MAX,
            io: (0, 0),
            io_at: None,
            d_user: 0,
            d_system: 0,
            rss: 0,
            threads: 0,
            rbps: 0.0,
            wbps: 0.0,
            comm: String::new(),
            detail: None,
            seen: false,
        }
    }
}

pub struct Processes {
    proc: PathBuf,
    top: usize,
    cmdline_max: usize,
    procs: HashMap<u32, Proc>,
    buf: Buf,
    page: u64,
    open_fds: usize,
    fd_budget: usize,
    hz: f64,
    users: Option<HashMap<u32, String>>,
    order: Vec<u32>,
    idle_stride: u64,
    round: u64,
    /// The last pid allocated at the last listing of /proc.
    last_pid: Option<u64>,
    /// A descriptor just opened by `read_stat`, for the entry being filled.
    kept: Option<std::fs::File>,
    /// Processes seen at the last collection (for tests and the bench).
    pub count: usize,
}

impl Processes {
    pub fn new(proc: &str, top: usize, cmdline_max: usize, idle_stride: u32) -> Self {
        Processes {
            proc: proc.into(),
            top,
            cmdline_max,
            procs: HashMap::new(),
            buf: Buf::new(),
            page: 4096,
            open_fds: 0,
            fd_budget: super::fd_budget() / 2,
            hz: 100.0,
            users: None,
            order: Vec::new(),
            count: 0,
            kept: None,
            last_pid: None,
            idle_stride: idle_stride.max(1) as u64,
            round: 0,
        }
    }

    fn path_of(&self, file: &str) -> PathBuf {
        self.proc.join(file)
    }

    fn path(&self, pid: u32, file: &str) -> PathBuf {
        let mut p = self.proc.clone();
        p.push(itoa(pid));
        p.push(file);
        p
    }

    fn read(&mut self, pid: u32, file: &str) -> std::io::Result<()> {
        read_file(&std::fs::File::open(self.path(pid, file))?, &mut self.buf)
    }

    /// `/proc/PID/stat` through the kept descriptor, opening (and keeping) it if needed.
    fn read_stat(&mut self, pid: u32) -> std::io::Result<()> {
        if let Some(p) = self.procs.get_mut(&pid) {
            if let Some(f) = p.stat.as_ref() {
                if read_file(f, &mut self.buf).is_ok() {
                    return Ok(());
                }
                // The process it pointed at is gone (the pid may be reused): reopen.
                p.stat = None;
                self.open_fds -= 1;
            }
        }
        let f = std::fs::File::open(self.path(pid, "stat"))?;
        read_file(&f, &mut self.buf)?;
        if self.open_fds < self.fd_budget {
            self.kept = Some(f);
        }
        Ok(())
    }

    pub fn collect(&mut self, secs: Option<f64>, out: &mut Vec<ProcessRec>) -> std::io::Result<()> {
        let now = Instant::now();
        for p in self.procs.values_mut() {
            p.seen = false;
        }
        // Listing /proc is a fifth of the cost: skip it while no pid was allocated since
        // the last listing (the last field of /proc/loadavg); processes that exited fail
        // their read and are dropped.
        let last_pid = std::fs::File::open(self.path_of("loadavg"))
            .and_then(|f| read_file(&f, &mut self.buf))
            .ok()
            .and_then(|_| fields(&self.buf).nth(4).map(parse_u64));
        let mut pids = std::mem::take(&mut self.order);
        pids.clear();
        if last_pid.is_some() && last_pid == self.last_pid {
            pids.extend(self.procs.keys().copied());
        } else {
            for e in std::fs::read_dir(&self.proc)?.flatten() {
                if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
                    pids.push(pid);
                }
            }
        }
        self.last_pid = last_pid;
        self.round += 1;
        for &pid in &pids {
            // A process idle for 3 reads is re-read every `idle_stride`-th interval only
            // (spread by pid); the CPU it used meanwhile counts over the time since its
            // last read.
            if let Some(p) = self.procs.get_mut(&pid) {
                if self.idle_stride > 1
                    && p.idle >= 3
                    && !(self.round + pid as u64).is_multiple_of(self.idle_stride)
                {
                    p.seen = true;
                    (p.d_user, p.d_system, p.rbps, p.wbps) = (0, 0, 0.0, 0.0);
                    continue;
                }
            }
            self.kept = None;
            if self.read_stat(pid).is_err() {
                continue; // exited meanwhile
            }
            let Some((comm, v)) = parse_stat(&self.buf) else {
                continue;
            };
            let comm_changed = self
                .procs
                .get(&pid)
                .is_none_or(|p| p.comm.as_bytes() != comm);
            let comm = if comm_changed {
                String::from_utf8_lossy(comm).into_owned()
            } else {
                String::new()
            };
            let (utime, stime, threads, start, rss) = (v[11], v[12], v[17], v[19], v[21]);
            let p = self
                .procs
                .entry(pid)
                .or_insert_with(|| Proc::new(start, utime, stime));
            if p.start != start {
                // The pid was reused: a new process (the kept descriptor pointed at the
                // old one and would have failed; a fresh one was opened).
                if p.stat.take().is_some() {
                    self.open_fds -= 1;
                }
                *p = Proc::new(start, utime, stime);
            }
            p.seen = true;
            if let Some(f) = self.kept.take() {
                if p.stat.is_none() {
                    p.stat = Some(f);
                    self.open_fds += 1;
                }
            }
            p.d_user = utime.saturating_sub(p.utime);
            p.d_system = stime.saturating_sub(p.stime);
            p.window = p
                .read_at
                .map(|t| now.duration_since(t).as_secs_f64())
                .unwrap_or(0.0);
            p.read_at = Some(now);
            p.idle = if p.d_user + p.d_system == 0 {
                p.idle + 1
            } else {
                0
            };
            (p.utime, p.stime) = (utime, stime);
            p.rss = rss * self.page;
            p.threads = threads as u32;
            if comm_changed {
                p.comm = comm;
            }
            let cpu = utime + stime;
            let want_io = p.io_cpu != cpu;
            if !want_io {
                p.rbps = 0.0;
                p.wbps = 0.0;
                continue;
            }
            let io = if self.read(pid, "io").is_ok() {
                let (mut r, mut w) = (0, 0);
                for l in self.buf.split(|b| *b == b'\n') {
                    if let Some(x) = l.strip_prefix(b"read_bytes: ") {
                        r = parse_u64(x);
                    } else if let Some(x) = l.strip_prefix(b"write_bytes: ") {
                        w = parse_u64(x);
                    }
                }
                Some((r, w))
            } else {
                None // another user's process without CAP_SYS_PTRACE
            };
            let p = self.procs.get_mut(&pid).unwrap();
            p.io_cpu = cpu;
            match (io, p.io_at) {
                (Some((r, w)), Some(at)) => {
                    let dt = now.duration_since(at).as_secs_f64().max(1e-3);
                    p.rbps = (r.saturating_sub(p.io.0) as f64 / dt) as f32;
                    p.wbps = (w.saturating_sub(p.io.1) as f64 / dt) as f32;
                    p.io = (r, w);
                    p.io_at = Some(now);
                }
                (Some(rw), None) => {
                    p.io = rw;
                    p.io_at = Some(now);
                    (p.rbps, p.wbps) = (0.0, 0.0);
                }
                (None, _) => (p.rbps, p.wbps) = (0.0, 0.0),
            }
        }
        let mut closed = 0;
        self.procs.retain(|_, p| {
            if !p.seen && p.stat.is_some() {
                closed += 1;
            }
            p.seen
        });
        self.open_fds -= closed;
        self.count = self.procs.len();
        let Some(s) = secs else {
            out.clear();
            return Ok(());
        };
        // The union of the top N by CPU, RSS and I/O (partial selection, no full sort).
        let mut chosen: Vec<u32> = Vec::with_capacity(self.top * 3);
        let mut keyed: Vec<(f64, u32)> = Vec::with_capacity(self.procs.len());
        for crit in 0..3 {
            keyed.clear();
            keyed.extend(self.procs.iter().map(|(pid, p)| {
                let k = match crit {
                    0 => (p.d_user + p.d_system) as f64,
                    1 => p.rss as f64,
                    _ => (p.rbps + p.wbps) as f64,
                };
                (k, *pid)
            }));
            let by = |a: &(f64, u32), b: &(f64, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
            let top = self.top.min(keyed.len());
            if top < keyed.len() {
                keyed.select_nth_unstable_by(top, by);
            }
            keyed[..top].sort_unstable_by(by);
            for &(k, pid) in &keyed[..top] {
                if k > 0.0 && !chosen.contains(&pid) {
                    chosen.push(pid);
                }
            }
        }
        self.order = pids;
        let tick_pct = 100.0 / (self.hz * s);
        let mut n = 0;
        for pid in &chosen {
            if self.procs[pid].detail.is_none() {
                let d = self.detail(*pid);
                self.procs.get_mut(pid).unwrap().detail = Some(d);
            }
            let p = &self.procs[pid];
            let r = slot(out, n);
            n += 1;
            r.pid = *pid;
            set_str(&mut r.comm, p.comm.as_bytes());
            let (cmd, user, cg) = p.detail.as_ref().unwrap();
            set_str(&mut r.cmdline, cmd.as_bytes());
            set_str(&mut r.user, user.as_bytes());
            set_str(&mut r.cgroup, cg.as_bytes());
            let per = pct_per_tick(p, self.hz, tick_pct);
            r.cpu_user_pct = (p.d_user as f64 * per) as f32;
            r.cpu_system_pct = (p.d_system as f64 * per) as f32;
            r.cpu_pct = r.cpu_user_pct + r.cpu_system_pct;
            r.rss = p.rss;
            r.read_bytes_per_s = p.rbps;
            r.write_bytes_per_s = p.wbps;
            r.threads = p.threads;
            r.processes = 1;
        }
        // Everything else as one row.
        let (mut u, mut sy, mut rss, mut rb, mut wb, mut th, mut cnt) =
            (0f64, 0f64, 0, 0f64, 0f64, 0, 0);
        for (pid, p) in &self.procs {
            if chosen.contains(pid) {
                continue;
            }
            let per = pct_per_tick(p, self.hz, tick_pct);
            u += p.d_user as f64 * per;
            sy += p.d_system as f64 * per;
            rss += p.rss;
            rb += p.rbps as f64;
            wb += p.wbps as f64;
            th += p.threads;
            cnt += 1;
        }
        let r = slot(out, n);
        n += 1;
        r.pid = 0;
        set_str(&mut r.comm, b"other");
        r.cmdline.clear();
        r.user.clear();
        r.cgroup.clear();
        r.cpu_user_pct = u as f32;
        r.cpu_system_pct = sy as f32;
        r.cpu_pct = r.cpu_user_pct + r.cpu_system_pct;
        r.rss = rss;
        r.read_bytes_per_s = rb as f32;
        r.write_bytes_per_s = wb as f32;
        r.threads = th;
        r.processes = cnt;
        out.truncate(n);
        Ok(())
    }

    /// (command line, user, cgroup) of a process, read once.
    fn detail(&mut self, pid: u32) -> (String, String, String) {
        let mut cmd = String::new();
        if self.read(pid, "cmdline").is_ok() {
            let max = self.cmdline_max.min(self.buf.len());
            let mut end = max;
            while end > 0 && end < self.buf.len() && (self.buf[end] & 0xC0) == 0x80 {
                end -= 1; // do not cut a UTF-8 character
            }
            cmd = String::from_utf8_lossy(&self.buf[..end])
                .trim_end_matches('\0')
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
        }
        let mut p = self.proc.clone();
        p.push(itoa(pid));
        let uid = std::fs::metadata(&p).map(|m| m.uid()).ok();
        let user = match uid {
            Some(uid) => {
                let users = self.users.get_or_insert_with(read_passwd);
                users.get(&uid).cloned().unwrap_or_else(|| uid.to_string())
            }
            None => String::new(),
        };
        let mut cg = String::new();
        if self.read(pid, "cgroup").is_ok() {
            // v2 line "0::/path" when the process has one; else the cpu controller's.
            let text = String::from_utf8_lossy(&self.buf);
            let mut v1 = None;
            for l in text.lines() {
                let mut f = l.splitn(3, ':');
                let (Some(id), Some(ctl), Some(path)) = (f.next(), f.next(), f.next()) else {
                    continue;
                };
                if id == "0" && ctl.is_empty() && path != "/" {
                    cg = path.to_string();
                    break;
                }
                if ctl.split(',').any(|c| c == "cpu" || c == "memory")
                    && path != "/"
                    && v1.is_none()
                {
                    v1 = Some(path.to_string());
                }
            }
            if cg.is_empty() {
                cg = v1.unwrap_or_else(|| "/".into());
            }
        }
        (cmd, user, cg)
    }
}

/// Percent of one CPU per clock tick of `p`: over the time since its previous read when
/// it was skipped while idle, else over the interval.
fn pct_per_tick(p: &Proc, hz: f64, tick_pct: f64) -> f64 {
    if p.window > 0.0 {
        100.0 / (hz * p.window)
    } else {
        tick_pct
    }
}

fn itoa(pid: u32) -> String {
    pid.to_string()
}

/// `comm` and the numeric fields after it: index 0 is state (field 3 of proc(5)), so
/// utime (14) is index 11, stime 12, num_threads 17, starttime 19, rss 21.
fn parse_stat(buf: &[u8]) -> Option<(&[u8], [u64; 22])> {
    let (comm, rest) = split_stat(buf)?;
    let mut v = [0u64; 22];
    for (i, x) in fields(rest).take(22).enumerate() {
        v[i] = parse_u64(x);
    }
    Some((comm, v))
}

/// `comm` (between the first '(' and the last ')') and the fields after it.
fn split_stat(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let open = buf.iter().position(|b| *b == b'(')?;
    let close = buf.iter().rposition(|b| *b == b')')?;
    (close > open).then(|| (&buf[open + 1..close], buf.get(close + 2..).unwrap_or(&[])))
}

fn read_passwd() -> HashMap<u32, String> {
    let mut m = HashMap::new();
    if let Ok(t) = std::fs::read_to_string("/etc/passwd") {
        for l in t.lines() {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() > 2 {
                if let Ok(uid) = f[2].parse() {
                    m.entry(uid).or_insert_with(|| f[0].to_string());
                }
            }
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_hostile_comm() {
        let (c, rest) = split_stat(b"42 (a) b) (c) S 1 42 42 0 -1 4194560 10 0 0 0 7 3").unwrap();
        assert_eq!(c, b"a) b) (c");
        assert!(rest.starts_with(b"S 1"));
        assert!(split_stat(b"garbage").is_none());
    }

    /// This very process, made busy, is found with its pid and name; the rows add up.
    #[test]
    fn finds_a_busy_thread_of_its_own() {
        let mut p = Processes::new("/proc", 3, 256, 5);
        let mut out = Vec::new();
        p.collect(None, &mut out).unwrap();
        assert!(out.is_empty());
        let t0 = Instant::now();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let spin = std::thread::spawn(move || {
            let mut x = 0u64;
            while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                x = x.wrapping_add(1);
            }
            x
        });
        std::thread::sleep(std::time::Duration::from_millis(600));
        let secs = t0.elapsed().as_secs_f64();
        p.collect(Some(secs), &mut out).unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        spin.join().unwrap();
        let me = std::process::id();
        // Among the busiest (not necessarily first: another process, a compiler, may be
        // busier on a shared machine).
        let mine = out
            .iter()
            .find(|r| r.pid == me)
            .unwrap_or_else(|| panic!("this process is not listed: {out:?}"));
        assert!(mine.cpu_pct > 50.0, "{mine:?}");
        assert!(mine.processes == 1 && mine.threads >= 2);
        assert!(mine.comm.starts_with("sensor"), "{mine:?}");
        let other = out.last().unwrap();
        assert_eq!((other.pid, other.comm.as_str()), (0, "other"));
        let listed: u32 = out.iter().map(|r| r.processes).sum();
        assert_eq!(listed as usize, p.count);
    }
}
