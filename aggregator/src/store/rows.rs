//! Row types for inserts, one per table, in the column order of
//! `schema.rs` (a unit test checks that they agree). Labels borrow from the
//! decoded batch, so building rows allocates only the row vectors.

use clickhouse::Row;
use protocol::{Batch, CPU_TOTAL, PRESSURE_RESOURCES};
use serde::Serialize;
use std::sync::OnceLock;

#[derive(Row, Serialize)]
pub struct CpuRow<'a> {
    pub ts: u32,
    pub host: &'a str,
    pub cpu: &'a str,
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

#[derive(Row, Serialize)]
pub struct SystemRow<'a> {
    pub ts: u32,
    pub host: &'a str,
    pub load1: f32,
    pub load5: f32,
    pub load15: f32,
    pub ctxt_per_s: f32,
    pub forks_per_s: f32,
    pub interrupts_per_s: f32,
    pub procs_running: u32,
    pub procs_blocked: u32,
}

#[derive(Row, Serialize)]
pub struct MemoryRow<'a> {
    pub ts: u32,
    pub host: &'a str,
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

#[derive(Row, Serialize)]
pub struct PressureRow<'a> {
    pub ts: u32,
    pub host: &'a str,
    pub resource: &'a str,
    pub some_avg10: f32,
    pub some_avg60: f32,
    pub some_avg300: f32,
    pub some_stall_pct: f32,
    pub full_avg10: f32,
    pub full_avg60: f32,
    pub full_avg300: f32,
    pub full_stall_pct: f32,
}

#[derive(Row, Serialize)]
pub struct DiskRow<'a> {
    pub ts: u32,
    pub host: &'a str,
    pub device: &'a str,
    pub reads_per_s: f32,
    pub writes_per_s: f32,
    pub read_bytes_per_s: f32,
    pub write_bytes_per_s: f32,
    pub r_await_ms: f32,
    pub w_await_ms: f32,
    pub util_pct: f32,
    pub in_flight: u32,
}

#[derive(Row, Serialize)]
pub struct FilesystemRow<'a> {
    pub ts: u32,
    pub host: &'a str,
    pub mount: &'a str,
    pub device: &'a str,
    pub fstype: &'a str,
    pub size_bytes: u64,
    pub used_bytes: u64,
    pub avail_bytes: u64,
    pub inodes_total: u64,
    pub inodes_used: u64,
}

#[derive(Row, Serialize)]
pub struct NetRow<'a> {
    pub ts: u32,
    pub host: &'a str,
    pub interface: &'a str,
    pub rx_bytes_per_s: f32,
    pub tx_bytes_per_s: f32,
    pub rx_packets_per_s: f32,
    pub tx_packets_per_s: f32,
    pub rx_errors_per_s: f32,
    pub tx_errors_per_s: f32,
    pub rx_drops_per_s: f32,
    pub tx_drops_per_s: f32,
}

#[derive(Row, Serialize)]
pub struct TcpRow<'a> {
    pub ts: u32,
    pub host: &'a str,
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

#[derive(Row, Serialize)]
pub struct LatencyRow<'a> {
    pub ts: u32,
    pub host: &'a str,
    pub source: &'a str,
    pub unit: &'a str,
    pub count: u64,
    pub sum: u64,
    pub bucket_upper: Vec<u64>,
    pub bucket_count: Vec<u64>,
}

#[derive(Row, Serialize)]
pub struct EventRow<'a> {
    pub ts: u32,
    pub host: &'a str,
    pub kind: &'a str,
    pub pid: u32,
    pub comm: &'a str,
    pub cgroup: &'a str,
    pub detail: &'a str,
}

#[derive(Row, Serialize)]
pub struct ProbeRow<'a> {
    pub ts: u32,
    pub host: &'a str,
    pub execs_per_s: f32,
    pub exits_per_s: f32,
    pub short_lived_per_s: f32,
    pub retransmits_per_s: f32,
    pub resets_sent_per_s: f32,
    pub resets_received_per_s: f32,
    pub oom_kills: u32,
}

