//! OOM kills (program `mark_victim` in sensor-ebpf): a count per interval and one event
//! per victim, from the ring buffer, with what the kernel log and /proc still tell.

use super::{monotonic_ns, spec, wall_ms, Probes, ProgSpec};
use protocol::{EventRec, ProbeRec};
use sensor_common::{counter, event_kind, Event};

pub(super) const PROGRAMS: &[ProgSpec] = &[spec(
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

/// This probe's share of the per-host counters (a count, not a rate).
pub(super) fn counters(p: &mut ProbeRec, delta: impl Fn(u32) -> f64) {
    p.oom_kills = delta(counter::OOM_KILLS) as u32;
}

/// /dev/kmsg, opened once while the sensor may still read it (reading it needs
/// CAP_SYSLOG under dmesg_restrict; the check is at open), read incrementally.
pub(super) static KMSG: std::sync::Mutex<Option<std::fs::File>> = std::sync::Mutex::new(None);
static KMSG_OOM_LINES: std::sync::Mutex<std::collections::VecDeque<String>> =
    std::sync::Mutex::new(std::collections::VecDeque::new());

/// Opens /dev/kmsg while this process may still read it.
pub(super) fn open_kmsg() {
    use std::os::unix::fs::OpenOptionsExt;
    *KMSG.lock().unwrap() = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .ok();
}

impl Probes {
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
    fn memory_cgroup_v1_and_v2() {
        let v1 = "12:pids:/user.slice\n5:memory:/sonde-test/oom\n0::/user.slice\n";
        assert_eq!(memory_cgroup(v1), "/sonde-test/oom");
        assert_eq!(
            memory_cgroup("0::/system.slice/x.service\n"),
            "/system.slice/x.service"
        );
    }
}
