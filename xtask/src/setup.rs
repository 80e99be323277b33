//! Installing what the project needs, idempotently, with progress lines.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;

pub fn step(msg: &str) {
    eprintln!("==> {msg}");
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd} >/dev/null 2>&1"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let st = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed with {st}");
    }
    Ok(())
}

pub fn apt_install(pkgs: &[&str]) -> Result<()> {
    if !have("apt-get") {
        bail!(
            "{} missing and this machine has no apt-get: install {} with your package manager",
            pkgs.join(", "),
            pkgs.join(" ")
        );
    }
    let root = unsafe { libc::geteuid() } == 0;
    let sudo = |c: &str| {
        let mut cmd = if root {
            Command::new(c)
        } else {
            let mut s = Command::new("sudo");
            s.arg(c);
            s
        };
        cmd.env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    step(&format!(
        "installing {} from Debian's packages",
        pkgs.join(" ")
    ));
    // Try without refreshing the lists first (fast when they are current).
    if run(sudo("apt-get").args(["install", "-y", "-q"]).args(pkgs)).is_err() {
        step("refreshing package lists (apt-get update)");
        run(sudo("apt-get").args(["update", "-q"]))?;
        run(sudo("apt-get").args(["install", "-y", "-q"]).args(pkgs))?;
    }
    Ok(())
}

/// ClickHouse server and client (Debian's clickhouse-server 18.16 where apt exists).
pub fn ensure_clickhouse() -> Result<()> {
    if have("clickhouse-server")
        && have("clickhouse-client")
        && std::path::Path::new("/etc/clickhouse-server/config.xml").exists()
    {
        step("ClickHouse: installed");
        return Ok(());
    }
    apt_install(&["clickhouse-server", "clickhouse-client"])
}

/// chdb-core (a current ClickHouse engine in-process) for the modern-DDL and README query checks.
pub fn ensure_chdb() -> Result<()> {
    let ok = Command::new("python3")
        .args(["-c", "import chdb"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        step("chdb-core: installed");
        return Ok(());
    }
    if !have("python3") {
        apt_install(&["python3", "python3-pip"])?;
    }
    step("installing chdb-core from PyPI (a current ClickHouse engine, ~180 MB, about 30 s)");
    let r = run(Command::new("python3").args(["-m", "pip", "install", "-q", "chdb-core"]));
    if r.is_err() {
        // Debian's system Python refuses pip installs without this flag.
        run(Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "-q",
            "--break-system-packages",
            "chdb-core",
        ]))?;
    }
    Ok(())
}

/// Tools the tests drive: load (stress-ng), packet drops (iptables), offload settings
/// (ethtool), a real Alertmanager, openssl (checks webhook signatures independently),
/// Chromium and its WebDriver (the console's browser tests), bpftrace (the run-queue
/// probe is compared with its runqlat).
pub fn ensure_test_tools() -> Result<()> {
    let missing: Vec<&str> = [
        ("stress-ng", "stress-ng"),
        ("iptables", "iptables"),
        ("ethtool", "ethtool"),
        ("ip", "iproute2"),
        ("losetup", "mount"),
        ("prometheus-alertmanager", "prometheus-alertmanager"),
        ("openssl", "openssl"),
        ("sshd", "openssh-server"),
        ("ssh", "openssh-client"),
        ("chromium", "chromium"),
        ("chromedriver", "chromium-driver"),
        ("bpftrace", "bpftrace"),
    ]
    .iter()
    .filter(|(cmd, _)| !have(cmd) && !std::path::Path::new(&format!("/usr/sbin/{cmd}")).exists())
    .map(|(_, pkg)| *pkg)
    .collect();
    if missing.is_empty() {
        step(
            "test tools (stress-ng, iptables, ethtool, iproute2, alertmanager, openssl, openssh, chromium, bpftrace): installed",
        );
        return Ok(());
    }
    apt_install(&missing)
}

