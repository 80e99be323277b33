//! Rollup tiers on a real ClickHouse 18.16 server (the aggregator's managed one): a known
//! raw series gives exactly the expected per-minute and per-hour aggregates, whether it was
//! stored before the tiers existed (the upgrade's backfill) or after (the materialized
//! views, rows arriving late and out of order); histogram quantiles from a tier equal
//! those from raw; each tier's retention drops what it should and nothing else.
//! The same known-series checks on a current engine are in `modern_engine.py`.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::time::Duration;

const SECONDS: u64 = 7200;

/// The chosen series: second `i` of the two hours, or None for the seconds left out (30 s
/// of every 10 minutes: buckets with fewer samples).
fn user(i: u64) -> Option<f64> {
    if (100..130).contains(&(i % 600)) {
        None
    } else {
        Some(((i * 37) % 101) as f64 / 4.0)
    }
}

fn rate(i: u64) -> f64 {
    ((i * 13) % 17) as f64 * 8.0
}

/// The raw rows of one host, as INSERT ... SELECT over `numbers`, split by `part`
/// (a WHERE over `number`) so a test can send them in several late, out-of-order blocks.
fn insert_known(agg: &Aggregator, host: &str, t0: u64, part: &str) {
    let keep = format!("NOT (number % 600 >= 100 AND number % 600 < 130) AND ({part})");
    query(
        agg,
        &format!(
            "INSERT INTO sonde.cpu (ts, host, cpu, user, idle) SELECT toDateTime({t0} + number), '{host}', 'total', \
             ((number * 37) % 101) / 4, 100 - ((number * 37) % 101) / 4 FROM numbers({SECONDS}) WHERE {keep}"
        ),
    );
    query(
        agg,
        &format!(
            "INSERT INTO sonde.net (ts, host, interface, rx_bytes_per_s) SELECT toDateTime({t0} + number), '{host}', 'eth0', \
             ((number * 13) % 17) * 8 FROM numbers({SECONDS}) WHERE {part}"
        ),
    );
    query(
        agg,
        &format!(
            "INSERT INTO sonde.latency (ts, host, source, unit, count, sum, bucket_upper, bucket_count) \
             SELECT toDateTime({t0} + number), '{host}', 'runqueue', 'us', 3 + number % 3 + number % 7, number, \
             [1, pow(2, 1 + number % 5), 1024], [1 + number % 3, 2, 1 + number % 7] FROM numbers({SECONDS}) WHERE {part}"
        ),
    );
}

#[derive(Debug, Default, PartialEq)]
struct Bucket {
    samples: u64,
    avg: f64,
    min: f64,
    max: f64,
    last: f64,
}

fn expected(width: u64) -> BTreeMap<u64, Bucket> {
    let mut m: BTreeMap<u64, (Vec<f64>, f64)> = BTreeMap::new();
    for i in 0..SECONDS {
        if let Some(v) = user(i) {
            let e = m.entry(i / width).or_default();
            e.0.push(v);
            e.1 = v;
        }
    }
    m.into_iter()
        .map(|(k, (v, last))| {
            (
                k,
                Bucket {
                    samples: v.len() as u64,
                    avg: v.iter().sum::<f64>() / v.len() as f64,
                    min: v.iter().cloned().fold(f64::MAX, f64::min),
                    max: v.iter().cloned().fold(f64::MIN, f64::max),
                    last,
                },
            )
        })
        .collect()
}

fn tier_rows(
    agg: &Aggregator,
    tier: &str,
    host: &str,
    t0: u64,
    width: u64,
) -> BTreeMap<u64, Bucket> {
    query(
        agg,
        &format!(
            "SELECT toUInt32(ts), samples, user, user_min, user_max, user_last FROM sonde.cpu_{tier} \
             WHERE host = '{host}' AND cpu = 'total' ORDER BY ts"
        ),
    )
    .lines()
    .map(|l| {
        let f: Vec<f64> = l.split('\t').map(|x| x.parse().unwrap()).collect();
        (
            (f[0] as u64 - t0) / width,
            Bucket {
                samples: f[1] as u64,
                avg: f[2],
                min: f[3],
                max: f[4],
                last: f[5],
            },
        )
    })
    .collect()
}

fn assert_buckets(what: &str, got: &BTreeMap<u64, Bucket>, want: &BTreeMap<u64, Bucket>) {
    assert_eq!(got.len(), want.len(), "{what}: bucket count");
    for (k, w) in want {
        let g = &got[k];
        assert_eq!(g.samples, w.samples, "{what}: samples of bucket {k}");
        for (name, a, b) in [
            ("avg", g.avg, w.avg),
            ("min", g.min, w.min),
            ("max", g.max, w.max),
            ("last", g.last, w.last),
        ] {
            assert!(
                (a - b).abs() < 1e-6,
                "{what}: {name} of bucket {k}: {a} != {b}"
            );
        }
    }
}

