//! Run-queue latency: time from becoming runnable (woken, or preempted while runnable) to
//! running, one histogram per host and, optionally, per cgroup.
//!
//! Two designs, chosen at load time:
//! - **one program per switch** (`rq_switch_si`): at `sched_switch` the incoming task's
//!   `sched_info.last_queued` (stamped by the scheduler when it queued the task) and its
//!   run queue's `clock` give the wait the kernel is about to add to its `run_delay`. Needs
//!   CONFIG_SCHED_INFO and CONFIG_FAIR_GROUP_SCHED (every distribution kernel) and the
//!   kernel's BTF to find the fields. Waits are also attributed to the task's cgroup.
//!   As a BTF tracepoint (`rq_switch_btf`, with per-cgroup histograms `rq_switch_cg_btf`)
//!   the same reads are plain loads, not helper calls: the default where the kernel
//!   accepts it; `rq_switch_si` (raw tracepoint) where it does not.
//! - **fallback** (`rq_wakeup`, `rq_wakeup_new`, `rq_switch`): the sensor stamps wakeups in
//!   its own table; used when a field above is missing. No per-cgroup histograms.

use super::maps::{hist_delta, hist_words, slot_lat};
use super::{raw, Probes, ProgSpec};
use crate::collect::btf::Btf;
use protocol::{CgroupLatencyRec, LatencyRec};
use sensor_common::rq_cg_mode;
use std::path::{Path, PathBuf};

pub(super) const FALLBACK: &[ProgSpec] = &[
    raw("rq_wakeup", "sched", "sched_wakeup"),
    raw("rq_wakeup_new", "sched", "sched_wakeup_new"),
    raw("rq_switch", "sched", "sched_switch"),
];

pub(super) const SINGLE: &[ProgSpec] = &[raw("rq_switch_si", "sched", "sched_switch")];

pub(super) const BTF: &[ProgSpec] = &[super::tp_btf("rq_switch_btf", "sched", "sched_switch")];

/// The BTF design with per-cgroup histograms.
pub(super) const BTF_CGROUP: &[ProgSpec] =
    &[super::tp_btf("rq_switch_cg_btf", "sched", "sched_switch")];

/// Kernel structure offsets the one-program design reads (from BTF), and how it finds a
/// task's cgroup.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Layout {
    pub lastq: u32,
    pub se_cfsrq: u32,
    pub cfsrq_rq: u32,
    pub rq_clock: u32,
    pub cg_mode: u32,
    pub cgroups: u32,
    pub cssset_ptr: u32,
    pub cgroup_kn: u32,
    pub kn_id: u32,
    /// The hierarchy whose directories the cgroup ids name.
    pub cg_root: Option<PathBuf>,
}

impl Layout {
    /// Offsets from the kernel's BTF; `None` when one of the scheduler's is missing (the
    /// fallback programs are used). The cgroup part is off (`cg_mode` 0) when its fields are
    /// missing or no hierarchy is given: `cpu_v1` = the v1 cpu controller's mount (preferred:
    /// on hybrid hosts containers live there), else `v2` = the unified tree.
    pub fn from_btf(b: &Btf, cpu_v1: Option<&Path>, v2: Option<&Path>) -> Option<Layout> {
        let off = |s: &str, m: &str| b.path_offset(s, m).map(|o| o as u32);
        let mut l = Layout {
            lastq: off("task_struct", "sched_info.last_queued")?,
            se_cfsrq: off("task_struct", "se.cfs_rq")?,
            cfsrq_rq: off("cfs_rq", "rq")?,
            rq_clock: off("rq", "clock")?,
            ..Layout::default()
        };
        let common = (|| {
            Some((
                off("task_struct", "cgroups")?,
                off("cgroup", "kn")?,
                off("kernfs_node", "id")?,
            ))
        })();
        if let Some((cgroups, kn, id)) = common {
            let (mode, ptr, root) = if let (Some(root), Some(idx)) =
                (cpu_v1, b.enum_value("cgroup_subsys_id", "cpu_cgrp_id"))
            {
                let subsys = off("css_set", "subsys");
                (rq_cg_mode::V1_CSS, subsys.map(|s| s + 8 * idx as u32), root)
            } else if let Some(root) = v2 {
                (rq_cg_mode::V2, off("css_set", "dfl_cgrp"), root)
            } else {
                (rq_cg_mode::OFF, None, Path::new(""))
            };
            if let Some(ptr) = ptr {
                l.cg_mode = mode;
                l.cgroups = cgroups;
                l.cssset_ptr = ptr;
                l.cgroup_kn = kn;
                l.kn_id = id;
                l.cg_root = Some(root.to_path_buf());
            }
        }
        Some(l)
    }
}

impl Probes {
    /// Adds the interval's `runqueue` histogram at `latency[*nlat]`, and the per-cgroup
    /// rows into `cg_latency`.
    pub(super) fn collect_runqueue(
        &mut self,
        secs: Option<f64>,
        latency: &mut Vec<LatencyRec>,
        nlat: &mut usize,
        cg_latency: &mut Vec<CgroupLatencyRec>,
    ) {
        // Run-queue histogram.
        if let Some(m) = self.runq.as_mut() {
            let key = 0u32;
            match m.sum_into(
                &key as *const u32 as *const u8,
                hist_words(&mut self.runq_cur),
            ) {
                Ok(_) => {
                    if self.primed && secs.is_some() {
                        let rec = slot_lat(latency, *nlat);
                        *nlat += 1;
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
        let report = self.primed && secs.is_some();
        if let Some(c) = self.runq_cg.as_mut() {
            if let Err(e) = c.collect(report, cg_latency) {
                self.warn("RUNQ_CG_HIST", e);
            }
        }
    }
}
