//! The command lines users run: config errors, certificate checks at start,
//! `sensor once --json`.

mod common;

use common::*;
use std::process::Command;

#[test]
fn config_errors_name_the_file_and_key_before_anything_runs() {
    let d = Dir::new("cli-config");
    let bad = d.0.join("sensor.toml");
    std::fs::write(&bad, "interval = \"1s\"\nbatch_intervall = \"5s\"\n").unwrap();
    let out = Command::new(bin("sensor"))
        .arg("-c")
        .arg(&bad)
        .arg("once")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sensor.toml") && err.contains("batch_intervall") && err.contains("line 2"),
        "{err}"
    );

    std::fs::write(&bad, "interval = \"soon\"\n").unwrap();
    let out = Command::new(bin("sensor"))
        .arg("-c")
        .arg(&bad)
        .arg("once")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("interval"), "{err}");

    let bad = d.0.join("agg.toml");
    std::fs::write(&bad, "[clickhouse]\ndatabase = \"x; DROP\"\n").unwrap();
    let out = Command::new(bin("aggregator"))
        .arg("-c")
        .arg(&bad)
        .arg("run")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("clickhouse.database"),
        "{err}"
    );
}

#[test]
fn certificate_problems_are_refused_at_start() {
    let d = Dir::new("cli-certs");
    certs(&d.0.join("a"), &["h1"]);
    certs(&d.0.join("b"), &[]);
    let a = d.0.join("a");
    let b = d.0.join("b");
    // The aggregator's certificate was issued by another CA.
    let out = Command::new(bin("aggregator"))
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(d.0.join("data"))
        .arg("--ca")
        .arg(a.join("ca.pem"))
        .arg("--cert")
        .arg(b.join("aggregator.pem"))
        .arg("--key")
        .arg(b.join("aggregator-key.pem"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("was not issued by the CA"),
        "{err}"
    );
    // An unreadable key file for the sensor.
    let out = Command::new(bin("sensor"))
        .arg("run")
        .arg("--ca")
        .arg(a.join("ca.pem"))
        .arg("--cert")
        .arg(a.join("hosts/h1.pem"))
        .arg("--key")
        .arg(d.0.join("missing-key.pem"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("missing-key.pem"),
        "{err}"
    );
    // A sensor certificate from another deployment's CA: refused at start, naming both files.
    let out = Command::new(bin("sensor"))
        .arg("run")
        .arg("--ca")
        .arg(b.join("ca.pem"))
        .arg("--cert")
        .arg(a.join("hosts/h1.pem"))
        .arg("--key")
        .arg(a.join("hosts/h1-key.pem"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(2)
            && err.contains("was not issued by the CA")
            && err.contains("h1.pem"),
        "{err}"
    );
    // The CA key never lands outside the certs directory; leaf keys are private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(a.join("ca-key.pem"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn sensor_once_json_is_a_readable_snapshot() {
    let out = Command::new(bin("sensor"))
        .args(["once", "--json", "--interval", "300ms"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ncpu = std::thread::available_parallelism().unwrap().get();
    assert_eq!(v["host"]["cpus"].as_u64().unwrap() as usize, ncpu);
    let cpu = v["snapshot"]["cpu"].as_array().unwrap();
    assert_eq!(cpu.len(), ncpu + 1);
    assert_eq!(cpu[0]["cpu"], "total");
    let total: f64 = [
        "user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal",
    ]
    .iter()
    .map(|k| cpu[0][k].as_f64().unwrap())
    .sum();
    assert!((total - 100.0).abs() < 0.5, "cpu shares sum to {total}");
    let interval = v["snapshot"]["interval_ms"].as_u64().unwrap();
    assert!((290..600).contains(&interval), "interval {interval}");
    assert!(v["snapshot"]["memory"]["total"].as_u64().unwrap() > 0);
    assert!(v["snapshot"]["net"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["interface"] == "lo"));
    // Keyed like the database, from the declarations: every table, every column.
    for t in protocol::TABLES {
        let rows = &v["snapshot"][t.name];
        let first = match rows {
            serde_json::Value::Array(a) => a.first(),
            serde_json::Value::Object(_) => Some(rows),
            _ => None,
        };
        if let Some(row) = first {
            for c in t.stored_columns().iter().skip(2) {
                assert!(
                    !row[c.name].is_null(),
                    "{}.{} missing in {row}",
                    t.name,
                    c.name
                );
            }
        }
    }
    assert!(v["snapshot"]["tcp"]["listen_overflows_per_s"].is_number());
    assert!(v["snapshot"]["pressure"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| ["cpu", "memory", "io"].contains(&p["resource"].as_str().unwrap())));
}
