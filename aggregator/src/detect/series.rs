//! Series selection: `table.column` names (the ClickHouse column names, plus a few derived
//! ones such as `cpu.busy`) resolved once to accessor functions, and evaluated straight on
//! decoded snapshots.

#[cfg(test)]
use protocol::BucketRec;
use protocol::{
    CpuRec, DiskRec, FsRec, LatencyRec, MemoryRec, NetRec, PressureRec, ProbeRec, Snapshot,
    SystemRec, TcpRec, PRESSURE_RESOURCES,
};

type Acc<T> = fn(&T) -> f64;

macro_rules! cols {
    ($t:ty; $($name:literal => $f:expr),* $(,)?) => {
        &[$(($name, { let f: Acc<$t> = $f; f })),*]
    };
}

const CPU: &[(&str, Acc<CpuRec>)] = cols!(CpuRec;
    "user" => |r| r.user as f64, "nice" => |r| r.nice as f64, "system" => |r| r.system as f64,
    "idle" => |r| r.idle as f64, "iowait" => |r| r.iowait as f64, "irq" => |r| r.irq as f64,
    "softirq" => |r| r.softirq as f64, "steal" => |r| r.steal as f64, "guest" => |r| r.guest as f64,
    "busy" => |r| 100.0 - r.idle as f64);
const SYSTEM: &[(&str, Acc<SystemRec>)] = cols!(SystemRec;
    "load1" => |r| r.load1 as f64, "load5" => |r| r.load5 as f64, "load15" => |r| r.load15 as f64,
    "ctxt_per_s" => |r| r.ctxt_per_s as f64, "forks_per_s" => |r| r.forks_per_s as f64,
    "interrupts_per_s" => |r| r.interrupts_per_s as f64,
    "procs_running" => |r| r.procs_running as f64, "procs_blocked" => |r| r.procs_blocked as f64);
const MEMORY: &[(&str, Acc<MemoryRec>)] = cols!(MemoryRec;
    "total" => |r| r.total as f64, "available" => |r| r.available as f64, "free" => |r| r.free as f64,
    "buffers" => |r| r.buffers as f64, "cached" => |r| r.cached as f64, "dirty" => |r| r.dirty as f64,
    "swap_total" => |r| r.swap_total as f64, "swap_free" => |r| r.swap_free as f64,
    "used" => |r| r.total.saturating_sub(r.available) as f64,
    "available_pct" => |r| r.available as f64 * 100.0 / (r.total.max(1)) as f64,
    "page_faults_per_s" => |r| r.page_faults_per_s as f64,
    "major_faults_per_s" => |r| r.major_faults_per_s as f64,
    "swap_in_per_s" => |r| r.swap_in_per_s as f64, "swap_out_per_s" => |r| r.swap_out_per_s as f64,
    "oom_kills_per_s" => |r| r.oom_kills_per_s as f64);
const PRESSURE: &[(&str, Acc<PressureRec>)] = cols!(PressureRec;
    "some_avg10" => |r| r.some_avg10 as f64, "some_avg60" => |r| r.some_avg60 as f64,
    "some_avg300" => |r| r.some_avg300 as f64, "some_stall_pct" => |r| r.some_stall_pct as f64,
    "full_avg10" => |r| r.full_avg10 as f64, "full_avg60" => |r| r.full_avg60 as f64,
    "full_avg300" => |r| r.full_avg300 as f64, "full_stall_pct" => |r| r.full_stall_pct as f64);
const DISK: &[(&str, Acc<DiskRec>)] = cols!(DiskRec;
    "reads_per_s" => |r| r.reads_per_s as f64, "writes_per_s" => |r| r.writes_per_s as f64,
    "read_bytes_per_s" => |r| r.read_bytes_per_s as f64,
    "write_bytes_per_s" => |r| r.write_bytes_per_s as f64,
    "r_await_ms" => |r| r.r_await_ms as f64, "w_await_ms" => |r| r.w_await_ms as f64,
    "r_await" => |r| r.r_await_ms as f64, "w_await" => |r| r.w_await_ms as f64,
    "util_pct" => |r| r.util_pct as f64, "in_flight" => |r| r.in_flight as f64);
const FS: &[(&str, Acc<FsRec>)] = cols!(FsRec;
    "size_bytes" => |r| r.size_bytes as f64, "used_bytes" => |r| r.used_bytes as f64,
    "avail_bytes" => |r| r.avail_bytes as f64, "inodes_total" => |r| r.inodes_total as f64,
    "inodes_used" => |r| r.inodes_used as f64,
    "used_pct" => |r| r.used_bytes as f64 * 100.0 / (r.size_bytes.max(1)) as f64,
    "inodes_used_pct" => |r| r.inodes_used as f64 * 100.0 / (r.inodes_total.max(1)) as f64);