/// Rate totals per hour: Σ rate over the bucket's seconds (1 s rows).
fn totals(agg: &Aggregator, tier: &str, host: &str) -> Vec<(f64, f64)> {
    query(
        agg,
        &format!(
            "SELECT rx_bytes_per_s_total, rx_bytes_per_s_max FROM sonde.net_{tier} WHERE host = '{host}' ORDER BY ts"
        ),
    )
    .lines()
    .map(|l| {
        let f: Vec<f64> = l.split('\t').map(|x| x.parse().unwrap()).collect();
        (f[0], f[1])
    })
    .collect()
}

/// The bucket (upper bound) holding quantile `q` of merged log2 buckets.
fn quantile_bucket(hist: &str, q: f64) -> u64 {
    // `([1,2,...],[5,7,...])`
    let inner = hist.trim().trim_start_matches('(').trim_end_matches(')');
    let (a, b) = inner.split_once("],[").unwrap();
    let ups: Vec<u64> = a
        .trim_start_matches('[')
        .split(',')
        .map(|x| x.parse().unwrap())
        .collect();
    let cnt: Vec<u64> = b
        .trim_end_matches(']')
        .split(',')
        .map(|x| x.parse().unwrap())
        .collect();
    let total: u64 = cnt.iter().sum();
    let mut acc = 0;
    for (u, c) in ups.iter().zip(&cnt) {
        acc += c;
        if acc as f64 >= q * total as f64 {
            return *u;
        }
    }
    *ups.last().unwrap()
}

