//! eBPF probes end to end: a real sensor with its probes attached to this kernel ships
//! histograms and counters through QUIC to the aggregator and a real ClickHouse 18.16; the
//! README's latency query answers; and when the sensor exits (SIGTERM or kill -9) none of
//! its programs stays loaded.

mod common;

use common::*;
use std::time::Duration;

/// Our programs as the kernel names them (BPF object names are cut at 15 bytes).
const PROGRAMS: &[&str] = &[
    "rq_wakeup",
    "rq_wakeup_new",
    "rq_switch",
    "block_rq_issue",
    "block_rq_complete",
    "tcp_retransmit_skb",
    "tcp_send_reset",
    "tcp_receive_reset",
    "mark_victim",
    "sched_process_fork",
    "sched_process_exec",
    "sched_process_exit",
];

fn ours_loaded() -> usize {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| {
            let n = p.name_as_str().unwrap_or("");
            PROGRAMS.iter().any(|o| &o[..o.len().min(15)] == n)
        })
        .count()
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// The README's "p50/p99 run-queue latency per host per minute" query.
pub const RUNQ_QUERY: &str = "\
SELECT host, minute,
       ub[arrayFirstIndex(c -> c >= total * 0.50, cum)] AS p50_us,
       ub[arrayFirstIndex(c -> c >= total * 0.99, cum)] AS p99_us,
       total AS wakeups
FROM (
    SELECT host, minute,
           arrayMap(b -> tupleElement(b, 1), buckets) AS ub,
           arrayCumSum(arrayMap(b -> tupleElement(b, 2), buckets)) AS cum,
           arraySum(arrayMap(b -> tupleElement(b, 2), buckets)) AS total
    FROM (
        SELECT host, minute, arraySort(groupArray((upper, n))) AS buckets
        FROM (
            SELECT host, toStartOfMinute(ts) AS minute, upper, sum(c) AS n
            FROM sonde.latency
            ARRAY JOIN bucket_upper AS upper, bucket_count AS c
            WHERE source = 'runqueue' AND ts > now() - 3600
            GROUP BY host, minute, upper
        )
        GROUP BY host, minute
    )
)
ORDER BY host, minute";

#[test]
fn probes_reach_clickhouse_and_detach_on_exit() {
    if !is_root() {
        eprintln!("SKIP: eBPF needs root");
        return;
    }
    let dir = Dir::new("ebpf-e2e");
    certs(&dir.0.join("certs"), &["ebpf-host"]);
    let agg = start_aggregator(&dir.0, free_udp_port(), "a");
    let before = ours_loaded();
    let mut sensor = start_sensor(&dir.0, &agg.quic, "ebpf-host", &["--batch-interval", "1s"]);
    wait_until("probe rows in ClickHouse", Duration::from_secs(30), || {
        count(
            &agg,
            "SELECT count() FROM sonde.latency WHERE host = 'ebpf-host' AND source = 'runqueue'",
        ) >= 2
            && count(
                &agg,
                "SELECT count() FROM sonde.probes WHERE host = 'ebpf-host'",
            ) >= 2
    });
    let during = ours_loaded();
    assert!(
        during >= before + PROGRAMS.len(),
        "expected {} programs loaded while the sensor runs, found {during} (before: {before})",
        PROGRAMS.len()
    );
    let probes = query(
        &agg,
        "SELECT argMax(probes, last_seen) FROM sonde.hosts WHERE host = 'ebpf-host'",
    );
    assert_eq!(probes.trim(), "runqueue,block,tcp,oom,process");
    // Histogram rows are self-consistent: bucket counts add up to the count.
    let bad = count(
        &agg,
        "SELECT count() FROM sonde.latency WHERE arraySum(bucket_count) != count OR length(bucket_upper) != length(bucket_count)",
    );
    assert_eq!(bad, 0);
    let out = query(&agg, RUNQ_QUERY);
    let line = out.lines().next().expect("a row from the README query");
    let f: Vec<&str> = line.split('\t').collect();
    assert_eq!(f[0], "ebpf-host");
    let (p50, p99): (u64, u64) = (f[2].parse().unwrap(), f[3].parse().unwrap());
    assert!(p50 >= 1 && p99 >= p50, "p50 {p50} p99 {p99}");
    // SIGTERM: everything detached.
    let st = sensor.stop();
    assert!(st.success(), "{st}");
    assert_eq!(ours_loaded(), before, "programs left after SIGTERM");
    // kill -9: the kernel drops them with the process's file descriptors.
    let mut s2 = start_sensor(&dir.0, &agg.quic, "ebpf-host", &[]);
    wait_until("programs attached", Duration::from_secs(20), || {
        ours_loaded() >= before + PROGRAMS.len()
    });
    s2.signal(libc::SIGKILL);
    let _ = s2.child.wait();
    wait_until(
        "programs gone after kill -9",
        Duration::from_secs(5),
        || ours_loaded() == before,
    );
}
