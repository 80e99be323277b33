//! sonde's eBPF programs. Tracepoints only (this project's target kernels lack fentry and
//! kprobe events). Field offsets are the stable tracepoint layouts; the sensor checks each
//! one against tracefs's `format` file before attaching and refuses a probe whose layout
//! differs, so a wrong offset can never produce wrong numbers.
//!
//! Hot-path rules: per-CPU maps for every counter and histogram (no atomics, no locks);
//! the run-queue wakeup table is a plain array indexed by pid with a single 8-byte store
//! per event; nothing here loops.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes},
    macros::{btf_tracepoint, map, raw_tracepoint, tracepoint},
    maps::{Array, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
    EbpfContext,
};
use sensor_common::{
    block_dev_slot, block_kind, block_slot, counter, event_kind, log2_bucket, rq_cg_mode,
    BlockDevHists, BlockSlot, CgKey, Counters, Event, Hist, BLOCK_CGROUPS_MAX, BLOCK_DEV_SLOTS,
    BLOCK_INFLIGHT_SLOTS, RUNQ_CGROUPS_MAX, RUNQ_CG_OTHER, RUNQ_TABLE, RUNQ_TABLE_BITS,
    RUNQ_TS_BITS, RUNQ_TS_MASK,
};

#[map]
static COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(1, 0);
#[map]
static RUNQ_HIST: PerCpuArray<Hist> = PerCpuArray::with_max_entries(1, 0);
#[map]
static RUNQ_WAKE: Array<u64> = Array::with_max_entries(RUNQ_TABLE, 0);
#[map]
static RUNQ_CG_HIST: PerCpuHashMap<CgKey, Hist> = PerCpuHashMap::with_max_entries(RUNQ_CGROUPS_MAX, 0);
#[map]
static BLOCK_CG_HIST: PerCpuHashMap<CgKey, Hist> =
    PerCpuHashMap::with_max_entries(BLOCK_CGROUPS_MAX, 0);
/// This CPU's `struct rq` (found once per CPU through the switching-out task).
#[map]
static RUNQ_RQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
#[map]
static BLOCK_INFLIGHT: Array<BlockSlot> = Array::with_max_entries(BLOCK_INFLIGHT_SLOTS, 0);
#[map]
static BLOCK_DEVS: PerCpuArray<BlockDevHists> = PerCpuArray::with_max_entries(BLOCK_DEV_SLOTS, 0);
#[map]
static TCP_RETRANS_PORT: PerCpuHashMap<u32, u64> = PerCpuHashMap::with_max_entries(1024, 0);
#[map]
static PROC_START: LruHashMap<u32, u64> = LruHashMap::with_max_entries(32768, 0);
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

/// Offset of the GSO segment count (`TCP_SKB_CB(skb)->tcp_gso_segs`) inside `struct sk_buff`,
/// found in the kernel's BTF by the sensor and set at load time; 0 = unknown (count skbs).
#[unsafe(no_mangle)]
static SKB_GSO_SEGS_OFF: u32 = 0;

/// Zeroed histogram to seed new per-device entries (lives in .rodata, not on the stack).
static ZERO_HIST: Hist = Hist::ZERO;

/// Reads a field of the tracepoint record at a constant offset.
#[inline(always)]
fn field<T: Copy>(ctx: &TracePointContext, off: usize) -> T {
    unsafe { core::ptr::read_unaligned(ctx.as_ptr().add(off) as *const T) }
}

#[inline(always)]
fn bump(idx: u32, by: u64) {
    if let Some(p) = COUNTERS.get_ptr_mut(0) {
        unsafe { (*p).v[(idx & (counter::COUNT - 1)) as usize] += by };
    }
}

#[inline(always)]
fn hist_add(h: *mut Hist, v: u64) {
    let b = (log2_bucket(v) & 31) as usize;
    unsafe {
        (*h).buckets[b] += 1;
        (*h).sum += v;
        (*h).count += 1;
    }
}

