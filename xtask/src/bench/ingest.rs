//! Ingest: the N-sensor QUIC load generator, sustained samples/s, 10k connections, wire study.

use super::*;

pub(super) fn loadgen(args: &[String]) -> Result<Value> {
    let out = Command::new("cargo")
        .current_dir(root())
        .args([
            "bench",
            "-q",
            "-p",
            "sonde-aggregator",
            "--bench",
            "loadgen",
            "--",
        ])
        .args(args)
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("load generator failed ({})", out.status);
    }
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.lines().last().unwrap_or("")).context("load generator output")
}

/// Builds the load generator first, so that its compilation is not inside a measured step.
pub(super) fn build_loadgen() -> Result<()> {
    step("building the load generator (cargo bench --no-run)");
    let st = Command::new("cargo")
        .current_dir(root())
        .args([
            "bench",
            "-q",
            "--no-run",
            "-p",
            "sonde-aggregator",
            "--bench",
            "loadgen",
        ])
        .status()?;
    if !st.success() {
        bail!("building the load generator failed ({st})");
    }
    Ok(())
}

/// 2 (continued): batch size and a trained zstd dictionary, on snapshots of this host
/// recorded by `sensor record` during the overhead window.
pub(super) fn wire_study(rec: &Path) -> Result<Value> {
    step("wire size: batch size and a trained zstd dictionary (recorded snapshots)");
    loadgen(&["wire".into(), "--input".into(), rec.display().to_string()])
}

/// 3: ingest. N simulated sensors over QUIC + mTLS against the running aggregator and its
/// ClickHouse: offered rate in steps, and the most concurrent connections held.
/// Sustained-rate steps: 200 simulated sensors offering each rate for `secs` seconds.
pub(super) fn ingest_steps(
    env: &Env,
    agg_pid: u32,
    rates: &[f64],
    secs: u32,
) -> Result<Vec<Value>> {
    let certs = env.dir.join("certs").display().to_string();
    let base = |mode: &str| -> Vec<String> {
        vec![
            "--aggregator".into(),
            env.agg_quic.clone(),
            "--certs".into(),
            certs.clone(),
            mode.into(),
        ]
    };
    let ch_pids = || -> Vec<u32> {
        tree(agg_pid)
            .into_iter()
            .filter(|&p| p != agg_pid)
            .collect()
    };
    let mut steps = Vec::new();
    for &rate in rates {
        // Each step starts on an idle aggregator: the previous step's backlog is not
        // counted in this one's lag.
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(120)
            && (super::metric(&env.agg_http, "sonde_queue_depth") > 0
                || super::metric(&env.agg_http, "sonde_insert_rounds_in_flight") > 0
                || super::metric(&env.agg_http, "sonde_streams_waiting") > 0)
        {
            std::thread::sleep(Duration::from_millis(500));
        }
        std::thread::sleep(Duration::from_secs(2));
        step(&format!(
            "ingest: 200 simulated sensors offering {:.0}k samples/s for {secs} s",
            rate / 1e3
        ));
        let chp = ch_pids();
        let merged0 = ch_events(env);
        let mut args = base("rate");
        args.extend([
            "--sensors".into(),
            "200".into(),
            "--samples-per-s".into(),
            rate.to_string(),
            "--secs".into(),
            secs.to_string(),
            "--prefix".into(),
            format!("load{}", rate as u64 / 1000),
            // CPU of the aggregator and ClickHouse over the timed run only (the batches
            // are encoded before it).
            "--watch".into(),
            std::iter::once(agg_pid)
                .chain(chp.iter().copied())
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(","),
        ]);
        let mut r = loadgen(&args)?;
        let wall = r["wall_s"].as_f64().unwrap_or(secs as f64).max(1.0);
        let watched: Vec<f64> = r["watched_cpu_s"]
            .as_array()
            .map(|v| v.iter().filter_map(|x| x.as_f64()).collect())
            .unwrap_or_default();
        r["aggregator_cores"] = json!(watched.first().copied().unwrap_or(0.0) / wall);
        r["clickhouse_cores"] = json!(watched.iter().skip(1).sum::<f64>() / wall);
        r["generator_cores"] = json!(r["generator_cpu_s"].as_f64().unwrap_or(0.0) / wall);
        // ClickHouse's merges: rows rewritten per row inserted during the step.
        let merged1 = ch_events(env);
        let inserted = merged1.0.saturating_sub(merged0.0);
        if inserted > 0 {
            r["merged_rows_per_inserted_row"] =
                json!(merged1.1.saturating_sub(merged0.1) as f64 / inserted as f64);
        }
        let ok = r["errors"] == 0
            && r["acked_samples_per_s"].as_f64().unwrap_or(0.0) >= 0.98 * rate
            && r["lag_ms_p99"].as_f64().unwrap_or(f64::MAX) <= 5000.0;
        r["sustained"] = json!(ok);
        println!(
            "    acked {:.0} samples/s, lag p50 {} ms p99 {} ms, aggregator {:.2} cores, ClickHouse {:.2} cores{}",
            r["acked_samples_per_s"].as_f64().unwrap_or(0.0),
            r["lag_ms_p50"],
            r["lag_ms_p99"],
            r["aggregator_cores"].as_f64().unwrap_or(0.0),
            r["clickhouse_cores"].as_f64().unwrap_or(0.0),
            if ok { "" } else { " — NOT sustained" }
        );
        steps.push(r);
    }
    Ok(steps)
}

