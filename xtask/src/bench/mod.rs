//! `cargo xtask bench`: overhead, wire size, eBPF probe cost and detection speed, measured
//! in one run on this machine next to node_exporter and Netdata, written to
//! docs/BENCHMARKS.md and target/bench/results.json. Nothing here is a test: figures are
//! reported, never asserted. One file per section; this one holds the shared process and
//! measurement helpers and runs the sections in order.

use crate::setup::{apt_install, have, root, run, step};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod cluster;
mod console;
mod containers;
mod detect;
mod ebpf;
mod ingest;
mod overhead;
mod report;
mod storage;
mod tiers;
use console::*;
use containers::*;
use detect::*;
use ebpf::*;
use ingest::*;
use overhead::*;
use report::*;
use storage::*;
pub use tiers::run_storage;
use tiers::*;

struct Proc {
    child: Child,
    name: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!("==> {} did not stop on SIGTERM; killing it", self.name);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Proc> {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    Ok(Proc {
        child,
        name: name.into(),
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http(addr: &str, path: &str, gzip: bool) -> Option<(u16, Vec<u8>)> {
    let mut s =
        std::net::TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let enc = if gzip {
        "Accept-Encoding: gzip\r\n"
    } else {
        ""
    };
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{enc}\r\n").ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let split = out.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&out[..split]).to_string();
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, out[split + 4..].to_vec()))
}

/// CPU time (ns) of a process: sum_exec_runtime from /proc/PID/schedstat when the kernel keeps
/// it, else utime+stime ticks from /proc/PID/stat.
/// CPU time of a process, all its threads: the sum of every live thread's
/// `/proc/PID/task/TID/schedstat` (ns precision; the process-level file covers the
/// main thread only, which for multi-threaded programs is most of the time idle).
/// Falls back to utime+stime (10 ms ticks) where schedstat is missing.
fn cpu_ns(pid: u32) -> u64 {
    if pid == 0 {
        return 0;
    }
    let mut sum = 0u64;
    let mut any = false;
    if let Ok(d) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for e in d.flatten() {
            if let Ok(s) = std::fs::read_to_string(e.path().join("schedstat")) {
                if let Some(v) = s
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                {
                    sum += v;
                    any = true;
                }
            }
        }
    }
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return sum;
    };
    let rest = s.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    if any {
        // Live threads only: a thread that exits takes its time with it (the programs
        // measured here keep their threads).
        sum
    } else {
        ticks * 1_000_000_000 / hz
    }
}

/// A counter or gauge from an aggregator's /metrics (0 when absent).
fn metric(http_addr: &str, name: &str) -> u64 {
    http(http_addr, "/metrics", false)
        .and_then(|(_, body)| {
            let body = String::from_utf8_lossy(&body).to_string();
            body.lines()
                .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .unwrap_or(0.0) as u64
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn hwm_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// A process and all its descendants (Netdata runs plugins as children).
fn tree(root: u32) -> Vec<u32> {
    let mut parent = std::collections::HashMap::new();
    if let Ok(d) = std::fs::read_dir("/proc") {
        for e in d.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                let rest = s.rsplit(')').next().unwrap_or("");
                if let Some(pp) = rest
                    .split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u32>().ok())
                {
                    parent.insert(pid, pp);
                }
            }
        }
    }
    parent
        .keys()
        .copied()
        .filter(|&p| {
            let mut cur = p;
            for _ in 0..32 {
                if cur == root {
                    return true;
                }
                match parent.get(&cur) {
                    Some(&pp) if pp != 0 => cur = pp,
                    _ => return false,
                }
            }
            false
        })
        .collect()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn spread(v: &[f64]) -> (f64, f64) {
    (
        v.iter().cloned().fold(f64::INFINITY, f64::min),
        v.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
    )
}

fn ensure_tools() -> Result<()> {
    let mut missing = Vec::new();
    for (cmd, pkg) in [
        ("prometheus-node-exporter", "prometheus-node-exporter"),
        ("netdata", "netdata"),
        ("fio", "fio"),
        ("perf", "linux-perf"),
        ("collectd", "collectd-core"),
        ("bpftrace", "bpftrace"),
    ] {
        if !have(cmd) && !Path::new(&format!("/usr/sbin/{cmd}")).exists() {
            missing.push(pkg);
        }
    }
    if missing.is_empty() {
        step("benchmark peers and tools (node_exporter, netdata, fio, perf, collectd, bpftrace): installed");
        return Ok(());
    }
    apt_install(&missing)
}

struct Env {
    dir: PathBuf,
    bin: PathBuf,
    agg_quic: String,
    agg_http: String,
    ch_http: String,
}

/// What the aggregator logs at start when its managed ClickHouse's data is on an ext4
/// without a journal.
const NO_JOURNAL: &str = "on an ext4 filesystem without a journal";

/// True when the aggregator last started under `dir` warned that ClickHouse's data is on an
/// ext4 without a journal.
fn journal_less(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("aggregator.log")).is_ok_and(|l| l.contains(NO_JOURNAL))
}

