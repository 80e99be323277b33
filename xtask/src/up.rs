//! `cargo xtask up`: the whole system on this machine.

use crate::certs;
use crate::setup::{ensure_clickhouse, root, run as run_cmd, step};
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s =
        std::net::TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, out.split("\r\n\r\n").nth(1).unwrap_or("").to_string()))
}

fn stop(child: &mut Child, name: &str) {
    if let Ok(None) = child.try_wait() {
        step(&format!("stopping {name}"));
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(40);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The first `n` ```sql blocks of the README.
pub fn readme_queries(n: usize) -> Vec<String> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap_or_default();
    readme
        .split("```sql\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .map(|q| q.trim().to_string())
        .take(n)
        .collect()
}

pub fn run(data_dir: &Path, listen: &str, http_listen: &str, release: bool) -> Result<()> {
    let root = root();
    let data_dir = if data_dir.is_absolute() {
        data_dir.to_path_buf()
    } else {
        root.join(data_dir)
    };
    ensure_clickhouse()?;
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
    step(&format!(
        "certificates in {} (CA created once, reused after)",
        cdir.display()
    ));
    certs::run(&cdir, std::slice::from_ref(&host), &[], false)?;

    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let logs = data_dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    step(&format!("starting the aggregator (QUIC {listen}, HTTP {http_listen}, managed ClickHouse under {}/aggregator)", data_dir.display()));
    let mut agg = Command::new(bin.join("aggregator"))
        .arg("run")
        .args(["--listen", listen, "--http-listen", http_listen])
        .arg("--data-dir")
        .arg(data_dir.join("aggregator"))
        .arg("--ca")
        .arg(cdir.join("ca.pem"))
        .arg("--cert")
        .arg(cdir.join("aggregator.pem"))
        .arg("--key")
        .arg(cdir.join("aggregator-key.pem"))
        .stderr(std::fs::File::create(logs.join("aggregator.log"))?)
        .process_group(0)
        .spawn()
        .context("cannot start the aggregator")?;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(st) = agg.try_wait()? {
            let log = std::fs::read_to_string(logs.join("aggregator.log")).unwrap_or_default();
            bail!(
                "the aggregator exited ({st}):\n{}",
                log.lines()
                    .rev()
                    .take(10)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        if matches!(http_get(http_listen, "/readyz"), Some((200, _))) {
            break;
        }
        if STOP.load(Ordering::SeqCst) || Instant::now() > deadline {
            stop(&mut agg, "aggregator");
            bail!(
                "the aggregator did not become ready; see {}",
                logs.join("aggregator.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    step(&format!("starting a sensor for this host ({host})"));
    let mut sensor = Command::new(bin.join("sensor"))
        .arg("run")
        .args(["--aggregator", listen])
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

    let ports =
        std::fs::read_to_string(data_dir.join("aggregator/clickhouse/ports")).unwrap_or_default();
    let tcp_port = ports
        .lines()
        .find_map(|l| l.strip_prefix("tcp_port="))
        .unwrap_or("9000")
        .to_string();
    println!();
    println!("sonde is up.");
    println!("  console:     http://{http_listen}/");
    println!("  sensor ({host}) -> aggregator QUIC {listen} -> ClickHouse database `sonde`");
    println!("  aggregator:  http://{http_listen}/metrics   http://{http_listen}/api/hosts");
    println!("  logs:        {}", logs.display());
    println!("  ClickHouse:  clickhouse-client --port {tcp_port} --database sonde");
    println!(
        "  alerts:      the built-in default rules are on (`aggregator default-rules` lists them);"
    );
    println!("               alert history: SELECT * FROM sonde.alerts ORDER BY ts DESC LIMIT 20");
    println!();
    println!("Data arrives every 5 s. Try (paste into clickhouse-client --port {tcp_port} --database sonde):");
    for q in readme_queries(3) {
        println!("\n{q}");
    }
    println!("\nCtrl-C stops everything.");

    while !STOP.load(Ordering::SeqCst) {
        if let Some(st) = sensor.try_wait()? {
            eprintln!(
                "sensor exited ({st}); see {}",
                logs.join("sensor.log").display()
            );
            break;
        }
        if let Some(st) = agg.try_wait()? {
            eprintln!(
                "aggregator exited ({st}); see {}",
                logs.join("aggregator.log").display()
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!();
    stop(&mut sensor, "sensor");
    stop(&mut agg, "aggregator (and its ClickHouse)");
    step("stopped; data kept for next time");
    Ok(())
}
