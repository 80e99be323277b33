//! eBPF probes: loads sonde's tracepoint programs (built by `cargo xtask build-ebpf` and
//! embedded in the binary), attaches the ones the configuration asks for, and every interval
//! turns their cumulative per-CPU maps into per-interval histograms and rates.
//!
//! Each probe is independent: if the kernel refuses one (missing tracepoint, a field layout
//! that differs from what the program was compiled for, no CAP_BPF/CAP_PERFMON, verifier
//! rejection) the reason is kept, logged once, and everything else keeps running.
//! Dropping [`Probes`] detaches every program and frees every map.
//!
//! Map reads use the raw `bpf(2)` syscall with buffers allocated once, so a steady-state
//! collection allocates nothing.

use crate::filter::Filter;
use aya::maps::{Map, MapData, RingBuf};
use aya::programs::{RawTracePoint, TracePoint};
use aya::{Ebpf, EbpfLoader};
use protocol::{BucketRec, EventRec, LatencyRec, PortRec, ProbeRec};
use sensor_common::{
    block_kind, counter, dev_major_minor, event_kind, BlockHistKey, Counters, Event, Hist,
    HIST_BUCKETS,
};
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;

/// The object built by `cargo xtask build-ebpf`, embedded at compile time (empty when the
/// sensor was built without it).
static EMBEDDED: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sensor-ebpf.o"));

/// Probe names, in the order they are reported.
pub const PROBE_NAMES: [&str; 5] = ["runqueue", "block", "tcp", "oom", "process"];

/// A tracepoint field the programs read: (name, offset, size). Size 0 = any size (arrays).
type Field = (&'static str, usize, usize);

struct ProgSpec {
    /// Function name in the object = program name.
    prog: &'static str,
    /// A raw tracepoint (arguments, not the formatted record; `fields` is then empty).
    raw: bool,
    category: &'static str,
    event: &'static str,
    fields: &'static [Field],
}

const fn spec(
    prog: &'static str,
    category: &'static str,
    event: &'static str,
    fields: &'static [Field],
) -> ProgSpec {
    ProgSpec {
        prog,
        raw: false,
        category,
        event,
        fields,
    }
}

const fn raw(prog: &'static str, category: &'static str, event: &'static str) -> ProgSpec {
    ProgSpec {
        prog,
        raw: true,
        category,
        event,
        fields: &[],
    }
}

fn probe_programs(probe: &str) -> &'static [ProgSpec] {
    const RUNQ: &[ProgSpec] = &[
        raw("rq_wakeup", "sched", "sched_wakeup"),
        raw("rq_wakeup_new", "sched", "sched_wakeup_new"),
        raw("rq_switch", "sched", "sched_switch"),
    ];
    const BLOCK: &[ProgSpec] = &[
        spec(
            "block_rq_issue",
            "block",
            "block_rq_issue",
            &[
                ("dev", 8, 4),
                ("sector", 16, 8),
                ("bytes", 28, 4),
                ("rwbs", 34, 0),
            ],
        ),
        spec(
            "block_rq_complete",
            "block",
            "block_rq_complete",
            &[("dev", 8, 4), ("sector", 16, 8)],
        ),
    ];
    const TCP: &[ProgSpec] = &[
        spec(
            "tcp_retransmit_skb",
            "tcp",
            "tcp_retransmit_skb",
            &[("skbaddr", 8, 8), ("dport", 30, 2), ("err", 76, 4)],
        ),
        spec("tcp_send_reset", "tcp", "tcp_send_reset", &[]),
        spec("tcp_receive_reset", "tcp", "tcp_receive_reset", &[]),
    ];
    const OOM: &[ProgSpec] = &[spec(
        "mark_victim",
        "oom",
        "mark_victim",
        &[
            ("pid", 8, 4),
            ("comm", 12, 4),
            ("total_vm", 16, 8),
            ("anon_rss", 24, 8),
            ("file_rss", 32, 8),
            ("shmem_rss", 40, 8),
            ("uid", 48, 4),
        ],
    )];
    const PROCESS: &[ProgSpec] = &[
        spec(
            "sched_process_fork",
            "sched",
            "sched_process_fork",
            &[("child_pid", 20, 4)],
        ),
        spec("sched_process_exec", "sched", "sched_process_exec", &[]),
        spec(
            "sched_process_exit",
            "sched",
            "sched_process_exit",
            &[("pid", 24, 4), ("group_dead", 32, 1)],
        ),
    ];
    match probe {
        "runqueue" => RUNQ,
        "block" => BLOCK,
        "tcp" => TCP,
        "oom" => OOM,
        "process" => PROCESS,
        _ => &[],
    }
}