// ---- run-queue latency: wakeup (or preemption) -> switched in -----------------------------

#[inline(always)]
fn record_wake(pid: u32, now_us: u64) {
    if pid == 0 {
        return;
    }
    let v = (((pid >> RUNQ_TABLE_BITS) as u64) << RUNQ_TS_BITS) | (now_us & RUNQ_TS_MASK);
    if let Some(p) = RUNQ_WAKE.get_ptr_mut(pid & (RUNQ_TABLE - 1)) {
        unsafe { core::ptr::write_volatile(p, v) };
    }
}

/// Offset of `pid` in `struct task_struct`, from the kernel's BTF (set by the sensor at load).
#[unsafe(no_mangle)]
static TASK_PID_OFF: u32 = 0;

#[inline(always)]
fn task_pid(task: *const u8) -> u32 {
    let off = unsafe { core::ptr::read_volatile(&TASK_PID_OFF) } as usize;
    if off == 0 || task.is_null() {
        return 0;
    }
    unsafe { bpf_probe_read_kernel(task.add(off) as *const u32) }.unwrap_or(0)
}

// Raw tracepoints: the kernel hands over its arguments directly, without formatting the
// trace record (two comm copies per sched_switch), which is what the scheduler hot path needs.

#[raw_tracepoint(tracepoint = "sched_wakeup")]
pub fn rq_wakeup(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct task_struct *p)
    let p: *const u8 = ctx.arg(0);
    record_wake(task_pid(p), unsafe { bpf_ktime_get_ns() } / 1000);
    0
}

#[raw_tracepoint(tracepoint = "sched_wakeup_new")]
pub fn rq_wakeup_new(ctx: RawTracePointContext) -> i32 {
    let p: *const u8 = ctx.arg(0);
    record_wake(task_pid(p), unsafe { bpf_ktime_get_ns() } / 1000);
    0
}

#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn rq_switch(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next,
    //          unsigned int prev_state)
    let now_us = unsafe { bpf_ktime_get_ns() } / 1000;
    let preempt: u64 = ctx.arg(0);
    let prev_state: u64 = ctx.arg(3);
    if preempt & 1 != 0 || prev_state & 0xff == 0 {
        // Still runnable (preempted or yielding): it waits in the run queue from now.
        let prev: *const u8 = ctx.arg(1);
        record_wake(task_pid(prev), now_us);
    }
    let next = task_pid(ctx.arg(2));
    if next == 0 {
        return 0;
    }
    let Some(slot) = RUNQ_WAKE.get_ptr_mut(next & (RUNQ_TABLE - 1)) else {
        return 0;
    };
    let v = unsafe { core::ptr::read_volatile(slot) };
    if v == 0 || (v >> RUNQ_TS_BITS) != (next >> RUNQ_TABLE_BITS) as u64 {
        return 0;
    }
    unsafe { core::ptr::write_volatile(slot, 0) };
    let delta = now_us.wrapping_sub(v) & RUNQ_TS_MASK;
    if let Some(h) = RUNQ_HIST.get_ptr_mut(0) {
        hist_add(h, delta);
    }
    0
}

// ---- run-queue latency, one program per switch: the kernel's own sched_info ---------------
//
// With CONFIG_SCHED_INFO (schedstats or delay accounting built in; always on at run time
// since 5.14) the scheduler stamps `task->sched_info.last_queued` with its run-queue clock
// when a task is queued (woken, or preempted while runnable) and, in `context_switch()`,
// after the `sched_switch` tracepoint, adds `rq->clock - last_queued` to the task's
// `run_delay` and clears the stamp. At the tracepoint the stamp of `next` is still there and
// `rq->clock` was updated by `__schedule()`, so this program computes the very wait the
// kernel is about to account, with no wakeup program and no table of its own. Offsets come
// from the kernel's BTF through the sensor; any missing one and the sensor attaches the three
// programs above instead.

