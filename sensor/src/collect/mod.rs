//! The collectors, one per source, driven by one scheduler: every interval
//! `Collector::collect` fills a reused `Snapshot` in place.

pub mod btf;
pub mod cpu;
pub mod disk;
pub mod ebpf;
#[cfg(test)]
mod ebpf_tests;
pub mod filesystem;
pub mod host;
pub mod memory;
pub mod net;
pub mod psi;
pub mod tcp;

use crate::config::Filters;
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
    pub probes: Option<ebpf::Probes>,
    last: Option<Instant>,
    errors_logged: u32,
}

impl Collector {
    pub fn new(proc: &str, sys: &str, f: &Filters) -> Self {
        Collector {
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
        let secs = self.last.map(|l| now.duration_since(l).as_secs_f64());
        self.last = Some(now);
        snap.ts_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        snap.interval_ms = secs.map(|s| (s * 1000.0).round() as u32).unwrap_or(0);
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
        match self.probes.as_mut() {
            Some(p) => p.collect(
                secs,
                &mut snap.probes,
                &mut snap.latency,
                &mut snap.tcp_ports,
                &mut snap.events,
            ),
            None => snap.probes = None,
        }
        secs.is_some()
    }
}
