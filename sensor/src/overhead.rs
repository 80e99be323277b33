//! `sensor probes --overhead DURATION`: what the attached probes cost this host, measured
//! on the workload that hits the run-queue probe hardest.
//!
//! Two processes ping-pong one byte over two pipes, both pinned to one CPU, so every round
//! trip is two wakeups and two context switches on that CPU (what `perf bench sched pipe`
//! does). Meanwhile the probes are detached and attached again in alternating phases
//! (programs stay loaded: only the tracepoint links change), and the round trips completed
//! in each phase are counted. Each pair of neighbouring phases gives one ratio; the median of
//! the ratios is the slowdown. Phases of a fraction of a second are short enough that the
//! host's own drift (on a VM, other guests) hits both halves of a pair alike, which a few
//! runs of several seconds each with and without a sensor cannot promise.

use crate::collect::ebpf::Probes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What one measurement found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Overhead {
    /// The CPU the ping-pong ran on.
    pub cpu: usize,
    /// Pairs of phases (one without, one with the probes).
    pub pairs: usize,
    pub phase_ms: u64,
    /// Median time per round trip (two context switches), without and with the probes.
    pub ns_per_round_trip_off: f64,
    pub ns_per_round_trip_on: f64,
    /// Median over the pairs of (time with / time without − 1), in percent, and the
    /// interquartile range of the same.
    pub slowdown_pct: f64,
    pub slowdown_p25_pct: f64,
    pub slowdown_p75_pct: f64,
}

/// Two pinned processes ping-ponging; killed when dropped.
struct PingPong {
    pids: [libc::pid_t; 2],
    counter: *const AtomicU64,
}

impl PingPong {
    fn start(cpu: usize) -> Result<PingPong, String> {
        let os = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
        // One shared counter of round trips, in memory both children and this process see.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if mem == libc::MAP_FAILED {
            return Err(os("mmap"));
        }
        let counter = mem as *const AtomicU64;
        let (mut a, mut b) = ([0i32; 2], [0i32; 2]);
        if unsafe { libc::pipe(a.as_mut_ptr()) } != 0 || unsafe { libc::pipe(b.as_mut_ptr()) } != 0
        {
            return Err(os("pipe"));
        }
        let mut pids = [0; 2];
        for (i, pid) in pids.iter_mut().enumerate() {
            let p = unsafe { libc::fork() };
            if p < 0 {
                return Err(os("fork"));
            }
            if p == 0 {
                // Child: only async-signal-safe calls from here on.
                unsafe {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                    let mut byte = [0u8; 1];
                    let buf = byte.as_mut_ptr() as *mut libc::c_void;
                    if i == 0 {
                        // Pinger: write to a, wait for the reply on b, count.
                        loop {
                            if libc::write(a[1], buf, 1) != 1 || libc::read(b[0], buf, 1) != 1 {
                                libc::_exit(0);
                            }
                            (*counter).fetch_add(1, Ordering::Relaxed);
                        }
                    } else {
                        loop {
                            if libc::read(a[0], buf, 1) != 1 || libc::write(b[1], buf, 1) != 1 {
                                libc::_exit(0);
                            }
                        }
                    }
                }
            }
            *pid = p;
        }
        for fd in a.iter().chain(b.iter()) {
            unsafe { libc::close(*fd) };
        }
        Ok(PingPong { pids, counter })
    }

    fn count(&self) -> u64 {
        unsafe { (*self.counter).load(Ordering::Relaxed) }
    }
}

impl Drop for PingPong {
    fn drop(&mut self) {
        for p in self.pids {
            unsafe {
                libc::kill(p, libc::SIGKILL);
                libc::waitpid(p, std::ptr::null_mut(), 0);
            }
        }
        unsafe { libc::munmap(self.counter as *mut libc::c_void, 4096) };
    }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

/// Measures for about `total`, in phases of `phase`, calling `progress` after each pair.
pub fn measure(
    probes: &mut Probes,
    total: Duration,
    phase: Duration,
    mut progress: impl FnMut(usize, usize),
) -> Result<Overhead, String> {
    let ncpu = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    // The ping-pong on the last CPU; this process (which only sleeps and flips links)
    // elsewhere when there is an elsewhere.
    let cpu = ncpu - 1;
    if ncpu > 1 {
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
    let pp = PingPong::start(cpu)?;
    // Let the pair settle into its rhythm.
    std::thread::sleep(Duration::from_millis(300));
    // Time after a flip before counting, so a phase's count is all of one state.
    let settle = (phase / 10).max(Duration::from_millis(5));
    let pairs = ((total.as_secs_f64() / (2.0 * phase.as_secs_f64())) as usize).max(1);
    let mut run_phase = |on: bool| -> Result<f64, String> {
        probes.set_attached(on)?;
        std::thread::sleep(settle);
        let (c0, t0) = (pp.count(), Instant::now());
        std::thread::sleep(phase - settle);
        let (c1, t1) = (pp.count(), Instant::now());
        let n = c1.saturating_sub(c0);
        if n == 0 {
            return Err("the ping-pong processes made no progress".into());
        }
        Ok((t1 - t0).as_nanos() as f64 / n as f64)
    };
    let (mut off, mut on, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for k in 0..pairs {
        // Alternate the order (off-on, on-off, ...) so a steady drift cancels out.
        let (x, y) = if k % 2 == 0 {
            let x = run_phase(false)?;
            (x, run_phase(true)?)
        } else {
            let y = run_phase(true)?;
            (run_phase(false)?, y)
        };
        off.push(x);
        on.push(y);
        ratios.push((y / x - 1.0) * 100.0);
        progress(k + 1, pairs);
    }
    probes.set_attached(true)?;
    drop(pp);
    let sort = |v: &mut Vec<f64>| v.sort_by(|a, b| a.total_cmp(b));
    sort(&mut off);
    sort(&mut on);
    sort(&mut ratios);
    Ok(Overhead {
        cpu,
        pairs,
        phase_ms: phase.as_millis() as u64,
        ns_per_round_trip_off: quantile(&off, 0.5),
        ns_per_round_trip_on: quantile(&on, 0.5),
        slowdown_pct: quantile(&ratios, 0.5),
        slowdown_p25_pct: quantile(&ratios, 0.25),
        slowdown_p75_pct: quantile(&ratios, 0.75),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_pong_makes_round_trips_and_dies_with_its_handle() {
        let pp = PingPong::start(0).expect("ping-pong");
        std::thread::sleep(Duration::from_millis(200));
        let n = pp.count();
        assert!(n > 100, "only {n} round trips in 200 ms");
        let pids = pp.pids;
        drop(pp);
        for p in pids {
            // Reaped by the drop: no such process any more.
            assert_eq!(unsafe { libc::kill(p, 0) }, -1, "pid {p} still exists");
        }
    }

    #[test]
    fn quantiles_of_sorted_values() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(quantile(&v, 0.5), 3.0);
        assert_eq!(quantile(&v, 0.25), 2.0);
        assert_eq!(quantile(&v, 0.75), 4.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