#[unsafe(no_mangle)]
static TASK_LASTQ_OFF: u32 = 0;
#[unsafe(no_mangle)]
static TASK_SE_CFSRQ_OFF: u32 = 0;
#[unsafe(no_mangle)]
static CFSRQ_RQ_OFF: u32 = 0;
#[unsafe(no_mangle)]
static RQ_CLOCK_OFF: u32 = 0;
/// `rq_cg_mode`: which cgroup a wait is attributed to (0 = none).
#[unsafe(no_mangle)]
static RQ_CG_MODE: u32 = 0;
#[unsafe(no_mangle)]
static TASK_CGROUPS_OFF: u32 = 0;
/// Offset in `struct css_set` of the pointer to follow: `subsys[i]` (v1) or `dfl_cgrp` (v2).
#[unsafe(no_mangle)]
static CSSSET_PTR_OFF: u32 = 0;
#[unsafe(no_mangle)]
static CGROUP_KN_OFF: u32 = 0;
#[unsafe(no_mangle)]
static KN_ID_OFF: u32 = 0;

#[inline(always)]
fn kread<T: Copy + Default>(base: u64, off: u32) -> T {
    if base == 0 {
        return T::default();
    }
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) }.unwrap_or_default()
}

#[inline(always)]
fn global(v: &u32) -> u32 {
    unsafe { core::ptr::read_volatile(v) }
}

/// The cgroup id (kernfs node id = the directory's inode number) of a task, per `RQ_CG_MODE`.
#[inline(always)]
fn task_cgroup_id(task: u64, mode: u32) -> u64 {
    let cset: u64 = kread(task, global(&TASK_CGROUPS_OFF));
    let mut cg: u64 = kread(cset, global(&CSSSET_PTR_OFF));
    if mode == rq_cg_mode::V1_CSS {
        // css->cgroup is the first member of struct cgroup_subsys_state.
        cg = kread(cg, 0);
    }
    let kn: u64 = kread(cg, global(&CGROUP_KN_OFF));
    kread(kn, global(&KN_ID_OFF))
}

/// The per-CPU histogram of (cgroup `id`, `kind`) in `map`, created when new; when the map
/// is full, the "other" entry (id 0).
#[inline(always)]
fn cg_hist(map: &PerCpuHashMap<CgKey, Hist>, id: u64, kind: u64) -> Option<*mut Hist> {
    let key = CgKey { id, kind };
    if let Some(h) = map.get_ptr_mut(&key) {
        return Some(h);
    }
    // BPF_NOEXIST: another CPU may have created it meanwhile.
    let _ = map.insert(&key, &ZERO_HIST, 1);
    if let Some(h) = map.get_ptr_mut(&key) {
        return Some(h);
    }
    let other = CgKey {
        id: RUNQ_CG_OTHER,
        kind,
    };
    let _ = map.insert(&other, &ZERO_HIST, 1);
    map.get_ptr_mut(&other)
}

#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn rq_switch_si(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next, ...)
    let next: u64 = ctx.arg(2);
    let queued: u64 = kread(next, global(&TASK_LASTQ_OFF));
    if queued == 0 {
        return 0; // the idle task, or a task that was not queued (never happens otherwise)
    }
    let Some(slot) = RUNQ_RQ.get_ptr_mut(0) else {
        return 0;
    };
    let mut rq = unsafe { *slot };
    if rq == 0 {
        let prev: u64 = ctx.arg(1);
        let cfs: u64 = kread(prev, global(&TASK_SE_CFSRQ_OFF));
        rq = kread(cfs, global(&CFSRQ_RQ_OFF));
        unsafe { *slot = rq };
    }
    let clock: u64 = kread(rq, global(&RQ_CLOCK_OFF));
    if clock == 0 {
        return 0;
    }
    // A task queued on another CPU carries that CPU's clock: never negative.
    let wait_us = clock.saturating_sub(queued) / 1000;
    if let Some(h) = RUNQ_HIST.get_ptr_mut(0) {
        hist_add(h, wait_us);
    }
    let mode = global(&RQ_CG_MODE);
    if mode == rq_cg_mode::OFF {
        return 0;
    }
    let id = task_cgroup_id(next, mode);
    let Some(h) = cg_hist(&RUNQ_CG_HIST, id, 0) else {
        return 0;
    };
    hist_add(h, wait_us);
    0
}

