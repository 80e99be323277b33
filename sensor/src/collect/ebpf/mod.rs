//! eBPF probes: loads sonde's tracepoint programs (built by `cargo xtask build-ebpf` and
//! embedded in the binary), attaches the ones the configuration asks for, and every interval
//! turns their cumulative per-CPU maps into per-interval histograms and rates.
//!
//! Each probe is independent: if the kernel refuses one (missing tracepoint, a field layout
//! that differs from what the program was compiled for, no CAP_BPF/CAP_PERFMON, verifier
//! rejection) the reason is kept, logged once, and everything else keeps running.
//! Dropping [`Probes`] detaches every program and frees every map.
//!
//! One file per probe, next to its name and mirroring the sections of sensor-ebpf's
//! programs: `runqueue.rs`, `block.rs`, `tcp.rs`, `oom.rs`, `process.rs` (each with the
//! programs it attaches and its share of the collection); `cghists.rs` holds the
//! per-cgroup histograms the run-queue and block probes share; `maps.rs` reads the maps with
//! the raw `bpf(2)` syscall and buffers allocated once, so a steady-state collection
//! allocates nothing. This file loads, attaches and schedules them.

mod block;
mod cghists;
mod maps;
mod oom;
mod process;
mod runqueue;
mod tcp;
mod tracefs;

use tracefs::{check_layout, tracefs};

use crate::filter::Filter;
use aya::maps::{MapData, RingBuf};
use aya::programs::{BtfTracePoint, RawTracePoint, TracePoint};
use aya::{Ebpf, EbpfLoader};
use block::BlockDev;
use maps::{take_data, PerCpu};
use protocol::{CgroupLatencyRec, EventRec, LatencyRec, PortRec, ProbeRec};
use sensor_common::{counter, Counters, Hist};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};

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
    /// A BTF tracepoint (`tp_btf`: a raw tracepoint whose arguments the kernel types, so
    /// fields are read with plain loads); `raw` is then true too.
    btf: bool,
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
        btf: false,
        category,
        event,
        fields,
    }
}

const fn raw(prog: &'static str, category: &'static str, event: &'static str) -> ProgSpec {
    ProgSpec {
        prog,
        raw: true,
        btf: false,
        category,
        event,
        fields: &[],
    }
}

const fn tp_btf(prog: &'static str, category: &'static str, event: &'static str) -> ProgSpec {
    ProgSpec {
        btf: true,
        ..raw(prog, category, event)
    }
}

fn probe_programs(probe: &str) -> &'static [ProgSpec] {
    match probe {
        "runqueue" => runqueue::FALLBACK,
        "block" => block::PROGRAMS,
        "tcp" => tcp::PROGRAMS,
        "oom" => oom::PROGRAMS,
        "process" => process::PROGRAMS,
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
    /// Per-cgroup run-queue histograms (table `cgroup_latency`): rows per interval, the
    /// busiest cgroups by waits and the rest summed as `other`. 0 (the default) = the host
    /// histogram only: finding a task's cgroup (five dependent reads and a hash-map lookup
    /// per context switch) takes the probe's slowdown of a switch-bound workload from about
    /// 2.5 % to 4.3 % here.
    pub runqueue_cgroups: usize,
    /// Per-cgroup block I/O latency (table `cgroup_latency`, sources `block:read` and
    /// `block:write`, all devices): rows per interval per source, the busiest cgroups and
    /// `other`. 0 (the default) = per device only: the issue program then reads the request
    /// and its block cgroup (about a dozen kernel reads per I/O).
    pub block_cgroups: usize,
    /// Use the wakeup + switch programs for the run queue even where the kernel allows one
    /// program per switch (to compare the two; costs about twice as much).
    pub runqueue_fallback: bool,
    /// Use the raw-tracepoint programs (kernel reads through `bpf_probe_read_kernel`) even
    /// where BTF tracepoints (plain loads) would load: to compare the two.
    pub raw_tracepoints: bool,
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
            runqueue_cgroups: 0,
            block_cgroups: 0,
            runqueue_fallback: false,
            raw_tracepoints: false,
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
    /// Why it is not active; for an active probe, how it works when there is a choice.
    pub reason: String,
}

