//! `--only cluster`: ingest into the local scale-out setup (ZooKeeper, 2 shards × 2
//! replicas of ClickHouse 18.16, two aggregators), the load split between the aggregators.
//! Everything shares this machine's two cores, so the figures that carry over to a real
//! deployment are per core: samples/s per aggregator core and per ClickHouse core.

use super::*;

/// Samples per second one simulated host sends (the load generator's batch: 940 samples
/// per 5 s).
const SAMPLES_PER_HOST_S: f64 = 188.0;

pub(super) fn cluster_bench(dir: &Path, bin: PathBuf, quick: bool) -> Result<()> {
    let out = cluster_section(dir, bin, quick)?;
    let md = format!("# sonde benchmarks: cluster only\n{}", cluster_md(&out));
    let doc = dir.join("BENCHMARKS-cluster.md");
    std::fs::write(&doc, &md)?;
    std::fs::write(
        dir.join("results-cluster.json"),
        serde_json::to_string_pretty(&out)?,
    )?;
    println!("{md}");
    step(&format!("results: {}", doc.display()));
    Ok(())
}

/// Section 9: the steps per insert quorum (2, the default majority, then 1).
pub(super) fn cluster_section(dir: &Path, bin: PathBuf, quick: bool) -> Result<Vec<Value>> {
    ingest::build_loadgen()?;
    let cdir = dir.join("certs");
    crate::certs::run(&cdir, &[], &[], false)?;
    let cl_dir = dir.join("cluster");
    let _ = std::fs::remove_dir_all(&cl_dir);
    let addrs: Vec<(String, String)> = (0..2)
        .map(|_| {
            (
                format!("127.0.0.1:{}", free_port()),
                format!("127.0.0.1:{}", free_port()),
            )
        })
        .collect();
    let mut out = Vec::new();
    // Quorum 2 (the default majority) runs one round at a time on 18.16; with quorum 1 the
    // rounds may overlap (4, an extra one only when full): a round on the cluster waits
    // on network round trips more than on CPU.
    for (quorum, rounds) in [(2u32, 1usize), (1, 4)] {
        let _ = std::fs::remove_dir_all(&cl_dir);
        let run = crate::cluster::start(&cl_dir, &bin, &cdir, &addrs, quorum, rounds)?;
        let (rates, secs): (&[f64], u32) = if quick {
            (&[2.5e5], 6)
        } else if quorum > 1 {
            // From 50,000 up: nothing at 250,000 or more was sustained here.
            (&[5e4, 1e5, 2.5e5, 5e5], 20)
        } else {
            (&[5e5, 1e6, 1.5e6], 20)
        };
        for &rate in rates {
            // Start each step on idle aggregators.
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(120)
                && run.aggs.iter().any(|a| {
                    super::metric(&a.http, "sonde_queue_depth") > 0
                        || super::metric(&a.http, "sonde_insert_rounds_in_flight") > 0
                        || super::metric(&a.http, "sonde_streams_waiting") > 0
                })
            {
                std::thread::sleep(Duration::from_millis(500));
            }
            std::thread::sleep(Duration::from_secs(2));
            step(&format!(
                "cluster (insert quorum {quorum}, insert rounds {rounds}): 2 × 100 simulated sensors offering {:.0}k samples/s for {secs} s, half to each aggregator",
                rate / 1e3
            ));
            let agg_pids: Vec<u32> = run.aggs.iter().map(|a| a.child.id()).collect();
            let ch_pids = run.cluster.pids();
            let cpu = |p: &[u32]| p.iter().map(|&p| cpu_ns(p)).sum::<u64>();
            let (a0, c0) = (cpu(&agg_pids), cpu(&ch_pids));
            let t0 = Instant::now();
            let results: Vec<Result<Value>> = std::thread::scope(|s| {
                let hs: Vec<_> = run
                    .aggs
                    .iter()
                    .enumerate()
                    .map(|(i, a)| {
                        let args: Vec<String> = vec![
                            "--aggregator".into(),
                            a.quic.clone(),
                            "--certs".into(),
                            cdir.display().to_string(),
                            "rate".into(),
                            "--sensors".into(),
                            "100".into(),
                            "--samples-per-s".into(),
                            (rate / 2.0).to_string(),
                            "--secs".into(),
                            secs.to_string(),
                            "--prefix".into(),
                            format!("cl{quorum}-{}-{i}", rate as u64 / 1000),
                        ];
                        s.spawn(move || ingest::loadgen(&args))
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let wall = t0.elapsed().as_secs_f64();
            let (a1, c1) = (cpu(&agg_pids), cpu(&ch_pids));
            let mut acked = 0.0;
            let mut errors = 0;
            let mut p99: f64 = 0.0;
            let mut p50: f64 = 0.0;
            let mut gen = 0.0;
            for r in results {
                let r = r?;
                acked += r["acked_samples_per_s"].as_f64().unwrap_or(0.0);
                errors += r["errors"].as_u64().unwrap_or(0);
                p99 = p99.max(r["lag_ms_p99"].as_f64().unwrap_or(0.0));
                p50 = p50.max(r["lag_ms_p50"].as_f64().unwrap_or(0.0));
                gen += r["generator_cpu_s"].as_f64().unwrap_or(0.0) / secs as f64;
            }
            let agg_cores = (a1 - a0) as f64 / 1e9 / wall;
            let ch_cores = (c1 - c0) as f64 / 1e9 / wall;
            let retries: u64 = run
                .aggs
                .iter()
                .map(|a| super::metric(&a.http, "sonde_quorum_retries_total"))
                .sum();
            let ok = errors == 0 && acked >= 0.98 * rate && p99 <= 5000.0;
            println!(
                "    acked {acked:.0} samples/s, lag p50 {p50} ms p99 {p99} ms, aggregators {agg_cores:.2} cores, ClickHouse+ZooKeeper {ch_cores:.2} cores, quorum retries so far {retries}{}",
                if ok { "" } else { " — NOT sustained" }
            );
            out.push(json!({
                "insert_quorum": quorum,
                "insert_rounds": rounds,
                "offered_samples_per_s": rate,
                "acked_samples_per_s": acked,
                "errors": errors,
                "lag_ms_p50": p50,
                "lag_ms_p99": p99,
                "aggregator_cores": agg_cores,
                "clickhouse_cores": ch_cores,
                "generator_cores": gen,
                "quorum_retries": retries,
                "sustained": ok,
                "samples_per_aggregator_core": acked / agg_cores.max(1e-9),
                "samples_per_clickhouse_core": acked / ch_cores.max(1e-9),
            }));
        }
        drop(run);
    }
    let _ = std::fs::remove_dir_all(&cl_dir);
    Ok(out)
}

pub(super) fn cluster_md(rows: &[Value]) -> String {
    let mut s = String::from(
        "\n## 9. Scale-out: a ClickHouse cluster and two aggregators\n\nZooKeeper, 2 shards × 2 replicas of ClickHouse 18.16 and two aggregators on this 2-core machine; two load \
         generators of 100 simulated sensors each (section 3's batches), one per aggregator. CPU is each group's CPU time \
         over the step (ClickHouse includes ZooKeeper). Sustained: ≥ 98 % acked, no error, lag p99 ≤ 5 s.\n\n\
         | insert quorum | insert rounds | offered samples/s | acked samples/s | lag p50 ms | lag p99 ms | aggregator cores | ClickHouse cores | samples/s per aggregator core | samples/s per ClickHouse core | quorum retries | sustained |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r["insert_quorum"],
            r["insert_rounds"],
            report::f(&r["offered_samples_per_s"]),
            report::f(&r["acked_samples_per_s"]),
            r["lag_ms_p50"],
            r["lag_ms_p99"],
            report::f(&r["aggregator_cores"]),
            report::f(&r["clickhouse_cores"]),
            report::f(&r["samples_per_aggregator_core"]),
            report::f(&r["samples_per_clickhouse_core"]),
            r["quorum_retries"],
            if r["sustained"] == true { "yes" } else { "no" }
        ));
    }
    // Projection from the best sustained step per quorum.
    for q in [2u64, 1] {
        let best = rows
            .iter()
            .filter(|r| r["insert_quorum"] == q && r["sustained"] == true)
            .max_by(|a, b| {
                a["acked_samples_per_s"]
                    .as_f64()
                    .partial_cmp(&b["acked_samples_per_s"].as_f64())
                    .unwrap()
            });
        if let Some(r) = best {
            let per_agg = r["samples_per_aggregator_core"].as_f64().unwrap_or(0.0);
            let per_ch = r["samples_per_clickhouse_core"].as_f64().unwrap_or(0.0);
            s.push_str(&format!(
                "\nProjection (quorum {q}, from the best sustained step): one aggregator core stores {:.0} samples/s, i.e. {:.0} hosts \
                 at {SAMPLES_PER_HOST_S} samples/s each (1 s interval); one ClickHouse core of the cluster {:.0} samples/s. With 2 replicas per \
                 shard every row is written twice, so a shard of two 8-core servers (16 cores) holds about {:.0} hosts, and a \
                 4-core aggregator about {:.0} hosts.\n",
                per_agg,
                per_agg / SAMPLES_PER_HOST_S,
                per_ch,
                per_ch * 16.0 / SAMPLES_PER_HOST_S,
                per_agg * 4.0 / SAMPLES_PER_HOST_S,
            ));
        }
    }
    s
}
