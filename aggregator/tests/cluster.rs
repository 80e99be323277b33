//! Scale-out with real processes: a ClickHouse 18.16 cluster of 2 shards × 2 replicas with
//! ZooKeeper (`store::localcluster`), two aggregators with the schema `ON CLUSTER`, and
//! sensors that prefer one aggregator by rendezvous hashing and fail over to the other.
//! After each scenario, rows are counted per (host, second) over the Distributed tables:
//! a sensor samples once a second, so a missing second is a lost sample and a repeated one
//! a duplicate.

mod common;
use common::*;
use sonde_aggregator::store::localcluster::LocalCluster;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn start_agg(dir: &Path, listen: &str, url: &str, tag: &str, quorum: u32, wait: bool) -> Agg {
    let http = format!("127.0.0.1:{}", free_port());
    let c = dir.join("certs");
    let log = dir.join(format!("aggregator-{tag}.log"));
    let child = Command::new(bin("aggregator"))
        .arg("run")
        .args(["--listen", listen, "--http-listen", &http])
        .arg("--data-dir")
        .arg(dir.join(format!("agg-{tag}")))
        .args(["--clickhouse-url", url])
        .args(["--clickhouse-cluster", "sonde"])
        .args(["--insert-quorum", &quorum.to_string()])
        .arg("--ca")
        .arg(c.join("ca.pem"))
        .arg("--cert")
        .arg(c.join("aggregator.pem"))
        .arg("--key")
        .arg(c.join("aggregator-key.pem"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let p = Proc::new(child, log, "aggregator");
    if wait {
        wait_until("aggregator ready", Duration::from_secs(240), || {
            matches!(http_get(&http, "/readyz"), Some((200, _)))
        });
    }
    Agg { p, http }
}

struct Agg {
    p: Proc,
    http: String,
}

fn q(url: &str, sql: &str) -> String {
    ch_query(url.trim_start_matches("http://"), sql).unwrap_or_else(|e| panic!("{e}\n{sql}"))
}

/// (seconds stored, holes, duplicated seconds) of `host`'s per-second CPU series.
fn series(url: &str, host: &str) -> (u64, Vec<(u64, u64)>, u64) {
    let tsv = q(url, &format!(
        "SELECT toUInt32(ts), count() FROM sonde.cpu WHERE host = '{host}' AND cpu = 'total' GROUP BY ts ORDER BY ts FORMAT TabSeparated"
    ));
    let (mut rows, mut dups, mut holes, mut prev) = (0, 0, Vec::new(), None::<u64>);
    for l in tsv.lines() {
        let mut f = l.split('\t');
        let ts: u64 = f.next().unwrap().parse().unwrap();
        let n: u64 = f.next().unwrap().parse().unwrap();
        rows += n;
        dups += n - 1;
        if let Some(p) = prev {
            if ts > p + 1 {
                holes.push((p + 1, ts - 1));
            }
        }
        prev = Some(ts);
    }
    (rows, holes, dups)
}

fn assert_exact(scenario: &str, url: &str, hosts: &[&str], min_rows: u64) {
    for h in hosts {
        let (rows, holes, dups) = series(url, h);
        eprintln!("[{scenario}] {h}: seconds stored {rows}, missing {holes:?}, duplicated {dups}");
        assert!(
            rows >= min_rows,
            "{scenario}: {h}: only {rows} seconds stored"
        );
        assert_eq!(dups, 0, "{scenario}: {h}: duplicated samples");
        assert!(
            holes.is_empty(),
            "{scenario}: {h}: missing samples {holes:?}"
        );
    }
    let dup_batches = q(url, "SELECT count() FROM (SELECT host, sensor_boot_id, seq FROM sonde.batches GROUP BY host, sensor_boot_id, seq HAVING count() > 1)");
    assert_eq!(
        dup_batches.trim(),
        "0",
        "{scenario}: a batch recorded twice"
    );
}

/// Each migration recorded once, on every server, and no schema lock left behind.
fn assert_schema_once(urls: &[String]) {
    for u in urls {
        let dup = q(
            u,
            "SELECT count() - uniqExact(version) FROM sonde.schema_migrations",
        );
        assert_eq!(dup.trim(), "0", "{u}: a migration recorded twice");
        let locks = q(
            u,
            "SELECT count() FROM system.tables WHERE database = 'sonde' AND name LIKE 'schema_lock%'",
        );
        assert_eq!(locks.trim(), "0", "{u}: a schema lock left behind");
    }
}

/// Seconds of `host`'s CPU rows stored so far (through the Distributed table).
fn seconds(url: &str, host: &str) -> u64 {
    q(
        url,
        &format!("SELECT count() FROM sonde.cpu WHERE host = '{host}' AND cpu = 'total'"),
    )
    .trim()
    .parse()
    .unwrap_or(0)
}

#[test]
fn cluster_two_shards_two_aggregators_failover_exactly_once() {
    let d = Dir::new("cluster");
    let hosts = ["n1", "n2", "n3", "n4", "n5", "n6"];
    certs(
        &d.0.join("certs"),
        &["n1", "n2", "n3", "n4", "n5", "n6", "n7"],
    );
    let t = Instant::now();
    let mut cl = LocalCluster::start(&d.0.join("ch"), 2, 2, "clickhouse-server")
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "[cluster] 2 shards × 2 replicas and ZooKeeper up in {:?}",
        t.elapsed()
    );
    let urls: Vec<String> = cl.servers.iter().map(|s| s.url()).collect();
    let (la, lb) = (
        format!("127.0.0.1:{}", free_udp_port()),
        format!("127.0.0.1:{}", free_udp_port()),
    );
    // Quorum 1: ingest goes on with one replica of a shard down (the scenario below).
    // Both at once on the empty cluster: one takes the schema lock and creates the
    // schema, the other waits for it.
    let mut a = start_agg(&d.0, &la, &urls[0], "a0", 1, false);
    let b = start_agg(&d.0, &lb, &urls[2], "b", 1, false);
    for x in [&a, &b] {
        wait_until("aggregator ready", Duration::from_secs(300), || {
            matches!(http_get(&x.http, "/readyz"), Some((200, _)))
        });
    }
    eprintln!("[cluster] both aggregators ready after {:?}", t.elapsed());
    let logs = [&a, &b].map(|x| std::fs::read_to_string(&x.p.log).unwrap_or_default());
    let creators = logs
        .iter()
        .filter(|l| l.contains("new cluster: creating the current schema"))
        .count();
    assert_eq!(creators, 1, "exactly one aggregator creates the schema");
    assert!(
        logs.iter()
            .any(|l| l.contains("is changing the schema") || l.contains("took the schema lock")),
        "the other waited for the lock"
    );
    assert_schema_once(&urls);
    let list = format!("{la},{lb}");
    let mut sensors: Vec<Proc> = hosts
        .iter()
        .map(|h| start_sensor(&d.0, &list, h, &[]))
        .collect();
    wait_until("every host stored", Duration::from_secs(60), || {
        hosts.iter().all(|h| {
            q(
                &urls[1],
                &format!("SELECT count() FROM sonde.batches WHERE host = '{h}'"),
            )
            .trim()
                != "0"
        })
    });
    // What the rounds in flight were writing is in too.
    std::thread::sleep(Duration::from_secs(3));

    // The schema: local replicated tables per shard, Distributed under the usual names;
    // one host's rows on one shard only.
    let engines = q(&urls[3], "SELECT name, engine FROM system.tables WHERE database = 'sonde' AND name IN ('cpu', 'cpu_local', 'batches_local', 'schema_migrations') ORDER BY name FORMAT TabSeparated");
    assert_eq!(engines, "batches_local\tReplicatedMergeTree\ncpu\tDistributed\ncpu_local\tReplicatedMergeTree\nschema_migrations\tReplicatedMergeTree\n");
    // Rows per shard: the most either replica of it holds (one may lag the other).
    let per_shard = |table: &str, h: &str| -> Vec<u64> {
        [(0, 1), (2, 3)]
            .iter()
            .map(|&(r1, r2)| {
                let n = |i: usize| -> u64 {
                    q(
                        &urls[i],
                        &format!("SELECT count() FROM sonde.{table} WHERE host = '{h}'"),
                    )
                    .trim()
                    .parse()
                    .unwrap()
                };
                n(r1).max(n(r2))
            })
            .collect()
    };
    for h in hosts {
        let on = per_shard("cpu_local", h);
        assert!(
            on.iter().filter(|&&n| n > 0).count() == 1,
            "{h}: rows on both shards: {on:?}"
        );
        for t in ["batches_local", "batch_intents_local", "hosts_local"] {
            let bl = per_shard(t, h);
            assert_eq!(
                (on[0] > 0, on[1] > 0),
                (bl[0] > 0, bl[1] > 0),
                "{h}: {t} rows {bl:?} not on the shard of its metric rows {on:?}"
            );
        }
    }
    // Both aggregators got hosts (rendezvous over two addresses; six hosts).
    let (ca, cb) = (
        metric_at(&a.http, "sonde_sensors_connected"),
        metric_at(&b.http, "sonde_sensors_connected"),
    );
    eprintln!("[cluster] sensors connected: A {ca}, B {cb}");
    assert_eq!(ca + cb, hosts.len() as u64);

    // 1. kill -9 aggregator A 10 times while its sensors fail over to B and back.
    let t0 = Instant::now();
    for k in 1..=10 {
        std::thread::sleep(Duration::from_millis(3000 + (k % 3) * 1500));
        a.p.signal(libc::SIGKILL);
        let _ = a.p.child.wait();
        std::thread::sleep(Duration::from_millis(500 + (k % 2) * 1500));
        a = start_agg(&d.0, &la, &urls[0], &format!("a{k}"), 1, false);
    }
    wait_until("aggregator A ready", Duration::from_secs(120), || {
        matches!(http_get(&a.http, "/readyz"), Some((200, _)))
    });
    eprintln!("[kill -9] 10 kills of aggregator A in {:?}", t0.elapsed());
    std::thread::sleep(Duration::from_secs(12));
    assert_exact("kill -9 aggregator A ×10", &urls[1], &hosts, 40);

    // 2. One replica of each shard stopped for 60 s: ingest goes on (quorum 1), the replica
    // catches up, queries through either replica see every host.
    cl.stop_server(1, 2);
    cl.stop_server(2, 2);
    let before: Vec<u64> = hosts.iter().map(|h| seconds(&urls[0], h)).collect();
    std::thread::sleep(Duration::from_secs(60));
    let during: Vec<u64> = hosts.iter().map(|h| seconds(&urls[0], h)).collect();
    for (i, h) in hosts.iter().enumerate() {
        assert!(
            during[i] >= before[i] + 45,
            "{h}: ingest stalled with a replica down ({} → {})",
            before[i],
            during[i]
        );
    }
    cl.start_server(1, 2).unwrap();
    cl.start_server(2, 2).unwrap();
    wait_until("replicas caught up", Duration::from_secs(120), || {
        let n = |u: &str| {
            q(u, "SELECT count() FROM sonde.cpu_local")
                .trim()
                .parse::<u64>()
                .unwrap_or(0)
        };
        n(&urls[1]) >= n(&urls[0]) && n(&urls[3]) >= n(&urls[2])
    });
    assert_exact(
        "a replica of each shard down 60 s (read via replica 2)",
        &urls[1],
        &hosts,
        100,
    );
    assert_exact(
        "a replica of each shard down 60 s (read via replica 1)",
        &urls[0],
        &hosts,
        100,
    );

    // 3. A schema change while the other aggregator ingests: A restarts and finds
    // migration 11 (which drops and re-creates the 1h tier's views) pending. It takes
    // the schema lock; B holds its inserts until the lock is gone, so no round lands
    // between a DROP and its CREATE and the 1h tier misses nothing.
    a.p.signal(libc::SIGTERM);
    let _ = a.p.child.wait();
    q(
        &urls[1],
        "ALTER TABLE sonde.schema_migrations DELETE WHERE version = 11",
    );
    wait_until("migration 11 unrecorded", Duration::from_secs(60), || {
        q(
            &urls[0],
            "SELECT count() FROM sonde.schema_migrations WHERE version = 11",
        )
        .trim()
            == "0"
    });
    let t0 = Instant::now();
    a = start_agg(&d.0, &la, &urls[0], "a-migrate", 1, false);
    let mut held = false;
    wait_until("A migrated and ready", Duration::from_secs(300), || {
        held |= metric_at(&b.http, "sonde_schema_change_hold") == 1;
        matches!(http_get(&a.http, "/readyz"), Some((200, _)))
    });
    eprintln!(
        "[schema change] migration 11 re-applied by A in {:?}",
        t0.elapsed()
    );
    let log = std::fs::read_to_string(&a.p.log).unwrap_or_default();
    assert!(
        log.contains("applying schema migration") && log.contains("schema lock released"),
        "A applied the migration under the lock"
    );
    assert!(held, "B held its inserts while A changed the schema");
    assert_schema_once(&urls);
    let n0: Vec<u64> = hosts.iter().map(|h| seconds(&urls[0], h)).collect();
    wait_until(
        "ingest after the schema change",
        Duration::from_secs(60),
        || {
            hosts
                .iter()
                .enumerate()
                .all(|(i, h)| seconds(&urls[0], h) > n0[i] + 5)
        },
    );
    assert_exact("schema change under load", &urls[0], &hosts, 120);
    // Every raw row is counted once in the 1m tier and once in the 1h tier (which reads
    // the 1m views: rows inserted while a 1h view was dropped would be missing there).
    // Ingest goes on and each read may go to either replica, one of which can lag by a
    // part: the two are read together until they agree (a sample missing from the 1h
    // tier never comes back, so a real loss still fails after 30 s).
    for h in hosts {
        let both = || -> (u64, u64) {
            let t = q(
                &urls[2],
                &format!(
                    "SELECT (SELECT sum(samples) FROM sonde.cpu_1m WHERE host = '{h}' AND cpu = 'total'), \
                     (SELECT sum(samples) FROM sonde.cpu_1h WHERE host = '{h}' AND cpu = 'total') FORMAT TSV"
                ),
            );
            let mut f = t.split_whitespace().map(|x| x.parse::<u64>().unwrap_or(0));
            (f.next().unwrap_or(0), f.next().unwrap_or(0))
        };
        let t0 = Instant::now();
        let (mut m, mut hr) = both();
        while (m == 0 || m != hr) && t0.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(500));
            (m, hr) = both();
        }
        eprintln!(
            "[schema change] {h}: 1m tier {m} samples, 1h tier {hr} (read after {:?})",
            t0.elapsed()
        );
        assert!(
            m > 0 && m == hr,
            "{h}: the 1h tier has {hr} samples, the 1m tier {m}"
        );
    }

    // 4. ZooKeeper stopped for 30 s: replicated tables go read-only; the aggregators hold
    // (sensors spool) and resume.
    cl.stop_zookeeper();
    std::thread::sleep(Duration::from_secs(30));
    cl.start_zookeeper().unwrap();
    let n0: Vec<u64> = hosts.iter().map(|h| seconds(&urls[0], h)).collect();
    wait_until(
        "ingest resumed after ZooKeeper",
        Duration::from_secs(120),
        || {
            hosts
                .iter()
                .enumerate()
                .all(|(i, h)| seconds(&urls[0], h) > n0[i] + 30)
        },
    );
    std::thread::sleep(Duration::from_secs(10));
    assert_exact("ZooKeeper down 30 s", &urls[0], &hosts, 150);

    // 5. A shard added (one server) under load: it joins `remote_servers` everywhere and
    // a running aggregator (neither is restarted) finds a server without the schema and
    // creates it there; the hosts that hash to the new shard store there from then on.
    let t0 = Instant::now();
    let shard = cl.add_shard(1).unwrap_or_else(|e| panic!("{e}"));
    let url3 = cl.server(shard, 1).url();
    eprintln!("[add a shard] new server up after {:?}", t0.elapsed());
    // (18.16 answers "Database sonde doesn't exist" while the new server has none.)
    let tables = |u: &str| {
        ch_query(
            u.trim_start_matches("http://"),
            "SELECT count() FROM system.tables WHERE database = 'sonde'",
        )
        .unwrap_or_default()
    };
    wait_until(
        "the schema on the new shard, created by a running aggregator",
        Duration::from_secs(120),
        || tables(&url3) == tables(&urls[0]),
    );
    eprintln!(
        "[add a shard] schema on the new shard after {:?}",
        t0.elapsed()
    );
    let logs = [&a.p.log, &b.p.log].map(|l| std::fs::read_to_string(l).unwrap_or_default());
    assert!(
        logs.iter()
            .any(|l| l.contains("servers of the cluster without the schema")),
        "neither aggregator logged creating the schema on the new server"
    );
    // Which of the hosts the sharding key sends to the third shard (weights 1, 1, 1).
    let names: Vec<String> = hosts.iter().map(|h| format!("'{h}'")).collect();
    let to_new = q(
        &urls[0],
        &format!(
            "SELECT count() FROM (SELECT arrayJoin([{}]) AS h) WHERE sipHash64(h) % 3 = 2",
            names.join(",")
        ),
    );
    let n0: Vec<u64> = hosts.iter().map(|h| seconds(&urls[0], h)).collect();
    wait_until("ingest on three shards", Duration::from_secs(120), || {
        hosts
            .iter()
            .enumerate()
            .all(|(i, h)| seconds(&urls[0], h) > n0[i] + 15)
    });
    eprintln!(
        "[add a shard] every host 15 s further after {:?}",
        t0.elapsed()
    );
    let on_new = q(&url3, "SELECT uniqExact(host) FROM sonde.cpu_local");
    eprintln!(
        "[add a shard] hosts the key sends to the new shard: {}, hosts with rows there: {}",
        to_new.trim(),
        on_new.trim()
    );
    assert_eq!(
        on_new.trim(),
        to_new.trim(),
        "hosts storing on the new shard"
    );
    assert_schema_once(&urls);
    for s in &mut sensors {
        assert!(s.stop().success());
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_exact("a shard added", &urls[0], &hosts, 180);

    // 6. A batch whose insert runs on the cluster when its sensor leaves (the network
    // between them cut, the aggregator and ClickHouse going on) is stored once: the
    // aggregator the sensor resends it to finds the intent, sees through `remote()` the
    // first one's insert running on a shard's server, waits for it to end, and finds the
    // batch stored.
    if unsafe { libc::geteuid() } == 0 {
        running_insert_when_the_sensor_leaves(&d.0, &cl, &urls[0]);
    } else {
        eprintln!("[running insert] SKIP: network namespaces need root");
    }
    drop(b);
    drop(a);
}

