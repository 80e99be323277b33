//! Detection and alerting end to end: a real sensor on this host, the real aggregator with
//! its managed ClickHouse, real HTTP receivers (webhooks) and Debian's real Alertmanager.

mod common;

use common::*;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The tests here load the CPU or start servers: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn hmac_hex(secret: &str, body: &[u8]) -> String {
    // HMAC-SHA256 computed independently of the aggregator's code path: via openssl(1).
    let mut c = std::process::Command::new("openssl")
        .args(["dgst", "-sha256", "-hmac", secret, "-hex"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("openssl");
    c.stdin.take().unwrap().write_all(body).unwrap();
    let out = c.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.rsplit(' ').next().unwrap().trim().to_string()
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn spin(
    threads: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..threads)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 1u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    std::hint::black_box(x);
                }
            })
        })
        .collect()
}

#[test]
fn cpu_load_alert_fires_and_resolves_signed_flaky_receiver_gets_each_once_and_silence_is_noticed() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Dir::new("alerting");
    certs(&dir.0.join("certs"), &["alpha"]);
    let good = Receiver::start(None);
    // The flaky receiver answers 500 for the first 12 s.
    let flaky = Receiver::start(Some(Instant::now() + Duration::from_secs(12)));
    let rules = dir.0.join("rules.toml");
    std::fs::write(
        &rules,
        r#"
[[rule]]
name = "cpu busy"
kind = "threshold"
series = "cpu.busy"
labels = { cpu = "total" }
critical = 80
for = "5s"
summary = "CPU above 80% for 5 s"

[[rule]]
name = "memory present"
kind = "threshold"
series = "memory.total"
warning = 0

[[rule]]
name = "load present"
kind = "threshold"
series = "system.procs_running"
direction = "above"
warning = -1

[[rule]]
name = "silent"
kind = "host_silent"
for = "4s"
severity = "critical"
"#,
    )
    .unwrap();
    let cfg = dir.0.join("agg.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[alerting.webhook]]\nurl = \"{}\"\nsecret = \"s3cret\"\n\n[[alerting.webhook]]\nurl = \"{}\"\n",
            good.url(),
            flaky.url()
        ),
    )
    .unwrap();
    let agg = start_aggregator_with(
        &dir.0,
        free_udp_port(),
        "a",
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--rules",
            rules.to_str().unwrap(),
        ],
    );
    let mut sensor = start_sensor(&dir.0, &agg.quic, "alpha", &["--batch-interval", "1s"]);
    wait_until(
        "the always-true rules fire",
        Duration::from_secs(30),
        || {
            good.accepted()
                .iter()
                .filter(|r| r.body["status"] == "firing")
                .count()
                >= 2
        },
    );

    // CPU load: every core busy.
    let ncpu = std::thread::available_parallelism().unwrap().get();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load_start = SystemTime::now();
    let spinners = spin(ncpu * 2, stop.clone());
    let firing = |r: &Received| r.body["rule"] == "cpu busy" && r.body["status"] == "firing";
    wait_until("cpu busy firing", Duration::from_secs(40), || {
        good.accepted().iter().any(firing)
    });
    let f = good.accepted().into_iter().find(firing).unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in spinners {
        s.join().unwrap();
    }
    let starts: u64 = ms(humantime::parse_rfc3339(f.body["starts_at"].as_str().unwrap()).unwrap());
    let delay_ms = ms(f.at) - starts;
    eprintln!(
        "cpu busy: breach at +{} ms after load start, firing webhook {} ms after the breach (for = 5 s); value {}",
        starts as i64 - ms(load_start) as i64,
        delay_ms,
        f.body["value"]
    );
    assert!(
        delay_ms >= 5000,
        "fired before `for` elapsed ({delay_ms} ms)"
    );
    assert!(
        delay_ms <= 8000,
        "firing arrived {delay_ms} ms after the breach (> for + 3 s)"
    );
    assert_eq!(f.body["severity"], "critical");
    assert_eq!(f.body["threshold"], 80.0);
    assert!(f.body["value"].as_f64().unwrap() > 80.0);
    assert_eq!(f.body["labels"]["host"], "alpha");
    // The signature verifies (HMAC-SHA256 over the exact body).
    let sig = f
        .headers
        .get("x-sonde-signature")
        .expect("signature header");
    assert_eq!(sig, &format!("sha256={}", hmac_hex("s3cret", &f.raw)));
    // Resolved after the load stops, same id.
    let id = f.body["id"].as_str().unwrap().to_string();
    wait_until("cpu busy resolved", Duration::from_secs(30), || {
        good.accepted()
            .iter()
            .any(|r| r.body["id"] == id.as_str() && r.body["status"] == "resolved")
    });

    // Silence: stop the sensor; the host_silent alert fires, and resolves when it returns.
    sensor.stop();
    let silent =
        |st: &'static str| move |r: &Received| r.body["rule"] == "silent" && r.body["status"] == st;
    wait_until("host silent firing", Duration::from_secs(20), || {
        good.accepted().iter().any(silent("firing"))
    });
    let _sensor2 = start_sensor(&dir.0, &agg.quic, "alpha", &["--batch-interval", "1s"]);
    wait_until("host silent resolved", Duration::from_secs(20), || {
        good.accepted().iter().any(silent("resolved"))
    });

    // The flaky receiver: after its outage, every notification the good one got, exactly once.
    wait_until("flaky receiver caught up", Duration::from_secs(60), || {
        let want: std::collections::HashSet<(String, String)> = good
            .accepted()
            .iter()
            .filter(|r| r.body["repeat"] == false)
            .map(|r| (r.body["id"].to_string(), r.body["status"].to_string()))
            .collect();
        let have: std::collections::HashSet<(String, String)> = flaky
            .accepted()
            .iter()
            .map(|r| (r.body["id"].to_string(), r.body["status"].to_string()))
            .collect();
        want.is_subset(&have)
    });
    let got = flaky.got.lock().unwrap().clone();
    let failed = got.iter().filter(|r| r.status == 500).count();
    let mut per: HashMap<(String, String), usize> = HashMap::new();
    for r in got.iter().filter(|r| r.status == 200) {
        *per.entry((r.body["id"].to_string(), r.body["status"].to_string()))
            .or_default() += 1;
    }
    eprintln!(
        "flaky receiver: {failed} answered 500, {} distinct accepted",
        per.len()
    );
    assert!(failed > 0, "the outage did not happen");
    assert!(
        per.values().all(|n| *n == 1),
        "duplicates after recovery: {per:?}"
    );
    assert!(metric(&agg, "sonde_alert_notification_failures_total") >= failed as u64);
    assert_eq!(metric(&agg, "sonde_alert_notifications_dropped_total"), 0);
    // Every transition is in ClickHouse.
    wait_until("alert rows", Duration::from_secs(10), || {
        count(&agg, &format!("SELECT count() FROM sonde.alerts WHERE alert_id = '{id}' AND state IN ('pending','firing','resolved')")) == 3
    });
}

