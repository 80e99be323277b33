//! Process churn (programs `sched_process_fork`, `sched_process_exec`,
//! `sched_process_exit` in sensor-ebpf): execs, exits and short-lived processes.

use super::{spec, ProgSpec};
use protocol::ProbeRec;
use sensor_common::counter;

pub(super) const PROGRAMS: &[ProgSpec] = &[
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

/// This probe's share of the per-host counters.
pub(super) fn counters(p: &mut ProbeRec, rate: impl Fn(u32) -> f32) {
    p.execs_per_s = rate(counter::EXECS);
    p.exits_per_s = rate(counter::EXITS);
    p.short_lived_per_s = rate(counter::SHORT_LIVED);
}