// The same program as a BTF tracepoint (`tp_btf`): the kernel types the arguments, so the
// fields are plain loads the JIT turns into single instructions (fault-safe) instead of one
// `bpf_probe_read_kernel` call each. The offsets are the same `.rodata` globals, which the
// verifier reads as constants (the loader freezes `.rodata`), so every load is checked
// against the kernel's own layout at load time. Needs the kernel's BTF and the typedef
// `btf_trace_sched_switch`; the sensor falls back to `rq_switch_si` when refused.

/// A plain load `*(base + off)` (the verifier turns it into a fault-safe load).
#[inline(always)]
fn load<T: Copy>(base: u64, off: u32) -> T {
    unsafe { core::ptr::read_volatile((base + off as u64) as *const T) }
}

/// A pointer field `*(base + off)`, `None` when null (plain load, as [`load`]).
#[inline(always)]
fn load_ptr(base: u64, off: u32) -> Option<u64> {
    let p: u64 = load(base, off);
    (p != 0).then_some(p)
}

#[btf_tracepoint(function = "sched_switch")]
pub fn rq_switch_btf(ctx: BtfTracePointContext) -> i32 {
    rq_switch_plain(ctx, false)
}

/// The same with per-cgroup histograms: the task's cgroup found with plain loads too.
#[btf_tracepoint(function = "sched_switch")]
pub fn rq_switch_cg_btf(ctx: BtfTracePointContext) -> i32 {
    rq_switch_plain(ctx, true)
}

#[inline(always)]
fn rq_switch_plain(ctx: BtfTracePointContext, with_cgroup: bool) -> i32 {
    // TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next, ...)
    let next: u64 = ctx.arg(2);
    let queued: u64 = load(next, global(&TASK_LASTQ_OFF));
    if queued == 0 {
        return 0;
    }
    let prev: u64 = ctx.arg(1);
    let Some(rq) = load_ptr(prev, global(&TASK_SE_CFSRQ_OFF))
        .and_then(|cfs| load_ptr(cfs, global(&CFSRQ_RQ_OFF)))
    else {
        return 0;
    };
    let clock: u64 = load(rq, global(&RQ_CLOCK_OFF));
    let wait_us = clock.saturating_sub(queued) / 1000;
    if let Some(h) = RUNQ_HIST.get_ptr_mut(0) {
        hist_add(h, wait_us);
    }
    if !with_cgroup {
        return 0;
    }
    let mode = global(&RQ_CG_MODE);
    if mode == rq_cg_mode::OFF {
        return 0;
    }
    let id = task_cgroup_id_plain(next, mode).unwrap_or(0);
    if let Some(h) = cg_hist(&RUNQ_CG_HIST, id, 0) {
        hist_add(h, wait_us);
    }
    0
}

/// [`task_cgroup_id`] with plain loads (BTF tracepoints only); `None` where a pointer on
/// the way is null.
#[inline(always)]
fn task_cgroup_id_plain(task: u64, mode: u32) -> Option<u64> {
    let cset = load_ptr(task, global(&TASK_CGROUPS_OFF))?;
    let mut cg = load_ptr(cset, global(&CSSSET_PTR_OFF))?;
    if mode == rq_cg_mode::V1_CSS {
        // css->cgroup is the first member of struct cgroup_subsys_state.
        cg = load_ptr(cg, 0)?;
    }
    let kn = load_ptr(cg, global(&CGROUP_KN_OFF))?;
    Some(load(kn, global(&KN_ID_OFF)))
}

// ---- block I/O: issue -> complete, per device, read/write ----------------------------------