fn machine(dir: &Path) -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().map(|l| l.to_string()))
        .unwrap_or_default();
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "memory": mem,
        "kernel": kernel,
        "data_dir": dir.display().to_string(),
        "data_journal_less": journal_less(dir),
    })
}

/// Starts the aggregator (managed ClickHouse) with its state under `dir/agg` and the
/// certificates in `dir/certs`.
fn start_env(dir: &Path, bin: PathBuf) -> Result<(Proc, Env)> {
    start_env_with(dir, bin, &[])
}

/// Like `start_env`, with extra aggregator arguments (e.g. `--config FILE`).
fn start_env_with(dir: &Path, bin: PathBuf, extra: &[String]) -> Result<(Proc, Env)> {
    let quic = format!("127.0.0.1:{}", free_port());
    let http_addr = format!("127.0.0.1:{}", free_port());
    let c = dir.join("certs");
    step("starting the aggregator (managed ClickHouse)");
    let agg = spawn(
        "aggregator",
        Command::new(bin.join("aggregator"))
            .arg("run")
            .args(["--listen", &quic, "--http-listen", &http_addr])
            .arg("--data-dir")
            .arg(dir.join("agg"))
            .arg("--ca")
            .arg(c.join("ca.pem"))
            .arg("--cert")
            .arg(c.join("aggregator.pem"))
            .arg("--key")
            .arg(c.join("aggregator-key.pem"))
            .args(extra)
            .env("RUST_LOG", "warn"),
        &dir.join("aggregator.log"),
    )?;
    let deadline = Instant::now() + Duration::from_secs(90);
    while !matches!(http(&http_addr, "/readyz", false), Some((200, _))) {
        if Instant::now() > deadline {
            bail!(
                "aggregator not ready; see {}",
                dir.join("aggregator.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if journal_less(dir) {
        step(&format!(
            "warning: ClickHouse's data ({}) is on an ext4 without a journal, where its inserts \
             are much slower (docs/BENCHMARKS.md, section 3): the ingest figures may be low; \
             --dir on a journaled filesystem or a tmpfs avoids it",
            dir.join("agg").display()
        ));
    }
    let ports = std::fs::read_to_string(dir.join("agg/clickhouse/ports"))?;
    let ch_port = ports
        .lines()
        .find_map(|l| l.strip_prefix("http_port="))
        .context("clickhouse port")?;
    let env = Env {
        dir: dir.to_path_buf(),
        bin,
        agg_quic: quic,
        agg_http: http_addr,
        ch_http: format!("127.0.0.1:{ch_port}"),
    };
    Ok((agg, env))
}

/// `--only ingest`: the sustained-rate steps with one insert round at a time and with the
/// default four in flight, each on a fresh aggregator and managed ClickHouse.
fn ingest_only(dir: &Path, bin: PathBuf, quick: bool) -> Result<()> {
    let (rates, secs): (&[f64], u32) = if quick {
        (&[2e6], 6)
    } else {
        (&[1.5e6, 2e6, 3e6, 4e6], 20)
    };
    ingest::build_loadgen()?;
    let mut runs = Vec::new();
    for rounds in [1, 4] {
        let _ = std::fs::remove_dir_all(dir.join("agg"));
        let cfg = dir.join(format!("ingest-rounds-{rounds}.toml"));
        std::fs::write(&cfg, format!("[clickhouse]\ninsert_rounds = {rounds}\n"))?;
        step(&format!("ingest with clickhouse.insert_rounds = {rounds}"));
        let (agg, env) = start_env_with(
            dir,
            bin.clone(),
            &["--config".into(), cfg.display().to_string()],
        )?;
        let steps = ingest::ingest_steps(&env, agg.child.id(), rates, secs)?;
        drop(agg);
        runs.push(json!({ "insert_rounds": rounds, "steps": steps }));
    }
    let _ = std::fs::remove_dir_all(dir.join("agg"));
    let md = format!(
        "# sonde benchmarks: ingest only\n{}",
        report::ingest_rounds_md(&runs)
    );
    let doc = dir.join("BENCHMARKS-ingest.md");
    std::fs::write(&doc, &md)?;
    std::fs::write(
        dir.join("results-ingest.json"),
        serde_json::to_string_pretty(&runs)?,
    )?;
    println!("{md}");
    step(&format!("results: {}", doc.display()));
    Ok(())
}

pub fn run_bench(quick: bool, only: Option<&str>, dir: Option<PathBuf>) -> Result<()> {
    if let Some(o) =
        only.filter(|o| !["containers", "ebpf", "wire", "ingest", "cluster"].contains(o))
    {
        bail!(
            "--only {o}: the sections that run alone are: containers, ebpf, wire, ingest, cluster"
        );
    }
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark needs root (eBPF probes, loop devices)");
    }
    let root = root();
    crate::setup::ensure_clickhouse()?;
    ensure_tools()?;
    crate::ebpf::build()?;
    step("building release binaries");
    run(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "sonde-sensor",
        "-p",
        "sonde-aggregator",
    ]))?;
    let dir = match dir {
        Some(d) => std::path::absolute(&d)
            .with_context(|| format!("--dir {}", d.display()))?
            .join("sonde-bench"),
        None => root.join("target/bench"),
    };
    let _ = std::fs::remove_dir_all(dir.join("agg"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    step(&format!("the benchmark's files under {}", dir.display()));
    if only == Some("wire") {
        // This host's own snapshots, then every encoding over them.
        let n = if quick { 30 } else { 120 };
        step(&format!(
            "recording {n} snapshots of this host (sensor record, 1 s apart)"
        ));
        let rec = dir.join("record.bin");
        run(Command::new(root.join("target/release/sensor"))
            .args(["record", "--count", &n.to_string(), "--out"])
            .arg(&rec))?;
        let w = wire_study(&rec)?;
        let md = format!("# sonde benchmarks: wire size only\n{}", wire_md(&w));
        let doc = dir.join("BENCHMARKS-wire.md");
        std::fs::write(&doc, &md)?;
        println!("{md}");
        step(&format!("results: {}", doc.display()));
        return Ok(());
    }
    crate::certs::run(
        &dir.join("certs"),
        &[
            "bench-proc".into(),
            "bench-ebpf".into(),
            "bench-cg-off".into(),
            "bench-cg-on".into(),
            "bench-cg-all".into(),
        ],
        &[],
        false,
    )?;
    let bin = root.join("target/release");
    if only == Some("ingest") {
        return ingest_only(&dir, bin, quick);
    }
    if only == Some("cluster") {
        return cluster::cluster_bench(&dir, bin, quick);
    }
    let (agg, env) = start_env(&dir, bin)?;
    let _ = &env.agg_http;
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    if only == Some("ebpf") {
        let e = ebpf_overhead(&env, if quick { 3 } else { 9 }, quick)?;
        drop(agg);
        let md = format!(
            "# sonde benchmarks: eBPF probes only ({date})\n{}",
            ebpf_md(&e)
        );
        let doc = dir.join("BENCHMARKS-ebpf.md");
        std::fs::write(&doc, &md)?;
        println!("{md}");
        step(&format!("results: {}", doc.display()));
        return Ok(());
    }
    if only.is_some() {
        let c = containers(&env, if quick { 10 } else { 30 })?;
        drop(agg);
        let md = format!(
            "# sonde benchmarks: containers and processes only ({date})\n{}",
            containers_md(&c)
        );
        let doc = dir.join("BENCHMARKS-containers.md");
        std::fs::write(&doc, &md)?;
        println!("{md}");
        step(&format!("results: {}", doc.display()));
        return Ok(());
    }
    let secs = if quick { 15 } else { 60 };
    // Real snapshots of this host for the batch-size / dictionary study, recorded while
    // the overhead window runs (one more light process on the machine).
    let rec = dir.join("record.bin");
    let recorder = spawn(
        "sensor record",
        Command::new(env.bin.join("sensor"))
            .args(["record", "--count", &secs.max(20).to_string(), "--out"])
            .arg(&rec),
        &dir.join("record.log"),
    )?;
    let overhead = overhead(&env, secs)?;
    let mut recorder = recorder;
    let _ = recorder.child.wait();
    let wire = wire_study(&rec).unwrap_or_else(|e| json!({"error": e.to_string()}));
    let containers = containers(&env, if quick { 10 } else { 30 })
        .unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
    let ebpf = ebpf_overhead(&env, if quick { 3 } else { 9 }, quick)?;
    let storage = storage_and_queries(&env, quick)?;
    let console = console_bench(
        &env,
        "gen-0",
        storage["hosts"].as_u64().unwrap_or(0),
        storage["hours"].as_u64().unwrap_or(1),
    );
    let tier_storage =
        tier_storage(&env, !quick).unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
    let ingest = ingest(&env, agg.child.id(), quick)?;
    drop(agg);
    // The generated history is large (GBs for the full run): do not leave it behind.
    let _ = std::fs::remove_dir_all(dir.join("agg"));
    let detect = detect_bench(quick)?;
    // The cluster (ZooKeeper and four servers; minutes to create the schema) only in the
    // full run.
    let cluster = if quick {
        Value::Null
    } else {
        cluster::cluster_section(&dir, env.bin.clone(), false)
            .map(|v| json!(v))
            .unwrap_or_else(|e| json!({"error": format!("{e:#}")}))
    };
    let results = json!({
        "date": date,
        "quick": quick,
        "machine": machine(&dir),
        "overhead": overhead,
        "ebpf": ebpf,
        "storage": storage,
        "tier_storage": tier_storage,
        "console": console,
        "containers": containers,
        "ingest": ingest,
        "wire_study": wire,
        "detect": detect,
        "cluster": cluster,
    });
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    let md = markdown(&results, quick);
    let doc = if quick {
        dir.join("BENCHMARKS.md")
    } else {
        std::fs::create_dir_all(root.join("docs"))?;
        root.join("docs/BENCHMARKS.md")
    };
    std::fs::write(&doc, &md)?;
    println!("{md}");
    step(&format!(
        "results: {} and {}",
        doc.display(),
        dir.join("results.json").display()
    ));
    Ok(())
}
