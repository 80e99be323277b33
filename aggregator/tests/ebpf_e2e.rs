//! eBPF probes end to end: a real sensor with its probes attached to this kernel ships
//! histograms and counters through QUIC to the aggregator and a real ClickHouse 18.16; the
//! README's latency query answers; and when the sensor exits (SIGTERM or kill -9) none of
//! its programs stays loaded.

mod common;

use common::*;
use std::time::Duration;

/// Our programs (the kernel cuts BPF object names at 15 bytes; `ours_loaded` compares
/// that much): what a sensor with every probe attaches by default on a kernel with BTF
/// tracepoints, with per-cgroup run-queue histograms on (as the test configures it).
const PROGRAMS: &[&str] = &[
    "rq_switch_cg_btf",
    "block_done_btf",
    "tcp_retransmit_skb",
    "tcp_send_reset",
    "tcp_receive_reset",
    "mark_victim",
    "sched_process_fork",
    "sched_process_exec",
    "sched_process_exit",
];

/// The other designs' programs (raw tracepoints, the run-queue fallback, the block issue and
/// completion pair), counted too so that whichever design a kernel gets is seen to detach.
const FALLBACK: &[&str] = &[
    "rq_switch_btf",
    "rq_switch_si",
    "rq_wakeup",
    "rq_wakeup_new",
    "rq_switch",
    "block_done_cg_btf",
    "block_rq_issue",
    "block_rq_issue_cg",
    "block_rq_complete",
];

fn ours_loaded() -> usize {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| {
            let n = p.name_as_str().unwrap_or("");
            PROGRAMS
                .iter()
                .chain(FALLBACK)
                .any(|o| &o[..o.len().min(15)] == n)
        })
        .count()
}

/// The README's "run-queue p99 per container" query.
fn readme_query(marker: &str) -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    readme
        .split("```sql\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .find(|q| q.contains(marker))
        .unwrap_or_else(|| panic!("no README query with {marker}"))
        .trim()
        .to_string()
}

/// The tests here count this project's programs loaded in the kernel: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

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
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Dir::new("ebpf-e2e");
    certs(&dir.0.join("certs"), &["ebpf-host"]);
    let agg = start_aggregator(&dir.0, free_udp_port(), "a");
    let before = ours_loaded();
    // Per-cgroup run-queue histograms on, for the README's per-container query.
    let cfg = dir.0.join("sensor.toml");
    std::fs::write(&cfg, "[probes]\nrunqueue_cgroups = 5\n").unwrap();
    let cfg_arg = cfg.to_string_lossy().to_string();
    let mut sensor = start_sensor(
        &dir.0,
        &agg.quic,
        "ebpf-host",
        &["--batch-interval", "1s", "--config", &cfg_arg],
    );
    wait_until("probe rows in ClickHouse", Duration::from_secs(30), || {
        count(
            &agg,
            "SELECT count() FROM sonde.latency WHERE host = 'ebpf-host' AND source = 'runqueue'",
        ) >= 2
            && count(
                &agg,
                "SELECT count() FROM sonde.probes WHERE host = 'ebpf-host'",
            ) >= 2
            // A round's tables are written concurrently: its `hosts` row may land last.
            && count(
                &agg,
                "SELECT count() FROM sonde.hosts WHERE host = 'ebpf-host'",
            ) >= 1
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
    // Per cgroup: rows that add up like the host's, and the README query answers.
    wait_until("cgroup_latency rows", Duration::from_secs(20), || {
        count(
            &agg,
            "SELECT count() FROM sonde.cgroup_latency WHERE host = 'ebpf-host' AND source = 'runqueue'",
        ) >= 2
    });
    let bad = count(
        &agg,
        "SELECT count() FROM sonde.cgroup_latency WHERE arraySum(bucket_count) != count OR cgroup = ''",
    );
    assert_eq!(bad, 0);
    let out = query(&agg, &readme_query("sonde.cgroup_latency"));
    let line = out
        .lines()
        .next()
        .expect("a row from the README per-container query");
    let f: Vec<&str> = line.split('\t').collect();
    assert_eq!(f[0], "ebpf-host", "{line}");
    assert!(
        f[1] == "other" || f[1].starts_with('/'),
        "cgroup label {line}"
    );
    // SIGTERM: everything detached.
    let st = sensor.stop();
    assert!(st.success(), "{st}");
    // The kernel frees a program shortly after its last reference goes (deferred work).
    wait_until(
        "programs gone after SIGTERM",
        Duration::from_secs(5),
        || ours_loaded() == before,
    );
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

fn status_field(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
        .unwrap_or_default()
}

#[test]
fn sensor_runs_unprivileged_after_loading_probes() {
    if !is_root() {
        eprintln!("SKIP: eBPF needs root");
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Dir::new("ebpf-user");
    certs(&dir.0.join("certs"), &["nobody-host"]);
    let agg = start_aggregator(&dir.0, free_udp_port(), "a");
    let mut sensor = start_sensor(
        &dir.0,
        &agg.quic,
        "nobody-host",
        &["--batch-interval", "1s", "--user", "nobody"],
    );
    let pid = sensor.child.id();
    wait_until("privileges dropped", Duration::from_secs(20), || {
        sensor.log_text().contains("privileges dropped")
    });
    assert_eq!(
        status_field(pid, "Uid:")
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["65534"; 4],
        "real, effective, saved and fs uid are nobody"
    );
    assert_eq!(status_field(pid, "CapEff:"), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm:"), "0000000000000000");
    assert_eq!(status_field(pid, "CapBnd:"), "0000000000000000");
    assert_eq!(status_field(pid, "NoNewPrivs:"), "1");
    // Maps are still read and the spool still written: probe rows keep arriving.
    let rows = || {
        count(
            &agg,
            "SELECT count() FROM sonde.latency WHERE host = 'nobody-host' AND source = 'runqueue'",
        )
    };
    wait_until(
        "probe rows from the unprivileged sensor",
        Duration::from_secs(30),
        || rows() >= 3,
    );
    let n = rows();
    wait_until("more probe rows", Duration::from_secs(20), || rows() > n);
    let spool = dir.0.join("spool-nobody-host");
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&spool).unwrap());
    assert_eq!(owner, 65534, "spool handed to the user");
    let st = sensor.stop();
    assert!(st.success(), "{st}");
    // A user that does not exist is refused at start, before anything runs.
    let out = std::process::Command::new(bin("sensor"))
        .args(["run", "--user", "no-such-user-sonde"])
        .arg("--ca")
        .arg(dir.0.join("certs/ca.pem"))
        .arg("--cert")
        .arg(dir.0.join("certs/hosts/nobody-host.pem"))
        .arg("--key")
        .arg(dir.0.join("certs/hosts/nobody-host-key.pem"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no such user"), "{err}");
}
