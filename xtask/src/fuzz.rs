//! `cargo xtask fuzz`: the protocol decoder (frame → zstd → records) under
//! libFuzzer via cargo-fuzz, seeded from fuzz/corpus/decode.

use crate::setup::{root, run, step};
use anyhow::{bail, Context, Result};
use std::process::Command;

const CARGO_FUZZ: &str = "0.13.2";

fn ensure_cargo_fuzz() -> Result<()> {
    crate::ebpf::ensure_toolchain()?; // nightly (the sanitizer flags need it)
                                      // libfuzzer-sys compiles libFuzzer's C++ sources.
    if !crate::setup::have("c++") {
        crate::setup::apt_install(&["g++"])?;
    }
    // The decoder's zstd is linked from the system's libzstd (ZSTD_SYS_USE_PKG_CONFIG):
    // building zstd-sys's bundled C sources took 2.2 of the fuzz stage's 3.3 build minutes
    // in CI, and cargo-fuzz instruments only Rust code (RUSTFLAGS), so the C library was
    // never under the sanitizer or coverage either way. What is fuzzed is the decoder.
    if !std::path::Path::new("/usr/include/zstd.h").exists() || !crate::setup::have("pkg-config") {
        crate::setup::apt_install(&["libzstd-dev", "pkg-config"])?;
    }
    let v = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    if v.contains(CARGO_FUZZ) {
        step(&format!("cargo-fuzz {CARGO_FUZZ}: installed"));
        return Ok(());
    }
    step(&format!(
        "installing cargo-fuzz {CARGO_FUZZ} (about a minute, once)"
    ));
    run(Command::new("cargo").args(["install", &format!("cargo-fuzz@{CARGO_FUZZ}"), "--locked"]))
}

/// Runs the decode target for `secs` seconds; prints and returns (executions, crashes).
pub fn run_fuzz(secs: u64) -> Result<(u64, u64)> {
    ensure_cargo_fuzz()?;
    let dir = root().join("fuzz");
    // New inputs go to a scratch corpus; the committed seeds stay as they are.
    let work = root().join("target/fuzz-corpus");
    std::fs::create_dir_all(&work)?;
    step(&format!(
        "fuzzing the protocol decoder for {secs} s (seeds: fuzz/corpus/decode)"
    ));
    let out = Command::new("cargo")
        .current_dir(&dir)
        .args(["+nightly", "fuzz", "run", "decode"])
        .env("ZSTD_SYS_USE_PKG_CONFIG", "1")
        .arg(&work)
        .arg(dir.join("corpus/decode"))
        .args([
            "--",
            &format!("-max_total_time={secs}"),
            "-rss_limit_mb=2048",
            "-max_len=65536",
            "-print_final_stats=1",
        ])
        .output()
        .context("cannot run cargo fuzz")?;
    let err = String::from_utf8_lossy(&out.stderr);
    let execs = err
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let crashed = !out.status.success();
    if crashed {
        let tail: Vec<&str> = err.lines().rev().take(40).collect();
        eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        bail!(
            "the fuzzer found a failing input after {execs} executions (see fuzz/artifacts/decode/)"
        );
    }
    step(&format!(
        "fuzzing: {execs} executions in {secs} s, no crash, no leak, no timeout"
    ));
    Ok((execs, 0))
}
