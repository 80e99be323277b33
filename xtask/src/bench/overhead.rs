//! Sensor overhead next to node_exporter and Netdata: CPU per collection, RSS, wire size.

use super::*;

fn probe_lines(one: &str) -> String {
    ["runqueue", "block", "tcp", "oom", "process"]
        .iter()
        .map(|n| format!("{n} = {}\n", *n == one))
        .collect()
}

/// `probes`: "none", "all", one probe name (only that one attached), or
/// "runqueue-cgroups" / "runqueue-fallback" / "runqueue-raw" / "block-raw" / "all-raw"
/// (the probes' other designs).
pub(super) fn sensor_config(env: &Env, host: &str, probes: &str) -> Result<PathBuf> {
    let c = env.dir.join("certs");
    let p = env.dir.join(format!("sensor-{host}-{probes}.toml"));
    let section = match probes {
        "none" => "enabled = false\n".to_string(),
        "all" => "enabled = true\n".to_string(),
        // The run-queue probe's variants: per-cgroup histograms on, or the wakeup programs.
        "runqueue-cgroups" => probe_lines("runqueue") + "runqueue_cgroups = 20\n",
        "runqueue-fallback" => probe_lines("runqueue") + "runqueue_fallback = true\n",
        // The raw-tracepoint designs (helper-call reads) where BTF tracepoints would load.
        "runqueue-raw" => probe_lines("runqueue") + "raw_tracepoints = true\n",
        "block-raw" => probe_lines("block") + "raw_tracepoints = true\n",
        "all-raw" => "enabled = true\nraw_tracepoints = true\n".to_string(),
        one => probe_lines(one),
    };
    std::fs::write(
        &p,
        format!(
            "aggregator = [\"{}\"]\nspool_dir = \"{}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n[probes]\n{section}",
            env.agg_quic,
            env.dir.join(format!("spool-{host}")).display(),
            c.join("ca.pem").display(),
            c.join(format!("hosts/{host}.pem")).display(),
            c.join(format!("hosts/{host}-key.pem")).display(),
        ),
    )?;
    Ok(p)
}

pub(super) fn start_sensor(env: &Env, host: &str, probes: &str) -> Result<Proc> {
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

pub(super) fn ch(env: &Env, sql: &str) -> Result<String> {
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
pub(super) fn overhead(env: &Env, secs: u64) -> Result<Value> {
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
    let proc_only = start_sensor(env, "bench-proc", "none")?;
    let with_ebpf = start_sensor(env, "bench-ebpf", "all")?;
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
    // Several consecutive windows, so each figure comes with a median and a spread.
    let n_windows = (secs / 5).clamp(3, 6);
    let win = Duration::from_secs_f64(secs as f64 / n_windows as f64);
    let mut marks: Vec<(Instant, Vec<u64>, u64)> = vec![(t0, start.clone(), 0)];
    while t0.elapsed() < Duration::from_secs(secs) {
        let tick = Instant::now();
        if tick.duration_since(marks.last().unwrap().0) >= win {
            let now: Vec<u64> = pids
                .iter()
                .map(|(_, p)| p.iter().map(|&p| cpu_ns(p)).sum())
                .collect();
            marks.push((tick, now, scrapes));
        }
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
    marks.push((
        Instant::now(),
        pids.iter()
            .map(|(_, p)| p.iter().map(|&p| cpu_ns(p)).sum())
            .collect(),
        scrapes,
    ));
    let mut rows = Vec::new();
    for (i, (name, p)) in pids.iter().enumerate() {
        if p.is_empty() {
            continue;
        }
        let mut per_window: Vec<f64> = marks
            .windows(2)
            .map(|w| {
                let dt = w[1].0.duration_since(w[0].0).as_secs_f64();
                let n = if i == 2 { (w[1].2 - w[0].2) as f64 } else { dt };
                w[1].1[i].saturating_sub(w[0].1[i]) as f64 / 1e6 / n.max(1.0)
            })
            .collect();
        let (lo, hi) = spread(&per_window);
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
            "windows": per_window.len(),
            "window_ms_median": median(&mut per_window),
            "window_ms_range": [lo, hi],
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
