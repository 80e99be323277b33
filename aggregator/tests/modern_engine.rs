//! The DDL for current ClickHouse releases and every README query, on a
//! current engine (chdb-core from PyPI, ClickHouse 26.x in-process).

use std::process::Command;

#[test]
fn modern_ddl_and_readme_queries_run_on_current_clickhouse() {
    let have_chdb = Command::new("python3")
        .args(["-c", "import chdb"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(have_chdb, "python3 with chdb-core is required: run `cargo xtask test`, which installs it (pip install chdb-core)");
    let agg = env!("CARGO_BIN_EXE_aggregator");
    let out = Command::new(agg)
        .args(["schema", "--server-version", "26.9.2"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let ddl = std::env::temp_dir().join(format!("sonde-modern-ddl-{}.sql", std::process::id()));
    std::fs::write(&ddl, &out.stdout).unwrap();
    let dir = env!("CARGO_MANIFEST_DIR");
    let r = Command::new("python3")
        .arg(format!("{dir}/tests/modern_engine.py"))
        .arg(&ddl)
        .arg(format!("{dir}/../README.md"))
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&ddl);
    let stdout = String::from_utf8_lossy(&r.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&r.stderr));
    assert!(r.status.success(), "modern engine check failed");
    assert!(stdout.contains("README queries on the current engine"));
}

#[test]
fn old_server_ddl_has_no_modern_extras() {
    let out = Command::new(env!("CARGO_BIN_EXE_aggregator"))
        .args(["schema", "--server-version", "18.16.1"])
        .output()
        .unwrap();
    let ddl = String::from_utf8(out.stdout).unwrap();
    assert!(ddl.contains("CREATE TABLE IF NOT EXISTS sonde.cpu"));
    for x in ["CODEC", "TTL", "LowCardinality"] {
        assert!(!ddl.contains(x), "18.16 DDL contains {x}");
    }
}
