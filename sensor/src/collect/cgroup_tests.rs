//! The cgroup and process collectors against this real kernel: v1 cgroups (and a v2
//! subtree) created by the test with a CPU quota and a memory limit, stress-ng and an OOM
//! inside them, 300 cgroups created and removed under the collector, and a known busy
//! process. Root only (a test that cannot run says so); they share the probes' lock,
//! since load from one would disturb another's measurement.

use super::cgroup::{Cgroups, Options, Roots};
use super::processes::Processes;
use crate::filter::Filter;
use protocol::{CgroupIoRec, CgroupRec};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ROOT: &str = "/sys/fs/cgroup";

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

fn roots() -> Option<Roots> {
    if !is_root() {
        eprintln!("SKIP: cgroup tests need root (they create cgroups)");
        return None;
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    Some(Roots::from_mounts(&mounts, ROOT))
}

/// A cgroup created in every listed hierarchy, removed (after its tasks are killed) on drop.
struct TestCg {
    dirs: Vec<PathBuf>,
    rel: String,
    children: Vec<Child>,
}

impl TestCg {
    fn new(rel: &str, hierarchies: &[&Path]) -> TestCg {
        let dirs: Vec<PathBuf> = hierarchies
            .iter()
            .map(|h| h.join(rel.trim_start_matches('/')))
            .collect();
        for d in &dirs {
            std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
        }
        TestCg {
            dirs,
            rel: rel.to_string(),
            children: Vec::new(),
        }
    }

    fn write(&self, file: &str, value: &str) {
        let d = self
            .dirs
            .iter()
            .find(|d| d.join(file).exists())
            .unwrap_or_else(|| panic!("no hierarchy of {} has {file}", self.rel));
        std::fs::write(d.join(file), value)
            .unwrap_or_else(|e| panic!("{}/{file} = {value}: {e}", d.display()));
    }

    fn read(&self, file: &str) -> String {
        let d = self.dirs.iter().find(|d| d.join(file).exists()).unwrap();
        std::fs::read_to_string(d.join(file)).unwrap()
    }

    /// Starts `cmd` inside the cgroup (in every hierarchy) before it execs.
    fn spawn(&mut self, cmd: &str) -> u32 {
        let procs: Vec<String> = self
            .dirs
            .iter()
            .map(|d| d.join("cgroup.procs").display().to_string())
            .collect();
        let mut script = String::new();
        for p in &procs {
            script.push_str(&format!("echo $$ > {p}; "));
        }
        script.push_str(&format!("exec {cmd}"));
        let c = Command::new("sh")
            .args(["-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = c.id();
        self.children.push(c);
        pid
    }
}

impl Drop for TestCg {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for d in &self.dirs {
            // Tasks of killed stress-ng workers may take a moment to leave.
            for _ in 0..50 {
                let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
                if std::fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn collector(roots: Roots, include: &str) -> Cgroups {
    Cgroups::new(
        "/proc",
        roots,
        Options {
            max_cgroups: 500,
            filter: Filter::new(&[include], &[]),
            rescan: Duration::from_secs(30),
            idle_stride: 5,
        },
    )
}

fn find<'a>(out: &'a [CgroupRec], path: &str) -> &'a CgroupRec {
    out.iter().find(|r| r.cgroup == path).unwrap_or_else(|| {
        panic!(
            "no row for {path}: {:?}",
            out.iter().map(|r| &r.cgroup).collect::<Vec<_>>()
        )
    })
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// v1 (hybrid host): quota 0.5 CPU on a CPU hog gives ~50 % of one CPU and throttling;
/// the reported usage equals the cgroup's own cpuacct.usage over the same interval; memory
/// tracks a known allocation and the limit; an OOM inside is counted in its row.
#[test]
fn v1_quota_memory_and_oom() {
    let _g = super::TEST_SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(roots) = roots() else { return };
    let (Some(cpu), Some(acct), Some(mem)) = (&roots.cpu, &roots.cpuacct, &roots.memory) else {
        eprintln!("SKIP: no v1 cpu/cpuacct/memory hierarchy here (pure v2 host): {roots:?}");
        return;
    };
    assert!(
        have("stress-ng"),
        "stress-ng is needed (cargo xtask test installs it)"
    );
    let base = format!("/sonde-test-{}", std::process::id());
    // Declared first, so removed last (after the cgroups below it).
    let _base = TestCg::new(&base, &[cpu, acct, mem]);
    let mut cg = TestCg::new(&format!("{base}/quota"), &[cpu, acct, mem]);
    cg.write("cpu.cfs_period_us", "100000");
    cg.write("cpu.cfs_quota_us", "50000");
    cg.write("memory.limit_in_bytes", &(256u64 << 20).to_string());
    cg.spawn("stress-ng --cpu 1 --vm 1 --vm-bytes 96M --vm-keep --vm-hang 0 -q");
    std::thread::sleep(Duration::from_millis(1500)); // let the allocation settle
    let mut c = collector(roots.clone(), &format!("{base}*"));
    let (mut out, mut io) = (Vec::<CgroupRec>::new(), Vec::<CgroupIoRec>::new());
    c.collect(None, &mut out, &mut io);
    let u0: u64 = cg.read("cpuacct.usage").trim().parse().unwrap();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let secs = t0.elapsed().as_secs_f64();
    c.collect(Some(secs), &mut out, &mut io);
    let u1: u64 = cg.read("cpuacct.usage").trim().parse().unwrap();
    let own = (u1 - u0) as f64 / 1e7 / secs; // % of one CPU from the cgroup's own file
    let r = find(&out, &cg.rel);
    eprintln!("quota cgroup: {r:?}; cpuacct says {own:.1} %");
    assert!(
        (r.cpu_pct as f64 - own).abs() < 1.5,
        "reported {} vs cpuacct {own}",
        r.cpu_pct
    );
    assert!(
        (40.0..=56.0).contains(&r.cpu_pct),
        "quota 0.5 -> ~50 % of one CPU: {}",
        r.cpu_pct
    );
    assert!((r.cpu_user_pct + r.cpu_system_pct - r.cpu_pct).abs() < 5.0);
    assert_eq!(r.cpu_limit, 0.5);
    assert!(
        r.cpu_throttled_periods > 0 && r.cpu_periods >= r.cpu_throttled_periods,
        "{r:?}"
    );
    assert!(r.cpu_throttled_ms_per_s > 0.0);
    assert_eq!(r.memory_limit, 256 << 20);
    let usage: u64 = cg.read("memory.usage_in_bytes").trim().parse().unwrap();
    assert!(
        r.memory_rss >= 96 << 20,
        "96 MiB kept by stress-ng: rss {}",
        r.memory_rss
    );
    assert!(
        (r.memory_usage as i64 - usage as i64).unsigned_abs() < 16 << 20,
        "usage {} vs memory.usage_in_bytes {usage}",
        r.memory_usage
    );
    assert!(r.memory_working_set <= r.memory_usage && r.memory_working_set >= r.memory_rss);
    // The parent is reported too, with its child's usage (hierarchical).
    assert!(find(&out, &base).memory_usage >= r.memory_usage);
    drop(cg);

    // OOM: a 32 MiB limit and a 200 MiB allocation.
    let mut oom = TestCg::new(&format!("{base}/oom"), &[mem]);
    oom.write("memory.limit_in_bytes", &(32u64 << 20).to_string());
    let _ = std::fs::write(
        oom.dirs[0].join("memory.memsw.limit_in_bytes"),
        (32u64 << 20).to_string(),
    );
    let mut c = collector(roots, &format!("{base}*"));
    c.collect(None, &mut out, &mut io);
    let t0 = Instant::now();
    oom.spawn("python3 -c 'b = bytearray(200 << 20)'");
    std::thread::sleep(Duration::from_secs(2));
    c.collect(Some(t0.elapsed().as_secs_f64()), &mut out, &mut io);
    let r = find(&out, &oom.rel);
    eprintln!("oom cgroup: {r:?}");
    assert!(r.oom_kills >= 1, "the OOM kill inside is counted: {r:?}");
}

/// A v2 subtree (the hybrid host's unified tree, or the host's only tree): CPU from
/// cpu.stat and per-cgroup pressure from cpu.pressure.
#[test]
fn v2_usage_and_pressure() {
    let _g = super::TEST_SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(roots) = roots() else { return };
    let Some(v2) = roots.v2.clone() else {
        eprintln!("SKIP: no cgroup2 mounted under {ROOT}");
        return;
    };
    if !v2.join("cpu.pressure").exists() {
        eprintln!("SKIP: no per-cgroup PSI on this kernel");
        return;
    }
    let base = format!("/sonde-test2-{}", std::process::id());
    let _base = TestCg::new(&base, &[&v2]);
    let mut cg = TestCg::new(&format!("{base}/hogs"), &[&v2]);
    // Three CPU hogs on this host's CPUs: they wait for each other (pressure).
    let ncpu = std::thread::available_parallelism().unwrap().get();
    let hogs = ncpu + 1;
    cg.spawn(&format!("stress-ng --cpu {hogs} -q"));
    std::thread::sleep(Duration::from_millis(500));
    // Only the v2 tree: this path exists in no v1 controller.
    let only_v2 = Roots {
        v2: Some(v2),
        ..Default::default()
    };
    let mut c = collector(only_v2, &format!("{base}*"));
    let (mut out, mut io) = (Vec::new(), Vec::new());
    c.collect(None, &mut out, &mut io);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    c.collect(Some(t0.elapsed().as_secs_f64()), &mut out, &mut io);
    let r = find(&out, &cg.rel);
    eprintln!("v2 cgroup: {r:?}");
    let want = 100.0 * ncpu as f32;
    assert!(
        r.cpu_pct > want * 0.6 && r.cpu_pct < want * 1.05,
        "{hogs} hogs on {ncpu} CPUs: {}",
        r.cpu_pct
    );
    assert!(
        r.cpu_some_pct > 5.0,
        "hogs wait for each other: cpu some {}",
        r.cpu_some_pct
    );
}

/// 300 cgroups created and removed while the collector runs: no state or rows are left
/// for the gone ones and memory does not grow.
#[test]
fn churn_leaves_nothing_behind() {
    let _g = super::TEST_SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(roots) = roots() else { return };
    let Some(h) = roots.memory.clone().or(roots.v2.clone()) else {
        eprintln!("SKIP: no memory or v2 hierarchy");
        return;
    };
    let base = format!("/sonde-churn-{}", std::process::id());
    let parent = TestCg::new(&base, &[&h]);
    let mut c = collector(roots, &format!("{base}*"));
    let (mut out, mut io) = (Vec::new(), Vec::new());
    c.collect(None, &mut out, &mut io);
    let rss = || -> u64 {
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        s.lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap()
            .parse()
            .unwrap()
    };
    let mut peak_tracked = 0;
    let mut rss_after_first = 0;
    for round in 0..10 {
        let dirs: Vec<PathBuf> = (0..30)
            .map(|i| {
                h.join(base.trim_start_matches('/'))
                    .join(format!("job-{round}-{i}"))
            })
            .collect();
        for d in &dirs {
            std::fs::create_dir(d).unwrap();
        }
        // Found at once (the kernel's cgroup count moved), reported from their second
        // interval (rates need two reads).
        c.collect(Some(0.1), &mut out, &mut io);
        assert_eq!(c.tracked(), 31, "round {round}: parent + 30 jobs tracked");
        c.collect(Some(0.1), &mut out, &mut io);
        peak_tracked = peak_tracked.max(c.tracked());
        assert_eq!(out.len(), 31, "round {round}: parent + 30 jobs");
        for d in &dirs {
            std::fs::remove_dir(d).unwrap();
        }
        c.collect(Some(0.1), &mut out, &mut io);
        c.collect(Some(0.1), &mut out, &mut io);
        assert_eq!(
            out.iter().map(|r| r.cgroup.as_str()).collect::<Vec<_>>(),
            [base.as_str()],
            "round {round}: rows for removed cgroups"
        );
        assert_eq!(
            c.tracked(),
            1,
            "round {round}: state left for removed cgroups"
        );
        if round == 0 {
            rss_after_first = rss();
        }
    }
    let grown = rss().saturating_sub(rss_after_first);
    eprintln!("300 cgroups churned: peak tracked {peak_tracked}, RSS grew {grown} kB after the first round");
    assert!(grown < 2048, "RSS grew {grown} kB over 270 churned cgroups");
    drop(parent);
}

/// A known busy process is first by CPU with its pid and name; the rows (with `other`)
/// add up to the host's process CPU time within 2 points.
#[test]
fn top_processes_add_up() {
    let _g = super::TEST_SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut busy = Command::new("yes").stdout(Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut p = Processes::new("/proc", 10, 256, 5);
    let mut out = Vec::new();
    let stat = || -> Vec<u64> {
        let s = std::fs::read_to_string("/proc/stat").unwrap();
        s.lines()
            .next()
            .unwrap()
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap())
            .collect()
    };
    p.collect(None, &mut out).unwrap();
    let s0 = stat();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let s1 = stat();
    p.collect(Some(t0.elapsed().as_secs_f64()), &mut out)
        .unwrap();
    let _ = busy.kill();
    let _ = busy.wait();
    let first = &out[0];
    eprintln!(
        "top: {:?}",
        out.iter()
            .map(|r| (r.pid, r.comm.as_str(), r.cpu_pct))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        (first.pid, first.comm.as_str()),
        (busy.id(), "yes"),
        "{first:?}"
    );
    assert!(first.cpu_pct > 60.0, "{first:?}");
    assert!(
        !first.user.is_empty() && first.cmdline == "yes",
        "{first:?}"
    );
    // Host: user + nice + system + irq + softirq ticks over the same two seconds, as % of
    // all CPUs; the rows' sum, as % of one CPU, divided by the CPU count.
    let d = |i: usize| (s1[i] - s0[i]) as f64;
    let all: f64 = (0..8).map(d).sum();
    let host = (d(0) + d(1) + d(2) + d(5) + d(6)) * 100.0 / all;
    let ncpu = std::thread::available_parallelism().unwrap().get() as f64;
    let rows: f64 = out.iter().map(|r| r.cpu_pct as f64).sum::<f64>() / ncpu;
    eprintln!("host process CPU {host:.2} % of all CPUs; rows sum to {rows:.2} %");
    assert!(
        (rows - host).abs() <= 2.0,
        "rows {rows:.2} vs host {host:.2}"
    );
    let other = out.last().unwrap();
    assert_eq!(other.comm, "other");
    assert!(other.processes as usize + out.len() - 1 == p.count);
}
