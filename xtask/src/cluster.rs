//! `cargo xtask cluster up`: scale-out on this machine. ZooKeeper, a ClickHouse cluster of
//! 2 shards × 2 replicas (Debian's clickhouse-server 18.16) and two aggregators sharing it,
//! all on loopback; a sensor for this host that prefers one aggregator by rendezvous
//! hashing and fails over to the other. The bench's cluster section starts the same thing.

#[allow(dead_code)]
#[path = "../../aggregator/src/store/localcluster.rs"]
pub mod localcluster;

use crate::certs;
use crate::setup::{ensure_clickhouse, ensure_zookeeper, root, run as run_cmd, step};
use anyhow::{anyhow, bail, Context, Result};
use localcluster::LocalCluster;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s =
        std::net::TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, out.split("\r\n\r\n").nth(1).unwrap_or("").to_string()))
}

pub struct AggProc {
    pub child: Child,
    pub quic: String,
    pub http: String,
    pub log: PathBuf,
}

impl Drop for AggProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(40);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The cluster and its aggregators (stopped on drop, aggregators first).
pub struct Running {
    pub aggs: Vec<AggProc>,
    pub cluster: LocalCluster,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.aggs.clear();
    }
}

/// Starts ZooKeeper, 2 × 2 ClickHouse servers under `dir/clickhouse` and one aggregator per
/// (QUIC, HTTP) address pair, aggregator i talking to shard (i mod 2)+1's first replica.
pub fn start(
    dir: &Path,
    bin: &Path,
    certs_dir: &Path,
    addrs: &[(String, String)],
    quorum: u32,
    rounds: usize,
) -> Result<Running> {
    ensure_clickhouse()?;
    ensure_zookeeper()?;
    step("starting ZooKeeper and a ClickHouse cluster of 2 shards × 2 replicas on loopback");
    let t = Instant::now();
    let cluster = LocalCluster::start(&dir.join("clickhouse"), 2, 2, "clickhouse-server")
        .map_err(|e| anyhow!(e))?;
    step(&format!(
        "cluster up in {:.1} s: ZooKeeper 127.0.0.1:{}, servers {}",
        t.elapsed().as_secs_f64(),
        cluster.zk_port,
        cluster
            .servers
            .iter()
            .map(|s| format!("{} http {}", s.name(), s.http_port))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let mut run = Running {
        aggs: Vec::new(),
        cluster,
    };
    // One after the other, so that each start's progress is reported on its own: the
    // first creates (or migrates) the schema on the cluster, the next finds it current.
    // (Started at once they would also be right: the schema lock lets one migrate.)
    let deadline = Instant::now() + Duration::from_secs(600);
    for (i, (quic, http)) in addrs.iter().enumerate() {
        let url = run.cluster.server(i % 2 + 1, 1).url();
        let log = logs.join(format!("aggregator-{}.log", i + 1));
        step(&format!(
            "starting aggregator {} (QUIC {quic}, HTTP {http}, ClickHouse {url}, cluster sonde, insert quorum {quorum})",
            i + 1
        ));
        let child = Command::new(bin.join("aggregator"))
            .arg("run")
            .args(["--listen", quic, "--http-listen", http])
            .arg("--data-dir")
            .arg(dir.join(format!("aggregator-{}", i + 1)))
            .args(["--clickhouse-url", &url, "--clickhouse-cluster", "sonde"])
            .args(["--insert-quorum", &quorum.to_string()])
            .args(["--insert-rounds", &rounds.to_string()])
            .arg("--ca")
            .arg(certs_dir.join("ca.pem"))
            .arg("--cert")
            .arg(certs_dir.join("aggregator.pem"))
            .arg("--key")
            .arg(certs_dir.join("aggregator-key.pem"))
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stderr(std::fs::File::create(&log)?)
            .process_group(0)
            .spawn()
            .context("cannot start an aggregator")?;
        run.aggs.push(AggProc {
            child,
            quic: quic.clone(),
            http: http.clone(),
            log,
        });
        let a = run.aggs.last_mut().unwrap();
        let t = Instant::now();
        let mut said = Instant::now();
        loop {
            if let Some(st) = a.child.try_wait()? {
                let log = std::fs::read_to_string(&a.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(8).collect();
                bail!(
                    "aggregator {} exited ({st}):\n{}",
                    a.http,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            if matches!(http_get(&a.http, "/readyz"), Some((200, _))) {
                break;
            }
            if said.elapsed() > Duration::from_secs(15) {
                said = Instant::now();
                let why = http_get(&a.http, "/readyz")
                    .map(|r| r.1)
                    .unwrap_or_default();
                step(&format!(
                    "aggregator {} not ready after {} s: {}",
                    a.http,
                    t.elapsed().as_secs(),
                    why.trim()
                ));
            }
            if STOP.load(Ordering::SeqCst) || Instant::now() > deadline {
                bail!(
                    "aggregator {} did not become ready; see {}",
                    a.http,
                    a.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(run)
}

pub fn up(data_dir: &Path, release: bool, quorum: u32) -> Result<()> {
    let root = root();
    let data_dir = if data_dir.is_absolute() {
        data_dir.to_path_buf()
    } else {
        root.join(data_dir)
    };
    if let Err(e) = crate::ebpf::build() {
        step(&format!(
            "eBPF build failed ({e:#}); the sensor will run on /proc only"
        ));
    }
    step(&format!(
        "building sensor and aggregator ({})",
        if release { "release" } else { "debug" }
    ));
    let mut b = Command::new("cargo");
    b.current_dir(&root)
        .args(["build", "-p", "sonde-sensor", "-p", "sonde-aggregator"]);
    if release {
        b.arg("--release");
    }
    run_cmd(&mut b)?;
    let bin = root
        .join("target")
        .join(if release { "release" } else { "debug" });
    let host = certs::hostname();
    let cdir = data_dir.join("certs");
    certs::run(&cdir, std::slice::from_ref(&host), &[], false)?;
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let addrs = vec![
        ("127.0.0.1:4433".to_string(), "127.0.0.1:9464".to_string()),
        ("127.0.0.1:4434".to_string(), "127.0.0.1:9465".to_string()),
    ];
    let run = start(&data_dir, &bin, &cdir, &addrs, quorum, 1)?;
    let list = addrs
        .iter()
        .map(|a| a.0.clone())
        .collect::<Vec<_>>()
        .join(",");
    step(&format!(
        "starting a sensor for this host ({host}) with both aggregators: {list}"
    ));
    let logs = data_dir.join("logs");
    let mut sensor = Command::new(bin.join("sensor"))
        .arg("run")
        .args(["--aggregator", &list])
        .arg("--ca")
        .arg(cdir.join("ca.pem"))
        .arg("--cert")
        .arg(cdir.join("hosts").join(format!("{host}.pem")))
        .arg("--key")
        .arg(cdir.join("hosts").join(format!("{host}-key.pem")))
        .arg("--spool-dir")
        .arg(data_dir.join("spool"))
        .stderr(std::fs::File::create(logs.join("sensor.log"))?)
        .process_group(0)
        .spawn()
        .context("cannot start the sensor")?;
    let s1 = run.cluster.server(1, 1);
    println!();
    println!("sonde (scale-out) is up.");
    for (i, a) in run.aggs.iter().enumerate() {
        println!(
            "  aggregator {}: QUIC {}  console http://{}/",
            i + 1,
            a.quic,
            a.http
        );
    }
    for s in &run.cluster.servers {
        println!(
            "  ClickHouse {} (shard {}, replica {}): clickhouse-client --port {} --database sonde",
            s.name(),
            s.shard,
            s.replica,
            s.tcp_port
        );
    }
    println!("  ZooKeeper:   127.0.0.1:{}", run.cluster.zk_port);
    println!("  logs:        {}", logs.display());
    println!();
    println!(
        "Every table is Distributed over per-shard Replicated tables: the README's queries run"
    );
    println!(
        "unchanged on any server, e.g. clickhouse-client --port {} --database sonde:",
        s1.tcp_port
    );
    for q in crate::up::readme_queries(2) {
        println!("\n{q}");
    }
    println!("\nTry: kill one aggregator (the sensor moves to the other), or stop a replica.");
    println!("Ctrl-C stops everything.");
    while !STOP.load(Ordering::SeqCst) {
        if let Some(st) = sensor.try_wait()? {
            eprintln!(
                "sensor exited ({st}); see {}",
                logs.join("sensor.log").display()
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    unsafe { libc::kill(sensor.id() as i32, libc::SIGTERM) };
    let _ = sensor.wait();
    step("stopping the aggregators, ClickHouse servers and ZooKeeper");
    drop(run);
    Ok(())
}