#[inline(always)]
fn block_op(rwbs: [u8; 4]) -> Option<u32> {
    // rwbs: optional 'F' (preflush), then R/W/D/N, then flags. Discards and pure flushes are
    // not counted (diskstats counts them separately too).
    let c = if rwbs[0] == b'F' { rwbs[1] } else { rwbs[0] };
    match c {
        b'R' => Some(0),
        b'W' => Some(1),
        _ => None,
    }
}

// No hash map on this path: array slots found by a hash of (device, sector), two per request
// and two per device, are plain loads the verifier inlines (a hash map costs a helper call,
// a bucket lock and, on insert, a free-list pop per I/O).

/// A slot left by a request whose completion never came (requeued and dropped, say) is
/// free again after this long.
const BLOCK_STALE_NS: u64 = 30_000_000_000;

#[inline(always)]
fn block_issue(dev: u32, sector: u64, bytes: u32, op: u32, cgroup: u64) {
    let now = unsafe { bpf_ktime_get_ns() };
    let first = block_slot(dev, sector);
    for i in [first, first | 1] {
        let Some(s) = BLOCK_INFLIGHT.get_ptr_mut(i) else {
            return;
        };
        unsafe {
            let free = (*s).ts_ns == 0
                || ((*s).dev == dev && (*s).sector == sector)
                || now.wrapping_sub((*s).ts_ns) > BLOCK_STALE_NS;
            if free {
                (*s).sector = sector;
                (*s).dev = dev;
                (*s).bytes = bytes;
                (*s).op = op;
                (*s).cgroup = cgroup;
                (*s).ts_ns = now;
                return;
            }
        }
    }
    // Both slots hold other requests in flight: this one will count as unmatched.
}

#[tracepoint(category = "block", name = "block_rq_issue")]
pub fn block_rq_issue(ctx: TracePointContext) -> u32 {
    // dev 8, sector 16, bytes 28, rwbs 34
    let Some(op) = block_op(field(&ctx, 34)) else {
        return 0;
    };
    block_issue(field(&ctx, 8), field(&ctx, 16), field(&ctx, 28), op, 0);
    0
}

// Per-cgroup block latency: the same issue program on the raw tracepoint, which hands over
// the request itself, so the request's block cgroup (`rq->bio->bi_blkg->blkcg`, the cgroup
// the I/O is charged to, writeback included) can be read. Fields at BTF offsets set by the
// sensor; attached instead of `block_rq_issue` when `[probes] block_cgroups` is on.

#[unsafe(no_mangle)]
static RQ_SECTOR_OFF: u32 = 0;
#[unsafe(no_mangle)]
static RQ_DATA_LEN_OFF: u32 = 0;
#[unsafe(no_mangle)]
static RQ_CMD_FLAGS_OFF: u32 = 0;
#[unsafe(no_mangle)]
static RQ_Q_OFF: u32 = 0;
#[unsafe(no_mangle)]
static Q_DISK_OFF: u32 = 0;
#[unsafe(no_mangle)]
static DISK_MAJOR_OFF: u32 = 0;
#[unsafe(no_mangle)]
static DISK_MINOR_OFF: u32 = 0;
#[unsafe(no_mangle)]
static RQ_BIO_OFF: u32 = 0;
#[unsafe(no_mangle)]
static BIO_BLKG_OFF: u32 = 0;
#[unsafe(no_mangle)]
static BLKG_BLKCG_OFF: u32 = 0;
/// Offset of `css` in `struct blkcg` (its `cgroup` pointer is the first member of the css).
#[unsafe(no_mangle)]
static BLKCG_CSS_OFF: u32 = 0;