/// Scenario 6 of the test above: a sensor in a network namespace with two more
/// aggregators on its link; every insert into `batch_intents_local` by the one it chose
/// is made slow on every server (a view of sleeps), and its link to that one is cut while
/// such an insert runs.
fn running_insert_when_the_sensor_leaves(dir: &Path, cl: &LocalCluster, url: &str) {
    let (ns, here) = Netns::new("cr", 236);
    let (pa, pb) = (free_udp_port(), free_udp_port());
    let (la, lb) = (format!("{here}:{pa}"), format!("{here}:{pb}"));
    let x = start_agg(dir, &la, &cl.servers[1].url(), "ns-a", 1, true);
    let y = start_agg(dir, &lb, &cl.servers[3].url(), "ns-b", 1, true);
    let mut sensor = ns.start_sensor(dir, &format!("{la},{lb}"), "n7");
    wait_until(
        "batches of n7 stored through one aggregator",
        Duration::from_secs(40),
        || {
            metric_at(&x.http, "sonde_batches_stored_total")
                + metric_at(&y.http, "sonde_batches_stored_total")
                >= 3
        },
    );
    let ((cur, cur_port), other) = if metric_at(&x.http, "sonde_batches_stored_total") > 0 {
        ((&x, pa), &y)
    } else {
        ((&y, pb), &x)
    };
    let urls: Vec<String> = cl.servers.iter().map(|s| s.url()).collect();
    // Every insert of the chosen aggregator's intents takes 45 s, on every server.
    for u in &urls {
        q(
            u,
            &slow_intents_view("sonde.batch_intents_local", cur.p.child.id()),
        );
    }
    let slow_from = Instant::now();
    // An insert of its intents begun since, running on some server of the cluster.
    let (awaited_at, found_at) =
        cut_while_its_insert_runs(&ns, &here, cur_port, &other.http, |s| {
            urls.iter()
                .any(|u| q(u, &intents_running_sql(s, slow_from)).trim() != "0")
        });
    // (A DROP waits for the running insert; the client may give up waiting first.)
    for u in &urls {
        wait_until("the slow view dropped", Duration::from_secs(60), || {
            let _ = ch_query(
                u.trim_start_matches("http://"),
                "DROP TABLE IF EXISTS sonde.slow",
            );
            q(
                u,
                "SELECT count() FROM system.tables WHERE database = 'sonde' AND name = 'slow'",
            )
            .trim()
                == "0"
        });
    }
    eprintln!(
        "[running insert] after the cut: the other aggregator waited from {awaited_at:?}, found the batch stored at {found_at:?}"
    );
    let stored = metric_at(&other.http, "sonde_batches_stored_total");
    wait_until(
        "the other aggregator stores n7's batches",
        Duration::from_secs(60),
        || metric_at(&other.http, "sonde_batches_stored_total") >= stored + 3,
    );
    assert!(sensor.stop().success());
    std::thread::sleep(Duration::from_secs(3));
    assert_exact("an insert running when the sensor left", url, &["n7"], 40);
    drop((x, y));
}
