//! Per-cgroup latency histograms (the run-queue and block probes' `cgroup_latency` rows):
//! maps cgroup ids seen by the programs to paths by walking the hierarchy when an unknown
//! id appears, reports the busiest cgroups per source and sums the rest, and forgets the
//! map entries of removed cgroups, so churn leaves nothing behind.

use super::maps::{hist_sub, hist_to, hist_words, PerCpu};
use protocol::CgroupLatencyRec;
use sensor_common::{CgKey, Hist, RUNQ_CG_OTHER};
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Per-cgroup histograms of one probe (the run queue's, or block I/O's): a per-CPU hash map
/// keyed by (cgroup id, kind) read every interval into `cgroup_latency` rows.
pub(super) struct CgHists {
    pub map: PerCpu,
    root: PathBuf,
    /// `source` of the rows, by key kind.
    sources: &'static [&'static str],
    /// Rows per interval (the rest is summed as `other`).
    top: usize,
    /// Cgroup id (the directory's inode number) -> path below `root`.
    paths: HashMap<u64, String>,
    /// Cumulative histogram per key as of the last collection.
    prev: HashMap<CgKey, Hist>,
    keys: Vec<CgKey>,
    deltas: Vec<(CgKey, Hist)>,
    cur: Hist,
    /// Collections since the hierarchy was last walked (ids of removed cgroups are dropped
    /// at the next walk).
    since_walk: u32,
}

impl CgHists {
    pub fn new(
        map: PerCpu,
        root: PathBuf,
        sources: &'static [&'static str],
        top: usize,
    ) -> CgHists {
        let mut c = CgHists {
            map,
            root,
            sources,
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

    /// Appends the interval's per-cgroup rows to `out`: per source, the top `top` cgroups by
    /// values measured, then one `other` row for the rest.
    pub fn collect(
        &mut self,
        report: bool,
        out: &mut Vec<CgroupLatencyRec>,
    ) -> std::io::Result<()> {
        self.keys.clear();
        let mut key = CgKey { id: 0, kind: 0 };
        let mut next = key;
        let mut first = true;
        loop {
            let prev = (!first).then_some(&key as *const CgKey as *const u8);
            if !self
                .map
                .next_key(prev, &mut next as *mut CgKey as *mut u8)?
            {
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
            .any(|k| k.id != RUNQ_CG_OTHER && !self.paths.contains_key(&k.id));
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
        let mut gone: Vec<CgKey> = Vec::new();
        for &k in &keys {
            if !self
                .map
                .sum_into(&k as *const CgKey as *const u8, hist_words(&mut self.cur))?
            {
                continue;
            }
            let prev = self.prev.get(&k).copied().unwrap_or(Hist::ZERO);
            let d = hist_sub(&self.cur, &prev);
            if d.count > 0 {
                self.deltas.push((k, d));
            }
            self.prev.insert(k, self.cur);
            let removed = match self.paths.get(&k.id) {
                None => k.id != RUNQ_CG_OTHER,
                // No waits this interval: is the cgroup still there? (one stat)
                Some(p) if d.count == 0 && old_paths.is_none() => {
                    !self.root.join(p.trim_start_matches('/')).exists()
                }
                Some(_) => false,
            };
            if removed {
                gone.push(k);
            }
        }
        self.keys = keys;
        if report {
            self.deltas.sort_unstable_by(|a, b| {
                (a.0.kind, b.1.count, a.0.id).cmp(&(b.0.kind, a.1.count, b.0.id))
            });
            let mut i = 0;
            while i < self.deltas.len() {
                let kind = self.deltas[i].0.kind;
                let source = self
                    .sources
                    .get(kind as usize)
                    .copied()
                    .unwrap_or("unknown");
                let mut other = Hist::ZERO;
                let mut rows = 0;
                while i < self.deltas.len() && self.deltas[i].0.kind == kind {
                    let (k, d) = &self.deltas[i];
                    i += 1;
                    let path = self
                        .paths
                        .get(&k.id)
                        .or_else(|| old_paths.as_ref().and_then(|o| o.get(&k.id)));
                    match path {
                        Some(p) if rows < self.top => {
                            rows += 1;
                            let (container, pod) = super::super::cgnames::resolve(p);
                            let mut r = CgroupLatencyRec {
                                cgroup: p.clone(),
                                container,
                                pod,
                                source: source.into(),
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
                        source: source.into(),
                        unit: "us".into(),
                        ..Default::default()
                    };
                    hist_to(&other, &mut r.count, &mut r.sum, &mut r.buckets);
                    out.push(r);
                }
            }
        }
        // Forget removed cgroups: their map entries and state (bounded under churn).
        for k in gone {
            self.map.delete(&k as *const CgKey as *const u8);
            self.prev.remove(&k);
        }
        Ok(())
    }

    /// Paths of the cgroups state is kept for (tests).
    #[cfg(test)]
    pub fn tracked(&self) -> Vec<String> {
        self.prev
            .keys()
            .map(|k| {
                self.paths
                    .get(&k.id)
                    .cloned()
                    .unwrap_or_else(|| format!("id {}", k.id))
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