#[raw_tracepoint(tracepoint = "block_rq_issue")]
pub fn block_rq_issue_cg(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct request *rq)
    let rq: u64 = ctx.arg(0);
    let flags: u32 = kread(rq, global(&RQ_CMD_FLAGS_OFF));
    // REQ_OP_READ 0, REQ_OP_WRITE 1 (the tracepoint's rwbs R and W); the rest not counted.
    let op = flags & 0xff;
    if op > 1 {
        return 0;
    }
    let q: u64 = kread(rq, global(&RQ_Q_OFF));
    let disk: u64 = kread(q, global(&Q_DISK_OFF));
    if disk == 0 {
        return 0;
    }
    let major: i32 = kread(disk, global(&DISK_MAJOR_OFF));
    let minor: i32 = kread(disk, global(&DISK_MINOR_OFF));
    let dev = ((major as u32) << 20) | (minor as u32 & 0xf_ffff);
    let bio: u64 = kread(rq, global(&RQ_BIO_OFF));
    let blkg: u64 = kread(bio, global(&BIO_BLKG_OFF));
    let blkcg: u64 = kread(blkg, global(&BLKG_BLKCG_OFF));
    let cgroup = if blkcg == 0 {
        0
    } else {
        let cg: u64 = kread(blkcg + global(&BLKCG_CSS_OFF) as u64, 0);
        let kn: u64 = kread(cg, global(&CGROUP_KN_OFF));
        kread(kn, global(&KN_ID_OFF))
    };
    block_issue(
        dev,
        kread(rq, global(&RQ_SECTOR_OFF)),
        kread(rq, global(&RQ_DATA_LEN_OFF)),
        op,
        cgroup,
    );
    0
}

#[inline(always)]
fn block_dev(dev: u32) -> Option<*mut BlockDevHists> {
    let first = block_dev_slot(dev);
    for i in [first, first | 1] {
        let e = BLOCK_DEVS.get_ptr_mut(i)?;
        unsafe {
            if (*e).dev == dev {
                return Some(e);
            }
            if (*e).dev == 0 {
                // Per-CPU: no other CPU writes this copy.
                (*e).dev = dev;
                return Some(e);
            }
        }
    }
    None
}

#[tracepoint(category = "block", name = "block_rq_complete")]
pub fn block_rq_complete(ctx: TracePointContext) -> u32 {
    // dev 8, sector 16
    let dev: u32 = field(&ctx, 8);
    let sector: u64 = field(&ctx, 16);
    let first = block_slot(dev, sector);
    let mut found: Option<(u64, u32, u32, u64)> = None;
    for i in [first, first | 1] {
        let Some(s) = BLOCK_INFLIGHT.get_ptr_mut(i) else {
            return 0;
        };
        unsafe {
            if (*s).ts_ns != 0 && (*s).dev == dev && (*s).sector == sector {
                found = Some(((*s).ts_ns, (*s).bytes, (*s).op, (*s).cgroup));
                (*s).ts_ns = 0;
                break;
            }
        }
    }
    let Some((ts, bytes, op, cgroup)) = found else {
        bump(counter::BLOCK_UNMATCHED, 1);
        return 0;
    };
    let lat_us = (unsafe { bpf_ktime_get_ns() }.wrapping_sub(ts)) / 1000;
    block_account(dev, op, lat_us, bytes, cgroup);
    0
}

/// Adds one completed I/O to its device's histograms (and its cgroup's, when known).
#[inline(always)]
fn block_account(dev: u32, op: u32, lat_us: u64, bytes: u32, cgroup: u64) {
    let (lat_kind, size_kind) = if op == 0 {
        (block_kind::READ_LATENCY, block_kind::READ_SIZE)
    } else {
        (block_kind::WRITE_LATENCY, block_kind::WRITE_SIZE)
    };
    let Some(e) = block_dev(dev) else {
        bump(counter::BLOCK_DEVS_FULL, 1);
        return;
    };
    unsafe {
        hist_add(&mut (*e).hists[(lat_kind & 3) as usize], lat_us);
        hist_add(&mut (*e).hists[(size_kind & 3) as usize], bytes as u64);
    }
    if cgroup != 0 {
        if let Some(h) = cg_hist(&BLOCK_CG_HIST, cgroup, (op & 1) as u64) {
            hist_add(h, lat_us);
        }
    }
}