#[derive(Row, Serialize)]
pub struct TcpPortRow<'a> {
    pub ts: u32,
    pub host: &'a str,
    pub port: u32,
    pub retransmits: u32,
}

#[derive(Row, Serialize)]
pub struct AlertRow<'a> {
    pub ts: u32,
    pub alert_id: &'a str,
    pub rule: &'a str,
    pub host: &'a str,
    pub state: &'a str,
    pub severity: &'a str,
    pub labels: String,
    pub value: f64,
    pub threshold: Option<f64>,
    pub score: Option<f64>,
    pub starts_at: u32,
    pub ends_at: Option<u32>,
}

#[derive(Row, Serialize)]
pub struct HostRow<'a> {
    pub host: &'a str,
    pub first_seen: u32,
    pub last_seen: u32,
    pub sensor_version: &'a str,
    pub kernel: &'a str,
    pub os: &'a str,
    pub arch: &'a str,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub kernel_boot_id: &'a str,
    pub sensor_boot_id: &'a str,
    pub probes: &'a str,
}

#[derive(Row, Serialize)]
pub struct BatchRow<'a> {
    pub host: &'a str,
    pub sensor_boot_id: &'a str,
    pub seq: u64,
    pub received: u32,
    pub snapshots: u32,
    pub samples: u32,
    pub bytes: u32,
}

pub fn cpu_name(id: u32) -> &'static str {
    static NAMES: OnceLock<Vec<String>> = OnceLock::new();
    if id == CPU_TOTAL {
        return "total";
    }
    let names = NAMES.get_or_init(|| (0..4096).map(|i| i.to_string()).collect());
    names
        .get(id as usize)
        .map(String::as_str)
        .unwrap_or("other")
}

/// All rows of many batches, grouped by table.
#[derive(Default)]
pub struct Rows<'a> {
    pub cpu: Vec<CpuRow<'a>>,
    pub system: Vec<SystemRow<'a>>,
    pub memory: Vec<MemoryRow<'a>>,
    pub pressure: Vec<PressureRow<'a>>,
    pub disk: Vec<DiskRow<'a>>,
    pub filesystem: Vec<FilesystemRow<'a>>,
    pub net: Vec<NetRow<'a>>,
    pub tcp: Vec<TcpRow<'a>>,
    pub latency: Vec<LatencyRow<'a>>,
    pub events: Vec<EventRow<'a>>,
    pub probes: Vec<ProbeRow<'a>>,
    pub tcp_ports: Vec<TcpPortRow<'a>>,
}

impl<'a> Rows<'a> {
    pub fn len(&self) -> usize {
        self.cpu.len()
            + self.system.len()
            + self.memory.len()
            + self.pressure.len()
            + self.disk.len()
            + self.filesystem.len()
            + self.net.len()
            + self.tcp.len()
            + self.latency.len()
            + self.events.len()
            + self.probes.len()
            + self.tcp_ports.len()
    }

