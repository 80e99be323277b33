//! docs/BENCHMARKS.md from the results.

use super::*;

pub(super) fn f(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x.abs() >= 100.0 => format!("{x:.0}"),
        Some(x) if x.abs() >= 1.0 => format!("{x:.2}"),
        Some(x) => format!("{x:.3}"),
        None if v.is_null() => "—".into(),
        None => v.to_string(),
    }
}

pub(super) fn range(v: &Value) -> String {
    format!("{}–{}", f(&v[0]), f(&v[1]))
}

pub(super) fn markdown(r: &Value, quick: bool) -> String {
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
    if m["data_journal_less"] == true {
        s.push_str(&format!(
            "**ClickHouse's data was on an ext4 without a journal** (`{}`): ClickHouse's inserts are much slower there \
             (section 3), so the ingest figures of this run may be low. `--dir` on a journaled filesystem or a tmpfs avoids it.\n\n",
            m["data_dir"].as_str().unwrap_or("")
        ));
    }
    let o = &r["overhead"];
    s.push_str(&format!(
        "## 1. Collector overhead at a 1 s interval ({} s, side by side)\n\nMethod: all four run at once; CPU is the process's \
         (and for Netdata its plugins') CPU time over the window (all threads: the sum of `/proc/PID/task/*/schedstat`); RSS is the peak (VmHWM). \
         node_exporter is scraped once a second by the harness (per collection = per scrape). \"Peak RSS\" is VmHWM, start-up included; \
         \"steady RSS\" is the largest VmRSS sampled each second during the window. The window is also cut into consecutive sub-windows: \
         their median ms per collection and range show how noisy the figure is. Targets: sensor ≤ 1.7 ms per collection, \
         ≤ 0.1% of one core, ≤ 12 MB.\n\n| process | CPU s | % of one core | ms per collection | median (range) over sub-windows | peak RSS MB | steady RSS MB |\n|---|---|---|---|---|---|---|\n",
        f(&o["seconds"])
    ));
    for p in o["processes"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} ({}, {} windows) | {} | {} |\n",
            p["name"].as_str().unwrap_or(""),
            f(&p["cpu_seconds"]),
            f(&p["cpu_pct_of_one_core"]),
            f(&p["cpu_ms_per_collection"]),
            f(&p["window_ms_median"]),
            range(&p["window_ms_range"]),
            p["windows"],
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
    s.push_str(&wire_md(&r["wire_study"]));
    if let Some(i) = r.get("ingest") {
        s.push_str("\n## 3. Ingest\n\nMethod: `aggregator/benches/loadgen.rs` simulates sensors in one process: each has its own client \
                    certificate issued from the deployment CA (distinct host identity), its own QUIC connection with mutual TLS 1.3, and sends \
                    realistic 5-snapshot batches (9 CPU rows, 2 disks, 2 interfaces, 3 filesystems, PSI, TCP: 940 samples per batch, zstd \
                    level 3) at a fixed offered rate, staggered; every batch is encoded before the timed step and stamped with the time it is due \
                    (a late send counts in its lag). Lag = ack arrival − timestamp of the batch's newest sample; the aggregator acks \
                    only after the rows are committed in ClickHouse, so at ack time they are queryable. Everything (generator, aggregator, \
                    ClickHouse 18.16) shares this 2-core machine; CPU is each process's CPU time over the timed step. A step counts as sustained when \
                    ≥ 98% of the offered samples were acked, no batch failed and lag p99 ≤ 5 s. Targets: ≥ 1,000,000 samples/s, 10,000 sensors.\n\n\
                    | offered samples/s | acked samples/s | batches acked | lag p50 ms | lag p99 ms | aggregator cores | ClickHouse cores | generator cores | sustained |\n|---|---|---|---|---|---|---|---|---|\n");
        for st in i["steps"].as_array().into_iter().flatten() {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                f(&st["offered_samples_per_s"]),
                f(&st["acked_samples_per_s"]),
                st["batches_acked"],
                st["lag_ms_p50"],
                st["lag_ms_p99"],
                f(&st["aggregator_cores"]),
                f(&st["clickhouse_cores"]),
                f(&st["generator_cores"]),
                if st["sustained"] == true { "yes" } else { "no" }
            ));
        }
        let c = &i["connections"];
        s.push_str(&format!(
            "\nHighest sustained rate in this run: **{} samples/s**. Where a step is not sustained while the machine's two cores are \
             not saturated (aggregator + ClickHouse + generator well under 2 cores), the limit is the aggregator's single writer: it \
             runs one insert round at a time (an intent insert, 12 table inserts and the `batches` insert against ClickHouse 18.16), so \
             rounds grow and lag builds; several writers is the next step.\n\nConcurrent connections: {} simulated sensors connected at once \
             ({} handshakes in {} s), {} of them had a batch acked, and {} were still connected after holding them {} s \
             (failures: {}). Aggregator RSS {} MB before, {} MB peak with the connections open.\n",
            f(&i["best_sustained_samples_per_s"]),
            c["sensors"], c["connected"], f(&c["connect_s"]), c["batches_acked"], c["alive_after_hold"], c["hold_s"],
            c["connect_failed"], f(&c["aggregator_rss_mb_before"]), f(&c["aggregator_rss_mb_peak"])
        ));
    }
    if let Some(e) = r.get("ebpf") {
        s.push_str(&ebpf_md(e));
    }
    if let Some(st) = r.get("storage") {
        s.push_str(&format!(
            "\n## 5. Storage\n\nMethod: {} hosts × {} h of generated history (smooth curves plus noise) in the sonde schema; compressed bytes of \
             the active parts (`system.parts`) over samples (rows × numeric columns).\n\n| server | bytes per sample |\n|---|---|\n\
             | ClickHouse 18.16 (LZ4 default, no codecs) | {} |\n| {} with sonde's modern codecs (chdb-core, {} h) | {} |\n",
            st["hosts"], st["hours"],
            f(&st["clickhouse_18_bytes_per_sample"]),
            st["modern"]["engine"].as_str().map(|e| format!("ClickHouse {e}")).unwrap_or_else(|| format!("current engine: {}", st["modern"]["error"])),
            f(&st["modern"]["hours"]),
            f(&st["modern"]["bytes_per_sample"]),
        ));
        if let Some(t) = r.get("tier_storage") {
            s.push_str(&super::tiers::tier_markdown(t));
        }
        s.push_str(&format!(
            "\n## 6. Query speed\n\nMethod: every README query over the generated {} hosts × {} h on ClickHouse 18.16 (`FORMAT Null`), three runs, median (range).\n\n\
             | query (first line) | table | median ms | range ms |\n|---|---|---|---|\n",
            st["hosts"], st["hours"]
        ));
        for q in st["queries"].as_array().into_iter().flatten() {
            s.push_str(&format!(
                "| `{}` | {} | {} | {} |\n",
                q["query"].as_str().unwrap_or("").replace('|', "\\|"),
                q["table"].as_str().unwrap_or(""),
                f(&q["median_ms"]),
                range(&q["range_ms"])
            ));
        }
    }
    if let Some(c) = r.get("console") {
        s.push_str(&format!(
            "\n## 7. Console API\n\nMethod: the requests the console's pages make (read from the page), one after another against the generated history \
             through the aggregator (wall time per request, summed; bytes of the JSON bodies). Targets: host page over 24 h of 1 s data ≤ 300 ms and ≤ 1 MB; \
             fleet page of 1,000 hosts ≤ 1 s.\n\n| page | range | requests | server time ms | bytes |\n|---|---|---|---|---|\n\
             | host (`{}`) | {} h | {} | {} | {} |\n| fleet ({} hosts) | 1 h sparklines | {} | {} | {} |\n{}",
            c["host"].as_str().unwrap_or(""),
            c["hours"],
            c["host_calls"],
            f(&c["host_page_ms"]),
            c["host_page_bytes"],
            c["fleet_hosts"],
            c["fleet_calls"],
            f(&c["fleet_page_ms"]),
            c["fleet_page_bytes"],
            match c["failed"].as_array() {
                Some(v) if !v.is_empty() => format!("\nFailed requests: {v:?}\n"),
                _ => String::new(),
            }
        ));
    }
    if let Some(c) = r.get("containers") {
        s.push_str(&containers_md(c));
    }
    if let Some(c) = r["cluster"].as_array() {
        s.push_str(&super::cluster::cluster_md(c));
    } else if let Some(e) = r["cluster"].get("error") {
        s.push_str(&format!(
            "\n## 9. Scale-out: a ClickHouse cluster and two aggregators\n\nNot measured: {e}\n"
        ));
    }
    if let Some(d) = r["detect"].as_array() {
        s.push_str("\n## Detection\n\nMethod: the engine's own code on one core (series lookup, detector, alert lifecycle), 10,000 series unless named, after warm-up (`aggregator/benches/detect.rs`). State per series includes the engine's per-series record (labels, lifecycle). Detection quality is in [DETECTION.md](DETECTION.md).\n\n\
                    | detector | series | evaluations/s | ns per evaluation | state bytes per series |\n|---|---|---|---|---|\n");
        for x in d {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                x["detector"].as_str().unwrap_or(""),
                x["series"],
                f(&x["evaluations_per_s"]),
                f(&x["ns_per_evaluation"]),
                x["state_bytes_per_series"]
            ));
        }
    }
    s
}