// One program per I/O: at completion, as a BTF tracepoint. The kernel stamps each request
// with `start_time_ns` when it is created from a bio (`blk_account_io_start`, whenever the
// queue keeps I/O statistics, i.e. `queue/iostats` = 1) and /proc/diskstats adds
// `now - start_time_ns` to its read/write ticks at completion: this program records that same
// interval, so no issue program and no table of requests in flight are needed. A request
// without the stamp (iostats off: diskstats does not count it either) is counted as
// unmatched. Offsets from the kernel's BTF through the sensor; refused → the two programs
// above.

#[unsafe(no_mangle)]
static RQ_START_NS_OFF: u32 = 0;

#[btf_tracepoint(function = "block_rq_complete")]
pub fn block_done_btf(ctx: BtfTracePointContext) -> i32 {
    block_done(ctx, false)
}

/// The same with per-cgroup histograms: the request's bios are still attached when the
/// tracepoint fires, so its block cgroup (`rq->bio->bi_blkg->blkcg`, the cgroup the I/O is
/// charged to, writeback included) is read here too.
#[btf_tracepoint(function = "block_rq_complete")]
pub fn block_done_cg_btf(ctx: BtfTracePointContext) -> i32 {
    block_done(ctx, true)
}

#[inline(always)]
fn block_done(ctx: BtfTracePointContext, with_cgroup: bool) -> i32 {
    // TP_PROTO(struct request *rq, blk_status_t error, unsigned int nr_bytes)
    let rq: u64 = ctx.arg(0);
    let nr_bytes: u64 = ctx.arg(2);
    let flags: u32 = load(rq, global(&RQ_CMD_FLAGS_OFF));
    // REQ_OP_READ 0, REQ_OP_WRITE 1; discards, flushes and the rest are not counted.
    let op = flags & 0xff;
    if op > 1 {
        return 0;
    }
    // The tracepoint fires before the request is updated: a partial completion leaves bytes
    // behind and is not the request's end (diskstats counts the request once, at its end).
    let remaining: u32 = load(rq, global(&RQ_DATA_LEN_OFF));
    let bytes = nr_bytes as u32;
    if bytes < remaining {
        return 0;
    }
    let start: u64 = load(rq, global(&RQ_START_NS_OFF));
    if start == 0 {
        bump(counter::BLOCK_UNMATCHED, 1);
        return 0;
    }
    let Some(disk) =
        load_ptr(rq, global(&RQ_Q_OFF)).and_then(|q| load_ptr(q, global(&Q_DISK_OFF)))
    else {
        return 0;
    };
    let major: i32 = load(disk, global(&DISK_MAJOR_OFF));
    let minor: i32 = load(disk, global(&DISK_MINOR_OFF));
    let dev = ((major as u32) << 20) | (minor as u32 & 0xf_ffff);
    let lat_us = unsafe { bpf_ktime_get_ns() }.saturating_sub(start) / 1000;
    let cgroup = if with_cgroup {
        request_cgroup(rq).unwrap_or(0)
    } else {
        0
    };
    block_account(dev, op, lat_us, bytes, cgroup);
    0
}

/// The cgroup id of the block cgroup a request is charged to (`None` where a pointer on the
/// way is null), plain loads.
#[inline(always)]
fn request_cgroup(rq: u64) -> Option<u64> {
    let bio = load_ptr(rq, global(&RQ_BIO_OFF))?;
    let blkg = load_ptr(bio, global(&BIO_BLKG_OFF))?;
    let blkcg = load_ptr(blkg, global(&BLKG_BLKCG_OFF))?;
    // css->cgroup is the first member of struct cgroup_subsys_state.
    let cg = load_ptr(blkcg, global(&BLKCG_CSS_OFF))?;
    let kn = load_ptr(cg, global(&CGROUP_KN_OFF))?;
    Some(load(kn, global(&KN_ID_OFF)))
}

// ---- TCP ----------------------------------------------------------------------------------