/// Which probes to attach and where the object comes from (the `[probes]` config section).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeConfig {
    /// Master switch: false = /proc only.
    pub enabled: bool,
    pub runqueue: bool,
    pub block: bool,
    pub tcp: bool,
    pub oom: bool,
    pub process: bool,
    /// Load the eBPF object from this file instead of the one built into the binary.
    pub object: Option<std::path::PathBuf>,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            enabled: true,
            runqueue: true,
            block: true,
            tcp: true,
            oom: true,
            process: true,
            object: None,
        }
    }
}

impl ProbeConfig {
    pub fn wants(&self, probe: &str) -> bool {
        self.enabled
            && match probe {
                "runqueue" => self.runqueue,
                "block" => self.block,
                "tcp" => self.tcp,
                "oom" => self.oom,
                "process" => self.process,
                _ => false,
            }
    }
}

/// What became of one probe.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProbeStatus {
    pub name: &'static str,
    /// "active", "disabled" (by configuration) or "refused".
    pub state: &'static str,
    /// Why it is not active.
    pub reason: String,
}

// ---- tracefs ---------------------------------------------------------------------------------

/// Finds (and if needed, mounts) tracefs.
fn tracefs() -> Option<&'static str> {
    for p in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if Path::new(p).join("events").is_dir() {
            return Some(p);
        }
    }
    // Not mounted: try to mount it where the kernel documents it (needs CAP_SYS_ADMIN).
    let target = c"/sys/kernel/tracing";
    let r = unsafe {
        libc::mount(
            c"tracefs".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r == 0 && Path::new("/sys/kernel/tracing/events").is_dir() {
        return Some("/sys/kernel/tracing");
    }
    None
}

/// Parses the `field:` lines of a tracepoint `format` file into (name, offset, size).
pub fn parse_format(text: &str) -> Vec<(String, usize, usize)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut parts = rest.split(';').map(str::trim);
        let decl = parts.next().unwrap_or("");
        let mut offset = None;
        let mut size = None;
        for p in parts {
            if let Some(v) = p.strip_prefix("offset:") {
                offset = v.parse().ok();
            } else if let Some(v) = p.strip_prefix("size:") {
                size = v.parse().ok();
            }
        }
        // The name is the last word of the declaration, minus any array suffix.
        let name = decl
            .rsplit(|c: char| c.is_whitespace() || c == '*')
            .next()
            .unwrap_or("")
            .split('[')
            .next()
            .unwrap_or("")
            .to_string();
        if let (Some(o), Some(s)) = (offset, size) {
            out.push((name, o, s));
        }
    }
    out
}