#[test]
fn alertmanager_receives_alerts() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let am_bin = ["/usr/bin/prometheus-alertmanager", "/usr/bin/alertmanager"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("prometheus-alertmanager is not installed (cargo xtask test installs it)");
    let dir = Dir::new("alertmanager");
    certs(&dir.0.join("certs"), &["beta"]);
    std::fs::write(
        dir.0.join("am.yml"),
        "route:\n  receiver: blackhole\n  group_wait: 1s\nreceivers:\n  - name: blackhole\n",
    )
    .unwrap();
    let am_port = free_port();
    let am_log = std::fs::File::create(dir.0.join("am.log")).unwrap();
    let mut am = std::process::Command::new(am_bin)
        .arg(format!("--config.file={}", dir.0.join("am.yml").display()))
        .arg(format!(
            "--storage.path={}",
            dir.0.join("am-data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{am_port}"))
        .arg("--cluster.listen-address=")
        .stdout(std::process::Stdio::null())
        .stderr(am_log)
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _k = Kill(&mut am);
    let am_addr = format!("127.0.0.1:{am_port}");
    wait_until("alertmanager ready", Duration::from_secs(20), || {
        matches!(http_get(&am_addr, "/-/ready"), Some((200, _)))
    });
    let rules = dir.0.join("rules.toml");
    std::fs::write(
        &rules,
        "[[rule]]\nname = \"sonde_memory_present\"\nkind = \"threshold\"\nseries = \"memory.total\"\nwarning = 0\nsummary = \"test alert\"\n",
    )
    .unwrap();
    let cfg = dir.0.join("agg.toml");
    std::fs::write(
        &cfg,
        format!(
            "[api]\ntoken = \"t0ken\"\n\n[[alerting.alertmanager]]\nurl = \"http://{am_addr}\"\n"
        ),
    )
    .unwrap();
    let agg = start_aggregator_with(
        &dir.0,
        free_udp_port(),
        "a",
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--rules",
            rules.to_str().unwrap(),
        ],
    );
    let _sensor = start_sensor(&dir.0, &agg.quic, "beta", &["--batch-interval", "1s"]);
    let mut last = String::new();
    wait_until("the alert in Alertmanager", Duration::from_secs(30), || {
        last = http_get(&am_addr, "/api/v2/alerts")
            .map(|r| r.1)
            .unwrap_or_default();
        last.contains("sonde_memory_present")
    });
    let v: serde_json::Value = serde_json::from_str(&last).unwrap();
    let a = v
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["labels"]["alertname"] == "sonde_memory_present")
        .unwrap();
    assert_eq!(a["labels"]["host"], "beta");
    assert_eq!(a["labels"]["severity"], "warning");
    assert_eq!(a["annotations"]["summary"], "test alert");
    assert_eq!(a["status"]["state"], "active");
    assert!(metric(&agg, "sonde_alert_notifications_sent_total") >= 1);
    // With an API token configured: /api/* needs it; health and metrics stay open.
    let get = |path: &str, auth: Option<&str>| -> u16 {
        let mut s = std::net::TcpStream::connect(&agg.http).unwrap();
        let h = auth
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n{h}\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    assert_eq!(get("/api/hosts", None), 401);
    assert_eq!(get("/api/hosts", Some("wrong")), 401);
    assert_eq!(get("/api/hosts", Some("t0ken")), 200);
    assert_eq!(get("/healthz", None), 200);
    assert_eq!(get("/metrics", None), 200);
}
