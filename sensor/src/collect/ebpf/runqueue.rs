//! Run-queue latency (programs `rq_wakeup`, `rq_wakeup_new`, `rq_switch` in
//! sensor-ebpf): time from wakeup (or preemption) to running, one histogram per host.

use super::maps::{hist_delta, hist_words, slot_lat};
use super::{raw, Probes, ProgSpec};
use protocol::LatencyRec;

pub(super) const PROGRAMS: &[ProgSpec] = &[
    raw("rq_wakeup", "sched", "sched_wakeup"),
    raw("rq_wakeup_new", "sched", "sched_wakeup_new"),
    raw("rq_switch", "sched", "sched_switch"),
];

impl Probes {
    /// Adds the interval's `runqueue` histogram at `latency[*nlat]`.
    pub(super) fn collect_runqueue(
        &mut self,
        secs: Option<f64>,
        latency: &mut Vec<LatencyRec>,
        nlat: &mut usize,
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
    }
}