/// Section 8 (also what `cargo xtask bench --only containers` prints).
/// The wire study (batch size, dictionary, columnar encoding) of section 2 (also what
/// `cargo xtask bench --only wire` prints).
pub(super) fn wire_md(w0: &Value) -> String {
    let mut s = String::new();
    if let Some(rows) = w0["rows"].as_array() {
        s.push_str(&format!(
            "\nEffect of batch size and of a trained zstd dictionary: {} real snapshots of this host recorded with `sensor record` \
             ({} samples each); the first half trains a 16 KiB dictionary (sliding windows of the batch size), the second half is \
             measured. Frame header included; level 3 as the sensor uses. The sensor sends 5-snapshot batches (5 s at 1 s) without \
             a dictionary, column by column (wire version 3: each value predicted from the same series in the previous snapshot, \
             `protocol/src/columnar.rs`); the row columns are version 2's records, which an aggregator of the previous release gets.\n\n\
             | snapshots per batch | batches measured | rows, uncompressed B/sample | rows + zstd B/sample | rows + zstd + dictionary B/sample | columnar + zstd B/sample (sent) |\n|---|---|---|---|---|---|\n",
            w0["snapshots"], w0["samples_per_snapshot"]
        ));
        for w in rows {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                w["snapshots_per_batch"],
                w["batches"],
                f(&w["raw_bytes_per_sample"]),
                f(&w["zstd_bytes_per_sample"]),
                f(&w["dict_bytes_per_sample"]),
                f(&w["columnar_bytes_per_sample"])
            ));
        }
    }
    s
}

