//! Run-queue latency: time from becoming runnable (woken, or preempted while runnable) to
//! running, one histogram per host and, optionally, per cgroup.
//!
//! Two designs, chosen at load time:
//! - **one program per switch** (`rq_switch_si`): at `sched_switch` the incoming task's
//!   `sched_info.last_queued` (stamped by the scheduler when it queued the task) and its
//!   run queue's `clock` give the wait the kernel is about to add to its `run_delay`. Needs
//!   CONFIG_SCHED_INFO and CONFIG_FAIR_GROUP_SCHED (every distribution kernel) and the
//!   kernel's BTF to find the fields. Waits are also attributed to the task's cgroup.
//! - **fallback** (`rq_wakeup`, `rq_wakeup_new`, `rq_switch`): the sensor stamps wakeups in
//!   its own table; used when a field above is missing. No per-cgroup histograms.

use super::maps::{hist_delta, hist_sub, hist_to, hist_words, slot_lat, PerCpu};
use super::{raw, Probes, ProgSpec};
use crate::collect::btf::Btf;
use protocol::{CgroupLatencyRec, LatencyRec};
use sensor_common::{rq_cg_mode, Hist, RUNQ_CG_OTHER};
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub(super) const FALLBACK: &[ProgSpec] = &[
    raw("rq_wakeup", "sched", "sched_wakeup"),
    raw("rq_wakeup_new", "sched", "sched_wakeup_new"),
    raw("rq_switch", "sched", "sched_switch"),
];

pub(super) const SINGLE: &[ProgSpec] = &[raw("rq_switch_si", "sched", "sched_switch")];

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

/// Per-cgroup state of the one-program design.
pub(super) struct CgRunq {
    pub map: PerCpu,
    root: PathBuf,
    /// Rows per interval (the rest is summed as `other`).
    top: usize,
    /// Cgroup id (the directory's inode number) -> path below `root`.
    paths: HashMap<u64, String>,
    /// Cumulative histogram per id as of the last collection.
    prev: HashMap<u64, Hist>,
    keys: Vec<u64>,
    deltas: Vec<(u64, Hist)>,
    cur: Hist,
    /// Collections since the hierarchy was last walked (ids of removed cgroups are dropped
    /// at the next walk).
    since_walk: u32,
}

impl CgRunq {
    pub fn new(map: PerCpu, root: PathBuf, top: usize) -> CgRunq {
        let mut c = CgRunq {
            map,
            root,
            top,
            paths: HashMap::new(),
            prev: HashMap::new(),
            keys: Vec::new(),
            deltas: Vec::new(),
            cur: Hist::ZERO,
            since_walk: 0,
        };
        c.walk();
        c
    }

    /// Maps every cgroup directory's id to its path.
    fn walk(&mut self) {
        self.paths.clear();
        fn visit(root: &Path, dir: &Path, out: &mut HashMap<u64, String>) {
            let Ok(md) = std::fs::metadata(dir) else {
                return;
            };
            let rel = dir
                .strip_prefix(root)
                .map(|r| format!("/{}", r.to_string_lossy()))
                .unwrap_or_else(|_| "/".into());
            out.insert(md.ino(), rel);
            let Ok(rd) = std::fs::read_dir(dir) else {
                return;
            };
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    visit(root, &e.path(), out);
                }
            }
        }
        let root = self.root.clone();
        visit(&root, &root, &mut self.paths);
        self.since_walk = 0;
    }

    /// The interval's per-cgroup rows into `out` (top `top` by waits, then `other`).
    pub fn collect(
        &mut self,
        report: bool,
        out: &mut Vec<CgroupLatencyRec>,
    ) -> std::io::Result<()> {
        out.clear();
        self.keys.clear();
        let mut key = 0u64;
        let mut next = 0u64;
        let mut first = true;
        loop {
            let prev = (!first).then_some(&key as *const u64 as *const u8);
            if !self.map.next_key(prev, &mut next as *mut u64 as *mut u8)? {
                break;
            }
            first = false;
            key = next;
            self.keys.push(key);
        }
        self.since_walk += 1;
        let unknown = self
            .keys
            .iter()
            .any(|k| *k != RUNQ_CG_OTHER && !self.paths.contains_key(k));
        // A new cgroup, or every 30 collections: walk again; ids no longer in the tree are
        // cgroups that were removed (their last waits are reported below, then forgotten).
        let old_paths = if unknown || self.since_walk >= 30 {
            let old = std::mem::take(&mut self.paths);
            self.walk();
            Some(old)
        } else {
            None
        };
        self.deltas.clear();
        let keys = std::mem::take(&mut self.keys);
        let mut gone: Vec<u64> = Vec::new();
        for &id in &keys {
            if !self
                .map
                .sum_into(&id as *const u64 as *const u8, hist_words(&mut self.cur))?
            {
                continue;
            }
            let prev = self.prev.get(&id).copied().unwrap_or(Hist::ZERO);
            let d = hist_sub(&self.cur, &prev);
            if d.count > 0 {
                self.deltas.push((id, d));
            }
            self.prev.insert(id, self.cur);
            let removed = match self.paths.get(&id) {
                None => id != RUNQ_CG_OTHER,
                // No waits this interval: is the cgroup still there? (one stat)
                Some(p) if d.count == 0 && old_paths.is_none() => {
                    !self.root.join(p.trim_start_matches('/')).exists()
                }
                Some(_) => false,
            };
            if removed {
                gone.push(id);
            }
        }
        self.keys = keys;
        if report {
            self.deltas
                .sort_unstable_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(&b.0)));
            let mut other = Hist::ZERO;
            let mut rows = 0;
            for (id, d) in &self.deltas {
                let path = self
                    .paths
                    .get(id)
                    .or_else(|| old_paths.as_ref().and_then(|o| o.get(id)));
                match path {
                    Some(p) if rows < self.top => {
                        rows += 1;
                        let (container, pod) = super::super::cgnames::resolve(p);
                        let mut r = CgroupLatencyRec {
                            cgroup: p.clone(),
                            container,
                            pod,
                            source: "runqueue".into(),
                            unit: "us".into(),
                            ..Default::default()
                        };
                        hist_to(d, &mut r.count, &mut r.sum, &mut r.buckets);
                        out.push(r);
                    }
                    _ => other = hist_add_all(&other, d),
                }
            }
            if other.count > 0 {
                let mut r = CgroupLatencyRec {
                    cgroup: "other".into(),
                    source: "runqueue".into(),
                    unit: "us".into(),
                    ..Default::default()
                };
                hist_to(&other, &mut r.count, &mut r.sum, &mut r.buckets);
                out.push(r);
            }
        }
        // Forget removed cgroups: their map entries and state (bounded under churn).
        for id in gone {
            self.map.delete(&id as *const u64 as *const u8);
            self.prev.remove(&id);
        }
        Ok(())
    }

    /// Paths of the cgroups state is kept for (tests).
    #[cfg(test)]
    pub fn tracked(&self) -> Vec<String> {
        self.prev
            .keys()
            .map(|id| {
                self.paths
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| format!("id {id}"))
            })
            .collect()
    }
}

fn hist_add_all(a: &Hist, b: &Hist) -> Hist {
    let mut h = *a;
    for i in 0..h.buckets.len() {
        h.buckets[i] += b.buckets[i];
    }
    h.sum += b.sum;
    h.count += b.count;
    h
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
        } else {
            cg_latency.clear();
        }
    }
}
