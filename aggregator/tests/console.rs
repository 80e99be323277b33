//! The web console in a real browser: Debian's Chromium, driven over WebDriver
//! (chromedriver), against a running aggregator with a real sensor, a real host's recorded
//! history imported with `aggregator import`, a rule that fires, and a stress-ng load.
//! Screenshots of each page are saved in the test directory (and into $SONDE_SCREENSHOTS
//! when set, e.g. docs/).

mod common;
use common::*;
use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Minimal HTTP/1.1 client for JSON (WebDriver, the aggregator's API), one request per
/// connection.
fn http_json(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    s.write_all(req.as_bytes()).unwrap();
    // Read the head, then exactly the body (the server may keep the connection open).
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed before the response head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut body = buf[head_end + 4..].to_vec();
    let lower = head.to_ascii_lowercase();
    let length = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let chunked = lower.contains("transfer-encoding: chunked");
    loop {
        let done = match length {
            Some(n) => body.len() >= n,
            None if chunked => body.windows(5).any(|w| w == b"0\r\n\r\n"),
            None => false,
        };
        if done {
            break;
        }
        let n = s.read(&mut chunk).unwrap_or(0);
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = String::from_utf8_lossy(&body).to_string();
    let body = if chunked {
        let mut rest = body.as_str();
        let mut out = String::new();
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || after.len() < n {
                break;
            }
            out.push_str(&after[..n]);
            rest = after[n..].trim_start_matches("\r\n");
        }
        out
    } else {
        body
    };
    (code, head, body)
}

struct Browser {
    _driver: Proc,
    addr: String,
    session: String,
    profile: std::path::PathBuf,
}

impl Browser {
    fn start(dir: &std::path::Path) -> Browser {
        let port = free_port();
        let log = dir.join("chromedriver.log");
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect(
                "chromedriver (Debian package chromium-driver; `cargo xtask test` installs it)",
            );
        let driver = Proc::new(child, log, "chromedriver");
        let addr = format!("127.0.0.1:{port}");
        wait_until("chromedriver", Duration::from_secs(20), || {
            std::net::TcpStream::connect(&addr).is_ok()
        });
        let profile = dir.join("chromium-profile");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                         "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                         "--window-size=1400,1000", format!("--user-data-dir={}", profile.display())]
            }
        }}});
        let (code, _, body) = http_json(&addr, "POST", "/session", Some(&caps), &[]);
        assert_eq!(code, 200, "WebDriver session: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let session = v["value"]["sessionId"].as_str().unwrap().to_string();
        Browser {
            _driver: driver,
            addr,
            session,
            profile,
        }
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (code, _, out) = http_json(
            &self.addr,
            method,
            &format!("/session/{}{path}", self.session),
            body.as_ref(),
            &[],
        );
        let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        assert_eq!(code, 200, "WebDriver {method} {path}: {out}");
        v["value"].clone()
    }

    fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })));
    }

    fn js(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
    }

    /// Waits until the page says it is drawn (body[data-ready]); returns its value.
    fn wait_ready(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = self.js("return document.body.dataset.ready || ''");
            if let Some(s) = v.as_str().filter(|s| !s.is_empty()) {
                return s.to_string();
            }
            assert!(Instant::now() < deadline, "page not ready in 60 s");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn open(&self, base: &str, hash: &str) -> String {
        self.js("if (document.body) delete document.body.dataset.ready; return 0");
        // A new hash on the same document re-routes (hashchange) without a reload.
        self.goto(&format!("{base}/{hash}"));
        self.wait_ready()
    }

    fn errors(&self) -> Vec<String> {
        serde_json::from_value(self.js("return (window.sonde && window.sonde.errors) || []"))
            .unwrap_or_default()
    }

    fn screenshot(&self, dir: &std::path::Path, name: &str) {
        let b64 = self.cmd("GET", "/screenshot", None);
        let png = decode_b64(b64.as_str().unwrap());
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(dir.join(format!("{name}.png")), &png).unwrap();
        if let Ok(out) = std::env::var("SONDE_SCREENSHOTS") {
            // Relative to the workspace root (tests run in aggregator/).
            let out = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/..")).join(out);
            std::fs::write(out.join(format!("{name}.png")), &png).unwrap();
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = http_json(
            &self.addr,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
            &[],
        );
        // Chromium outlives a killed chromedriver: end whatever runs on this test's profile.
        let _ = Command::new("pkill")
            .arg("-f")
            .arg(self.profile.display().to_string())
            .status();
    }
}

fn decode_b64(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => 0,
        }
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let pad = chunk.iter().filter(|&&c| c == b'=').count();
        let n = chunk.iter().fold(0u32, |acc, &c| (acc << 6) | val(c));
        let n = n << (6 * (4 - chunk.len()));
        let b = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&b[..3 - pad.min(3)]);
    }
    out
}

