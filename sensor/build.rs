//! Embeds the eBPF object built by `cargo xtask build-ebpf` (or the file named by
//! SONDE_EBPF_OBJECT). Without it the sensor still builds and runs on /proc alone, and
//! `sensor probes` says how to get the probes.
use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
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