#[tracepoint(category = "tcp", name = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    // skbaddr 8, dport 30 (host order), err 76
    let err: i32 = field(&ctx, 76);
    if err != 0 {
        bump(counter::TCP_RETRANS_FAILED, 1);
        return 0;
    }
    // One skb may carry several segments (GSO); count segments, as RetransSegs does.
    let off = unsafe { core::ptr::read_volatile(&SKB_GSO_SEGS_OFF) } as usize;
    let segs = if off == 0 {
        1
    } else {
        let skb: usize = field(&ctx, 8);
        let s: u16 = unsafe { bpf_probe_read_kernel((skb + off) as *const u16) }.unwrap_or(1);
        if s == 0 {
            1
        } else {
            s as u64
        }
    };
    bump(counter::TCP_RETRANS, segs);
    let port = field::<u16>(&ctx, 30) as u32;
    match TCP_RETRANS_PORT.get_ptr_mut(&port) {
        Some(p) => unsafe { *p += segs },
        None => {
            let _ = TCP_RETRANS_PORT.insert(&port, &segs, 0);
        }
    }
    0
}

#[tracepoint(category = "tcp", name = "tcp_send_reset")]
pub fn tcp_send_reset(_ctx: TracePointContext) -> u32 {
    bump(counter::TCP_RST_SENT, 1);
    0
}

#[tracepoint(category = "tcp", name = "tcp_receive_reset")]
pub fn tcp_receive_reset(_ctx: TracePointContext) -> u32 {
    bump(counter::TCP_RST_RECV, 1);
    0
}

// ---- OOM kills ------------------------------------------------------------------------------

#[tracepoint(category = "oom", name = "mark_victim")]
pub fn mark_victim(ctx: TracePointContext) -> u32 {
    // pid 8, comm __data_loc 12, total_vm 16, anon_rss 24, file_rss 32, shmem_rss 40, uid 48
    bump(counter::OOM_KILLS, 1);
    let Some(mut e) = EVENTS.reserve::<Event>(0) else {
        bump(counter::EVENTS_DROPPED, 1);
        return 0;
    };
    let ev = e.as_mut_ptr();
    unsafe {
        (*ev).kind = event_kind::OOM_KILL;
        (*ev).pid = field(&ctx, 8);
        (*ev).ts_ns = bpf_ktime_get_ns();
        (*ev).args = [
            field(&ctx, 16),
            field(&ctx, 24),
            field(&ctx, 32),
            field(&ctx, 40),
        ];
        (*ev).uid = field(&ctx, 48);
        (*ev)._pad = 0;
        (*ev).comm = [0; 16];
        let loc: u32 = field(&ctx, 12);
        let off = (loc & 0xffff) as usize;
        let src = ctx.as_ptr().add(off) as *const u8;
        let _ = bpf_probe_read_kernel_str_bytes(src, &mut (*ev).comm);
    }
    e.submit(0);
    0
}

// ---- process churn ---------------------------------------------------------------------------

#[tracepoint(category = "sched", name = "sched_process_fork")]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    // child_pid 20
    bump(counter::FORKS, 1);
    let child: u32 = field(&ctx, 20);
    let now = unsafe { bpf_ktime_get_ns() };
    let _ = PROC_START.insert(&child, &now, 0);
    0
}

#[tracepoint(category = "sched", name = "sched_process_exec")]
pub fn sched_process_exec(_ctx: TracePointContext) -> u32 {
    bump(counter::EXECS, 1);
    0
}

#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    // pid 24, group_dead 32
    let pid: u32 = field(&ctx, 24);
    let group_dead: u8 = field(&ctx, 32);
    let start = unsafe { PROC_START.get(&pid) }.copied();
    if start.is_some() {
        let _ = PROC_START.remove(&pid);
    }
    if group_dead != 0 {
        bump(counter::EXITS, 1);
        if let Some(s) = start {
            if unsafe { bpf_ktime_get_ns() }.wrapping_sub(s) < 1_000_000_000 {
                bump(counter::SHORT_LIVED, 1);
            }
        }
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