/// Section 4, eBPF probe overhead (also what `cargo xtask bench --only ebpf` prints).
pub(super) fn ebpf_md(e: &Value) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "\n## 4. eBPF probe overhead\n\nMethod: {} rounds alternating without and with a sensor running only the probe the workload stresses; medians (range). \
         `perf bench sched pipe` (both tasks on one CPU) is the worst case for the run-queue probe (two context switches and two \
         wakeups per op); 4 KiB O_DIRECT random reads (fio, psync) on a loop device over a page-cached file are the worst case for \
         the block probe. \
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
    let sp = &e["sched_pipe_usecs_per_op"];
    if sp.get("wakeup_programs").is_some() {
        s.push_str(&format!(
            "\nThe run-queue probe's designs and the peer, on `sched pipe` in the same rounds (without: {} µs/op):\n\n\
             | run-queue tracing | µs/op | slowdown |\n|---|---|---|\n\
             | sonde, one program per switch, BTF tracepoint (default) | {} ({}) | {}% |\n",
            f(&sp["off"]),
            f(&sp["on"]),
            range(&sp["on_range"]),
            f(&sp["slowdown_pct"]),
        ));
        for (name, key) in [
            (
                "sonde, one program per switch, raw tracepoint",
                "raw_tracepoint",
            ),
            (
                "sonde, one program per switch + per-cgroup histograms",
                "per_cgroup",
            ),
            (
                "sonde, wakeup + switch programs (fallback)",
                "wakeup_programs",
            ),
            ("bpftrace runqlat (peer)", "bpftrace_runqlat"),
        ] {
            let v = &sp[key];
            if v.is_null() {
                s.push_str(&format!("| {name} | not measured | |\n"));
            } else {
                s.push_str(&format!(
                    "| {name} | {} ({}) | {}% |\n",
                    f(&v["median"]),
                    range(&v["range"]),
                    f(&v["slowdown_pct"])
                ));
            }
        }
    }
    if let Some(t) = e["toggled"].as_object().filter(|t| !t.is_empty()) {
        s.push_str(
            "\nThe run-queue designs toggled in place (`sensor probes --overhead 60s --phase 50ms`): \
             the sensor's own pipe ping-pong (two processes on one CPU, like `sched pipe`) runs \
             while the loaded programs are detached and attached again every 50 ms; the slowdown \
             is the median over the pairs of neighbouring phases, with its interquartile range. \
             The host's drift, which swamps the rounds above, falls on both halves of a pair alike.\n\n\
             | run-queue tracing | pairs | ns per round trip without | with | slowdown (median) | interquartile |\n\
             |---|---|---|---|---|---|\n",
        );
        for (name, key) in [
            (
                "sonde, one program per switch, BTF tracepoint (default)",
                "runqueue",
            ),
            (
                "sonde, one program per switch, raw tracepoint",
                "runqueue-raw",
            ),
            ("sonde, + per-cgroup histograms", "runqueue-cgroups"),
            (
                "sonde, wakeup + switch programs (fallback)",
                "runqueue-fallback",
            ),
        ] {
            let o = &t[key];
            if o.is_null() {
                s.push_str(&format!("| {name} | not measured | | | | |\n"));
            } else {
                s.push_str(&format!(
                    "| {name} | {} | {} | {} | **{}%** | {}% to {}% |\n",
                    o["pairs"],
                    f(&o["ns_per_round_trip_off"]),
                    f(&o["ns_per_round_trip_on"]),
                    f(&o["slowdown_pct"]),
                    f(&o["slowdown_p25_pct"]),
                    f(&o["slowdown_p75_pct"]),
                ));
            }
        }
    }
    let br = &e["randread_4k_iops"]["raw_tracepoints"];
    if !br.is_null() {
        s.push_str(&format!(
            "\nThe block probe's designs on 4k random reads in the same rounds (without: {} IOPS):\n\n\
             | block tracing | IOPS | slowdown |\n|---|---|---|\n\
             | sonde, one program per I/O at completion, BTF tracepoint (default) | {} ({}) | {}% |\n\
             | sonde, issue + completion programs (fallback; with per-cgroup block histograms) | {} ({}) | {}% |\n",
            f(&e["randread_4k_iops"]["off"]),
            f(&e["randread_4k_iops"]["on"]),
            range(&e["randread_4k_iops"]["on_range"]),
            f(&e["randread_4k_iops"]["slowdown_pct"]),
            f(&br["median"]),
            range(&br["range"]),
            f(&br["slowdown_pct"]),
        ));
    }
    s.push_str("\nPer program, from the kernel's BPF run-time statistics (`sensor probes --measure 6s` while both workloads ran; the default designs, then with `raw_tracepoints = true`):\n\n\
                | program | runs | average ns per run |\n|---|---|---|\n");
    for c in e["program_costs"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "| {} | {} | {} |\n",
            c["program"].as_str().unwrap_or(""),
            c["runs"],
            f(&c["avg_ns"])
        ));
    }
    s.push_str("\nHow to read it: wall-clock slowdowns on this 2-vCPU VM move by several percent between rounds (see the ranges); the per-run costs are the kernel's own accounting and do not depend on that noise. The run-queue probe runs once per context switch (`rq_switch_btf`: it reads the incoming task's `sched_info.last_queued` and its run queue's clock; as a BTF tracepoint those reads are plain loads, where the raw-tracepoint `rq_switch_si` calls `bpf_probe_read_kernel` for each); the block probe runs once per I/O (`block_done_btf`, at completion, from the request's own `start_time_ns`), where the fallback runs at issue and at completion and matches the two through a table; the run-queue fallback design (`rq_wakeup` + `rq_switch`, kernels without sched_info in BTF) runs on every wakeup and every switch. Entering any BPF program costs a good share of that here: compare `sched_process_exec`, which only increments a counter. Per-cgroup run-queue histograms (`[probes] runqueue_cgroups`, off by default; `rq_switch_cg_btf`) add five dependent kernel reads and a hash-map lookup per switch to find the task's cgroup and its histogram. Every probe can be turned off in `[probes]`.\n");
    s
}