const NET: &[(&str, Acc<NetRec>)] = cols!(NetRec;
    "rx_bytes" => |r| r.rx_bytes_per_s as f64, "tx_bytes" => |r| r.tx_bytes_per_s as f64,
    "rx_bytes_per_s" => |r| r.rx_bytes_per_s as f64, "tx_bytes_per_s" => |r| r.tx_bytes_per_s as f64,
    "rx_packets_per_s" => |r| r.rx_packets_per_s as f64, "tx_packets_per_s" => |r| r.tx_packets_per_s as f64,
    "rx_errors_per_s" => |r| r.rx_errors_per_s as f64, "tx_errors_per_s" => |r| r.tx_errors_per_s as f64,
    "rx_drops_per_s" => |r| r.rx_drops_per_s as f64, "tx_drops_per_s" => |r| r.tx_drops_per_s as f64);
const TCP: &[(&str, Acc<TcpRec>)] = cols!(TcpRec;
    "retrans_segs_per_s" => |r| r.retrans_segs_per_s as f64,
    "active_opens_per_s" => |r| r.active_opens_per_s as f64,
    "passive_opens_per_s" => |r| r.passive_opens_per_s as f64,
    "attempt_fails_per_s" => |r| r.attempt_fails_per_s as f64,
    "estab_resets_per_s" => |r| r.estab_resets_per_s as f64,
    "out_rsts_per_s" => |r| r.out_rsts_per_s as f64, "in_errs_per_s" => |r| r.in_errs_per_s as f64,
    "in_segs_per_s" => |r| r.in_segs_per_s as f64, "out_segs_per_s" => |r| r.out_segs_per_s as f64,
    "curr_estab" => |r| r.curr_estab as f64,
    "udp_in_datagrams_per_s" => |r| r.udp_in_datagrams_per_s as f64,
    "udp_out_datagrams_per_s" => |r| r.udp_out_datagrams_per_s as f64,
    "udp_in_errors_per_s" => |r| r.udp_in_errors_per_s as f64,
    "udp_rcvbuf_errors_per_s" => |r| r.udp_rcvbuf_errors_per_s as f64,
    "udp_no_ports_per_s" => |r| r.udp_no_ports_per_s as f64);
const PROBES: &[(&str, Acc<ProbeRec>)] = cols!(ProbeRec;
    "execs_per_s" => |r| r.execs_per_s as f64, "exits_per_s" => |r| r.exits_per_s as f64,
    "short_lived_per_s" => |r| r.short_lived_per_s as f64,
    "retransmits_per_s" => |r| r.retransmits_per_s as f64,
    "resets_sent_per_s" => |r| r.resets_sent_per_s as f64,
    "resets_received_per_s" => |r| r.resets_received_per_s as f64,
    "oom_kills" => |r| r.oom_kills as f64);

