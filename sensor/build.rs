//! Embeds the eBPF object built by `cargo xtask build-ebpf` (or the file named by
//! SONDE_EBPF_OBJECT). Without it the sensor still builds and runs on /proc alone, and
//! `sensor probes` says how to get the probes.
use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    // The commit this sensor is built from, for `sensor --version` (what `cargo xtask
    // deploy` prints per host before and after an upgrade). "unknown" outside a checkout.
    let git = std::process::Command::new("git")
        .args(["rev-parse", "--short=9", "HEAD"])
        .current_dir(&manifest)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=SONDE_GIT={git}");
    for f in ["../.git/HEAD", "../.git/logs/HEAD"] {
        if manifest.join(f).exists() {
            println!("cargo:rerun-if-changed={}", manifest.join(f).display());
        }
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("sensor-ebpf.o");
    println!("cargo:rerun-if-env-changed=SONDE_EBPF_OBJECT");
    let src = std::env::var_os("SONDE_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/ebpf/bpfel-unknown-none/release/sensor-ebpf"));
    println!("cargo:rerun-if-changed={}", src.display());
    match std::fs::read(&src) {
        Ok(bytes) => std::fs::write(&out, bytes).unwrap(),
        Err(_) => {
            println!(
                "cargo:warning=no eBPF object at {} (run `cargo xtask build-ebpf`); this sensor will run on /proc only",
                src.display()
            );
            std::fs::write(&out, b"").unwrap();
        }
    }
}
