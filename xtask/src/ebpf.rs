//! `cargo xtask build-ebpf`: installs the eBPF toolchain when missing (nightly's rust-src,
//! bpf-linker 0.10.1) and builds sensor-ebpf for bpfel-unknown-none with BTF.

use crate::setup::{have, root, run, step};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;

/// bpf-linker 0.10.1 links with rustc's own LLVM; newer releases need a system LLVM 21+.
const BPF_LINKER: &str = "0.10.1";

/// Where the object lands (the sensor's build script embeds it from here).
pub fn object_path() -> PathBuf {
    root().join("target/ebpf/bpfel-unknown-none/release/sensor-ebpf")
}

/// A command with the outer cargo's toolchain choices removed, so rustup picks nightly.
fn clean(cmd: &str) -> Command {
    let mut c = Command::new(cmd);
    for v in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTDOC",
        "CARGO",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
    ] {
        c.env_remove(v);
    }
    c
}

fn output(cmd: &mut Command) -> String {
    cmd.output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

pub fn ensure_toolchain() -> Result<()> {
    if !have("rustup") {
        bail!("rustup is required for the eBPF build (it needs a nightly toolchain with rust-src); install it from https://rustup.rs");
    }
    let toolchains = output(clean("rustup").args(["toolchain", "list"]));
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        step("installing the nightly toolchain (eBPF programs need -Z build-std)");
        run(clean("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    let comps = output(clean("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]));
    if comps.lines().any(|l| l.starts_with("rust-src")) {
        step("nightly rust-src: installed");
    } else {
        step("adding rust-src to nightly (core is rebuilt for the BPF target)");
        run(clean("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    let linker = output(clean("bpf-linker").arg("--version"));
    if linker.contains(BPF_LINKER) {
        step(&format!("bpf-linker {BPF_LINKER}: installed"));
    } else {
        step(&format!(
            "installing bpf-linker {BPF_LINKER} with cargo (about 2 minutes, once; it links BPF objects with rustc's LLVM)"
        ));
        run(clean("cargo").args(["install", &format!("bpf-linker@{BPF_LINKER}"), "--locked"]))?;
    }
    Ok(())
}

pub fn build() -> Result<PathBuf> {
    ensure_toolchain()?;
    step("building sensor-ebpf (bpfel-unknown-none, with BTF)");
    let root = root();
    run(clean("cargo")
        .current_dir(root.join("sensor-ebpf"))
        .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf")
        .args([
            "+nightly",
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--target-dir",
        ])
        .arg(root.join("target/ebpf")))
    .context("building the eBPF programs")?;
    let obj = object_path();
    let size = std::fs::metadata(&obj)
        .with_context(|| format!("the build did not produce {}", obj.display()))?
        .len();
    step(&format!(
        "eBPF object: {} ({} KiB); the sensor embeds it when built next",
        obj.display(),
        size / 1024
    ));
    Ok(obj)
}
