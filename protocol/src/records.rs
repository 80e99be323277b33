//! The typed records a sensor sends. Rates are per second (f32), percentages
//! are 0..100 (f32), sizes are bytes (u64 varint), timestamps are Unix
//! milliseconds.

use crate::codec::{Decode, Encode, Reader};
use crate::{wire_struct, Error, Result};

wire_struct! {
    /// Static facts about the host, sent with every batch (a few dozen bytes
    /// after compression).
    pub struct HostInfo {
        pub hostname: String,
        pub kernel: String,
        pub os: String,
        pub arch: String,
        pub cpus: u32,
        pub memory_bytes: u64,
        /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`).
        pub kernel_boot_id: String,
        pub sensor_version: String,
        /// The eBPF probes attached on this host, comma-separated in a fixed
        /// order (e.g. "runqueue,block,tcp,oom,process"); empty when none.
        pub probes: String,
    }
}

wire_struct! {
    /// One CPU line of /proc/stat as percentages of the interval.
    /// `cpu` is -1 for the total over all CPUs, encoded as `u32::MAX`.
    pub struct CpuRec {
        pub cpu: u32,
        pub user: f32,
        pub nice: f32,
        pub system: f32,
        pub idle: f32,
        pub iowait: f32,
        pub irq: f32,
        pub softirq: f32,
        pub steal: f32,
        pub guest: f32,
    }
}

pub const CPU_TOTAL: u32 = u32::MAX;

wire_struct! {
    /// Load, scheduler and process counters (/proc/loadavg, /proc/stat).
    pub struct SystemRec {
        pub load1: f32,
        pub load5: f32,
        pub load15: f32,
        pub ctxt_per_s: f32,
        pub forks_per_s: f32,
        pub interrupts_per_s: f32,
        pub procs_running: u32,
        pub procs_blocked: u32,
    }
}

wire_struct! {
    /// /proc/meminfo (bytes) and /proc/vmstat rates.
    pub struct MemoryRec {
        pub total: u64,
        pub available: u64,
        pub free: u64,
        pub buffers: u64,
        pub cached: u64,
        pub dirty: u64,
        pub swap_total: u64,
        pub swap_free: u64,
        pub page_faults_per_s: f32,
        pub major_faults_per_s: f32,
        pub swap_in_per_s: f32,
        pub swap_out_per_s: f32,
        pub oom_kills_per_s: f32,
    }
}

wire_struct! {
    /// /proc/pressure/{cpu,memory,io}. `resource`: 0 cpu, 1 memory, 2 io.
    /// `*_stall_pct` is the share of the interval stalled, from the `total`
    /// counters (microseconds), so it is exact for the interval.
    pub struct PressureRec {
        pub resource: u32,
        pub some_avg10: f32,
        pub some_avg60: f32,
        pub some_avg300: f32,
        pub some_stall_pct: f32,
        pub full_avg10: f32,
        pub full_avg60: f32,
        pub full_avg300: f32,
        pub full_stall_pct: f32,
    }
}

pub const PRESSURE_RESOURCES: [&str; 3] = ["cpu", "memory", "io"];

wire_struct! {
    /// One block device from /proc/diskstats.
    pub struct DiskRec {
        pub device: String,
        pub reads_per_s: f32,
        pub writes_per_s: f32,
        pub read_bytes_per_s: f32,
        pub write_bytes_per_s: f32,
        /// Mean time a completed read spent queued and serviced, ms.
        pub r_await_ms: f32,
        pub w_await_ms: f32,
        /// Share of the interval with at least one request in flight, 0..100.
        pub util_pct: f32,
        pub in_flight: u32,
    }
}

wire_struct! {
    /// One mounted filesystem (statvfs).
    pub struct FsRec {
        pub mount: String,
        pub device: String,
        pub fstype: String,
        pub size_bytes: u64,
        pub used_bytes: u64,
        pub avail_bytes: u64,
        pub inodes_total: u64,
        pub inodes_used: u64,
    }
}

wire_struct! {
    /// One network interface from /proc/net/dev.
    pub struct NetRec {
        pub interface: String,
        pub rx_bytes_per_s: f32,
        pub tx_bytes_per_s: f32,
        pub rx_packets_per_s: f32,
        pub tx_packets_per_s: f32,
        pub rx_errors_per_s: f32,
        pub tx_errors_per_s: f32,
        pub rx_drops_per_s: f32,
        pub tx_drops_per_s: f32,
    }
}

wire_struct! {
    /// TCP and UDP counters from /proc/net/snmp.
    pub struct TcpRec {
        pub retrans_segs_per_s: f32,
        pub active_opens_per_s: f32,
        pub passive_opens_per_s: f32,
        pub attempt_fails_per_s: f32,
        pub estab_resets_per_s: f32,
        pub out_rsts_per_s: f32,
        pub in_errs_per_s: f32,
        pub in_segs_per_s: f32,
        pub out_segs_per_s: f32,
        pub curr_estab: u32,
        pub udp_in_datagrams_per_s: f32,
        pub udp_out_datagrams_per_s: f32,
        pub udp_in_errors_per_s: f32,
        pub udp_rcvbuf_errors_per_s: f32,
        pub udp_no_ports_per_s: f32,
    }
}

wire_struct! {
    /// One non-empty bucket of a log2 histogram: `index` i counts values v
    /// with 2^(i-1) <= v < 2^i (index 0 counts v = 0).
    pub struct BucketRec {
        pub index: u32,
        pub count: u64,
    }
}

wire_struct! {
    /// A histogram over one interval from an eBPF probe (only non-empty
    /// buckets are sent). `source`: "runqueue", "disk:sda:read",
    /// "disk:sda:write", "disk:sda:read_bytes", "disk:sda:write_bytes".
    pub struct LatencyRec {
        pub source: String,
        /// "us" or "bytes".
        pub unit: String,
        pub count: u64,
        /// Sum of the values, in `unit`.
        pub sum: u64,
        pub buckets: Vec<BucketRec>,
    }
}

wire_struct! {
    /// Per-host counters from eBPF probes, per second over the interval.
    pub struct ProbeRec {
        pub execs_per_s: f32,
        pub exits_per_s: f32,
        /// Processes that exited less than a second after they were forked.
        pub short_lived_per_s: f32,
        pub retransmits_per_s: f32,
        pub resets_sent_per_s: f32,
        pub resets_received_per_s: f32,
        /// OOM kills in the interval (a count, not a rate).
        pub oom_kills: u32,
    }
}

wire_struct! {
    /// TCP retransmitted segments to one remote port over the interval.
    pub struct PortRec {
        pub port: u32,
        pub retransmits: u32,
    }
}

wire_struct! {
    /// A discrete kernel event. `kind`: "oom_kill".
    pub struct EventRec {
        pub kind: String,
        /// When it happened, Unix milliseconds.
        pub ts_ms: u64,
        pub pid: u32,
        pub comm: String,
        /// The victim's cgroup (memory controller path on v1), "" when unknown.
        pub cgroup: String,
        /// Free-form details, `key=value` pairs separated by spaces.
        pub detail: String,
    }
}

wire_struct! {
    /// Everything collected at one instant.
    pub struct Snapshot {
        /// Unix time, milliseconds.
        pub ts_ms: u64,
        /// The interval the rates in this snapshot cover, milliseconds.
        pub interval_ms: u32,
        pub cpu: Vec<CpuRec>,
        pub system: SystemRec,
        pub memory: MemoryRec,
        pub pressure: Vec<PressureRec>,
        pub disks: Vec<DiskRec>,
        pub filesystems: Vec<FsRec>,
        pub nets: Vec<NetRec>,
        pub tcp: TcpRec,
        /// eBPF probe counters; None when no probe is attached.
        pub probes: Option<ProbeRec>,
        pub latency: Vec<LatencyRec>,
        pub tcp_ports: Vec<PortRec>,
        pub events: Vec<EventRec>,
    }
}

/// The unit of delivery and acknowledgement.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Batch {
    /// What the sensor calls itself. The aggregator stores the host name from
    /// the client certificate, never this claim.
    pub host: String,
    /// Random id chosen when the sensor's sequence numbering started.
    pub boot_id: String,
    /// Monotonically increasing per `boot_id`, starting at 1.
    pub seq: u64,
    pub info: Option<HostInfo>,
    pub snapshots: Vec<Snapshot>,
}

impl Batch {
    /// Number of samples (one value of one series at one time) in the batch.
    pub fn sample_count(&self) -> u64 {
        self.snapshots.iter().map(Snapshot::sample_count).sum()
    }
}

impl Snapshot {
    pub fn sample_count(&self) -> u64 {
        (self.cpu.len() * 9
            + 8
            + 13
            + self.pressure.len() * 8
            + self.disks.len() * 8
            + self.filesystems.len() * 5
            + self.nets.len() * 8
            + 15
            + self.probes.as_ref().map_or(0, |_| 7)
            + self
                .latency
                .iter()
                .map(|l| l.buckets.len() + 2)
                .sum::<usize>()
            + self.tcp_ports.len()
            + self.events.len()) as u64
    }
}

impl Encode for Batch {
    fn encode(&self, out: &mut Vec<u8>) {
        self.host.encode(out);
        self.boot_id.encode(out);
        self.seq.encode(out);
        self.info.encode(out);
        self.snapshots.encode(out);
    }
}

impl Decode for Batch {
    fn decode(r: &mut Reader<'_>) -> Result<Self> {
        let host = r.string("batch.host")?;
        let boot_id = r.string("batch.boot_id")?;
        let seq = r.varint()?;
        if seq == 0 {
            return Err(Error::InvalidValue {
                what: "batch.seq",
                value: 0,
            });
        }
        let info = Option::<HostInfo>::decode(r)?;
        // A snapshot is at least ~150 bytes; 16 is a safe lower bound.
        let n = r.count("batch.snapshots", r.limits.max_snapshots, 16)?;
        let mut snapshots = Vec::with_capacity(n);
        for _ in 0..n {
            snapshots.push(Snapshot::decode(r)?);
        }
        Ok(Batch {
            host,
            boot_id,
            seq,
            info,
            snapshots,
        })
    }
}