/// Over one window of the run-queue heatmap: (p50, p99, share of wakeups that waited 1 ms or
/// more), from the API the page draws.
fn heat_stats(http: &str, host: &str, from: u64, to: u64) -> (u64, u64, f64) {
    let (_, body) = http_get(
        http,
        &format!("/api/hosts/{host}/heatmap?source=runqueue&from={from}&to={to}&points=1"),
    )
    .unwrap();
    let v: Value = serde_json::from_str(&body).unwrap();
    let first = |k: &str| {
        v[k].as_array()
            .and_then(|a| a.first())
            .and_then(|x| x.as_u64())
            .unwrap_or(0)
    };
    let bounds: Vec<u64> = serde_json::from_value(v["bounds"].clone()).unwrap_or_default();
    let counts: Vec<Vec<u64>> = serde_json::from_value(v["counts"].clone()).unwrap_or_default();
    let row = counts.first().cloned().unwrap_or_default();
    let total: u64 = row.iter().sum();
    // A bucket with upper bound 2^i holds waits of at least 2^(i-1) µs.
    let slow: u64 = bounds
        .iter()
        .zip(&row)
        .filter(|(b, _)| **b >= 2048)
        .map(|(_, c)| c)
        .sum();
    (
        first("p50"),
        first("p99"),
        slow as f64 / total.max(1) as f64,
    )
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn console_pages_draw_real_data_in_chromium_and_the_token_guards_them() {
    let d = Dir::new("console");
    // A container-like cgroup with limits, so the live host's container charts have one.
    let limited = LimitedCgroup::new();
    certs(&d.0.join("certs"), &["web1"]);
    let rules = d.0.join("rules.toml");
    std::fs::write(
        &rules,
        "[[rule]]\nname = \"console test alert\"\nkind = \"threshold\"\nseries = \"system.procs_running\"\ndirection = \"above\"\nwarning = -1\n",
    )
    .unwrap();
    let port = free_udp_port();
    let rules_s = rules.to_str().unwrap().to_string();
    let agg = start_aggregator_with(&d.0, port, "1", &["--rules", &rules_s]);
    let ports = std::fs::read_to_string(agg.data.join("clickhouse/ports")).unwrap();
    let ch_http = ports
        .lines()
        .find_map(|l| l.strip_prefix("http_port="))
        .unwrap()
        .to_string();
    // A live sensor, then a CPU storm: the run-queue heatmap must show it.
    let mut sensor = start_sensor(&d.0, &agg.quic, "web1", &["--batch-interval", "1s"]);
    wait_until("latency rows for web1", Duration::from_secs(30), || {
        count(
            &agg,
            "SELECT count() FROM sonde.latency WHERE host = 'web1' AND source = 'runqueue'",
        ) >= 10
    });
    let quiet = (now_s() - 10, now_s());
    let t1 = now_s() + 1;
    let st = Command::new("stress-ng")
        .args(["--cpu", "8", "--timeout", "12s", "--quiet"])
        .status()
        .expect("stress-ng");
    assert!(st.success());
    let busy = (t1, now_s());
    std::thread::sleep(Duration::from_secs(4));
    let (quiet, busy) = (
        heat_stats(&agg.http, "web1", quiet.0, quiet.1),
        heat_stats(&agg.http, "web1", busy.0, busy.1),
    );
    eprintln!(
        "run-queue (p50 µs, p99 µs, share of wakeups waiting >= 1 ms): quiet {quiet:?}, under stress-ng {busy:?}"
    );
    assert!(
        busy.2 > quiet.2 && busy.0 >= quiet.0,
        "the heatmap API shows no run-queue shift: {quiet:?} -> {busy:?}"
    );
    wait_until("the test alert firing", Duration::from_secs(20), || {
        count(&agg, "SELECT count() FROM sonde.alerts WHERE rule = 'console test alert' AND state = 'firing'") > 0
    });

    // A real host's history (1.6 h at 1 s, every probe), ending now (imported after the
    // load measurement: its merges would disturb it).
    let out = Command::new(bin("aggregator"))
        .args([
            "import",
            concat!(env!("CARGO_MANIFEST_DIR"), "/corpus/recorded/host.rec.zst"),
        ])
        .args([
            "--host",
            "rec",
            "--end-at",
            "now",
            "--clickhouse-url",
            &format!("http://127.0.0.1:{ch_http}"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let base = format!("http://{}", agg.http);
    let b = Browser::start(&d.0);
    let shots = d.0.join("screenshots");
    std::fs::create_dir_all(&shots).unwrap();

    // Fleet: both hosts, sparklines drawn, the firing alert counted.
    assert_eq!(b.open(&base, "#/"), "1", "fleet page: {:?}", b.errors());
    let fleet =
        b.js("return [...document.querySelectorAll('#fleet tbody tr')].map(r => r.innerText)");
    let rows: Vec<String> = serde_json::from_value(fleet).unwrap();
    assert!(
        rows.iter().any(|r| r.starts_with("rec")) && rows.iter().any(|r| r.starts_with("web1")),
        "{rows:?}"
    );
    let sparks = b.js("return [...document.querySelectorAll('canvas.spark')].filter(c => +c.dataset.points > 0).length");
    assert!(
        sparks.as_u64().unwrap() >= 4,
        "sparklines with points: {sparks}"
    );
    assert!(b.errors().is_empty(), "fleet page errors: {:?}", b.errors());
    b.screenshot(&shots, "console-fleet");
    // Live pages refresh themselves (here every 2 s): the stamp moves, the rows come back.
    assert_eq!(b.open(&base, "#/?refresh=2"), "1");
    let stamp = || b.js("return document.querySelector('#refreshed').innerText");
    let first = stamp();
    assert!(first.as_str().unwrap().contains("every 2 s"), "{first}");
    std::thread::sleep(Duration::from_millis(3500));
    let later = stamp();
    assert_ne!(first, later, "the fleet did not refresh");
    let rows = b.js("return document.querySelectorAll('#fleet tbody tr').length");
    assert!(rows.as_u64().unwrap() >= 2, "rows after a refresh: {rows}");

    // A host over 24 hours: the recorded history comes from the 1-minute tier, every chart
    // has plotted points, the heatmap has cells.
    assert_eq!(
        b.open(&base, "#/host/rec?range=86400"),
        "1",
        "{:?}",
        b.errors()
    );
    let charts: serde_json::Map<String, Value> =
        serde_json::from_value(b.js("return window.sonde.charts")).unwrap();
    assert!(charts.len() >= 17, "{charts:?}");
    for (title, n) in &charts {
        // The recording predates the cgroups and processes tables.
        let newer = title.starts_with("Containers") || title.starts_with("Top processes");
        assert!(
            newer || n.as_u64().unwrap_or(0) > 0,
            "chart {title:?} drew nothing on the recorded host: {charts:?}"
        );
    }
    // The filesystem chart carries the forecast detector's trend for each mount.
    let fc = b.js("return [...document.querySelectorAll('.chart')].map(c => +(c.dataset.forecasts || 0)).reduce((a, b) => a + b, 0)");
    assert!(fc.as_u64().unwrap() >= 1, "no forecast trend drawn: {fc}");
    let legend = b.js("return document.querySelector('.chart .legend').innerText");
    assert!(
        legend.as_str().unwrap().contains("cpu_1m"),
        "24 h read from the minute tier: {legend}"
    );
    assert!(b.errors().is_empty(), "host page errors: {:?}", b.errors());
    b.screenshot(&shots, "console-host");

    // The live host over 5 minutes: raw rows, the alert shaded, the stress visible.
    assert_eq!(
        b.open(&base, "#/host/web1?range=300"),
        "1",
        "{:?}",
        b.errors()
    );
    let charts: serde_json::Map<String, Value> =
        serde_json::from_value(b.js("return window.sonde.charts")).unwrap();
    for title in [
        "CPU (total, %)",
        "Load",
        "Memory",
        "Network",
        "heatmap runqueue",
        "Containers: CPU (top 8, % of one CPU)",
        "Containers: memory working set (top 8)",
        "Top processes: CPU (% of one CPU)",
        "Top processes: resident memory",
    ] {
        assert!(
            charts[title].as_u64().unwrap_or(0) > 0,
            "{title} empty on web1: {charts:?}"
        );
    }
    let bands = b.js("return [...document.querySelectorAll('.chart canvas')].map(c => +(c.dataset.bands || 0)).reduce((a, b) => a + b, 0)");
    assert!(
        bands.as_u64().unwrap() > 0,
        "no alert shading on web1's charts"
    );
    b.screenshot(&shots, "console-host-live");

    // Alerts: the firing alert, with a link to the host at that time.
    assert_eq!(b.open(&base, "#/alerts"), "1", "{:?}", b.errors());
    let firing = b.js("return document.querySelector('#firing').innerText");
    assert!(
        firing.as_str().unwrap().contains("console test alert"),
        "{firing}"
    );
    let link = b.js("return document.querySelector('#firing a').getAttribute('href')");
    assert!(
        link.as_str().unwrap().starts_with("#/host/web1?from="),
        "{link}"
    );
    assert!(
        b.errors().is_empty(),
        "alerts page errors: {:?}",
        b.errors()
    );
    b.screenshot(&shots, "console-alerts");

    // Rules: the loaded rule, with the series it tracks and its firing count.
    assert_eq!(b.open(&base, "#/rules"), "1", "{:?}", b.errors());
    let rules = b.js("return [...document.querySelectorAll('#rules tr')].map(r => [...r.cells].map(c => c.innerText))");
    let rows: Vec<Vec<String>> = serde_json::from_value(rules).unwrap();
    let row = rows
        .iter()
        .find(|r| r[0] == "console test alert")
        .expect("the rule on the rules page");
    assert_eq!(row[1], "threshold");
    assert_eq!(row[2], "system.procs_running");
    assert!(
        row[5].parse::<u64>().unwrap() >= 1 && row[7].parse::<u64>().unwrap() >= 1,
        "{row:?}"
    );
    b.screenshot(&shots, "console-rules");

    // top=N keeps the N busiest label sets: the processes API with top=2 has two series,
    // the busiest first by average (the stress-ng workers ran in this window).
    let (code, body) = http_get(
        &agg.http,
        &format!(
            "/api/hosts/web1/series?metric=processes.cpu_pct&top=2&from={}",
            now_s() - 600
        ),
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["series"].as_array().unwrap().len(), 2, "{body}");
    // The forecast API: the detector's trend for the recorded host's filesystems.
    let (code, body) = http_get(
        &agg.http,
        "/api/hosts/rec/forecast?metric=filesystem.used_pct&window=1800",
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["series"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["line"].is_object() && s["slope_per_hour"].is_number()),
        "{body}"
    );
    // The limited cgroup is on the live host with its limit.
    let (_, body) = http_get(
        &agg.http,
        &format!(
            "/api/hosts/web1/series?metric=cgroups.memory_limit&cgroup={}",
            limited.rel
        ),
    )
    .unwrap();
    let v: Value = serde_json::from_str(&body).unwrap();
    let limit = v["series"][0]["v"][0].as_f64().unwrap_or(0.0);
    assert!((limit - 536870912.0).abs() < 1e3, "{body}"); // f32 precision in the API

    // Hostile parameters: refused with a message, nothing run.
    for bad in [
        "/api/hosts/x'%20OR%201=1/series?metric=cpu.busy",
        "/api/hosts/web1/series?metric=cpu.busy;DROP%20TABLE%20cpu",
        "/api/hosts/web1/series?metric=cpu.busy&from=abc",
        "/api/hosts/web1/series?metric=cpu.busy&cpu%3D%27x=1",
        "/api/alerts?state=firing'--",
        "/api/hosts/web1/series?metric=cgroups.cpu_pct&top=0",
        "/api/hosts/web1/series?metric=cgroups.cpu_pct&top=8)%20OR%20(1",
        "/api/hosts/web1/forecast?metric=filesystem.used_pct&window=1",
        "/api/hosts/web1/forecast?metric=filesystem.used_pct&limit=x",
    ] {
        let (code, body) = http_get(&agg.http, bad).unwrap();
        assert_eq!(code, 400, "{bad}: {body}");
        assert!(body.contains("error"), "{bad}: {body}");
    }
    assert!(count(&agg, "SELECT count() FROM sonde.cpu") > 0);

    // A fleet of 1,000 more hosts (an hour of CPU each, at one row a minute): the page
    // lists every one, and sparklines are drawn as rows scroll into view.
    query(
        &agg,
        "INSERT INTO sonde.hosts (host, first_seen, last_seen, sensor_version, kernel, os, arch, cpus, memory_bytes) \
         SELECT concat('gen-', toString(number)), now() - 3600, now(), 'gen', '6.1', 'Debian', 'x86_64', 4, 8000000000 FROM numbers(1000)",
    );
    query(
        &agg,
        "INSERT INTO sonde.cpu (ts, host, cpu, idle) SELECT now() - (number % 60) * 60, \
         concat('gen-', toString(intDiv(number, 60))), 'total', toFloat32(50 + 40 * sin(number / 7)) FROM numbers(60000)",
    );
    let t0 = Instant::now();
    assert_eq!(b.open(&base, "#/?refresh=0"), "1", "{:?}", b.errors());
    let ready = t0.elapsed();
    let rows = b.js("return document.querySelectorAll('#fleet tbody tr').length");
    assert!(rows.as_u64().unwrap() >= 1002, "fleet rows: {rows}");
    b.js("window.scrollTo(0, document.body.scrollHeight); return 1");
    let drawn = || {
        b.js("const c = [...document.querySelectorAll('#fleet tbody tr')].slice(-20).map(r => r.querySelector('canvas.spark')).filter(c => c && +c.dataset.points > 0); return c.length")
            .as_u64()
            .unwrap()
    };
    wait_until(
        "sparklines of the last rows after scrolling",
        Duration::from_secs(20),
        || drawn() > 0,
    );
    eprintln!(
        "fleet page with {rows} hosts ready in {:.2} s (browser, debug aggregator); last rows' sparklines drawn after scrolling",
        ready.as_secs_f64()
    );
    assert!(
        b.errors().is_empty(),
        "1,000-host fleet errors: {:?}",
        b.errors()
    );

    // With a token: the console asks for it, refuses without it, works after login.
    assert!(sensor.stop().success());
    drop(b);
    drop(agg);
    let cfg = d.0.join("token.toml");
    std::fs::write(&cfg, "[api]\ntoken = \"console-secret\"\n").unwrap();
    let cfg_s = cfg.to_str().unwrap().to_string();
    let agg = start_aggregator_with(&d.0, port, "2", &["--config", &cfg_s]);
    let (code, _) = http_get(&agg.http, "/api/hosts").unwrap();
    assert_eq!(code, 401);
    let (code, _, _) = http_json(
        &agg.http,
        "POST",
        "/login",
        Some(&json!({"token": "wrong"})),
        &[],
    );
    assert_eq!(code, 401);
    let (code, head, _) = http_json(
        &agg.http,
        "POST",
        "/login",
        Some(&json!({"token": "console-secret"})),
        &[],
    );
    assert_eq!(code, 200);
    let cookie_line = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .expect("a session cookie");
    for attr in ["HttpOnly", "SameSite=Strict", "Max-Age="] {
        assert!(cookie_line.contains(attr), "{cookie_line}");
    }
    let base = format!("http://{}", agg.http);
    let b = Browser::start(&d.0.join("b2").tap_mkdir());
    assert_eq!(b.open(&base, "#/"), "error");
    assert!(
        b.js("return !!document.querySelector('#login')")
            .as_bool()
            .unwrap(),
        "no login form without a session"
    );
    b.screenshot(&shots, "console-login");
    let el = b.cmd(
        "POST",
        "/element",
        Some(json!({"using": "css selector", "value": "#token"})),
    );
    let id = el
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    b.cmd(
        "POST",
        &format!("/element/{id}/value"),
        Some(json!({"text": "console-secret"})),
    );
    b.js("if (document.body) delete document.body.dataset.ready; return 0");
    let btn = b.cmd(
        "POST",
        "/element",
        Some(json!({"using": "css selector", "value": "#login button"})),
    );
    let bid = btn
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    b.cmd("POST", &format!("/element/{bid}/click"), Some(json!({})));
    assert_eq!(b.wait_ready(), "1", "after login: {:?}", b.errors());
    let n = b.js("return document.querySelectorAll('#fleet tbody tr').length");
    assert!(n.as_u64().unwrap() >= 2, "fleet after login: {n}");
    // The session cookie is HttpOnly: scripts cannot read it.
    assert_eq!(b.js("return document.cookie").as_str().unwrap(), "");
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}
impl TapMkdir for std::path::PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}