/// Checks that a tracepoint exists and that the fields the program reads sit where it
/// expects them.
fn check_layout(tracefs: &str, s: &ProgSpec) -> Result<(), String> {
    if s.raw {
        // Raw tracepoints take the kernel's arguments: the tracepoint must exist.
        let dir = format!("{tracefs}/events/{}/{}", s.category, s.event);
        if !Path::new(&dir).is_dir() {
            return Err(format!(
                "tracepoint {}:{} does not exist on this kernel",
                s.category, s.event
            ));
        }
        return Ok(());
    }
    let path = format!("{tracefs}/events/{}/{}/format", s.category, s.event);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format!(
                "tracepoint {}:{} does not exist on this kernel",
                s.category, s.event
            )
        } else {
            format!("cannot read {path}: {e}")
        }
    })?;
    let fields = parse_format(&text);
    for &(name, off, size) in s.fields {
        match fields.iter().find(|f| f.0 == name) {
            None => {
                return Err(format!(
                    "tracepoint {}:{} has no field `{name}`",
                    s.category, s.event
                ))
            }
            Some(f) if f.1 != off || (size != 0 && f.2 != size) => {
                return Err(format!(
                    "tracepoint {}:{} field `{name}` is at offset {} size {} on this kernel; the program expects offset {off} size {size}",
                    s.category, s.event, f.1, f.2
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

// ---- raw map access -----------------------------------------------------------------------------

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn bpf_elem(cmd: libc::c_long, fd: RawFd, key: *const u8, value: *mut u8) -> std::io::Result<bool> {
    let attr = ElemAttr {
        map_fd: fd as u32,
        _pad: 0,
        key: key as u64,
        value: value as u64,
        flags: 0,
    };
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &attr as *const ElemAttr,
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOENT) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// A per-CPU map read with a buffer allocated once.
struct PerCpu {
    map: MapData,
    ncpu: usize,
    stride: usize,
    buf: Vec<u64>,
}

impl PerCpu {
    fn new(map: MapData, value_size: usize, ncpu: usize) -> Self {
        let stride = value_size.div_ceil(8) * 8;
        PerCpu {
            map,
            ncpu,
            stride,
            buf: vec![0u64; stride / 8 * ncpu],
        }
    }

    fn fd(&self) -> RawFd {
        self.map.fd().as_fd().as_raw_fd()
    }

    /// Looks `key` up and sums the per-CPU values (as u64 words) into `out`.
    fn sum_into(&mut self, key: *const u8, out: &mut [u64]) -> std::io::Result<bool> {
        if !bpf_elem(
            BPF_MAP_LOOKUP_ELEM,
            self.fd(),
            key,
            self.buf.as_mut_ptr() as *mut u8,
        )? {
            return Ok(false);
        }
        out.iter_mut().for_each(|x| *x = 0);
        let words = self.stride / 8;
        for c in 0..self.ncpu {
            let cpu = &self.buf[c * words..c * words + out.len().min(words)];
            for (o, v) in out.iter_mut().zip(cpu) {
                *o = o.wrapping_add(*v);
            }
        }
        Ok(true)
    }

    fn next_key(&self, key: Option<*const u8>, next: *mut u8) -> std::io::Result<bool> {
        bpf_elem(
            BPF_MAP_GET_NEXT_KEY,
            self.fd(),
            key.unwrap_or(std::ptr::null()),
            next,
        )
    }

    fn delete(&self, key: *const u8) {
        let _ = bpf_elem(BPF_MAP_DELETE_ELEM, self.fd(), key, std::ptr::null_mut());
    }
}

fn hist_words(h: &mut Hist) -> &mut [u64] {
    // Hist is repr(C) and all u64: view it as words.
    unsafe {
        std::slice::from_raw_parts_mut(h as *mut Hist as *mut u64, std::mem::size_of::<Hist>() / 8)
    }
}

fn take_data(m: Map) -> Option<MapData> {
    match m {
        Map::Array(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuHashMap(d)
        | Map::HashMap(d)
        | Map::LruHashMap(d) => Some(d),
        _ => None,
    }
}

/// Per-interval difference of two cumulative histograms, into `out` (only non-empty buckets).
fn hist_delta(cur: &Hist, prev: &Hist, out: &mut LatencyRec) {
    let reset = cur.count < prev.count;
    let p = if reset { &Hist::ZERO } else { prev };
    out.count = cur.count - p.count;
    out.sum = cur.sum.wrapping_sub(p.sum);
    out.buckets.clear();
    for i in 0..HIST_BUCKETS {
        let d = cur.buckets[i].saturating_sub(p.buckets[i]);
        if d > 0 {
            out.buckets.push(BucketRec {
                index: i as u32,
                count: d,
            });
        }
    }
}

struct BlockDev {
    key: BlockHistKey,
    source: String,
    unit: &'static str,
    allowed: bool,
    prev: Hist,
    cur: Hist,
}

/// Loaded and attached probes.
pub struct Probes {
    // Programs stay attached while this lives; dropping it detaches them all.
    _ebpf: Ebpf,
    active: [bool; 5],
    counters: Option<PerCpu>,
    runq: Option<PerCpu>,
    block: Option<PerCpu>,
    ports: Option<PerCpu>,
    events: Option<RingBuf<MapData>>,
    prev_counters: [u64; counter::COUNT as usize],
    cur_counters: [u64; counter::COUNT as usize],
    runq_prev: Hist,
    runq_cur: Hist,
    devs: Vec<BlockDev>,
    dev_names: HashMap<(u32, u32), String>,
    proc_root: String,
    disk_filter: Filter,
    port_prev: HashMap<u32, u64>,
    pending_events: Vec<EventRec>,
    primed: bool,
    warned: u32,
}

fn index(probe: &str) -> usize {
    PROBE_NAMES.iter().position(|p| *p == probe).unwrap_or(0)
}

/// Loads the object and attaches the configured probes. Returns the probes (None when
/// nothing could be loaded) and the status of every probe either way.
/// /dev/kmsg, opened once while the sensor may still read it (reading it needs
/// CAP_SYSLOG under dmesg_restrict; the check is at open), read incrementally.
static KMSG: std::sync::Mutex<Option<std::fs::File>> = std::sync::Mutex::new(None);
static KMSG_OOM_LINES: std::sync::Mutex<std::collections::VecDeque<String>> =
    std::sync::Mutex::new(std::collections::VecDeque::new());

pub fn load(
    cfg: &ProbeConfig,
    proc_root: &str,
    disk_filter: Filter,
) -> (Option<Probes>, Vec<ProbeStatus>) {
    if cfg.wants("oom") {
        use std::os::unix::fs::OpenOptionsExt;
        *KMSG.lock().unwrap() = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .ok();
    }
    let mut status: Vec<ProbeStatus> = PROBE_NAMES
        .iter()
        .map(|n| ProbeStatus {
            name: n,
            state: if cfg.wants(n) { "refused" } else { "disabled" },
            reason: if cfg.wants(n) {
                String::new()
            } else if !cfg.enabled {
                "probes.enabled = false".into()
            } else {
                format!("probes.{n} = false")
            },
        })
        .collect();
    let fail_all = |status: &mut Vec<ProbeStatus>, why: String| {
        for s in status.iter_mut().filter(|s| s.state == "refused") {
            s.reason = why.clone();
        }
    };
    if !PROBE_NAMES.iter().any(|n| cfg.wants(n)) {
        return (None, status);
    }
    let owned;
    let bytes: &[u8] = match &cfg.object {
        Some(p) => match std::fs::read(p) {
            Ok(b) => {
                owned = b;
                &owned
            }
            Err(e) => {
                fail_all(
                    &mut status,
                    format!("cannot read eBPF object {}: {e}", p.display()),
                );
                return (None, status);
            }
        },
        None => EMBEDDED,
    };
    if bytes.is_empty() {
        fail_all(
            &mut status,
            "this sensor was built without its eBPF object (run `cargo xtask build-ebpf`, then rebuild the sensor)".into(),
        );
        return (None, status);
    }
    let Some(tracefs) = tracefs() else {
        fail_all(
            &mut status,
            "tracefs is not mounted at /sys/kernel/tracing and could not be mounted (needs CAP_SYS_ADMIN once)".into(),
        );
        return (None, status);
    };
    // Locked memory limits matter only on kernels before 5.11 (memcg accounting since).
    let rl = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rl) };
    // Where the GSO segment count sits behind an skb pointer on this kernel (from BTF), so
    // retransmits are counted in segments like /proc/net/snmp's RetransSegs.
    let btf = super::btf::Btf::from_sys();
    let gso_off: u32 = btf
        .as_ref()
        .and_then(|b| {
            Some(
                b.member_offset("sk_buff", "cb")?
                    + b.member_offset("tcp_skb_cb", "tcp_gso_segs")?,
            )
        })
        .map(|o| o as u32)
        .unwrap_or(0);
    // Where the pid sits in task_struct, for the run-queue raw tracepoints.
    let pid_off: u32 = btf
        .as_ref()
        .and_then(|b| b.member_offset("task_struct", "pid"))
        .map(|o| o as u32)
        .unwrap_or(0);
    drop(btf);
    if gso_off == 0 && cfg.wants("tcp") {
        tracing::info!("no kernel BTF for sk_buff/tcp_skb_cb: TCP retransmits are counted per skb, not per segment");
    }
    // The programs use no CO-RE relocations: skip loading the kernel's BTF into aya (it
    // would cost tens of MB of peak memory); offsets come from our small BTF index above.
    let mut ebpf = match EbpfLoader::new()
        .btf(None)
        .override_global("SKB_GSO_SEGS_OFF", &gso_off, true)
        .override_global("TASK_PID_OFF", &pid_off, true)
        .load(bytes)
    {
        Ok(e) => e,
        Err(e) => {
            let mut why = format!("loading the eBPF object failed: {e}");
            if matches!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::EPERM)
            ) || why.contains("Operation not permitted")
            {
                why.push_str(" (needs CAP_BPF and CAP_PERFMON, or root)");
            }
            fail_all(&mut status, why);
            return (None, status);
        }
    };
    let mut active = [false; 5];
    for (i, name) in PROBE_NAMES.iter().enumerate() {
        if !cfg.wants(name) {
            continue;
        }
        match attach_probe(&mut ebpf, tracefs, name, pid_off) {
            Ok(()) => {
                active[i] = true;
                status[i].state = "active";
            }
            Err(why) => status[i].reason = why,
        }
    }
    if !active.iter().any(|a| *a) {
        return (None, status);
    }
    let ncpu = aya::util::nr_cpus().unwrap_or(1);
    let mut take = |name: &str, vsize: usize| {
        ebpf.take_map(name)
            .and_then(take_data)
            .map(|d| PerCpu::new(d, vsize, ncpu))
    };
    let counters = take("COUNTERS", std::mem::size_of::<Counters>());
    let runq = take("RUNQ_HIST", std::mem::size_of::<Hist>());
    let block = take("BLOCK_HIST", std::mem::size_of::<Hist>());
    let ports = take("TCP_RETRANS_PORT", 8);
    let events = ebpf
        .take_map("EVENTS")
        .and_then(|m| RingBuf::try_from(m).ok());
    let probes = Probes {
        _ebpf: ebpf,
        active,
        counters,
        runq,
        block,
        ports,
        events,
        prev_counters: [0; counter::COUNT as usize],
        cur_counters: [0; counter::COUNT as usize],
        runq_prev: Hist::ZERO,
        runq_cur: Hist::ZERO,
        devs: Vec::new(),
        dev_names: HashMap::new(),
        proc_root: proc_root.to_string(),
        disk_filter,
        port_prev: HashMap::new(),
        pending_events: Vec::new(),
        primed: false,
        warned: 0,
    };
    (Some(probes), status)
}

fn attach_probe(
    ebpf: &mut Ebpf,
    tracefs: &str,
    probe: &str,
    task_pid_off: u32,
) -> Result<(), String> {
    let specs = probe_programs(probe);
    if specs.iter().any(|s| s.raw) && task_pid_off == 0 {
        return Err("no kernel BTF (/sys/kernel/btf/vmlinux) to locate task_struct.pid".into());
    }
    for s in specs {
        check_layout(tracefs, s)?;
    }
    let mut done: Vec<&str> = Vec::new();
    let mut result = Ok(());
    for s in specs {
        let r = (|| -> Result<(), String> {
            let p = ebpf
                .program_mut(s.prog)
                .ok_or_else(|| format!("program {} is missing from the eBPF object", s.prog))?;
            let refused = |e: aya::programs::ProgramError| {
                let mut m = format!("the kernel refused to load {}: {e}", s.prog);
                if format!("{e:?}").contains("EPERM") || m.contains("Operation not permitted") {
                    m.push_str(" (needs CAP_BPF and CAP_PERFMON, or root)");
                }
                m
            };
            if s.raw {
                let prog: &mut RawTracePoint = p
                    .try_into()
                    .map_err(|e| format!("program {}: {e}", s.prog))?;
                prog.load().map_err(refused)?;
                prog.attach(s.event)
                    .map_err(|e| format!("attaching to raw tracepoint {} failed: {e}", s.event))?;
            } else {
                let prog: &mut TracePoint = p
                    .try_into()
                    .map_err(|e| format!("program {}: {e}", s.prog))?;
                prog.load().map_err(refused)?;
                prog.attach(s.category, s.event)
                    .map_err(|e| format!("attaching to {}:{} failed: {e}", s.category, s.event))?;
            }
            Ok(())
        })();
        match r {
            Ok(()) => done.push(s.prog),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    if result.is_err() {
        // All or nothing per probe: detach what this probe already attached.
        for p in done {
            match ebpf.program_mut(p) {
                Some(aya::programs::Program::TracePoint(t)) => {
                    let _ = t.unload();
                }
                Some(aya::programs::Program::RawTracePoint(t)) => {
                    let _ = t.unload();
                }
                _ => {}
            }
        }
    }
    result
}

/// The active probe set, comma-separated in a fixed order (for the `hosts` table).
pub fn active_list(status: &[ProbeStatus]) -> String {
    status
        .iter()
        .filter(|s| s.state == "active")
        .map(|s| s.name)
        .collect::<Vec<_>>()
        .join(",")
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Probes {
    /// A cumulative counter as of the last collection (for tests and diagnostics).
    #[cfg(test)]
    pub fn counter(&self, idx: u32) -> u64 {
        self.cur_counters[idx as usize]
    }

    /// Per program: (name, runs, average ns per run), from the kernel's BPF statistics
    /// (counted only while `kernel.bpf_stats_enabled` is 1).
    pub fn program_costs(&self) -> Vec<(String, u64, f64)> {
        self._ebpf
            .programs()
            .filter_map(|(name, p)| {
                let info = p.info().ok()?;
                let runs = info.run_count();
                let ns = info.run_time().as_nanos() as f64;
                Some((
                    name.to_string(),
                    runs,
                    if runs > 0 { ns / runs as f64 } else { 0.0 },
                ))
            })
            .filter(|(_, runs, _)| *runs > 0)
            .collect()
    }

    /// The ring buffer's fd, readable when events are waiting.
    pub fn events_fd(&self) -> Option<RawFd> {
        self.events.as_ref().map(|r| r.as_raw_fd())
    }

    /// Moves waiting kernel events out of the ring buffer, resolving what the victim's
    /// /proc entry still tells (its cgroup) while it may still exist.
    pub fn drain_events(&mut self) {
        let Some(rb) = self.events.as_mut() else {
            return;
        };
        let (mono, wall) = (monotonic_ns(), wall_ms());
        while let Some(item) = rb.next() {
            if item.len() < std::mem::size_of::<Event>() || self.pending_events.len() >= 1024 {
                continue;
            }
            let e: Event = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Event) };
            if e.kind != event_kind::OOM_KILL {
                continue;
            }
            let comm_len = e.comm.iter().position(|b| *b == 0).unwrap_or(16);
            let comm = String::from_utf8_lossy(&e.comm[..comm_len]).into_owned();
            // The kernel log names the victim's memory cgroup and the OOM's constraint; by
            // the time we look, /proc/PID/cgroup of a dying task may already say "/".
            let (cgroup, constraint) = match oom_from_kmsg(e.pid) {
                Some((cg, c)) => (cg, c),
                None => (
                    std::fs::read_to_string(format!("{}/{}/cgroup", self.proc_root, e.pid))
                        .ok()
                        .map(|t| memory_cgroup(&t))
                        .unwrap_or_default(),
                    String::new(),
                ),
            };
            let age_ms = mono.saturating_sub(e.ts_ns) / 1_000_000;
            self.pending_events.push(EventRec {
                kind: "oom_kill".into(),
                ts_ms: wall.saturating_sub(age_ms),
                pid: e.pid,
                comm,
                cgroup,
                detail: format!(
                    "total_vm_kb={} anon_rss_kb={} file_rss_kb={} shmem_rss_kb={} uid={}{}{}",
                    e.args[0] * 4,
                    e.args[1] * 4,
                    e.args[2] * 4,
                    e.args[3] * 4,
                    e.uid,
                    if constraint.is_empty() {
                        ""
                    } else {
                        " constraint="
                    },
                    constraint
                ),
            });
        }
    }

    fn dev_name(&mut self, major: u32, minor: u32) -> Option<String> {
        if let Some(n) = self.dev_names.get(&(major, minor)) {
            return Some(n.clone());
        }
        // Unknown device: reread /proc/diskstats (happens once per new device).
        let text = std::fs::read_to_string(format!("{}/diskstats", self.proc_root)).ok()?;
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 3 {
                if let (Ok(ma), Ok(mi)) = (f[0].parse(), f[1].parse()) {
                    self.dev_names.insert((ma, mi), f[2].to_string());
                }
            }
        }
        self.dev_names.get(&(major, minor)).cloned()
    }

    fn warn(&mut self, what: &str, e: std::io::Error) {
        if self.warned < 10 {
            self.warned += 1;
            tracing::warn!(map = what, error = %e, "reading an eBPF map failed");
        }
    }

    /// Fills the snapshot's eBPF parts for the interval of `secs` (None on the first call,
    /// which only primes the cumulative values).
    pub fn collect(
        &mut self,
        secs: Option<f64>,
        probes: &mut Option<ProbeRec>,
        latency: &mut Vec<LatencyRec>,
        ports: &mut Vec<PortRec>,
        events: &mut Vec<EventRec>,
    ) {
        self.drain_events();
        events.clear();
        events.append(&mut self.pending_events);
        let mut nlat = 0;
        // Counters.
        if let Some(m) = self.counters.as_mut() {
            let key = 0u32;
            match m.sum_into(&key as *const u32 as *const u8, &mut self.cur_counters) {
                Ok(_) => {}
                Err(e) => self.warn("COUNTERS", e),
            }
        }
        let d = |i: u32, s: &Self| {
            s.cur_counters[i as usize].wrapping_sub(s.prev_counters[i as usize]) as f64
        };
        if let Some(secs) = secs.filter(|_| self.primed) {
            let rate = |i: u32| (d(i, self) / secs.max(1e-3)) as f32;
            let p = probes.get_or_insert_with(ProbeRec::default);
            *p = ProbeRec::default();
            if self.active[index("process")] {
                p.execs_per_s = rate(counter::EXECS);
                p.exits_per_s = rate(counter::EXITS);
                p.short_lived_per_s = rate(counter::SHORT_LIVED);
            }
            if self.active[index("tcp")] {
                p.retransmits_per_s = rate(counter::TCP_RETRANS);
                p.resets_sent_per_s = rate(counter::TCP_RST_SENT);
                p.resets_received_per_s = rate(counter::TCP_RST_RECV);
            }
            if self.active[index("oom")] {
                p.oom_kills = d(counter::OOM_KILLS, self) as u32;
            }
        }
        self.prev_counters = self.cur_counters;
        // Run-queue histogram.
        if let Some(m) = self.runq.as_mut() {
            let key = 0u32;
            match m.sum_into(
                &key as *const u32 as *const u8,
                hist_words(&mut self.runq_cur),
            ) {
                Ok(_) => {
                    if self.primed && secs.is_some() {
                        let rec = slot_lat(latency, nlat);
                        nlat += 1;
                        if rec.source != "runqueue" {
                            rec.source.clear();
                            rec.source.push_str("runqueue");
                        }
                        rec.unit.clear();
                        rec.unit.push_str("us");
                        hist_delta(&self.runq_cur, &self.runq_prev, rec);
                    }
                    self.runq_prev = self.runq_cur;
                }
                Err(e) => self.warn("RUNQ_HIST", e),
            }
        }
        // Block histograms: walk the keys; new devices are resolved once.
        if self.block.is_some() {
            let mut key = BlockHistKey { dev: 0, kind: 0 };
            let mut next = BlockHistKey { dev: 0, kind: 0 };
            let mut first = true;
            loop {
                let m = self.block.as_ref().unwrap();
                let prev_ptr = if first {
                    None
                } else {
                    Some(&key as *const BlockHistKey as *const u8)
                };
                match m.next_key(prev_ptr, &mut next as *mut BlockHistKey as *mut u8) {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        self.warn("BLOCK_HIST", e);
                        break;
                    }
                }
                first = false;
                key = next;
                let idx = match self.devs.iter().position(|d| d.key == key) {
                    Some(i) => i,
                    None => {
                        let (ma, mi) = dev_major_minor(key.dev);
                        let name = self
                            .dev_name(ma, mi)
                            .unwrap_or_else(|| format!("{ma}:{mi}"));
                        let allowed = self.disk_filter.allows(&name);
                        let (suffix, unit) = match key.kind {
                            block_kind::READ_LATENCY => ("read", "us"),
                            block_kind::WRITE_LATENCY => ("write", "us"),
                            block_kind::READ_SIZE => ("read_bytes", "bytes"),
                            _ => ("write_bytes", "bytes"),
                        };
                        self.devs.push(BlockDev {
                            key,
                            source: format!("disk:{name}:{suffix}"),
                            unit,
                            allowed,
                            prev: Hist::ZERO,
                            cur: Hist::ZERO,
                        });
                        self.devs.len() - 1
                    }
                };
                let m = self.block.as_mut().unwrap();
                let dev = &mut self.devs[idx];
                if let Ok(true) = m.sum_into(
                    &key as *const BlockHistKey as *const u8,
                    hist_words(&mut dev.cur),
                ) {
                    if dev.allowed
                        && secs.is_some()
                        && self.primed
                        && dev.cur.count != dev.prev.count
                    {
                        let rec = slot_lat(latency, nlat);
                        nlat += 1;
                        if rec.source != dev.source {
                            rec.source.clear();
                            rec.source.push_str(&dev.source);
                        }
                        rec.unit.clear();
                        rec.unit.push_str(dev.unit);
                        hist_delta(&dev.cur, &dev.prev, rec);
                    }
                    dev.prev = dev.cur;
                }
            }
        }
        latency.truncate(nlat);
        // Retransmits per remote port.
        let mut nports = 0;
        if let Some(m) = self.ports.as_mut() {
            let mut key = 0u32;
            let mut next = 0u32;
            let mut first = true;
            let mut val = [0u64; 1];
            let mut count = 0;
            loop {
                let prev_ptr = if first {
                    None
                } else {
                    Some(&key as *const u32 as *const u8)
                };
                match m.next_key(prev_ptr, &mut next as *mut u32 as *mut u8) {
                    Ok(true) => {}
                    _ => break,
                }
                first = false;
                key = next;
                count += 1;
                if let Ok(true) = m.sum_into(&key as *const u32 as *const u8, &mut val) {
                    let prev = self.port_prev.insert(key, val[0]).unwrap_or(0);
                    let dv = val[0].saturating_sub(prev);
                    if dv > 0 && self.primed && secs.is_some() {
                        if nports == ports.len() {
                            ports.push(PortRec::default());
                        }
                        ports[nports] = PortRec {
                            port: key,
                            retransmits: dv as u32,
                        };
                        nports += 1;
                    }
                }
            }
            // Keep the map well under its 1024 entries: clear it when it fills up.
            if count > 768 {
                let keys: Vec<u32> = self.port_prev.keys().copied().collect();
                for k in keys {
                    m.delete(&k as *const u32 as *const u8);
                }
                self.port_prev.clear();
            }
        }
        ports.truncate(nports);
        self.primed = true;
    }
}

fn slot_lat(v: &mut Vec<LatencyRec>, i: usize) -> &mut LatencyRec {
    if i == v.len() {
        v.push(LatencyRec::default());
    }
    &mut v[i]
}

/// Finds the kernel's `oom-kill:` summary line for `pid` in /dev/kmsg and returns
/// (task_memcg, constraint). Needs CAP_SYSLOG (or dmesg_restrict = 0); None otherwise.
fn oom_from_kmsg(pid: u32) -> Option<(String, String)> {
    use std::io::Read;
    let mut guard = KMSG.lock().unwrap();
    let f = guard.as_mut()?;
    let needle = format!(",pid={pid},");
    let mut seen = KMSG_OOM_LINES.lock().unwrap();
    let mut buf = vec![0u8; 8192];
    // Each read returns one record; EAGAIN at the end, EPIPE when a record was overwritten.
    for _ in 0..100_000 {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let rec = String::from_utf8_lossy(&buf[..n]);
                if let Some(line) = rec.split(';').nth(1) {
                    if line.starts_with("oom-kill:") {
                        if seen.len() >= 64 {
                            seen.pop_front();
                        }
                        seen.push_back(line.trim().to_string());
                    }
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break,
        }
    }
    // Lines read for an earlier event stay here, so a second kill right after is found too.
    let found = seen.iter().rev().find(|l| l.contains(&needle)).cloned();
    drop(seen);
    let line = found?;
    let field = |k: &str| {
        line.split(',')
            .find_map(|kv| kv.strip_prefix(k))
            .map(str::to_string)
    };
    let constraint = line
        .strip_prefix("oom-kill:constraint=")
        .and_then(|r| r.split(',').next())
        .unwrap_or("")
        .to_string();
    Some((field("task_memcg=")?, constraint))
}

/// The memory controller's path from /proc/PID/cgroup (v1), or the unified path (v2).
fn memory_cgroup(text: &str) -> String {
    let mut unified = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (parts.next(), parts.next(), parts.next());
        let (Some(ctrls), Some(path)) = (ctrls, path) else {
            continue;
        };
        if ctrls.split(',').any(|c| c == "memory") {
            return path.to_string();
        }
        if ctrls.is_empty() {
            unified = Some(path.to_string());
        }
    }
    unified.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tracefs_format() {
        let text = "name: sched_switch\nID: 316\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
                    \tfield:char prev_comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\tfield:pid_t prev_pid;\toffset:24;\tsize:4;\tsigned:1;\n\
                    \tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;\n\tfield:__data_loc char[] comm;\toffset:12;\tsize:4;\tsigned:0;\n";
        let f = parse_format(text);
        assert!(f.contains(&("common_type".into(), 0, 2)));
        assert!(f.contains(&("prev_comm".into(), 8, 16)));
        assert!(f.contains(&("prev_pid".into(), 24, 4)));
        assert!(f.contains(&("skbaddr".into(), 8, 8)));
        assert!(f.contains(&("comm".into(), 12, 4)));
    }

    #[test]
    fn histogram_delta_and_reset() {
        let mut prev = Hist::ZERO;
        prev.buckets[3] = 5;
        prev.count = 5;
        prev.sum = 20;
        let mut cur = prev;
        cur.buckets[3] = 7;
        cur.buckets[10] = 1;
        cur.count = 8;
        cur.sum = 20 + 8 + 700;
        let mut rec = LatencyRec::default();
        hist_delta(&cur, &prev, &mut rec);
        assert_eq!(rec.count, 3);
        assert_eq!(rec.sum, 708);
        assert_eq!(
            rec.buckets,
            vec![
                BucketRec { index: 3, count: 2 },
                BucketRec {
                    index: 10,
                    count: 1
                }
            ]
        );
        // A map that went backwards (reloaded) counts from zero.
        hist_delta(&prev, &cur, &mut rec);
        assert_eq!(rec.count, 5);
    }

    #[test]
    fn memory_cgroup_v1_and_v2() {
        let v1 = "12:pids:/user.slice\n5:memory:/sonde-test/oom\n0::/user.slice\n";
        assert_eq!(memory_cgroup(v1), "/sonde-test/oom");
        assert_eq!(
            memory_cgroup("0::/system.slice/x.service\n"),
            "/system.slice/x.service"
        );
    }

    #[test]
    fn this_kernel_matches_every_layout() {
        // Where tracefs is readable, every program's fields must match; otherwise the probe
        // would be refused at run time, which is what `sensor probes` reports.
        let Some(t) = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
            .into_iter()
            .find(|p| Path::new(p).join("events/sched").is_dir())
        else {
            eprintln!("SKIP: tracefs not mounted");
            return;
        };
        for p in PROBE_NAMES {
            for s in probe_programs(p) {
                check_layout(t, s).unwrap();
            }
        }
    }
}