pub(super) fn containers_md(c: &Value) -> String {
    let mut s = String::new();
    if c.get("rows").is_none() {
        s.push_str(&format!(
            "\n## 8. Containers and processes\n\nNot measured: {}\n",
            c["error"]
        ));
        return s;
    }
    s.push_str(&format!(
        "\n## 8. Containers and processes\n\nMethod: {} cgroups (every v1 controller, or the v2 tree) and {} processes on the host \
         ({} of them light workers waking 100 times a second, the rest sleeping, spread over the cgroups); all below run at once for {} s; \
         CPU per second of the process (tree), steady RSS the largest VmRSS sampled, peak RSS VmHWM. The sensor at 1 s three ways: \
         without its cgroup and process collectors, with them (defaults: idle cgroups and processes read in full every 5th interval), \
         and with everything read every interval. collectd 5.12 reads every cgroup's cpuacct (cgroups plugin) and every process \
         (processes plugin, one `ProcessMatch` for all); Netdata 1.37 runs its cgroups.plugin and apps.plugin by default. \
         Target: sensor ≤ 1.5 ms CPU per collection and ≤ 12 MB steady RSS with them.\n\n\
         | process | CPU ms per s | % of one core | steady RSS MB | peak RSS MB |\n|---|---|---|---|---|\n",
        c["cgroups"],
        c["processes"],
        c["busy_processes"],
        f(&c["secs"])
    ));
    for p in c["rows"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            p["name"].as_str().unwrap_or(""),
            f(&p["cpu_ms_per_s"]),
            f(&p["cpu_pct_of_one_core"]),
            f(&p["steady_rss_mb"]),
            f(&p["peak_rss_mb"]),
        ));
    }
    let w = &c["wire"];
    if w.get("bytes_per_new_sample").is_some() {
        s.push_str(&format!(
            "\nWire (a `sensor record` of this host with the load above, batches of 5 snapshots, zstd 3): per snapshot {} cgroups rows, \
             {} cgroup_io rows, {} processes rows = {} samples; a batch is {} bytes per snapshot with them and {} without: \
             **{} bytes per sample** of the new tables.\n",
            w["rows_per_snapshot"]["cgroups"],
            w["rows_per_snapshot"]["cgroup_io"],
            w["rows_per_snapshot"]["processes"],
            f(&w["new_samples_per_snapshot"]),
            f(&w["bytes_per_snapshot_with"]),
            f(&w["bytes_per_snapshot_without"]),
            f(&w["bytes_per_new_sample"]),
        ));
    }
    s
}