/// ClickHouse's (InsertedRows, MergedRows) counters since it started.
fn ch_events(env: &Env) -> (u64, u64) {
    let q = "SELECT sumIf(value, event = 'InsertedRows'), sumIf(value, event = 'MergedRows') FROM system.events";
    let enc: String = q
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let text = super::http(&env.ch_http, &format!("/?query={enc}"), false)
        .map(|(_, body)| String::from_utf8_lossy(&body).to_string())
        .unwrap_or_default();
    let mut it = text.split_whitespace().map(|v| v.parse().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

pub(super) fn ingest(env: &Env, agg_pid: u32, quick: bool) -> Result<Value> {
    let certs = env.dir.join("certs").display().to_string();
    let base = |mode: &str| -> Vec<String> {
        vec![
            "--aggregator".into(),
            env.agg_quic.clone(),
            "--certs".into(),
            certs.clone(),
            mode.into(),
        ]
    };
    let (rates, secs): (&[f64], u32) = if quick {
        (&[1e6], 6)
    } else {
        (&[2.5e5, 5e5, 1e6, 1.5e6, 2e6, 3e6, 4e6], 20)
    };
    let steps = ingest_steps(env, agg_pid, rates, secs)?;
    let n = if quick { 1000 } else { 10_000 };
    let hold = if quick { 2 } else { 20 };
    step(&format!(
        "ingest: {n} simulated sensors connected at once, each sends a batch, held {hold} s"
    ));
    // Peak aggregator RSS while the connections are open.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_kb(agg_pid));
                std::thread::sleep(Duration::from_millis(200));
            }
            peak
        })
    };
    let rss0 = rss_kb(agg_pid);
    let mut args = base("connections");
    args.extend([
        "--sensors".into(),
        n.to_string(),
        "--hold".into(),
        hold.to_string(),
        "--prefix".into(),
        "conn".into(),
    ]);
    let conns = loadgen(&args);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap_or(0);
    let mut conns = conns?;
    conns["aggregator_rss_mb_before"] = json!(rss0 as f64 / 1024.0);
    conns["aggregator_rss_mb_peak"] = json!(peak as f64 / 1024.0);
    println!(
        "    {} connected, {} alive after the hold, {} batches acked; aggregator RSS {:.0} → {:.0} MB",
        conns["connected"],
        conns["alive_after_hold"],
        conns["batches_acked"],
        rss0 as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    let best = steps
        .iter()
        .filter(|r| r["sustained"] == true)
        .filter_map(|r| r["acked_samples_per_s"].as_f64())
        .fold(0.0, f64::max);
    Ok(json!({ "steps": steps, "connections": conns, "best_sustained_samples_per_s": best }))
}