#[test]
fn tiers_hold_exact_aggregates_from_backfill_and_live_inserts_and_keep_their_retention() {
    let d = Dir::new("tiers");
    certs(&d.0.join("certs"), &["alpha"]);
    let port = free_udp_port();
    let agg = start_aggregator(&d.0, port, "1");
    // A database as the previous release left it (migrations 1-5), with data in it.
    let out = std::process::Command::new(bin("aggregator"))
        .args(["schema", "--upto", "5"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let script = String::from_utf8(out.stdout).unwrap();
    assert!(!script.contains("_1m"), "migration 5 has no tiers");
    rebuild_database(&agg, &script);
    query(
        &agg,
        "INSERT INTO sonde.schema_migrations VALUES (1, 'm', now()), (2, 'm', now()), (3, 'm', now()), (4, 'm', now()), (5, 'm', now())",
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let t0 = now / 3600 * 3600 - 3 * 3600;
    insert_known(&agg, "pre", t0, "1");
    // Old rows: 40, 100 and 800 days back (raw keeps 30, 1m 90, 1h 730 by default).
    for days in [40u64, 100, 800] {
        let ts = now - days * 86400;
        query(
            &agg,
            &format!(
                "INSERT INTO sonde.cpu (ts, host, cpu, user) VALUES ({ts}, 'old', 'total', {days})"
            ),
        );
    }
    // A schema lock its holder left 5 minutes ago (it died while migrating): taken over.
    query(
        &agg,
        "CREATE TABLE sonde.schema_lock_g1 (`holder` String, `beat` DateTime) ENGINE = MergeTree() ORDER BY beat",
    );
    query(
        &agg,
        "INSERT INTO sonde.schema_lock_g1 VALUES ('dead-aggregator', now() - 300)",
    );
    drop(agg);

    // This release: migration 6 creates the tiers; the backfill fills them in the
    // background while ingest runs.
    let agg = start_aggregator(&d.0, port, "2");
    // Rows stored after the upgrade, in three out-of-order blocks (late rows join their
    // bucket's state).
    insert_known(&agg, "live", t0, "number >= 3600");
    insert_known(&agg, "live", t0, "number < 3600 AND number % 2 = 1");
    insert_known(&agg, "live", t0, "number < 3600 AND number % 2 = 0");
    wait_until("the tier backfill", Duration::from_secs(120), || {
        agg.proc.log_text().contains("rollup tiers: backfill done")
    });
    let log = agg.proc.log_text();
    assert!(
        log.contains("version=6") && log.contains("rollup tiers: backfilled"),
        "{log}"
    );
    assert!(
        log.contains("taking it over") && log.contains("lock=sonde.schema_lock_g2"),
        "the stale schema lock taken over: {log}"
    );
    assert_eq!(
        count(
            &agg,
            "SELECT count() FROM system.tables WHERE database = 'sonde' AND name LIKE 'schema_lock%'"
        ),
        0,
        "a schema lock left behind"
    );
    assert_eq!(
        count(
            &agg,
            "SELECT count() FROM system.tables WHERE database = 'sonde' AND name LIKE '%backfill%'"
        ),
        0,
        "backfill copies left behind"
    );

    for host in ["pre", "live"] {
        assert_buckets(
            &format!("{host} 1m"),
            &tier_rows(&agg, "1m", host, t0, 60),
            &expected(60),
        );
        assert_buckets(
            &format!("{host} 1h"),
            &tier_rows(&agg, "1h", host, t0, 3600),
            &expected(3600),
        );
        // Rates: the exact total and the max per hour.
        let want: Vec<(f64, f64)> = (0..2)
            .map(|h| {
                let r: Vec<f64> = (h * 3600..(h + 1) * 3600).map(rate).collect();
                (r.iter().sum(), r.iter().cloned().fold(0.0, f64::max))
            })
            .collect();
        assert_eq!(
            totals(&agg, "1h", host),
            want,
            "{host}: rate total/max per hour"
        );
        // Histograms: merged per bucket, so the same quantiles (indeed the same buckets)
        // from raw, from the minute tier and from the hour tier.
        let range = format!("host = '{host}' AND ts >= {t0} AND ts < {}", t0 + SECONDS);
        let raw = query(
            &agg,
            &format!("SELECT sumMap(bucket_upper, bucket_count) FROM sonde.latency WHERE {range}"),
        );
        for tier in ["1m", "1h"] {
            let t = query(
                &agg,
                &format!("SELECT sumMap(bucket_upper, bucket_count) FROM sonde.latency_{tier} WHERE {range}"),
            );
            assert_eq!(
                t, raw,
                "{host}: latency buckets from {tier} differ from raw"
            );
            for q in [0.5, 0.9, 0.99] {
                assert_eq!(quantile_bucket(&t, q), quantile_bucket(&raw, q));
            }
            let counts = query(
                &agg,
                &format!("SELECT sum(count), sum(sum), sum(samples) FROM sonde.latency_{tier} WHERE {range}"),
            );
            let raw_counts = query(
                &agg,
                &format!("SELECT sum(count), sum(sum), count() FROM sonde.latency WHERE {range}"),
            );
            assert_eq!(counts, raw_counts, "{host}: latency counters in {tier}");
        }
    }

    // Backtest over a tier: one sample per bucket, the bucket's average.
    let rules = d.0.join("rules.toml");
    std::fs::write(
        &rules,
        "[[rule]]\nname = \"busy\"\nkind = \"threshold\"\nseries = \"cpu.busy\"\nlabels = { cpu = \"total\" }\nwarning = 99\n",
    )
    .unwrap();
    let ports = std::fs::read_to_string(agg.data.join("clickhouse/ports")).unwrap();
    let http_port = ports
        .lines()
        .find_map(|l| l.strip_prefix("http_port="))
        .unwrap();
    for (tier, want) in [
        ("1m", expected(60)),
        ("1h", expected(3600)),
        ("raw", expected(1)),
    ] {
        let scores = d.0.join(format!("scores-{tier}.csv"));
        let out = std::process::Command::new(bin("aggregator"))
            .arg("backtest")
            .arg("--rules")
            .arg(&rules)
            .args([
                "--host",
                "live",
                "--from",
                &t0.to_string(),
                "--to",
                &(t0 + SECONDS).to_string(),
            ])
            .args([
                "--tier",
                tier,
                "--clickhouse-url",
                &format!("http://127.0.0.1:{http_port}"),
            ])
            .arg("--scores")
            .arg(&scores)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "backtest --tier {tier}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let csv = std::fs::read_to_string(&scores).unwrap();
        let rows: Vec<&str> = csv.lines().skip(1).collect();
        assert_eq!(
            rows.len(),
            want.len(),
            "backtest --tier {tier}: one sample per bucket"
        );
        // cpu.busy = 100 - idle; idle was 100 - user, so busy is the bucket's user average.
        for (row, w) in rows.iter().zip(want.values()) {
            let value: f64 = row.split(',').nth(4).unwrap().parse().unwrap();
            assert!(
                (value - w.avg).abs() < 1e-3,
                "backtest --tier {tier}: {row} vs avg {}",
                w.avg
            );
        }
    }

    // Retention (18.16: partition drops, run after the backfill): raw keeps 30 days, the
    // minute tier 90, the hour tier 730.
    wait_until("raw retention", Duration::from_secs(30), || {
        count(&agg, "SELECT count() FROM sonde.cpu WHERE host = 'old'") == 0
    });
    let kept = |tier: &str| -> Vec<u64> {
        query(
            &agg,
            &format!(
                "SELECT toUInt32(user) FROM sonde.cpu_{tier} WHERE host = 'old' ORDER BY user"
            ),
        )
        .lines()
        .map(|l| l.parse().unwrap())
        .collect()
    };
    assert_eq!(kept("1m"), vec![40]);
    assert_eq!(kept("1h"), vec![40, 100]);
    // And nothing of this week's rows went anywhere.
    assert_eq!(
        count(
            &agg,
            &format!("SELECT count() FROM sonde.cpu WHERE host = 'pre' AND ts >= {t0}")
        ),
        expected(1).len() as u64
    );
}
