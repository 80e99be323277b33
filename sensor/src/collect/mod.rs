//! The collectors, one per source, driven by one scheduler: every interval
//! `Collector::collect` fills a reused `Snapshot` in place.

pub mod btf;
pub mod cgnames;
pub mod cgroup;
#[cfg(test)]
mod cgroup_tests;
pub mod cpu;
pub mod disk;
pub mod ebpf;
#[cfg(test)]
mod ebpf_tests;

/// How many descriptors the collectors may keep open (cgroup files, /proc/PID/stat): a
/// quarter of the soft RLIMIT_NOFILE (raised to the hard limit at start), leaving the rest
/// to connections, the spool and the probes. Beyond it they open, read and close.
pub fn fd_budget() -> usize {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return 256;
    }
    (rl.rlim_cur.min(1 << 20) as usize / 4).max(64)
}

/// Raises the soft descriptor limit to the hard one (kept cgroup and /proc files).
pub fn raise_nofile() {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 && rl.rlim_cur < rl.rlim_max {
            rl.rlim_cur = rl.rlim_max.min(1 << 20);
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
}

/// Tests that measure the real kernel share one lock: load from one would disturb another.
#[cfg(test)]
pub(crate) static TEST_SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
pub mod filesystem;
pub mod host;
pub mod memory;
pub mod net;
pub mod processes;
pub mod psi;
pub mod tcp;

use crate::config::Config;
use protocol::Snapshot;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub struct Collector {
    cpu: cpu::Cpu,
    memory: memory::Memory,
    psi: psi::Psi,
    disk: disk::Disk,
    fs: filesystem::Filesystem,
    net: net::Net,
    tcp: tcp::Tcp,
    pub cgroups: Option<cgroup::Cgroups>,
    pub processes: Option<processes::Processes>,
    pub probes: Option<ebpf::Probes>,
    last: Option<Instant>,
    errors_logged: u32,
}

impl Collector {
    pub fn new(cfg: &Config) -> Self {
        raise_nofile();
        let (proc, sys, f) = (cfg.proc_root.as_str(), cfg.sys_root.as_str(), &cfg.filters);
        let cgroups = cfg.cgroups.enabled.then(|| {
            let root = cfg.cgroup_root();
            let mounts = std::fs::read_to_string(format!("{proc}/self/mounts")).unwrap_or_default();
            let roots = cgroup::Roots::from_mounts(&mounts, &root);
            if roots.is_empty() {
                tracing::info!(
                    root,
                    "no cgroup hierarchy mounted there: no per-cgroup metrics"
                );
                return None;
            }
            tracing::debug!(?roots, "cgroup hierarchies");
            Some(cgroup::Cgroups::new(
                proc,
                roots,
                cgroup::Options {
                    max_cgroups: cfg.cgroups.max_cgroups,
                    filter: crate::filter::Filter {
                        include: cfg.cgroups.include.clone(),
                        exclude: cfg.cgroups.exclude.clone(),
                    },
                    rescan: cfg.cgroups.rescan,
                    idle_stride: cfg.cgroups.idle_stride,
                },
            ))
        });
        let processes = cfg.processes.enabled.then(|| {
            processes::Processes::new(
                proc,
                cfg.processes.top,
                cfg.processes.cmdline_max,
                cfg.processes.idle_stride,
            )
        });
        Collector {
            cgroups: cgroups.flatten(),
            processes,
            cpu: cpu::Cpu::new(proc),
            memory: memory::Memory::new(proc),
            psi: psi::Psi::new(proc),
            disk: disk::Disk::new(proc, sys, f.disks.clone(), f.disk_partitions),
            fs: filesystem::Filesystem::new(proc, f.mounts.clone()),
            net: net::Net::new(proc, f.interfaces.clone()),
            tcp: tcp::Tcp::new(proc),
            probes: None,
            last: None,
            errors_logged: 0,
        }
    }

    /// Reads every source into `snap`. The first call only primes the
    /// counters and returns false: rates need two reads.
    pub fn collect(&mut self, snap: &mut Snapshot) -> bool {
        let now = Instant::now();
        let elapsed = self.last.map(|l| now.duration_since(l).as_secs_f64());
        self.last = Some(now);
        snap.ts_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        snap.interval_ms = elapsed
            .map(|s| (s * 1000.0).round().max(1.0) as u32)
            .unwrap_or(0);
        // Rates are over the interval as sent (whole milliseconds, at most 0.5 ms off the
        // measured one): a rate is then exactly `increase * 1000 / interval_ms`, which the
        // wire encoding turns back into the integer increase (`protocol/src/columnar.rs`).
        let secs = elapsed.map(|_| snap.interval_ms as f64 / 1000.0);
        let results = [
            (
                "/proc/stat",
                self.cpu.collect(secs, &mut snap.cpu, &mut snap.system),
            ),
            ("/proc/meminfo", self.memory.collect(secs, &mut snap.memory)),
            ("/proc/diskstats", self.disk.collect(secs, &mut snap.disks)),
            ("/proc/net/dev", self.net.collect(secs, &mut snap.nets)),
            ("/proc/net/snmp", self.tcp.collect(secs, &mut snap.tcp)),
        ];
        for (what, r) in results {
            if let Err(e) = r {
                // Log the first few, not every second.
                if self.errors_logged < 10 {
                    self.errors_logged += 1;
                    tracing::warn!(source = what, error = %e, "collector failed; its values are zero in this snapshot");
                }
            }
        }
        self.psi.collect(secs, &mut snap.pressure);
        self.fs.collect(&mut snap.filesystems);
        if let Some(c) = self.cgroups.as_mut() {
            c.collect(secs, &mut snap.cgroups, &mut snap.cgroup_io);
        }
        if let Some(p) = self.processes.as_mut() {
            if let Err(e) = p.collect(secs, &mut snap.processes) {
                if self.errors_logged < 10 {
                    self.errors_logged += 1;
                    tracing::warn!(source = "/proc/[pid]", error = %e, "process collector failed");
                }
            }
        }
        match self.probes.as_mut() {
            Some(p) => p.collect(
                secs,
                &mut snap.probes,
                &mut snap.latency,
                &mut snap.tcp_ports,
                &mut snap.events,
                &mut snap.cgroup_latency,
            ),
            None => snap.probes = None,
        }
        secs.is_some()
    }
}
