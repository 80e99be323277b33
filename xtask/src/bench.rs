//! `cargo xtask bench`: overhead, wire size, eBPF probe cost and detection speed, measured
//! in one run on this machine next to node_exporter and Netdata, written to
//! docs/BENCHMARKS.md and target/bench/results.json. Nothing here is a test: figures are
//! reported, never asserted.

use crate::setup::{apt_install, have, root, run, step};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
fn cpu_ns(pid: u32) -> u64 {
    if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/schedstat")) {
        if let Some(v) = s
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
        {
            if v > 0 {
                return v;
            }
        }
    }
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let rest = s.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    ticks * 1_000_000_000 / hz
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
    ] {
        if !have(cmd) && !Path::new(&format!("/usr/sbin/{cmd}")).exists() {
            missing.push(pkg);
        }
    }
    if missing.is_empty() {
        step("benchmark peers and tools (node_exporter, netdata, fio, perf): installed");
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

fn sensor_config(env: &Env, host: &str, probes: bool) -> Result<PathBuf> {
    let c = env.dir.join("certs");
    let p = env.dir.join(format!("sensor-{host}.toml"));
    std::fs::write(
        &p,
        format!(
            "aggregator = [\"{}\"]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n[probes]\nenabled = {probes}\n",
            env.agg_quic,
            c.join("ca.pem").display(),
            c.join(format!("hosts/{host}.pem")).display(),
            c.join(format!("hosts/{host}-key.pem")).display(),
        ),
    )?;
    Ok(p)
}

fn start_sensor(env: &Env, host: &str, probes: bool) -> Result<Proc> {
    let cfg = sensor_config(env, host, probes)?;
    spawn(
        &format!("sensor {host}"),
        Command::new(env.bin.join("sensor"))
            .arg("run")
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "warn"),
        &env.dir.join(format!("sensor-{host}.log")),
    )
}