/// Every `table.column` the detector can select (aliases and static columns such as
/// `memory.total` left out), plus per-source latency p99 and mean: what the corpus
/// evaluation runs each detector on.
pub fn all_series() -> Vec<String> {
    fn names<T>(t: &str, cols: &[(&'static str, Acc<T>)], skip: &[&str]) -> Vec<String> {
        cols.iter()
            .filter(|c| !skip.contains(&c.0))
            .map(|c| format!("{t}.{}", c.0))
            .collect()
    }
    let mut v = Vec::new();
    v.extend(names("cpu", CPU, &[]));
    v.extend(names("system", SYSTEM, &[]));
    v.extend(names("memory", MEMORY, &["total", "swap_total"]));
    v.extend(names("pressure", PRESSURE, &[]));
    v.extend(names("disk", DISK, &["r_await", "w_await"]));
    v.extend(names("filesystem", FS, &["size_bytes", "inodes_total"]));
    v.extend(names("net", NET, &["rx_bytes", "tx_bytes"]));
    v.extend(names("tcp", TCP, &[]));
    v.extend(names("probes", PROBES, &[]));
    v.push("latency.*.p99".into());
    v.push("latency.*.mean".into());
    v
}

/// A statistic of a latency histogram.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LatStat {
    Quantile(f64),
    Mean,
    Count,
}

/// A resolved `table.column`.
#[derive(Debug, Clone)]
pub enum SeriesSpec {
    Cpu(Acc<CpuRec>, String),
    System(Acc<SystemRec>, String),
    Memory(Acc<MemoryRec>, String),
    Pressure(Acc<PressureRec>, String),
    Disk(Acc<DiskRec>, String),
    Fs(Acc<FsRec>, String),
    Net(Acc<NetRec>, String),
    Tcp(Acc<TcpRec>, String),
    Probes(Acc<ProbeRec>, String),
    /// `latency.<source glob>.<p50|p90|p99|p999|mean|count>`
    Latency {
        source: String,
        stat: LatStat,
    },
}

fn find<T>(cols: &[(&'static str, Acc<T>)], c: &str, table: &str) -> Result<Acc<T>, String> {
    cols.iter().find(|x| x.0 == c).map(|x| x.1).ok_or_else(|| {
        format!(
            "{table} has no column {c:?} (columns: {})",
            cols.iter().map(|x| x.0).collect::<Vec<_>>().join(", ")
        )
    })
}

pub fn parse_series(s: &str) -> Result<SeriesSpec, String> {
    let s = s.trim();
    if let Some(rest) = s.strip_prefix("latency.") {
        let (source, stat) = rest.rsplit_once('.').ok_or_else(|| {
            format!("{s:?}: expected latency.<source>.<p50|p90|p99|p999|mean|count>")
        })?;
        let stat = match stat {
            "p50" => LatStat::Quantile(0.5),
            "p90" => LatStat::Quantile(0.9),
            "p99" => LatStat::Quantile(0.99),
            "p999" => LatStat::Quantile(0.999),
            "mean" => LatStat::Mean,
            "count" => LatStat::Count,
            other => {
                return Err(format!(
                    "{s:?}: unknown statistic {other:?} (p50, p90, p99, p999, mean, count)"
                ))
            }
        };
        if source.is_empty() {
            return Err(format!("{s:?}: empty latency source"));
        }
        return Ok(SeriesSpec::Latency {
            source: source.to_string(),
            stat,
        });
    }
    let (t, c) = s
        .split_once('.')
        .ok_or_else(|| format!("{s:?} is not table.column (e.g. cpu.busy, disk.w_await_ms)"))?;
    let c_owned = c.to_string();
    Ok(match t {
        "cpu" => SeriesSpec::Cpu(find(CPU, c, t)?, c_owned),
        "system" => SeriesSpec::System(find(SYSTEM, c, t)?, c_owned),
        "memory" => SeriesSpec::Memory(find(MEMORY, c, t)?, c_owned),
        "pressure" => SeriesSpec::Pressure(find(PRESSURE, c, t)?, c_owned),
        "disk" => SeriesSpec::Disk(find(DISK, c, t)?, c_owned),
        "filesystem" => SeriesSpec::Fs(find(FS, c, t)?, c_owned),
        "net" => SeriesSpec::Net(find(NET, c, t)?, c_owned),
        "tcp" => SeriesSpec::Tcp(find(TCP, c, t)?, c_owned),
        "probes" => SeriesSpec::Probes(find(PROBES, c, t)?, c_owned),
        other => {
            return Err(format!(
                "unknown table {other:?} (cpu, system, memory, pressure, disk, filesystem, net, tcp, probes, latency)"
            ))
        }
    })
}

/// Upper bound of the bucket holding quantile `q` of a histogram (same rule as the README's SQL).
pub fn hist_quantile(l: &LatencyRec, q: f64) -> f64 {
    let target = (l.count as f64 * q).ceil().max(1.0) as u64;
    let mut acc = 0;
    for b in &l.buckets {
        acc += b.count;
        if acc >= target {
            return 1u64.checked_shl(b.index).unwrap_or(u64::MAX) as f64;
        }
    }
    0.0
}

impl PartialEq for SeriesSpec {
    fn eq(&self, o: &Self) -> bool {
        self.name() == o.name()
    }
}

impl SeriesSpec {
    /// The `table.column` this spec was parsed from.
    pub fn name(&self) -> String {
        match self {
            SeriesSpec::Cpu(_, c)
            | SeriesSpec::System(_, c)
            | SeriesSpec::Memory(_, c)
            | SeriesSpec::Pressure(_, c)
            | SeriesSpec::Disk(_, c)
            | SeriesSpec::Fs(_, c)
            | SeriesSpec::Net(_, c)
            | SeriesSpec::Tcp(_, c)
            | SeriesSpec::Probes(_, c) => format!("{}.{c}", self.table_name()),
            SeriesSpec::Latency { source, stat } => {
                let st = match stat {
                    LatStat::Quantile(q) if *q == 0.5 => "p50".to_string(),
                    LatStat::Quantile(q) if *q == 0.9 => "p90".to_string(),
                    LatStat::Quantile(q) if *q == 0.99 => "p99".to_string(),
                    LatStat::Quantile(_) => "p999".to_string(),
                    LatStat::Mean => "mean".to_string(),
                    LatStat::Count => "count".to_string(),
                };
                format!("latency.{source}.{st}")
            }
        }
    }

    pub fn table_name(&self) -> &'static str {
        match self {
            SeriesSpec::Cpu(..) => "cpu",
            SeriesSpec::System(..) => "system",
            SeriesSpec::Memory(..) => "memory",
            SeriesSpec::Pressure(..) => "pressure",
            SeriesSpec::Disk(..) => "disk",
            SeriesSpec::Fs(..) => "filesystem",
            SeriesSpec::Net(..) => "net",
            SeriesSpec::Tcp(..) => "tcp",
            SeriesSpec::Probes(..) => "probes",
            SeriesSpec::Latency { .. } => "latency",
        }
    }

    /// Labels (besides host) a series of this table has.
    pub fn label_names(&self) -> &'static [&'static str] {
        match self {
            SeriesSpec::Cpu(..) => &["cpu"],
            SeriesSpec::Pressure(..) => &["resource"],
            SeriesSpec::Disk(..) => &["device"],
            SeriesSpec::Fs(..) => &["mount", "device", "fstype"],
            SeriesSpec::Net(..) => &["interface"],
            SeriesSpec::Latency { .. } => &["source"],
            _ => &[],
        }
    }

    /// Calls `f(labels, value)` for every series of this spec in `snap`.
    pub fn for_each(&self, snap: &Snapshot, mut f: impl FnMut(&[(&'static str, &str)], f64)) {
        match self {
            SeriesSpec::Cpu(a, _) => {
                for r in &snap.cpu {
                    f(&[("cpu", crate::store::rows::cpu_name(r.cpu))], a(r))
                }
            }
            SeriesSpec::System(a, _) => f(&[], a(&snap.system)),
            SeriesSpec::Memory(a, _) => f(&[], a(&snap.memory)),
            SeriesSpec::Pressure(a, _) => {
                for r in &snap.pressure {
                    let res = PRESSURE_RESOURCES
                        .get(r.resource as usize)
                        .copied()
                        .unwrap_or("other");
                    f(&[("resource", res)], a(r))
                }
            }
            SeriesSpec::Disk(a, _) => {
                for r in &snap.disks {
                    f(&[("device", &r.device)], a(r))
                }
            }
            SeriesSpec::Fs(a, _) => {
                for r in &snap.filesystems {
                    f(
                        &[
                            ("mount", &r.mount),
                            ("device", &r.device),
                            ("fstype", &r.fstype),
                        ],
                        a(r),
                    )
                }
            }
            SeriesSpec::Net(a, _) => {
                for r in &snap.nets {
                    f(&[("interface", &r.interface)], a(r))
                }
            }
            SeriesSpec::Tcp(a, _) => f(&[], a(&snap.tcp)),
            SeriesSpec::Probes(a, _) => {
                if let Some(p) = &snap.probes {
                    f(&[], a(p))
                }
            }
            SeriesSpec::Latency { source, stat } => {
                for l in &snap.latency {
                    if !crate::detect::glob(source, &l.source) || l.count == 0 {
                        continue;
                    }
                    let v = match stat {
                        LatStat::Quantile(q) => hist_quantile(l, *q),
                        LatStat::Mean => l.sum as f64 / l.count as f64,
                        LatStat::Count => l.count as f64,
                    };
                    f(&[("source", &l.source)], v)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_or_explain() {
        assert!(matches!(parse_series("cpu.busy"), Ok(SeriesSpec::Cpu(..))));
        assert!(matches!(
            parse_series("disk.w_await"),
            Ok(SeriesSpec::Disk(..))
        ));
        assert!(matches!(
            parse_series("latency.runqueue.p99"),
            Ok(SeriesSpec::Latency { stat: LatStat::Quantile(q), .. }) if q == 0.99
        ));
        assert!(matches!(
            parse_series("latency.disk:sda:write.mean"),
            Ok(SeriesSpec::Latency { ref source, stat: LatStat::Mean }) if source == "disk:sda:write"
        ));
        let e = parse_series("cpu.bussy").unwrap_err();
        assert!(e.contains("busy") && e.contains("bussy"), "{e}");
        assert!(parse_series("nope.x")
            .unwrap_err()
            .contains("unknown table"));
        assert!(parse_series("latency.runqueue.p42").is_err());
    }

    #[test]
    fn quantiles_from_buckets() {
        let l = LatencyRec {
            count: 100,
            buckets: vec![
                BucketRec {
                    index: 2,
                    count: 90,
                },
                BucketRec {
                    index: 10,
                    count: 10,
                },
            ],
            ..Default::default()
        };
        assert_eq!(hist_quantile(&l, 0.5), 4.0);
        assert_eq!(hist_quantile(&l, 0.9), 4.0);
        assert_eq!(hist_quantile(&l, 0.99), 1024.0);
    }
}
