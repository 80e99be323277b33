//! Test harness: real processes (xtask certs, aggregator with its managed
//! ClickHouse 18.16, sensor) in a temporary directory, all on loopback.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn bin(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_aggregator")).with_file_name(name);
    assert!(
        p.exists(),
        "{} is not built: run `cargo xtask test` (or `cargo build --workspace --bins` first)",
        p.display()
    );
    p
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Dir(pub PathBuf);

impl Dir {
    pub fn new(name: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("sonde-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            eprintln!("test directory kept for inspection: {}", self.0.display());
        }
    }
}

/// `xtask certs` into dir/certs for the given hosts.
pub fn certs(dir: &Path, hosts: &[&str]) {
    let mut c = Command::new(bin("xtask"));
    c.arg("certs").arg("--dir").arg(dir);
    for h in hosts {
        c.args(["--host", h]);
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "xtask certs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    name: String,
}

impl Proc {
    pub fn new(child: Child, log: PathBuf, name: &str) -> Proc {
        Proc {
            child,
            log,
            name: name.into(),
        }
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(45);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not stop within 45 s after SIGTERM; log {}",
                self.name,
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub struct Aggregator {
    pub proc: Proc,
    pub quic: String,
    pub http: String,
    pub data: PathBuf,
}

pub fn start_aggregator(dir: &Path, quic_port: u16, tag: &str) -> Aggregator {
    start_aggregator_with(dir, quic_port, tag, &[])
}

/// Like `start_aggregator`, with extra arguments (e.g. `--config FILE`, `--rules FILE`).
pub fn start_aggregator_with(dir: &Path, quic_port: u16, tag: &str, extra: &[&str]) -> Aggregator {
    start_aggregator_at(dir, &format!("127.0.0.1:{quic_port}"), tag, extra)
}

/// Like `start_aggregator_with`, listening for QUIC on `quic` (address:port).
pub fn start_aggregator_at(dir: &Path, quic: &str, tag: &str, extra: &[&str]) -> Aggregator {
    let http = format!("127.0.0.1:{}", free_port());
    let quic = quic.to_string();
    let c = dir.join("certs");
    let log = dir.join(format!("aggregator-{tag}.log"));
    let child = Command::new(bin("aggregator"))
        .arg("run")
        .args(["--listen", &quic, "--http-listen", &http])
        .arg("--data-dir")
        .arg(dir.join("agg"))
        .arg("--ca")
        .arg(c.join("ca.pem"))
        .arg("--cert")
        .arg(c.join("aggregator.pem"))
        .arg("--key")
        .arg(c.join("aggregator-key.pem"))
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut a = Aggregator {
        proc: Proc {
            child,
            log,
            name: "aggregator".into(),
        },
        quic,
        http,
        data: dir.join("agg"),
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(st) = a.proc.child.try_wait().unwrap() {
            panic!(
                "aggregator exited during start ({st}):\n{}",
                a.proc.log_text()
            );
        }
        if matches!(http_get(&a.http, "/readyz"), Some((200, _))) {
            return a;
        }
        assert!(
            Instant::now() < deadline,
            "aggregator not ready in 90 s:\n{}",
            a.proc.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn start_sensor(dir: &Path, quic: &str, host: &str, extra: &[&str]) -> Proc {
    start_sensor_under(&[], dir, quic, host, extra)
}

/// `start_sensor`, run under a wrapper command (`ip netns exec NS`, say).
pub fn start_sensor_under(
    wrapper: &[&str],
    dir: &Path,
    quic: &str,
    host: &str,
    extra: &[&str],
) -> Proc {
    let c = dir.join("certs");
    let log = dir.join(format!("sensor-{host}.log"));
    let mut cmd = match wrapper {
        [] => Command::new(bin("sensor")),
        [w, rest @ ..] => {
            let mut cmd = Command::new(w);
            cmd.args(rest).arg(bin("sensor"));
            cmd
        }
    };
    let child = cmd
        .arg("run")
        .args(["--aggregator", quic])
        .arg("--ca")
        .arg(c.join("ca.pem"))
        .arg("--cert")
        .arg(c.join(format!("hosts/{host}.pem")))
        .arg("--key")
        .arg(c.join(format!("hosts/{host}-key.pem")))
        .arg("--spool-dir")
        .arg(dir.join(format!("spool-{host}")))
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Proc {
        child,
        log,
        name: format!("sensor {host}"),
    }
}

pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, out.split("\r\n\r\n").nth(1).unwrap_or("").to_string()))
}

/// Runs a query against the managed ClickHouse of `agg` over its HTTP port
/// and returns TSV text.
pub fn query(agg: &Aggregator, sql: &str) -> String {
    let ports = std::fs::read_to_string(agg.data.join("clickhouse/ports")).unwrap();
    let port = ports
        .lines()
        .find_map(|l| l.strip_prefix("http_port="))
        .unwrap();
    ch_query(&format!("127.0.0.1:{port}"), sql)
        .unwrap_or_else(|e| panic!("query failed: {e}\n{sql}"))
}

/// Replaces the aggregator's database with one built by `script` (the output of an
/// `aggregator schema`), as an earlier release left it.
#[allow(dead_code)]
pub fn rebuild_database(agg: &Aggregator, script: &str) {
    for t in query(
        agg,
        "SELECT name FROM system.tables WHERE database = 'sonde'",
    )
    .lines()
    {
        query(agg, &format!("DROP TABLE sonde.{t}"));
    }
    for stmt in script.split(";\n").map(str::trim).filter(|s| !s.is_empty()) {
        query(agg, stmt);
    }
}

pub fn ch_query(addr: &str, sql: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "POST /?database=sonde HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n{sql}",
        sql.len()
    )
    .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    let code: u16 = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    if code == 200 {
        Ok(body)
    } else {
        Err(body)
    }
}

pub fn count(agg: &Aggregator, sql: &str) -> u64 {
    query(agg, sql)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("not a number from {sql}"))
}

pub fn metric(agg: &Aggregator, name: &str) -> u64 {
    let (_, body) = http_get(&agg.http, "/metrics").expect("metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Runs a shell command; true when it succeeded (output discarded).
pub fn sh(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", cmd])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Runs a shell command that must succeed.
pub fn must(cmd: &str) {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Resident set size of a process, in kB (0 when it is gone).
pub fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// A cgroup with a CPU quota (0.5) and a memory limit (512 MiB) holding one sleeping
/// process, in the v1 cpu and memory controllers (this hybrid host) or the v2 tree when
/// it is the only one; removed on drop. So the cgroups table, and the README's queries
/// on limits and throttling, have a row to show.
#[allow(dead_code)]
pub struct LimitedCgroup {
    dirs: Vec<std::path::PathBuf>,
    pub rel: String,
    child: std::process::Child,
}

impl LimitedCgroup {
    #[allow(dead_code)]
    pub fn new() -> LimitedCgroup {
        let rel = format!("sonde-e2e-{}", std::process::id());
        let root = std::path::Path::new("/sys/fs/cgroup");
        let (dirs, writes): (Vec<_>, Vec<(&str, String)>) = if root.join("memory").is_dir() {
            (
                vec![root.join("cpu").join(&rel), root.join("memory").join(&rel)],
                vec![
                    ("cpu.cfs_period_us", "100000".into()),
                    ("cpu.cfs_quota_us", "50000".into()),
                    ("memory.limit_in_bytes", (512u64 << 20).to_string()),
                ],
            )
        } else {
            (
                vec![root.join(&rel)],
                vec![
                    ("cpu.max", "50000 100000".into()),
                    ("memory.max", (512u64 << 20).to_string()),
                ],
            )
        };
        for d in &dirs {
            std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
        }
        for (f, v) in writes {
            let d = dirs.iter().find(|d| d.join(f).exists()).unwrap();
            std::fs::write(d.join(f), v).unwrap();
        }
        let mut script = String::new();
        for d in &dirs {
            script.push_str(&format!("echo $$ > {}/cgroup.procs; ", d.display()));
        }
        script.push_str("exec sleep 600");
        let child = std::process::Command::new("sh")
            .args(["-c", &script])
            .spawn()
            .unwrap();
        LimitedCgroup {
            dirs,
            rel: format!("/{rel}"),
            child,
        }
    }
}

impl Drop for LimitedCgroup {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for d in &self.dirs {
            for _ in 0..50 {
                if std::fs::remove_dir(d).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Webhook receivers for alert tests.
#[derive(Clone, Debug)]
pub struct Received {
    pub at: std::time::SystemTime,
    pub headers: std::collections::HashMap<String, String>,
    pub body: serde_json::Value,
    pub raw: Vec<u8>,
    pub status: u16,
}

/// A minimal HTTP/1.1 server that records every POST and answers 500 until `fail_until`.
pub struct Receiver {
    pub addr: String,
    pub got: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
}

impl Receiver {
    pub fn start(fail_until: Option<Instant>) -> Receiver {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let got: std::sync::Arc<std::sync::Mutex<Vec<Received>>> = std::sync::Arc::default();
        let g = got.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let g = g.clone();
                std::thread::spawn(move || {
                    let _ = serve_hook(s, &g, fail_until);
                });
            }
        });
        Receiver { addr, got }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn accepted(&self) -> Vec<Received> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.status == 200)
            .cloned()
            .collect()
    }
}

fn serve_hook(
    s: std::net::TcpStream,
    g: &std::sync::Mutex<Vec<Received>>,
    fail_until: Option<Instant>,
) -> std::io::Result<()> {
    use std::io::{BufRead, Read, Write};
    let mut r = std::io::BufReader::new(s.try_clone()?);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut headers = std::collections::HashMap::new();
        loop {
            let mut h = String::new();
            r.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let n: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut raw = vec![0; n];
        r.read_exact(&mut raw)?;
        let status = if fail_until.is_some_and(|t| Instant::now() < t) {
            500
        } else {
            200
        };
        g.lock().unwrap().push(Received {
            at: std::time::SystemTime::now(),
            headers,
            body: serde_json::from_slice(&raw).unwrap_or(serde_json::Value::Null),
            raw,
            status,
        });
        let mut w = s.try_clone()?;
        write!(w, "HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n")?;
    }
}

/// A network namespace for a sensor (root only), so that its link to one aggregator can
/// be cut with iptables while the aggregator and its ClickHouse go on.
pub struct Netns(pub String);

impl Drop for Netns {
    fn drop(&mut self) {
        sh(&format!("ip netns del {}", self.0));
        sh(&format!("ip link del {}h", self.0));
    }
}

impl Netns {
    /// A namespace for a sensor, linked to this one by a veth pair (a private link):
    /// this side is `10.{net}.{o}.1`, the sensor's `.2`. Returns it and this side's
    /// address. `prefix` and `net` keep tests that run at once apart.
    pub fn new(prefix: &str, net: u8) -> (Netns, String) {
        let ns = format!("{prefix}{}", std::process::id() % 100000);
        let o = 100 + std::process::id() % 100;
        let guard = Netns(ns.clone());
        for c in [
            format!("ip netns add {ns}"),
            format!("ip link add {ns}h type veth peer name {ns}s"),
            format!("ip link set {ns}s netns {ns}"),
            format!("ip addr add 10.{net}.{o}.1/24 dev {ns}h"),
            format!("ip link set {ns}h up"),
            format!("ip netns exec {ns} ip addr add 10.{net}.{o}.2/24 dev {ns}s"),
            format!("ip netns exec {ns} ip link set {ns}s up"),
            format!("ip netns exec {ns} ip link set lo up"),
        ] {
            assert!(sh(&c), "network setup failed: {c}");
        }
        (guard, format!("10.{net}.{o}.1"))
    }

    /// Starts the sensor for `host` inside the namespace (logs to `sensor-{host}.log`).
    pub fn start_sensor(&self, dir: &Path, aggregators: &str, host: &str) -> Proc {
        start_sensor_under(
            &["ip", "netns", "exec", &self.0],
            dir,
            aggregators,
            host,
            &[],
        )
    }

    /// Runs `iptables ARGS` in the namespace.
    pub fn iptables(&self, args: &str) -> bool {
        sh(&format!("ip netns exec {} iptables {args}", self.0))
    }
}

/// A view that makes every insert into `table` (`sonde.batch_intents` or, on a cluster,
/// `sonde.batch_intents_local`) by the aggregator process `pid` take 45 s (its intents name
/// its process); others' are not slowed: a real server made slow, as a loaded one is. Thirty
/// distinct sleeps of 1.5 s (at most 3 s each per block) inside lambdas: a bare `sleep`
/// would run when the view is created too.
pub fn slow_intents_view(table: &str, pid: u32) -> String {
    let sleeps: Vec<String> = (0..30)
        .map(|i| {
            format!(
                "arrayMap(x -> sleepEachRow({}), [seq]) AS s{i}",
                1.5 - i as f64 / 10000.0
            )
        })
        .collect();
    format!(
        "CREATE MATERIALIZED VIEW sonde.slow ENGINE = Null AS SELECT {} FROM {table} WHERE writer LIKE '%-{pid}-%'",
        sleeps.join(", ")
    )
}

/// The value of metric `name` in the `/metrics` of the aggregator at `http` (0 when absent).
pub fn metric_at(http: &str, name: &str) -> u64 {
    http_get(http, "/metrics")
        .and_then(|(_, body)| {
            body.lines()
                .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .unwrap_or(0.0) as u64
}

/// SQL counting inserts into `batch_intents` (or its local table) running longer than
/// `min_s` and begun since `since` (the slow view's creation), from `system.processes`.
pub fn intents_running_sql(min_s: f64, since: Instant) -> String {
    format!(
        "SELECT count() FROM system.processes WHERE query LIKE 'INSERT INTO%batch_intents%' \
         AND elapsed > {min_s} AND elapsed < {}",
        since.elapsed().as_secs_f64()
    )
}

/// The sensor in `ns` loses its link to the aggregator at `here:cur_port` while one of
/// that aggregator's slowed intent inserts runs (`running(s)`: one begun since the slow
/// view and running for more than `s` seconds). The sensor resends to the other aggregator
/// (`other_http`), which must find the first one's intent, wait while that one's insert
/// runs, and when it ends find the batch stored. Returns when, after the cut, it waited
/// and found the batch stored.
pub fn cut_while_its_insert_runs(
    ns: &Netns,
    here: &str,
    cur_port: u16,
    other_http: &str,
    running: impl Fn(f64) -> bool,
) -> (Duration, Duration) {
    wait_until(
        "an insert round with its intents written and its rows not",
        Duration::from_secs(30),
        || running(1.0),
    );
    let rule = format!("OUTPUT -p udp -d {here} --dport {cur_port} -j DROP");
    assert!(
        ns.iptables(&format!("-I {rule}")),
        "iptables in the namespace failed"
    );
    let cut = Instant::now();
    wait_until(
        "the other aggregator waits for the running insert",
        Duration::from_secs(60),
        || metric_at(other_http, "sonde_batches_awaited_total") >= 1,
    );
    let awaited_at = cut.elapsed();
    assert!(
        running(0.0),
        "the first aggregator's insert ended before the batch arrived at the other one: nothing was tested"
    );
    wait_until(
        "the other aggregator finds the batch stored by the first",
        Duration::from_secs(120),
        || metric_at(other_http, "sonde_batches_duplicate_total") >= 1,
    );
    (awaited_at, cut.elapsed())
}