fn ch(env: &Env, sql: &str) -> Result<String> {
    let mut s = std::net::TcpStream::connect(&env.ch_http)?;
    write!(
        s,
        "POST / HTTP/1.0\r\nHost: x\r\nContent-Length: {}\r\n\r\n{sql}",
        sql.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    if !out.starts_with("HTTP/1.0 200") && !out.starts_with("HTTP/1.1 200") {
        bail!("ClickHouse: {body}");
    }
    Ok(body)
}

/// 1 + 2: sensor (/proc only and with all probes), node_exporter scraped every second and
/// Netdata, side by side for `secs`; then bytes per sample on the wire.
fn overhead(env: &Env, secs: u64) -> Result<Value> {
    step(&format!(
        "overhead: sensor (/proc), sensor (+eBPF), node_exporter (scraped 1/s), netdata — {secs} s side by side"
    ));
    let ne_port = free_port();
    let ne_addr = format!("127.0.0.1:{ne_port}");
    let ne = spawn(
        "node_exporter",
        Command::new("prometheus-node-exporter").arg(format!("--web.listen-address={ne_addr}")),
        &env.dir.join("node_exporter.log"),
    )?;
    let nd_port = free_port();
    let nd = if have("netdata") || Path::new("/usr/sbin/netdata").exists() {
        Some(spawn(
            "netdata",
            Command::new("netdata").args(["-D", "-p", &nd_port.to_string()]),
            &env.dir.join("netdata.log"),
        )?)
    } else {
        None
    };
    let proc_only = start_sensor(env, "bench-proc", false)?;
    let with_ebpf = start_sensor(env, "bench-ebpf", true)?;
    // Let everything start (netdata's plugins take a few seconds) before measuring.
    std::thread::sleep(Duration::from_secs(5));
    let nd_pids = nd.as_ref().map(|p| tree(p.child.id())).unwrap_or_default();
    let pids = [
        ("sensor (/proc only)", vec![proc_only.child.id()]),
        (
            "sensor (/proc + all eBPF probes)",
            vec![with_ebpf.child.id()],
        ),
        ("node_exporter (scraped every 1 s)", vec![ne.child.id()]),
        ("netdata (default per-second collection)", nd_pids.clone()),
    ];
    let start: Vec<u64> = pids
        .iter()
        .map(|(_, p)| p.iter().map(|&p| cpu_ns(p)).sum())
        .collect();
    let t0 = Instant::now();
    let mut scrapes = 0u64;
    let mut gz_bytes = 0u64;
    let mut steady = vec![0u64; pids.len()];
    while t0.elapsed() < Duration::from_secs(secs) {
        let tick = Instant::now();
        for (i, (_, p)) in pids.iter().enumerate() {
            let rss: u64 = p.iter().map(|&p| rss_kb(p)).sum();
            steady[i] = steady[i].max(rss);
        }
        if let Some((200, body)) = http(&ne_addr, "/metrics", true) {
            scrapes += 1;
            gz_bytes += body.len() as u64;
        }
        std::thread::sleep(Duration::from_secs(1).saturating_sub(tick.elapsed()));
    }
    let wall = t0.elapsed().as_secs_f64();
    let mut rows = Vec::new();
    for (i, (name, p)) in pids.iter().enumerate() {
        if p.is_empty() {
            continue;
        }
        let cpu: u64 = p
            .iter()
            .map(|&p| cpu_ns(p))
            .sum::<u64>()
            .saturating_sub(start[i]);
        let rss: u64 = p.iter().map(|&p| hwm_kb(p)).sum();
        let collections = if i == 2 { scrapes as f64 } else { wall };
        rows.push(json!({
            "name": name,
            "cpu_seconds": cpu as f64 / 1e9,
            "cpu_pct_of_one_core": cpu as f64 / 1e9 / wall * 100.0,
            "cpu_ms_per_collection": cpu as f64 / 1e6 / collections,
            "peak_rss_mb": rss as f64 / 1024.0,
            "steady_rss_mb": steady[i] as f64 / 1024.0,
        }));
    }
    // node_exporter: samples in one scrape (uncompressed), gzip bytes per sample.
    let (_, plain) = http(&ne_addr, "/metrics", false).unwrap_or((0, Vec::new()));
    let ne_samples = String::from_utf8_lossy(&plain)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .count() as f64;
    let ne_bps = if scrapes > 0 && ne_samples > 0.0 {
        gz_bytes as f64 / scrapes as f64 / ne_samples
    } else {
        f64::NAN
    };
    drop(proc_only);
    drop(with_ebpf);
    drop(ne);
    drop(nd);
    std::thread::sleep(Duration::from_secs(2));
    // sonde's wire size per sensor, from the aggregator's audit table.
    let tsv = ch(
        env,
        "SELECT host, sum(bytes), sum(samples), count(), round(avg(snapshots), 1) FROM sonde.batches WHERE host LIKE 'bench-%' GROUP BY host ORDER BY host FORMAT TabSeparated",
    )?;
    let mut wire = Vec::new();
    for l in tsv.lines() {
        let f: Vec<&str> = l.split('\t').collect();
        if f.len() == 5 {
            let (b, s): (f64, f64) = (f[1].parse().unwrap_or(0.0), f[2].parse().unwrap_or(1.0));
            wire.push(json!({
                "host": f[0], "bytes": b, "samples": s, "batches": f[3], "snapshots_per_batch": f[4],
                "bytes_per_sample": b / s.max(1.0),
            }));
        }
    }
    Ok(json!({
        "seconds": wall,
        "processes": rows,
        "wire": wire,
        "node_exporter": { "scrapes": scrapes, "samples_per_scrape": ne_samples, "gzip_bytes_per_sample": ne_bps },
    }))
}

fn perf_pipe(loops: u32) -> Result<f64> {
    // Both tasks on one CPU: every op is two wakeups and two context switches on that CPU,
    // and cross-CPU migration noise is out of the figure.
    let out = Command::new("taskset")
        .args([
            "-c",
            "1",
            "perf",
            "bench",
            "sched",
            "pipe",
            "-l",
            &loops.to_string(),
        ])
        .output()
        .context("perf bench")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "     12.345678 usecs/op"
    text.lines()
        .find(|l| l.contains("usecs/op"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .context("no usecs/op in perf output")
}

fn fio_iops(dev: &str, secs: u32) -> Result<f64> {
    let out = Command::new("fio")
        .args([
            "--name=randread",
            &format!("--filename={dev}"),
            "--rw=randread",
            "--bs=4k",
            "--direct=1",
            "--ioengine=psync",
            "--time_based",
            &format!("--runtime={secs}"),
            "--output-format=json",
        ])
        .output()
        .context("fio")?;
    let v: Value = serde_json::from_slice(&out.stdout).context("fio json")?;
    v["jobs"][0]["read"]["iops"].as_f64().context("no iops")
}

/// 4: eBPF probe cost on the workloads that hit them hardest, alternating off/on.
fn ebpf_overhead(env: &Env, rounds: usize, quick: bool) -> Result<Value> {
    step("eBPF overhead: perf bench sched pipe and 4k random reads on a loop device, probes off/on alternating");
    let img = env.dir.join("loop.img");
    run(Command::new("truncate").arg("-s").arg("256M").arg(&img))?;
    let out = Command::new("losetup")
        .arg("-f")
        .arg("--show")
        .arg(&img)
        .output()?;
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if dev.is_empty() {
        bail!("losetup failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    // Fill it so reads hit data.
    let _ = Command::new("dd")
        .args([
            "if=/dev/zero",
            &format!("of={dev}"),
            "bs=1M",
            "count=256",
            "oflag=direct",
            "status=none",
        ])
        .status();
    let loops = if quick { 50_000 } else { 200_000 };
    let fio_secs = if quick { 3 } else { 10 };
    let (mut pipe_off, mut pipe_on, mut fio_off, mut fio_on) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        pipe_off.push(perf_pipe(loops)?);
        fio_off.push(fio_iops(&dev, fio_secs)?);
        let s = start_sensor(env, "bench-ebpf", true)?;
        std::thread::sleep(Duration::from_secs(2));
        pipe_on.push(perf_pipe(loops)?);
        fio_on.push(fio_iops(&dev, fio_secs)?);
        drop(s);
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = Command::new("losetup").args(["-d", &dev]).status();
    let _ = std::fs::remove_file(&img);
    let (po, pn) = (median(&mut pipe_off.clone()), median(&mut pipe_on.clone()));
    let (fo, fnn) = (median(&mut fio_off.clone()), median(&mut fio_on.clone()));
    Ok(json!({
        "rounds": rounds,
        "sched_pipe_usecs_per_op": { "off": po, "on": pn, "off_range": spread(&pipe_off), "on_range": spread(&pipe_on),
                                      "slowdown_pct": (pn / po - 1.0) * 100.0 },
        "randread_4k_iops": { "off": fo, "on": fnn, "off_range": spread(&fio_off), "on_range": spread(&fio_on),
                               "slowdown_pct": (fo / fnn - 1.0) * 100.0 },
    }))
}

fn detect_bench(quick: bool) -> Result<Value> {
    step("detection: evaluations per second per core, state per series");
    let mut c = Command::new("cargo");
    c.current_dir(root()).args([
        "bench",
        "-q",
        "-p",
        "sonde-aggregator",
        "--bench",
        "detect",
        "--",
    ]);
    if quick {
        c.arg("--quick");
    }
    let out = c.output()?;
    if !out.status.success() {
        bail!("detect bench: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn machine() -> Value {
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
    })
}

fn f(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x.abs() >= 100.0 => format!("{x:.0}"),
        Some(x) if x.abs() >= 1.0 => format!("{x:.2}"),
        Some(x) => format!("{x:.3}"),
        None => v.to_string(),
    }
}

fn range(v: &Value) -> String {
    format!("{}–{}", f(&v[0]), f(&v[1]))
}

fn markdown(r: &Value, quick: bool) -> String {
    let mut s = String::new();
    let m = &r["machine"];
    s.push_str("# sonde benchmarks\n\nWritten by `cargo xtask bench");
    s.push_str(if quick { " --quick" } else { "" });
    s.push_str(&format!(
        "` on {}. Machine: {} ({} cores), {}, kernel {}. Every comparison below comes from the same run.\n\n",
        r["date"].as_str().unwrap_or(""),
        m["cpu"].as_str().unwrap_or(""),
        m["cores"],
        m["memory"].as_str().unwrap_or("").replace("MemTotal:", "MemTotal").trim(),
        m["kernel"].as_str().unwrap_or("")
    ));
    let o = &r["overhead"];
    s.push_str(&format!(
        "## 1. Collector overhead at a 1 s interval ({} s, side by side)\n\nMethod: all four run at once; CPU is the process's \
         (and for Netdata its plugins') CPU time over the window (`/proc/PID/schedstat` or utime+stime); RSS is the peak (VmHWM). \
         node_exporter is scraped once a second by the harness (per collection = per scrape). \"Peak RSS\" is VmHWM, start-up included; \
         \"steady RSS\" is the largest VmRSS sampled each second during the window. Targets: sensor ≤ 1.7 ms per collection, \
         ≤ 0.1% of one core, ≤ 12 MB.\n\n| process | CPU s | % of one core | ms per collection | peak RSS MB | steady RSS MB |\n|---|---|---|---|---|---|\n",
        f(&o["seconds"])
    ));
    for p in o["processes"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            p["name"].as_str().unwrap_or(""),
            f(&p["cpu_seconds"]),
            f(&p["cpu_pct_of_one_core"]),
            f(&p["cpu_ms_per_collection"]),
            f(&p["peak_rss_mb"]),
            f(&p["steady_rss_mb"])
        ));
    }
    s.push_str(&format!(
        "\n## 2. Wire size\n\nMethod: compressed bytes received by the aggregator over samples stored (a sample = one value of one series at one time), \
         from the `batches` table; node_exporter: gzip-encoded scrape bytes over the samples in a scrape. Target: ≤ 1 byte per sample.\n\n\
         | source | bytes per sample | detail |\n|---|---|---|\n| node_exporter (gzip scrape) | {} | {} samples per scrape |\n",
        f(&o["node_exporter"]["gzip_bytes_per_sample"]),
        f(&o["node_exporter"]["samples_per_scrape"])
    ));
    for w in o["wire"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "| sonde {} (zstd batches) | {} | {} samples in {} batches, {} snapshots per batch |\n",
            w["host"].as_str().unwrap_or(""),
            f(&w["bytes_per_sample"]),
            f(&w["samples"]),
            w["batches"].as_str().unwrap_or(""),
            w["snapshots_per_batch"].as_str().unwrap_or("")
        ));
    }
    if let Some(e) = r.get("ebpf") {
        s.push_str(&format!(
            "\n## 4. eBPF probe overhead\n\nMethod: {} rounds alternating without and with a sensor running all probes; medians (range). \
             `perf bench sched pipe` is the worst case for the scheduler probes (two context switches and two wakeups per op); 4 KiB \
             O_DIRECT random reads (fio, psync) on a loop device over a page-cached file are the worst case for the block probes. \
             Targets: ≤ 3% and ≤ 1%.\n\n| workload | without | with | slowdown |\n|---|---|---|---|\n\
             | sched pipe (one CPU), µs/op | {} ({}) | {} ({}) | {}% |\n| 4k randread, IOPS | {} ({}) | {} ({}) | {}% |\n",
            e["rounds"],
            f(&e["sched_pipe_usecs_per_op"]["off"]),
            range(&e["sched_pipe_usecs_per_op"]["off_range"]),
            f(&e["sched_pipe_usecs_per_op"]["on"]),
            range(&e["sched_pipe_usecs_per_op"]["on_range"]),
            f(&e["sched_pipe_usecs_per_op"]["slowdown_pct"]),
            f(&e["randread_4k_iops"]["off"]),
            range(&e["randread_4k_iops"]["off_range"]),
            f(&e["randread_4k_iops"]["on"]),
            range(&e["randread_4k_iops"]["on_range"]),
            f(&e["randread_4k_iops"]["slowdown_pct"]),
        ));
    }
    if let Some(d) = r["detect"].as_array() {
        s.push_str("\n## Detection\n\nMethod: the engine's own code on one core, 10,000 series, after warm-up (`aggregator/benches/detect.rs`).\n\n\
                    | detector | evaluations/s | ns per evaluation | state bytes per series |\n|---|---|---|---|\n");
        for x in d {
            s.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                x["detector"].as_str().unwrap_or(""),
                f(&x["evaluations_per_s"]),
                f(&x["ns_per_evaluation"]),
                x["state_bytes_per_series"]
            ));
        }
    }
    s.push_str("\n## Not measured yet\n\n3 (ingest load generator with N simulated sensors), 5 (bytes per sample on disk), 6 (query speed over \
                24 h × 100 hosts) are open work of the benchmark issue.\n");
    s
}