/// Loaded and attached probes.
pub struct Probes {
    // Programs stay attached while this lives; dropping it detaches them all.
    _ebpf: Ebpf,
    /// Every attached program and its link (for [`Probes::set_attached`]).
    links: Vec<(&'static ProgSpec, Option<Link>)>,
    active: [bool; 5],
    counters: Option<PerCpu>,
    runq: Option<PerCpu>,
    runq_cg: Option<cghists::CgHists>,
    block_cg: Option<cghists::CgHists>,
    block: Option<PerCpu>,
    ports: Option<PerCpu>,
    events: Option<RingBuf<MapData>>,
    prev_counters: [u64; counter::COUNT as usize],
    cur_counters: [u64; counter::COUNT as usize],
    runq_prev: Hist,
    runq_cur: Hist,
    devs: Vec<BlockDev>,
    new_devs: Vec<sensor_common::BlockHistKey>,
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
pub fn load(
    cfg: &ProbeConfig,
    proc_root: &str,
    disk_filter: Filter,
    cgroup_root: &str,
) -> (Option<Probes>, Vec<ProbeStatus>) {
    if cfg.wants("oom") {
        oom::open_kmsg();
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
    // The one-program run-queue design, when the kernel has what it reads; the cgroup
    // hierarchy its per-cgroup histograms name.
    let cg_roots = if cfg.runqueue_cgroups > 0 || cfg.block_cgroups > 0 {
        let mounts =
            std::fs::read_to_string(format!("{proc_root}/self/mounts")).unwrap_or_default();
        super::cgroup::Roots::from_mounts(&mounts, cgroup_root)
    } else {
        super::cgroup::Roots::default()
    };
    let rq_layout = btf
        .as_ref()
        .filter(|_| !cfg.runqueue_fallback)
        .and_then(|b| {
            // Per-cgroup run-queue histograms only when asked for (they cost per switch).
            let on = cfg.runqueue_cgroups > 0;
            runqueue::Layout::from_btf(
                b,
                cg_roots.cpu.as_deref().filter(|_| on),
                cg_roots.v2.as_deref().filter(|_| on),
            )
        });
    let blk_layout = btf
        .as_ref()
        .filter(|_| cfg.block_cgroups > 0)
        .and_then(|b| {
            block::Layout::from_btf(b, cg_roots.blkio.as_deref(), cg_roots.v2.as_deref())
        });
    let blk_done = btf.as_ref().and_then(block::Done::from_btf);
    if cfg.block_cgroups > 0 && blk_layout.is_none() && cfg.wants("block") {
        tracing::warn!("per-cgroup block latency needs the kernel's BTF with CONFIG_BLK_CGROUP and a blkio (v1) or cgroup2 hierarchy: per device only");
    }
    // Attach targets of the BTF tracepoints (typedef `btf_trace_<event>`), unless asked not to.
    let btf_ids: Vec<(&str, u32)> = btf
        .as_ref()
        .filter(|_| !cfg.raw_tracepoints)
        .map(|b| {
            let mut events: Vec<&str> = [
                runqueue::BTF,
                runqueue::BTF_CGROUP,
                block::BTF,
                block::BTF_CGROUP,
            ]
            .iter()
            .flat_map(|specs| specs.iter().map(|s| s.event))
            .collect();
            events.sort_unstable();
            events.dedup();
            events
                .into_iter()
                .filter_map(|e| Some((e, b.typedef_id(&format!("btf_trace_{e}"))?)))
                .collect()
        })
        .unwrap_or_default();
    drop(btf);
    let rq = rq_layout.clone().unwrap_or_default();
    let bl = blk_layout.clone().unwrap_or_default();
    // The request's offsets (a per-cgroup `Layout` holds the same `Done`).
    let bd = blk_done
        .clone()
        .or_else(|| blk_layout.as_ref().map(|l| l.req.clone()))
        .unwrap_or_default();
    // Shared by both programs' cgroup lookups (the same offsets when both are set).
    let cgroup_kn = rq.cgroup_kn.max(bl.cgroup_kn);
    let kn_id = rq.kn_id.max(bl.kn_id);
    if gso_off == 0 && cfg.wants("tcp") {
        tracing::info!("no kernel BTF for sk_buff/tcp_skb_cb: TCP retransmits are counted per skb, not per segment");
    }
    // The programs use no CO-RE relocations: aya is not handed the kernel's BTF, and with
    // `new_without_btf` (vendor/aya/PATCH.md) it does not parse it either (`new()` would:
    // 5.5 MB read plus the parsed types, the sensor's peak RSS); offsets come from our
    // small BTF index above.
    let mut ebpf = match EbpfLoader::new_without_btf()
        .override_global("SKB_GSO_SEGS_OFF", &gso_off, true)
        .override_global("TASK_PID_OFF", &pid_off, true)
        .override_global("TASK_LASTQ_OFF", &rq.lastq, true)
        .override_global("TASK_SE_CFSRQ_OFF", &rq.se_cfsrq, true)
        .override_global("CFSRQ_RQ_OFF", &rq.cfsrq_rq, true)
        .override_global("RQ_CLOCK_OFF", &rq.rq_clock, true)
        .override_global("RQ_CG_MODE", &rq.cg_mode, true)
        .override_global("TASK_CGROUPS_OFF", &rq.cgroups, true)
        .override_global("CSSSET_PTR_OFF", &rq.cssset_ptr, true)
        .override_global("CGROUP_KN_OFF", &cgroup_kn, true)
        .override_global("KN_ID_OFF", &kn_id, true)
        .override_global("RQ_SECTOR_OFF", &bl.sector, true)
        // The request's fields, which both block layouts read (a `Layout` holds a `Done`).
        .override_global("RQ_DATA_LEN_OFF", &bd.data_len, true)
        .override_global("RQ_CMD_FLAGS_OFF", &bd.cmd_flags, true)
        .override_global("RQ_Q_OFF", &bd.q, true)
        .override_global("Q_DISK_OFF", &bd.q_disk, true)
        .override_global("DISK_MAJOR_OFF", &bd.disk_major, true)
        .override_global("DISK_MINOR_OFF", &bd.disk_minor, true)
        .override_global("RQ_START_NS_OFF", &bd.start_ns, true)
        .override_global("RQ_BIO_OFF", &bl.bio, true)
        .override_global("BIO_BLKG_OFF", &bl.bio_blkg, true)
        .override_global("BLKG_BLKCG_OFF", &bl.blkg_blkcg, true)
        .override_global("BLKCG_CSS_OFF", &bl.blkcg_css, true)
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
    let mut links = Vec::new();
    let has_btf_id = |specs: &[ProgSpec]| {
        specs
            .iter()
            .all(|s| btf_ids.iter().any(|(e, _)| *e == s.event))
    };
    // Whether the one-program run queue and the per-cgroup block issue program are the
    // ones attached (each falls back to the basic programs if the kernel refuses it).
    let (mut single_on, mut blk_cg_on) = (false, false);
    for (i, name) in PROBE_NAMES.iter().enumerate() {
        if !cfg.wants(name) {
            continue;
        }
        // The probe's designs, best first: the first the kernel accepts is attached.
        let mut designs: Vec<(&'static [ProgSpec], &'static str)> = Vec::new();
        match *name {
            "runqueue" if rq_layout.is_some() => {
                let btf = if rq.cg_mode == 0 {
                    runqueue::BTF
                } else {
                    runqueue::BTF_CGROUP
                };
                if has_btf_id(btf) {
                    designs.push((btf, "btf"));
                }
                designs.push((runqueue::SINGLE, "single"));
            }
            "block" if blk_layout.is_some() => {
                if blk_done.is_some() && has_btf_id(block::BTF_CGROUP) {
                    designs.push((block::BTF_CGROUP, "btf-cgroup"));
                }
                designs.push((block::CGROUP, "cgroup"))
            }
            "block" if blk_done.is_some() && has_btf_id(block::BTF) => {
                designs.push((block::BTF, "btf"))
            }
            _ => {}
        }
        designs.push((probe_programs(name), "basic"));
        let mut chosen = "basic";
        let mut r = Err(String::new());
        for (k, (specs, label)) in designs.iter().enumerate() {
            r = attach_probe(&mut ebpf, tracefs, specs, pid_off, &btf_ids, &mut links);
            match &r {
                Ok(()) => {
                    chosen = label;
                    break;
                }
                Err(why) if k + 1 < designs.len() => {
                    tracing::warn!(probe = name, design = label, reason = %why, "the kernel refused this design of the probe; trying the next");
                }
                Err(_) => {}
            }
        }
        let single = *name == "runqueue" && matches!(chosen, "btf" | "single");
        let blk_cg = *name == "block" && matches!(chosen, "cgroup" | "btf-cgroup");
        single_on |= single;
        blk_cg_on |= blk_cg;
        match r {
            Ok(()) => {
                active[i] = true;
                status[i].state = "active";
                if *name == "runqueue" {
                    status[i].reason = if cfg.runqueue_fallback {
                        "wakeup and switch programs (probes.runqueue_fallback = true)".into()
                    } else if !single && rq_layout.is_some() {
                        "wakeup and switch programs (the kernel refused the one-program design: see the log)".into()
                    } else if !single {
                        "wakeup and switch programs (the kernel's BTF lacks sched_info, rq.clock or cfs_rq.rq)".into()
                    } else {
                        let kind = if chosen == "btf" {
                            "BTF tracepoint"
                        } else {
                            "raw tracepoint"
                        };
                        if rq.cg_mode == 0 {
                            format!("one program per switch (sched_info, {kind}); per-cgroup histograms off")
                        } else {
                            format!(
                                "one program per switch (sched_info, {kind}); per cgroup of {}",
                                rq.cg_root
                                    .as_deref()
                                    .unwrap_or(std::path::Path::new(""))
                                    .display()
                            )
                        }
                    };
                } else if *name == "block" {
                    status[i].reason = match chosen {
                        "btf" => "per device; one program per I/O at completion (request.start_time_ns, BTF tracepoint)".into(),
                        "btf-cgroup" => format!("per device, and per cgroup of {}; one program per I/O at completion (request.start_time_ns, BTF tracepoint)", bl.root.display()),
                        "cgroup" => format!("per device, and per cgroup of {}; issue and completion programs", bl.root.display()),
                        _ => "per device; issue and completion programs".into(),
                    };
                }
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
    let runq_cg = match (&rq.cg_root, active[index("runqueue")] && single_on) {
        (Some(root), true) if rq.cg_mode != 0 => take("RUNQ_CG_HIST", std::mem::size_of::<Hist>())
            .map(|m| cghists::CgHists::new(m, root.clone(), &["runqueue"], cfg.runqueue_cgroups)),
        _ => None,
    };
    let block_cg = if active[index("block")] && blk_cg_on {
        take("BLOCK_CG_HIST", std::mem::size_of::<Hist>()).map(|m| {
            cghists::CgHists::new(
                m,
                bl.root.clone(),
                &["block:read", "block:write"],
                cfg.block_cgroups,
            )
        })
    } else {
        None
    };
    let block = take(
        "BLOCK_DEVS",
        std::mem::size_of::<sensor_common::BlockDevHists>(),
    );
    let ports = take("TCP_RETRANS_PORT", 8);
    let events = ebpf
        .take_map("EVENTS")
        .and_then(|m| RingBuf::try_from(m).ok());
    let probes = Probes {
        _ebpf: ebpf,
        links,
        active,
        counters,
        runq,
        runq_cg,
        block_cg,
        block,
        ports,
        events,
        prev_counters: [0; counter::COUNT as usize],
        cur_counters: [0; counter::COUNT as usize],
        runq_prev: Hist::ZERO,
        runq_cur: Hist::ZERO,
        devs: Vec::new(),
        new_devs: Vec::new(),
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
    specs: &'static [ProgSpec],
    task_pid_off: u32,
    btf_ids: &[(&str, u32)],
    links: &mut Vec<(&'static ProgSpec, Option<Link>)>,
) -> Result<(), String> {
    if specs.iter().any(|s| s.raw) && task_pid_off == 0 {
        return Err("no kernel BTF (/sys/kernel/btf/vmlinux) to locate task_struct.pid".into());
    }
    for s in specs {
        check_layout(tracefs, s)?;
    }
    let mut done: Vec<&str> = Vec::new();
    let mut result = Ok(());
    let mut new_links = Vec::new();
    for s in specs {
        let r = (|| -> Result<Link, String> {
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
            let wrong = |e| format!("program {}: {e}", s.prog);
            if s.btf {
                let id = btf_ids
                    .iter()
                    .find(|(e, _)| *e == s.event)
                    .map(|(_, id)| *id)
                    .ok_or_else(|| format!("no BTF type btf_trace_{} in the kernel", s.event))?;
                let prog: &mut BtfTracePoint = p.try_into().map_err(wrong)?;
                prog.load_with_btf_id(id).map_err(refused)?;
            } else if s.raw {
                let prog: &mut RawTracePoint = p.try_into().map_err(wrong)?;
                prog.load().map_err(refused)?;
            } else {
                let prog: &mut TracePoint = p.try_into().map_err(wrong)?;
                prog.load().map_err(refused)?;
            }
            attach_one(ebpf, s)
        })();
        match r {
            Ok(link) => {
                done.push(s.prog);
                new_links.push((s, Some(link)));
            }
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
                Some(aya::programs::Program::BtfTracePoint(t)) => {
                    let _ = t.unload();
                }
                _ => {}
            }
        }
    } else {
        links.extend(new_links);
    }
    result
}

/// An attached program's link.
enum Link {
    Record(aya::programs::trace_point::TracePointLinkId),
    Raw(aya::programs::raw_trace_point::RawTracePointLinkId),
    Btf(aya::programs::tp_btf::BtfTracePointLinkId),
}

/// Attaches an already loaded program.
fn attach_one(ebpf: &mut Ebpf, s: &ProgSpec) -> Result<Link, String> {
    let p = ebpf
        .program_mut(s.prog)
        .ok_or_else(|| format!("program {} is missing from the eBPF object", s.prog))?;
    let failed = |e: aya::programs::ProgramError| {
        format!(
            "attaching {} to {}:{} failed: {e}",
            s.prog, s.category, s.event
        )
    };
    Ok(match p {
        aya::programs::Program::BtfTracePoint(t) => Link::Btf(t.attach().map_err(failed)?),
        aya::programs::Program::RawTracePoint(t) => Link::Raw(t.attach(s.event).map_err(failed)?),
        aya::programs::Program::TracePoint(t) => {
            Link::Record(t.attach(s.category, s.event).map_err(failed)?)
        }
        _ => return Err(format!("program {} has an unexpected type", s.prog)),
    })
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

    /// Cgroups the per-cgroup block histograms hold state for (tests).
    #[cfg(test)]
    pub fn block_cgroups_tracked(&self) -> Vec<String> {
        self.block_cg
            .as_ref()
            .map(|c| c.tracked())
            .unwrap_or_default()
    }

    /// Cgroups the per-cgroup run-queue histograms hold state for (tests).
    #[cfg(test)]
    pub fn runq_cgroups_tracked(&self) -> Vec<String> {
        self.runq_cg
            .as_ref()
            .map(|c| c.tracked())
            .unwrap_or_default()
    }

    /// Per program: (name, runs, average ns per run), from the kernel's BPF statistics
    /// (counted only while `kernel.bpf_stats_enabled` is 1).
    /// Detaches every attached program (`false`) or attaches them again (`true`), keeping
    /// them loaded and their maps as they are: for measuring what the probes cost
    /// (`sensor probes --overhead`).
    pub fn set_attached(&mut self, on: bool) -> Result<(), String> {
        for (s, link) in self.links.iter_mut() {
            match (on, link.take()) {
                (true, None) => *link = Some(attach_one(&mut self._ebpf, s)?),
                (true, Some(l)) => *link = Some(l),
                (false, Some(l)) => {
                    let r = match (self._ebpf.program_mut(s.prog), l) {
                        (Some(aya::programs::Program::BtfTracePoint(t)), Link::Btf(id)) => {
                            t.detach(id)
                        }
                        (Some(aya::programs::Program::RawTracePoint(t)), Link::Raw(id)) => {
                            t.detach(id)
                        }
                        (Some(aya::programs::Program::TracePoint(t)), Link::Record(id)) => {
                            t.detach(id)
                        }
                        _ => Ok(()),
                    };
                    r.map_err(|e| format!("detaching {}: {e}", s.prog))?;
                }
                (false, None) => {}
            }
        }
        Ok(())
    }

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
        cg_latency: &mut Vec<CgroupLatencyRec>,
    ) {
        self.drain_events();
        events.clear();
        cg_latency.clear();
        events.append(&mut self.pending_events);
        // Per-host counters (one map shared by the tcp, oom and process probes).
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
                process::counters(p, rate);
            }
            if self.active[index("tcp")] {
                tcp::counters(p, rate);
            }
            if self.active[index("oom")] {
                oom::counters(p, |i| d(i, self));
            }
        }
        self.prev_counters = self.cur_counters;
        let mut nlat = 0;
        self.collect_runqueue(secs, latency, &mut nlat, cg_latency);
        self.collect_block(secs, latency, &mut nlat, cg_latency);
        latency.truncate(nlat);
        self.collect_ports(secs, ports);
        self.primed = true;
    }
}