/// `--only ingest`: the sustained-rate steps per `insert_rounds` setting.
pub(super) fn ingest_rounds_md(runs: &[Value]) -> String {
    let mut s = String::from(
        "\nSame method as section 3 (200 simulated sensors, everything on this 2-core machine; the \
         generator encodes its batches before each timed step, and CPU is over the step), one fresh \
         aggregator and managed ClickHouse 18.16 per setting of `[clickhouse] insert_rounds`. \
         Merged rows: rows ClickHouse's merges rewrote per row inserted during the step.\n\n\
         | insert rounds in flight | offered samples/s | acked samples/s | lag p50 ms | lag p99 ms | aggregator cores | ClickHouse cores | generator cores | merged rows per inserted row | sustained (p99 ≤ 5 s) | p99 ≤ 2 s |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in runs {
        for st in r["steps"].as_array().into_iter().flatten() {
            let p99_2s =
                st["sustained"] == true && st["lag_ms_p99"].as_f64().unwrap_or(f64::MAX) <= 2000.0;
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                r["insert_rounds"],
                f(&st["offered_samples_per_s"]),
                f(&st["acked_samples_per_s"]),
                st["lag_ms_p50"],
                st["lag_ms_p99"],
                f(&st["aggregator_cores"]),
                f(&st["clickhouse_cores"]),
                f(&st["generator_cores"]),
                f(&st["merged_rows_per_inserted_row"]),
                if st["sustained"] == true { "yes" } else { "no" },
                if p99_2s { "yes" } else { "no" }
            ));
        }
    }
    s
}