pub fn run_bench(quick: bool) -> Result<()> {
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
    let dir = root.join("target/bench");
    let _ = std::fs::remove_dir_all(dir.join("agg"));
    std::fs::create_dir_all(&dir)?;
    crate::certs::run(
        &dir.join("certs"),
        &["bench-proc".into(), "bench-ebpf".into()],
        &[],
        false,
    )?;
    let bin = root.join("target/release");
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
    let ports = std::fs::read_to_string(dir.join("agg/clickhouse/ports"))?;
    let ch_port = ports
        .lines()
        .find_map(|l| l.strip_prefix("http_port="))
        .context("clickhouse port")?;
    let env = Env {
        dir: dir.clone(),
        bin,
        agg_quic: quic,
        agg_http: http_addr,
        ch_http: format!("127.0.0.1:{ch_port}"),
    };
    let _ = &env.agg_http;
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let overhead = overhead(&env, if quick { 15 } else { 60 })?;
    let ebpf = ebpf_overhead(&env, if quick { 3 } else { 9 }, quick)?;
    drop(agg);
    let detect = detect_bench(quick)?;
    let results = json!({
        "date": date,
        "quick": quick,
        "machine": machine(),
        "overhead": overhead,
        "ebpf": ebpf,
        "detect": detect,
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