/// ZooKeeper (Debian's package: the scale-out test's and `cargo xtask cluster up`'s
/// coordination service for ClickHouse 18.16 replication).
pub fn ensure_zookeeper() -> Result<()> {
    if std::path::Path::new("/usr/share/java/zookeeper.jar").exists() && have("java") {
        return Ok(());
    }
    step("installing ZooKeeper (Debian's zookeeper package)");
    apt_install(&["zookeeper", "libslf4j-java"])
}

/// Integration tests run at once within one test binary (`cargo xtask test`).
const INTEGRATION_TEST_THREADS: &str = "4";

pub fn test(args: &[String]) -> Result<()> {
    let root = root();
    ensure_clickhouse()?;
    ensure_zookeeper()?;
    ensure_chdb()?;
    ensure_test_tools()?;
    crate::ebpf::build()?;
    step("building all binaries (debug)");
    run(Command::new("cargo")
        .current_dir(&root)
        .args(["build", "--workspace", "--bins"]))?;
    step("running the test suite");
    // The integration tests (tests/*.rs) run four at once within each test binary (cargo's
    // default is one per core, two here): the aggregator's fault and end-to-end tests spend
    // most of their time waiting through the outages they inject, not computing (faults.rs
    // took 310 s with two at once and 190 s with four in the CI dry run). Unit tests keep
    // the default: the sensor's eBPF unit tests compare system-wide scheduler measurements
    // with bpftrace's, and more tests beside them made one fail. The three runs select the
    // same packages, so nothing is built twice. RUST_TEST_THREADS set by the caller wins;
    // with arguments (a filter, a target) the suite runs as one `cargo test --workspace`.
    let threads = std::env::var_os("RUST_TEST_THREADS").is_none();
    let scratch = test_scratch();
    let runs: Vec<(Vec<&str>, bool)> = if args.is_empty() {
        vec![
            (vec!["--lib", "--bins"], false),
            (vec!["--doc"], false),
            (vec!["--test", "*"], threads),
        ]
    } else {
        vec![(vec![], false)]
    };
    for (targets, more) in runs {
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&root)
            .args(["test", "--workspace"])
            .args(targets)
            .args(args);
        if more {
            cmd.env("RUST_TEST_THREADS", INTEGRATION_TEST_THREADS);
        }
        if let Some(dir) = &scratch {
            cmd.env("TMPDIR", dir);
        }
        run(&mut cmd)?;
    }
    step("all tests passed");
    Ok(())
}

/// Memory the tests' scratch directory may take on a tmpfs, at most (their ClickHouse
/// servers, spools and sensors' files: a few hundred MB at once).
const SCRATCH_MIN_FREE: u64 = 4 << 30;

/// Where the tests keep their files (`TMPDIR`): `/dev/shm/sonde-tests` when `/dev/shm` is a
/// tmpfs with room, unless the caller set `TMPDIR`. The tests start and delete dozens of
/// ClickHouse servers; on an ext4 without a journal (this project's CI machines' root
/// filesystem) creating files soon after many were deleted is slow (docs/BENCHMARKS.md,
/// section 3), which made the cluster test about a minute slower. None = the default.
fn test_scratch() -> Option<PathBuf> {
    if std::env::var_os("TMPDIR").is_some() {
        return None;
    }
    let shm = std::path::Path::new("/dev/shm");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let tmpfs = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[1] == "/dev/shm" && f[2] == "tmpfs"
    });
    let free = {
        let c = std::ffi::CString::new("/dev/shm").unwrap();
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid C string and a zeroed statvfs the call fills in.
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0 {
            st.f_bavail as u64 * st.f_frsize as u64
        } else {
            0
        }
    };
    let dir = shm.join("sonde-tests");
    if !tmpfs || free < SCRATCH_MIN_FREE || std::fs::create_dir_all(&dir).is_err() {
        step(&format!(
            "test files under the default temporary directory (/dev/shm is not a tmpfs with {} GiB free)",
            SCRATCH_MIN_FREE >> 30
        ));
        return None;
    }
    step(&format!(
        "test files under {} (a tmpfs; set TMPDIR to choose another place)",
        dir.display()
    ));
    Some(dir)
}
