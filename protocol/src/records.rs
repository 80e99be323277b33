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

/// Name of CPU code `id` as stored: "total" for [`CPU_TOTAL`], else the number.
pub fn cpu_label(id: u32) -> &'static str {
    static NAMES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    if id == CPU_TOTAL {
        return "total";
    }
    let names = NAMES.get_or_init(|| (0..4096).map(|i| i.to_string()).collect());
    names
        .get(id as usize)
        .map(String::as_str)
        .unwrap_or("other")
}

/// Name of PSI resource code `id`.
pub fn pressure_label(id: u32) -> &'static str {
    PRESSURE_RESOURCES
        .get(id as usize)
        .copied()
        .unwrap_or("other")
}

pub const CPU_TOTAL: u32 = u32::MAX;
pub const PRESSURE_RESOURCES: [&str; 3] = ["cpu", "memory", "io"];

fn pct(part: f64, whole: f64) -> f64 {
    part * 100.0 / whole.max(1.0)
}

// The metric tables. This is the only list: the wire records, the aggregator's rows and
// DDL, the detector's series, `sensor once --json` and the README's table of tables all
// follow from it (see `tables.rs`). Adding a column: declare it at the end of its table
// with `since N` (N = the next schema migration number; released migrations are frozen)
// and fill it in the collector. Table order is wire order; never reorder.
crate::tables! {
    /// One CPU line of /proc/stat as percentages of the interval (one row per CPU and
    /// one for the total). Guest time is also inside user/nice in the kernel's
    /// accounting; it is subtracted there.
    table cpu (cpu: Many CpuRec) from "/proc/stat", key [cpu], since 1, v1 10 {
        /// CPU number, or `total` for all CPUs (-1 / `u32::MAX` on the wire).
        cpu: u32 = Label("") as cpu_label,
        /// Time in user mode.
        user: f32 = Gauge("%"),
        /// Time in user mode at low priority (nice).
        nice: f32 = Gauge("%"),
        /// Time in the kernel.
        system: f32 = Gauge("%"),
        /// Idle time.
        idle: f32 = Gauge("%"),
        /// Idle with I/O outstanding.
        iowait: f32 = Gauge("%"),
        /// Servicing hardware interrupts.
        irq: f32 = Gauge("%"),
        /// Servicing softirqs.
        softirq: f32 = Gauge("%"),
        /// Stolen by the hypervisor.
        steal: f32 = Gauge("%"),
        /// Running guests.
        guest: f32 = Gauge("%"),
    }
    derived {
        /// Not idle: 100 - idle.
        busy = Gauge("%") sql "100 - idle" |r| 100.0 - r.idle as f64,
    }
    aliases {}

    /// Load, scheduler and process counters.
    table system (system: One SystemRec) from "/proc/loadavg, /proc/stat", key [], since 1, v1 8 {
        /// 1-minute load average.
        load1: f32 = Gauge(""),
        /// 5-minute load average.
        load5: f32 = Gauge(""),
        /// 15-minute load average.
        load15: f32 = Gauge(""),
        /// Context switches.
        ctxt_per_s: f32 = Rate("1/s"),
        /// Processes and threads created.
        forks_per_s: f32 = Rate("1/s"),
        /// Interrupts serviced.
        interrupts_per_s: f32 = Rate("1/s"),
        /// Tasks runnable at the instant.
        procs_running: u32 = Gauge("tasks"),
        /// Tasks blocked on I/O at the instant.
        procs_blocked: u32 = Gauge("tasks"),
    }
    derived {}
    aliases {}

    /// Memory (bytes) and paging rates.
    table memory (memory: One MemoryRec) from "/proc/meminfo, /proc/vmstat", key [], since 1, v1 13 {
        /// MemTotal.
        total: u64 = Capacity("bytes"),
        /// MemAvailable: what can be allocated without swapping.
        available: u64 = Gauge("bytes"),
        /// MemFree.
        free: u64 = Gauge("bytes"),
        /// Buffers.
        buffers: u64 = Gauge("bytes"),
        /// Page cache (Cached).
        cached: u64 = Gauge("bytes"),
        /// Dirty pages waiting for writeback.
        dirty: u64 = Gauge("bytes"),
        /// SwapTotal.
        swap_total: u64 = Capacity("bytes"),
        /// SwapFree.
        swap_free: u64 = Gauge("bytes"),
        /// Page faults (pgfault).
        page_faults_per_s: f32 = Rate("1/s"),
        /// Major page faults (pgmajfault).
        major_faults_per_s: f32 = Rate("1/s"),
        /// Pages swapped in (pswpin).
        swap_in_per_s: f32 = Rate("pages/s"),
        /// Pages swapped out (pswpout).
        swap_out_per_s: f32 = Rate("pages/s"),
        /// OOM kills (oom_kill).
        oom_kills_per_s: f32 = Rate("1/s"),
    }
    derived {
        /// In use: total - available.
        used = Gauge("bytes") sql "total - available" |r| r.total.saturating_sub(r.available) as f64,
        /// Available as a share of total.
        available_pct = Gauge("%") sql "available * 100 / greatest(total, 1)" |r| pct(r.available as f64, r.total as f64),
    }
    aliases {}

    /// Pressure stall information; `*_stall_pct` is the share of the interval stalled,
    /// from the `total` counters, so exact for the interval.
    table pressure (pressure: Many PressureRec) from "/proc/pressure/{cpu,memory,io}", key [resource], since 1, v1 9 {
        /// `cpu`, `memory` or `io` (0, 1, 2 on the wire).
        resource: u32 = Label("") as pressure_label,
        /// Some tasks stalled, kernel's 10 s average.
        some_avg10: f32 = Gauge("%"),
        /// Some tasks stalled, 60 s average.
        some_avg60: f32 = Gauge("%"),
        /// Some tasks stalled, 300 s average.
        some_avg300: f32 = Gauge("%"),
        /// Some tasks stalled, share of this interval.
        some_stall_pct: f32 = Gauge("%"),
        /// All non-idle tasks stalled, 10 s average.
        full_avg10: f32 = Gauge("%"),
        /// All non-idle tasks stalled, 60 s average.
        full_avg60: f32 = Gauge("%"),
        /// All non-idle tasks stalled, 300 s average.
        full_avg300: f32 = Gauge("%"),
        /// All non-idle tasks stalled, share of this interval.
        full_stall_pct: f32 = Gauge("%"),
    }
    derived {}
    aliases {}

    /// One block device.
    table disk (disks: Many DiskRec) from "/proc/diskstats", key [device], since 1, v1 9 {
        /// Device name (sda, nvme0n1, ...).
        device: String = Label(""),
        /// Reads completed.
        reads_per_s: f32 = Rate("1/s"),
        /// Writes completed.
        writes_per_s: f32 = Rate("1/s"),
        /// Bytes read.
        read_bytes_per_s: f32 = Rate("bytes/s"),
        /// Bytes written.
        write_bytes_per_s: f32 = Rate("bytes/s"),
        /// Mean time a completed read spent queued and serviced.
        r_await_ms: f32 = Gauge("ms"),
        /// Mean time a completed write spent queued and serviced.
        w_await_ms: f32 = Gauge("ms"),
        /// Share of the interval with at least one request in flight.
        util_pct: f32 = Gauge("%"),
        /// Requests in flight at the instant.
        in_flight: u32 = Gauge("requests"),
    }
    derived {}
    aliases { r_await = r_await_ms, w_await = w_await_ms }

    /// One mounted filesystem.
    table filesystem (filesystems: Many FsRec) from "/proc/self/mounts + statvfs", key [mount], since 1, v1 8 {
        /// Mount point.
        mount: String = Label(""),
        /// Source device.
        device: String = Label(""),
        /// Filesystem type.
        fstype: String = Label(""),
        /// Size.
        size_bytes: u64 = Capacity("bytes"),
        /// Used.
        used_bytes: u64 = Gauge("bytes"),
        /// Available to unprivileged users.
        avail_bytes: u64 = Gauge("bytes"),
        /// Inodes in total.
        inodes_total: u64 = Capacity("inodes"),
        /// Inodes in use.
        inodes_used: u64 = Gauge("inodes"),
    }
    derived {
        /// Used share of the size.
        used_pct = Gauge("%") sql "used_bytes * 100 / greatest(size_bytes, 1)" |r| pct(r.used_bytes as f64, r.size_bytes as f64),
        /// Used share of the inodes.
        inodes_used_pct = Gauge("%") sql "inodes_used * 100 / greatest(inodes_total, 1)" |r| pct(r.inodes_used as f64, r.inodes_total as f64),
    }
    aliases {}

    /// One network interface.
    table net (nets: Many NetRec) from "/proc/net/dev", key [interface], since 1, v1 9 {
        /// Interface name.
        interface: String = Label(""),
        /// Bytes received.
        rx_bytes_per_s: f32 = Rate("bytes/s"),
        /// Bytes sent.
        tx_bytes_per_s: f32 = Rate("bytes/s"),
        /// Packets received.
        rx_packets_per_s: f32 = Rate("1/s"),
        /// Packets sent.
        tx_packets_per_s: f32 = Rate("1/s"),
        /// Receive errors.
        rx_errors_per_s: f32 = Rate("1/s"),
        /// Transmit errors.
        tx_errors_per_s: f32 = Rate("1/s"),
        /// Received packets dropped.
        rx_drops_per_s: f32 = Rate("1/s"),
        /// Transmitted packets dropped.
        tx_drops_per_s: f32 = Rate("1/s"),
    }
    derived {}
    aliases { rx_bytes = rx_bytes_per_s, tx_bytes = tx_bytes_per_s }

    /// TCP and UDP protocol counters.
    table tcp (tcp: One TcpRec) from "/proc/net/snmp, /proc/net/netstat", key [], since 1, v1 15 {
        /// Segments retransmitted.
        retrans_segs_per_s: f32 = Rate("1/s"),
        /// Connections opened by this host (SYN sent).
        active_opens_per_s: f32 = Rate("1/s"),
        /// Connections accepted.
        passive_opens_per_s: f32 = Rate("1/s"),
        /// Connection attempts that failed.
        attempt_fails_per_s: f32 = Rate("1/s"),
        /// Established connections reset.
        estab_resets_per_s: f32 = Rate("1/s"),
        /// Segments sent with RST.
        out_rsts_per_s: f32 = Rate("1/s"),
        /// Segments received in error.
        in_errs_per_s: f32 = Rate("1/s"),
        /// Segments received.
        in_segs_per_s: f32 = Rate("1/s"),
        /// Segments sent.
        out_segs_per_s: f32 = Rate("1/s"),
        /// Connections established at the instant.
        curr_estab: u32 = Gauge("connections"),
        /// UDP datagrams received.
        udp_in_datagrams_per_s: f32 = Rate("1/s"),
        /// UDP datagrams sent.
        udp_out_datagrams_per_s: f32 = Rate("1/s"),
        /// UDP datagrams received in error.
        udp_in_errors_per_s: f32 = Rate("1/s"),
        /// UDP datagrams dropped: receive buffer full.
        udp_rcvbuf_errors_per_s: f32 = Rate("1/s"),
        /// UDP datagrams to a port nobody listens on.
        udp_no_ports_per_s: f32 = Rate("1/s"),
        /// Connections dropped because a listen queue (accept backlog) was full
        /// (TcpExt ListenOverflows).
        listen_overflows_per_s: f32 = Rate("1/s") since 5,
        /// SYNs to a listening socket dropped for any reason, overflows included
        /// (TcpExt ListenDrops).
        listen_drops_per_s: f32 = Rate("1/s") since 5,
    }
    derived {}
    aliases {}

    /// Per-host counters from the eBPF probes (process and tcp programs), over the
    /// interval; no row without probes, zero for a probe that is not active (see
    /// `hosts.probes`).
    table probes (probes: Optional ProbeRec) from "eBPF: sched_process_exec/exit, tcp_retransmit_skb, tcp_send_reset, tcp_receive_reset, oom/mark_victim", key [], since 2, v1 7 {
        /// Programs executed (exec).
        execs_per_s: f32 = Rate("1/s"),
        /// Processes exited.
        exits_per_s: f32 = Rate("1/s"),
        /// Processes that exited less than a second after they were forked.
        short_lived_per_s: f32 = Rate("1/s"),
        /// TCP segments retransmitted (kernel tracepoint).
        retransmits_per_s: f32 = Rate("1/s"),
        /// TCP resets sent.
        resets_sent_per_s: f32 = Rate("1/s"),
        /// TCP resets received.
        resets_received_per_s: f32 = Rate("1/s"),
        /// OOM kills in the interval (a count, not a rate).
        oom_kills: u32 = Counter("kills"),
    }
    derived {}
    aliases {}

    /// Log2 histograms over one interval from the eBPF probes (only non-empty buckets are
    /// sent). Sources: `runqueue` (µs from wakeup to run), `disk:<dev>:read|write` (µs
    /// from the request's creation to its completion, what diskstats' ticks sum; on kernels
    /// without BTF tracepoints, from issue to completion), `disk:<dev>:read_bytes|write_bytes`
    /// (request sizes).
    table latency (latency: Many LatencyRec) from "eBPF: sched_switch (task sched_info), block_rq_complete (request start_time_ns); fallbacks sched_wakeup/sched_switch, block_rq_issue/complete", key [source], since 2, v1 5 {
        /// What was measured (see above).
        source: String = Label(""),
        /// `us` or `bytes`.
        unit: String = Label(""),
        /// Values measured.
        count: u64 = Counter(""),
        /// Sum of the values, in `unit`.
        sum: u64 = Counter(""),
        /// Non-empty buckets: `bucket_upper` 2^i (values below it, at least half of it;
        /// 1 counts zeros) and `bucket_count`.
        buckets: Vec<BucketRec> = Histogram(""),
    }
    derived {}
    aliases {}

    /// TCP retransmitted segments to one remote port over the interval.
    table tcp_ports (tcp_ports: Many PortRec) from "eBPF: tcp_retransmit_skb", key [port], since 2, v1 2 {
        /// Remote port.
        port: u32 = Label(""),
        /// Segments retransmitted to it.
        retransmits: u32 = Counter("segments"),
    }
    derived {}
    aliases {}

    /// Discrete kernel events (`kind` = `oom_kill`), stored at the time they happened.
    table events (events: Many EventRec) from "eBPF: oom/mark_victim; /proc/vmstat oom_kill", key [kind], since 2, v1 6 {
        /// `oom_kill`.
        kind: String = Label(""),
        /// When it happened (Unix ms on the wire; the row's `ts`).
        ts_ms: u64 = Time("ms"),
        /// The victim's pid.
        pid: u32 = Label(""),
        /// The victim's command name.
        comm: String = Label(""),
        /// The victim's cgroup (memory controller path on v1), empty when unknown.
        cgroup: String = Text(""),
        /// `key=value` pairs separated by spaces (`total_vm_kb=… anon_rss_kb=…
        /// file_rss_kb=… shmem_rss_kb=… uid=… constraint=…`).
        detail: String = Text(""),
    }
    derived {}
    aliases {}

    /// The host's labels from its sensor's configuration (`labels = { env = "prod" }`),
    /// sent with the first snapshot of each batch (one row per label and batch): what the
    /// console filters on, what rules select with `labels = { env = "prod" }`, and what
    /// queries join on. Never the host name: that comes from the certificate.
    table host_labels (host_labels: Many HostLabelRec) from "sensor configuration: labels", key [name], since 8, v1 0 {
        /// Label name.
        name: String = Label(""),
        /// Label value.
        value: String = Label(""),
    }
    derived {}
    aliases {}

    /// One cgroup (container, pod, systemd unit, or any other group of processes) each
    /// interval, from the v2 tree where the cgroup has one and the v1 controllers otherwise
    /// (hybrid hosts use both: v1 for cpu quota, memory, blkio and pids, v2 for pressure).
    /// At most `max_cgroups` (sensor config `[cgroups]`), chosen by path globs; the
    /// hierarchy roots themselves are the host tables. Counters of a cgroup are
    /// hierarchical (its descendants included), as the kernel keeps them.
    table cgroups (cgroups: Many CgroupRec) from "/sys/fs/cgroup: cpu.stat, cpuacct.*, cpu.max|cfs_*, memory.*, io.stat|blkio.throttle.*, pids.*, *.pressure", key [cgroup], since 9, v1 0 {
        /// Path below the hierarchy root (`/system.slice/nginx.service`).
        cgroup: String = Label(""),
        /// Resolved from the path: `docker:<12 hex>` (`containerd:`, `crio:`, `podman:`,
        /// `container:` for a bare id), a systemd unit (`nginx.service`), or empty.
        container: String = Label(""),
        /// Kubernetes pod UID from kubelet's layout, or empty.
        pod: String = Label(""),
        /// CPU used, in percent of one CPU (200 = two CPUs' worth).
        cpu_pct: f32 = Gauge("%"),
        /// CPU used in user mode, percent of one CPU.
        cpu_user_pct: f32 = Gauge("%"),
        /// CPU used in the kernel, percent of one CPU.
        cpu_system_pct: f32 = Gauge("%"),
        /// CPU limit from the CFS quota in CPUs (quota / period); 0 = none.
        cpu_limit: f32 = Capacity("cpus"),
        /// CFS enforcement periods that had runnable tasks, in the interval.
        cpu_periods: u32 = Counter("periods"),
        /// Of those, periods in which the group hit its quota and was throttled.
        cpu_throttled_periods: u32 = Counter("periods"),
        /// Time the group was held back by the quota, summed over CPUs as the kernel
        /// counts it (so above 1000 ms/s when it is throttled on several CPUs at once).
        cpu_throttled_ms_per_s: f32 = Rate("ms/s"),
        /// Memory charged to the group (v2 memory.current, v1 usage_in_bytes): what the
        /// limit is compared against; includes page cache.
        memory_usage: u64 = Gauge("bytes"),
        /// Usage minus inactive file cache: what cannot be reclaimed easily (the
        /// kubelet's and cAdvisor's working set).
        memory_working_set: u64 = Gauge("bytes"),
        /// Anonymous memory (v2 anon, v1 total_rss).
        memory_rss: u64 = Gauge("bytes"),
        /// Page cache (v2 file, v1 total_cache).
        memory_cache: u64 = Gauge("bytes"),
        /// Swap used by the group (v2 memory.swap.current, v1 total_swap).
        memory_swap: u64 = Gauge("bytes"),
        /// Memory limit (v2 memory.max, v1 limit_in_bytes); 0 = none.
        memory_limit: u64 = Capacity("bytes"),
        /// Times usage went over memory.high and was throttled (v2 only).
        memory_high_events: u32 = Counter("events"),
        /// Times usage hit the limit (v2 memory.events max, v1 failcnt).
        memory_max_events: u32 = Counter("events"),
        /// Times the group went out of memory (v2 only; v1: see oom_kills).
        oom_events: u32 = Counter("events"),
        /// Processes killed by the OOM killer in the group.
        oom_kills: u32 = Counter("kills"),
        /// Bytes read from block devices (all devices; per device in `cgroup_io`).
        read_bytes_per_s: f32 = Rate("bytes/s"),
        /// Bytes written to block devices.
        write_bytes_per_s: f32 = Rate("bytes/s"),
        /// Read requests.
        reads_per_s: f32 = Rate("1/s"),
        /// Write requests.
        writes_per_s: f32 = Rate("1/s"),
        /// Processes and threads in the group (pids.current).
        pids: u32 = Gauge("tasks"),
        /// Their limit (pids.max); 0 = none.
        pids_limit: u32 = Capacity("tasks"),
        /// Some tasks stalled on CPU, share of the interval (v2 cpu.pressure).
        cpu_some_pct: f32 = Gauge("%"),
        /// Some tasks stalled on memory, share of the interval.
        memory_some_pct: f32 = Gauge("%"),
        /// All tasks stalled on memory, share of the interval.
        memory_full_pct: f32 = Gauge("%"),
        /// Some tasks stalled on I/O, share of the interval.
        io_some_pct: f32 = Gauge("%"),
        /// All tasks stalled on I/O, share of the interval.
        io_full_pct: f32 = Gauge("%"),
    }
    derived {
        /// Share of CFS periods throttled.
        cpu_throttled_pct = Gauge("%") sql "cpu_throttled_periods * 100 / greatest(cpu_periods, 1)" |r| pct(r.cpu_throttled_periods as f64, r.cpu_periods as f64),
        /// CPU used as a share of the CPU limit (0 without a limit).
        cpu_pct_of_limit = Gauge("%") sql "if(cpu_limit > 0, cpu_pct / cpu_limit, 0)" |r| if r.cpu_limit > 0.0 { r.cpu_pct as f64 / r.cpu_limit as f64 } else { 0.0 },
        /// Working set as a share of the memory limit (0 without a limit).
        memory_used_pct_of_limit = Gauge("%") sql "if(memory_limit > 0, memory_working_set * 100 / memory_limit, 0)" |r| if r.memory_limit > 0 { pct(r.memory_working_set as f64, r.memory_limit as f64) } else { 0.0 },
    }
    aliases {}

    /// Block I/O of one cgroup on one device, over the interval (devices the cgroup has
    /// done I/O on; hierarchical like `cgroups`).
    table cgroup_io (cgroup_io: Many CgroupIoRec) from "/sys/fs/cgroup: io.stat (v2), blkio.throttle.io_service*_recursive (v1)", key [cgroup, device], since 9, v1 0 {
        /// Path below the hierarchy root.
        cgroup: String = Label(""),
        /// Device name (`major:minor` when the kernel has no name for it).
        device: String = Label(""),
        /// Bytes read.
        read_bytes_per_s: f32 = Rate("bytes/s"),
        /// Bytes written.
        write_bytes_per_s: f32 = Rate("bytes/s"),
        /// Read requests.
        reads_per_s: f32 = Rate("1/s"),
        /// Write requests.
        writes_per_s: f32 = Rate("1/s"),
    }
    derived {}
    aliases {}

    /// The busiest processes each interval: the union of the top `top_processes` (sensor
    /// config `[processes]`, default 10) by CPU, by resident memory and by I/O bytes, plus
    /// one row `pid` 0 / `comm` `other` summing every other process, so the rows add up
    /// to the host's processes (CPU of processes that exited within the interval is not in
    /// any row: the kernel hands it to their parent only when reaped).
    table processes (processes: Many ProcessRec) from "/proc/[pid]/stat, io, cmdline, status, cgroup", key [pid], since 9, v1 0 {
        /// Process id; 0 for the `other` row.
        pid: u32 = Label(""),
        /// Command name (`comm`), `other` for the rest.
        comm: String = Label(""),
        /// Owner (user name, or the uid when it has none).
        user: String = Label(""),
        /// The process's cgroup (v2 path, or the v1 cpu controller's on v1-only hosts).
        cgroup: String = Label(""),
        /// Command line, arguments separated by spaces, at most 256 bytes.
        cmdline: String = Text(""),
        /// CPU used, percent of one CPU.
        cpu_pct: f32 = Gauge("%"),
        /// CPU in user mode, percent of one CPU.
        cpu_user_pct: f32 = Gauge("%"),
        /// CPU in the kernel, percent of one CPU.
        cpu_system_pct: f32 = Gauge("%"),
        /// Resident memory.
        rss: u64 = Gauge("bytes"),
        /// Bytes the process caused to be read from storage.
        read_bytes_per_s: f32 = Rate("bytes/s"),
        /// Bytes the process caused to be written to storage.
        write_bytes_per_s: f32 = Rate("bytes/s"),
        /// Threads.
        threads: u32 = Gauge("threads"),
        /// Processes the row stands for: 1, or how many `other` sums.
        processes: u32 = Gauge("processes"),
    }
    derived {}
    aliases {}

    /// Latency histograms per cgroup (eBPF, opt-in). `runqueue` (`[probes]
    /// runqueue_cgroups`): how long the tasks of a cgroup waited for a CPU after becoming
    /// runnable, attributed to the cgroup the task is in (its own, not its descendants'),
    /// the cpu hierarchy's on hosts with the v1 cpu controller, else the v2 tree's; the rows
    /// add up to the host's `runqueue` histogram. `block:read`, `block:write` (`[probes]
    /// block_cgroups`): block I/O latency as in `latency`'s `disk:` sources, all devices, of the
    /// requests charged to the cgroup (blkio v1 or v2). Per source, the top N cgroups by
    /// values each interval and one row `cgroup` = `other` summing the rest.
    table cgroup_latency (cgroup_latency: Many CgroupLatencyRec) from "eBPF: sched_switch (task sched_info, cgroup id); block_rq_complete (the request's start_time_ns and blkcg; fallback: block_rq_issue, raw, and block_rq_complete)", key [cgroup, source], since 10, v1 0 {
        /// Path below the hierarchy root (`/` for the root cgroup), or `other`.
        cgroup: String = Label(""),
        /// Container or systemd unit resolved from the path (see `cgroups`).
        container: String = Label(""),
        /// Kubernetes pod UID resolved from the path.
        pod: String = Label(""),
        /// What was measured: `runqueue` (µs from runnable to running), `block:read`,
        /// `block:write` (µs from the request's creation, or issue, to completion).
        source: String = Label(""),
        /// `us`.
        unit: String = Label(""),
        /// Values measured.
        count: u64 = Counter(""),
        /// Sum of the values, in `unit`.
        sum: u64 = Counter(""),
        /// Non-empty log2 buckets (as in `latency`).
        buckets: Vec<BucketRec> = Histogram(""),
    }
    derived {}
    aliases {}
}

wire_struct! {
    /// One non-empty bucket of a log2 histogram: `index` i counts values v
    /// with 2^(i-1) <= v < 2^i (index 0 counts v = 0).
    pub struct BucketRec {
        pub index: u32,
        pub count: u64,
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
    /// Samples in the snapshot (one value of one series at one time).
    pub fn sample_count(&self) -> u64 {
        struct Count(u64);
        impl crate::tables::Visitor for Count {
            fn record<R: crate::tables::Record>(&mut self, _: usize, r: &R) {
                self.0 += r.samples() as u64;
            }
        }
        let mut c = Count(0);
        self.visit(&mut c);
        c.0
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
        let snapshots = if r.version >= 3 {
            Snapshot::decode_columns(r, n)?
        } else {
            let mut snapshots = Vec::with_capacity(n);
            for _ in 0..n {
                snapshots.push(Snapshot::decode(r)?);
            }
            snapshots
        };
        Ok(Batch {
            host,
            boot_id,
            seq,
            info,
            snapshots,
        })
    }
}