    /// Adds every row of `b`, labelled with `host` (the certificate's name).
    pub fn add(&mut self, host: &'a str, b: &'a Batch) {
        for s in &b.snapshots {
            let ts = (s.ts_ms / 1000) as u32;
            for c in &s.cpu {
                self.cpu.push(CpuRow {
                    ts,
                    host,
                    cpu: cpu_name(c.cpu),
                    user: c.user,
                    nice: c.nice,
                    system: c.system,
                    idle: c.idle,
                    iowait: c.iowait,
                    irq: c.irq,
                    softirq: c.softirq,
                    steal: c.steal,
                    guest: c.guest,
                });
            }
            let y = &s.system;
            self.system.push(SystemRow {
                ts,
                host,
                load1: y.load1,
                load5: y.load5,
                load15: y.load15,
                ctxt_per_s: y.ctxt_per_s,
                forks_per_s: y.forks_per_s,
                interrupts_per_s: y.interrupts_per_s,
                procs_running: y.procs_running,
                procs_blocked: y.procs_blocked,
            });
            let m = &s.memory;
            self.memory.push(MemoryRow {
                ts,
                host,
                total: m.total,
                available: m.available,
                free: m.free,
                buffers: m.buffers,
                cached: m.cached,
                dirty: m.dirty,
                swap_total: m.swap_total,
                swap_free: m.swap_free,
                page_faults_per_s: m.page_faults_per_s,
                major_faults_per_s: m.major_faults_per_s,
                swap_in_per_s: m.swap_in_per_s,
                swap_out_per_s: m.swap_out_per_s,
                oom_kills_per_s: m.oom_kills_per_s,
            });
            for p in &s.pressure {
                self.pressure.push(PressureRow {
                    ts,
                    host,
                    resource: PRESSURE_RESOURCES
                        .get(p.resource as usize)
                        .copied()
                        .unwrap_or("other"),
                    some_avg10: p.some_avg10,
                    some_avg60: p.some_avg60,
                    some_avg300: p.some_avg300,
                    some_stall_pct: p.some_stall_pct,
                    full_avg10: p.full_avg10,
                    full_avg60: p.full_avg60,
                    full_avg300: p.full_avg300,
                    full_stall_pct: p.full_stall_pct,
                });
            }
            for d in &s.disks {
                self.disk.push(DiskRow {
                    ts,
                    host,
                    device: &d.device,
                    reads_per_s: d.reads_per_s,
                    writes_per_s: d.writes_per_s,
                    read_bytes_per_s: d.read_bytes_per_s,
                    write_bytes_per_s: d.write_bytes_per_s,
                    r_await_ms: d.r_await_ms,
                    w_await_ms: d.w_await_ms,
                    util_pct: d.util_pct,
                    in_flight: d.in_flight,
                });
            }
            for f in &s.filesystems {
                self.filesystem.push(FilesystemRow {
                    ts,
                    host,
                    mount: &f.mount,
                    device: &f.device,
                    fstype: &f.fstype,
                    size_bytes: f.size_bytes,
                    used_bytes: f.used_bytes,
                    avail_bytes: f.avail_bytes,
                    inodes_total: f.inodes_total,
                    inodes_used: f.inodes_used,
                });
            }
            for n in &s.nets {
                self.net.push(NetRow {
                    ts,
                    host,
                    interface: &n.interface,
                    rx_bytes_per_s: n.rx_bytes_per_s,
                    tx_bytes_per_s: n.tx_bytes_per_s,
                    rx_packets_per_s: n.rx_packets_per_s,
                    tx_packets_per_s: n.tx_packets_per_s,
                    rx_errors_per_s: n.rx_errors_per_s,
                    tx_errors_per_s: n.tx_errors_per_s,
                    rx_drops_per_s: n.rx_drops_per_s,
                    tx_drops_per_s: n.tx_drops_per_s,
                });
            }
            let t = &s.tcp;
            self.tcp.push(TcpRow {
                ts,
                host,
                retrans_segs_per_s: t.retrans_segs_per_s,
                active_opens_per_s: t.active_opens_per_s,
                passive_opens_per_s: t.passive_opens_per_s,
                attempt_fails_per_s: t.attempt_fails_per_s,
                estab_resets_per_s: t.estab_resets_per_s,
                out_rsts_per_s: t.out_rsts_per_s,
                in_errs_per_s: t.in_errs_per_s,
                in_segs_per_s: t.in_segs_per_s,
                out_segs_per_s: t.out_segs_per_s,
                curr_estab: t.curr_estab,
                udp_in_datagrams_per_s: t.udp_in_datagrams_per_s,
                udp_out_datagrams_per_s: t.udp_out_datagrams_per_s,
                udp_in_errors_per_s: t.udp_in_errors_per_s,
                udp_rcvbuf_errors_per_s: t.udp_rcvbuf_errors_per_s,
                udp_no_ports_per_s: t.udp_no_ports_per_s,
            });
            for l in &s.latency {
                self.latency.push(LatencyRow {
                    ts,
                    host,
                    source: &l.source,
                    unit: &l.unit,
                    count: l.count,
                    sum: l.sum,
                    bucket_upper: l
                        .buckets
                        .iter()
                        .map(|b| 1u64.checked_shl(b.index).unwrap_or(u64::MAX))
                        .collect(),
                    bucket_count: l.buckets.iter().map(|b| b.count).collect(),
                });
            }
            for e in &s.events {
                self.events.push(EventRow {
                    ts: (e.ts_ms / 1000) as u32,
                    host,
                    kind: &e.kind,
                    pid: e.pid,
                    comm: &e.comm,
                    cgroup: &e.cgroup,
                    detail: &e.detail,
                });
            }
            if let Some(p) = &s.probes {
                self.probes.push(ProbeRow {
                    ts,
                    host,
                    execs_per_s: p.execs_per_s,
                    exits_per_s: p.exits_per_s,
                    short_lived_per_s: p.short_lived_per_s,
                    retransmits_per_s: p.retransmits_per_s,
                    resets_sent_per_s: p.resets_sent_per_s,
                    resets_received_per_s: p.resets_received_per_s,
                    oom_kills: p.oom_kills,
                });
            }
            for p in &s.tcp_ports {
                self.tcp_ports.push(TcpPortRow {
                    ts,
                    host,
                    port: p.port,
                    retransmits: p.retransmits,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::schema::{EBPF_TABLES, METRIC_TABLES};

    fn names(t: &str) -> Vec<&'static str> {
        METRIC_TABLES
            .iter()
            .chain(EBPF_TABLES)
            .find(|x| x.name == t)
            .unwrap()
            .columns
            .iter()
            .map(|c| c.0)
            .collect()
    }

    #[test]
    fn rows_match_schema_column_order() {
        assert_eq!(CpuRow::COLUMN_NAMES, names("cpu"));
        assert_eq!(SystemRow::COLUMN_NAMES, names("system"));
        assert_eq!(MemoryRow::COLUMN_NAMES, names("memory"));
        assert_eq!(PressureRow::COLUMN_NAMES, names("pressure"));
        assert_eq!(DiskRow::COLUMN_NAMES, names("disk"));
        assert_eq!(FilesystemRow::COLUMN_NAMES, names("filesystem"));
        assert_eq!(NetRow::COLUMN_NAMES, names("net"));
        assert_eq!(TcpRow::COLUMN_NAMES, names("tcp"));
        assert_eq!(LatencyRow::COLUMN_NAMES, names("latency"));
        assert_eq!(EventRow::COLUMN_NAMES, names("events"));
        assert_eq!(ProbeRow::COLUMN_NAMES, names("probes"));
        assert_eq!(TcpPortRow::COLUMN_NAMES, names("tcp_ports"));
        assert_eq!(METRIC_TABLES.len() + EBPF_TABLES.len(), 12);
    }

    #[test]
    fn cpu_names() {
        assert_eq!(cpu_name(CPU_TOTAL), "total");
        assert_eq!(cpu_name(3), "3");
    }
}

#[derive(Row, Serialize)]
pub struct GapRow<'a> {
    pub host: &'a str,
    pub sensor_boot_id: &'a str,
    pub first_seq: u64,
    pub last_seq: u64,
    pub from_ts: u32,
    pub to_ts: u32,
    pub batches: u64,
    pub samples: u64,
    pub received: u32,
}

#[derive(Row, Serialize)]
pub struct IntentRow<'a> {
    pub host: &'a str,
    pub sensor_boot_id: &'a str,
    pub seq: u64,
    pub created: u32,
}
