//! sonde sensor: collects host metrics from /proc (and eBPF) and ships them
//! to the aggregator over QUIC with mutual TLS.

mod collect;
mod config;
mod filter;
mod overhead;
mod privs;
mod procfile;
mod ship;
mod spool;
mod tls;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use config::Config;
use protocol::{Snapshot, CPU_TOTAL, PRESSURE_RESOURCES};

/// `0.1.0 (commit 1a2b3c4d5, wire 2)`: the release, the commit it was built from and the
/// newest wire version it sends.
static VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{} (commit {}, wire {})",
        env!("CARGO_PKG_VERSION"),
        env!("SONDE_GIT"),
        protocol::VERSION
    )
});
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// sonde host sensor.
///
/// Reads /proc every interval (CPU, load, memory, pressure, disks,
/// filesystems, network interfaces, TCP/UDP), turns counters into per-second
/// rates, batches snapshots, compresses them with zstd and ships them to the
/// sonde aggregator over QUIC with mutual TLS. Unacknowledged batches are
/// kept and resent after reconnects.
///
/// Settings come from the TOML file given by --config, then SONDE_*
/// environment variables, then flags (flags win). See README.md,
/// "Configuration", for every key.
#[derive(Parser)]
#[command(name = "sensor", version = VERSION.as_str(), about, long_about, max_term_width = 100)]
struct Cli {
    /// TOML configuration file.
    #[arg(
        short,
        long,
        global = true,
        env = "SONDE_SENSOR_CONFIG",
        value_name = "FILE"
    )]
    config: Option<PathBuf>,
    /// Log format: text or json. Log level comes from RUST_LOG (default info).
    #[arg(long, global = true, env = "SONDE_LOG_FORMAT", value_name = "FORMAT")]
    log_format: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Collect and ship continuously until SIGTERM or Ctrl-C.
    Run(RunArgs),
    /// List each eBPF probe, whether this kernel accepts it, and why not when it does not.
    ///
    /// Loads and attaches every configured probe exactly as `run` would, prints the result,
    /// then detaches everything. Needs root (or CAP_BPF + CAP_PERFMON). Exit status 0 when
    /// every configured probe is active, 1 when some were refused.
    Probes {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also measure what the probes cost on this host: keep them attached this long with
        /// the kernel's BPF run-time statistics on (kernel.bpf_stats_enabled, restored after),
        /// then print each program's runs and average nanoseconds per run.
        #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
        measure: Option<Duration>,
        /// Also measure how much the probes slow the workload that hits the run-queue probe
        /// hardest, for about this long: two processes ping-pong a byte over pipes on one
        /// CPU (two wakeups and two context switches per round trip, like `perf bench sched
        /// pipe`) while the probes are detached and attached again in alternating phases
        /// (`--phase`); prints the time per round trip without and with them and the median
        /// slowdown over the pairs of phases, with its interquartile range. Short phases keep
        /// the host's own drift out of the comparison (on a VM, neighbours move a workload
        /// like this by tens of percent from one second to the next).
        #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
        overhead: Option<Duration>,
        /// Length of one phase of `--overhead` (one with the probes, one without make a pair).
        #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION", default_value = "250ms")]
        phase: Duration,
    },
    /// Take one snapshot of this host (two reads one interval apart, so rates
    /// are real) and print it.
    Once {
        /// Print JSON instead of a readable summary.
        #[arg(long)]
        json: bool,
        /// Time between the two reads.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
        interval: Duration,
    },
    /// Record COUNT consecutive snapshots of this host, one interval apart, to FILE in the
    /// wire encoding (an 8-byte header, `SREC` and the wire version, then each snapshot
    /// prefixed by its u32 LE length). Used by `cargo xtask bench` to
    /// study batch size and zstd dictionaries on real data; nothing is sent anywhere.
    Record {
        /// How many snapshots.
        #[arg(long, default_value_t = 60)]
        count: u32,
        /// Time between snapshots.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
        interval: Duration,
        /// Output file.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Aggregator address host:port; repeat (or comma-separate) for failover.
    #[arg(
        long,
        env = "SONDE_AGGREGATOR",
        value_delimiter = ',',
        value_name = "ADDR"
    )]
    aggregator: Vec<String>,
    /// Name the aggregator's certificate must carry.
    #[arg(long, env = "SONDE_SERVER_NAME", value_name = "NAME")]
    server_name: Option<String>,
    /// Deployment CA certificate (PEM).
    #[arg(long, env = "SONDE_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
    /// This host's certificate (PEM); its common name is the host name stored.
    #[arg(long, env = "SONDE_CERT", value_name = "FILE")]
    cert: Option<PathBuf>,
    /// This host's private key (PEM).
    #[arg(long, env = "SONDE_KEY", value_name = "FILE")]
    key: Option<PathBuf>,
    /// Collection interval, e.g. 1s, 500ms.
    #[arg(long, env = "SONDE_INTERVAL", value_parser = humantime::parse_duration, value_name = "DURATION")]
    interval: Option<Duration>,
    /// Close and ship a batch after this long, e.g. 5s.
    #[arg(long, env = "SONDE_BATCH_INTERVAL", value_parser = humantime::parse_duration, value_name = "DURATION")]
    batch_interval: Option<Duration>,
    /// Directory of the on-disk spool (unacknowledged batches survive restarts there);
    /// an empty value keeps them in memory only.
    #[arg(long, env = "SONDE_SPOOL_DIR", value_name = "DIR")]
    spool_dir: Option<PathBuf>,
    /// Bound of the spool in bytes (default 256 MiB); beyond it the oldest batches are
    /// dropped and the gap is reported.
    #[arg(long, env = "SONDE_SPOOL_MAX_BYTES", value_name = "BYTES")]
    spool_max_bytes: Option<usize>,
    /// When started as root: switch to this user after the eBPF probes are loaded (the
    /// spool directory is handed to it). Without it the sensor stays root but gives up
    /// every capability. Either way it keeps only open file descriptors and /proc access.
    #[arg(long, env = "SONDE_USER", value_name = "NAME")]
    user: Option<String>,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = real_main(cli) {
        eprintln!("sensor: error: {e:#}");
        std::process::exit(2);
    }
}

fn real_main(cli: Cli) -> Result<()> {
    let mut cfg = Config::load(cli.config.as_deref())?;
    if let Some(f) = cli.log_format {
        cfg.log_format = f;
    }
    match cli.cmd {
        Cmd::Once { json, interval } => {
            cfg.validate()?;
            once(&cfg, json, interval)
        }
        Cmd::Probes {
            json,
            measure,
            overhead,
            phase,
        } => probes_cmd(&cfg, json, measure, overhead.map(|d| (d, phase))),
        Cmd::Record {
            count,
            interval,
            out,
        } => {
            cfg.validate()?;
            record(&cfg, count, interval, &out)
        }
        Cmd::Run(a) => {
            if !a.aggregator.is_empty() {
                cfg.aggregator = a.aggregator;
            }
            cfg.server_name = a.server_name.unwrap_or(cfg.server_name);
            cfg.ca = a.ca.unwrap_or(cfg.ca);
            cfg.cert = a.cert.unwrap_or(cfg.cert);
            cfg.key = a.key.unwrap_or(cfg.key);
            cfg.interval = a.interval.unwrap_or(cfg.interval);
            cfg.batch_interval = a.batch_interval.unwrap_or(cfg.batch_interval);
            cfg.spool_dir = a.spool_dir.unwrap_or(cfg.spool_dir);
            cfg.spool_max_bytes = a.spool_max_bytes.unwrap_or(cfg.spool_max_bytes);
            cfg.user = a.user.unwrap_or(cfg.user);
            cfg.validate()?;
            init_logs(&cfg.log_format);
            // Check certificates and the user before anything runs.
            let client = tls::client_config(&cfg.ca, &cfg.cert, &cfg.key)?;
            let user = match cfg.user.as_str() {
                "" => None,
                u => Some(privs::lookup(u)?),
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(run(Arc::new(cfg), client, user))
        }
    }
}

fn init_logs(format: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

async fn run(
    cfg: Arc<Config>,
    client: quinn::ClientConfig,
    user: Option<privs::Target>,
) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut info = collect::host::host_info(&cfg.proc_root);
    let boot_id = uuid::Uuid::new_v4().to_string();
    let (probes, status) = collect::ebpf::load(
        &cfg.probes,
        &cfg.proc_root,
        cfg.filters.disks.clone(),
        &cfg.cgroup_root(),
    );
    for s in &status {
        match s.state {
            "active" => tracing::info!(probe = s.name, "eBPF probe attached"),
            "refused" => {
                tracing::warn!(probe = s.name, reason = %s.reason, "eBPF probe not attached; continuing without it")
            }
            _ => tracing::debug!(probe = s.name, reason = %s.reason, "eBPF probe disabled"),
        }
    }
    info.probes = collect::ebpf::active_list(&status);
    tracing::info!(host = %info.hostname, boot_id = %boot_id, interval = ?cfg.interval, aggregator = ?cfg.aggregator, "sensor starting");
    let spool_dir = (!cfg.spool_dir.as_os_str().is_empty()).then_some(cfg.spool_dir.as_path());
    let outbox = Arc::new(spool::Spool::open(
        spool_dir,
        &info.hostname,
        cfg.spool_max_bytes,
    )?);
    // Everything privileged is open now (probes, spool, certificates).
    match privs::drop_privileges(user.as_ref(), spool_dir) {
        Ok(msg) => tracing::info!("privileges dropped: {msg}"),
        Err(e) => return Err(e.context("dropping privileges")),
    }
    // Aggregator preference is by the identity the aggregators see: the certificate's name.
    let ident = tls::identity(&cfg.cert).unwrap_or_else(|| info.hostname.clone());
    let shipper = tokio::spawn(ship::run(cfg.clone(), client, outbox.clone(), ident));
    let mut collector = collect::Collector::new(&cfg);
    let events_fd = probes.as_ref().and_then(|p| p.events_fd()).and_then(|fd| {
        // SAFETY: the ring buffer's fd lives in `collector.probes`, which outlives this
        // registration (declared before it, so dropped after it).
        unsafe { tokio::io::unix::AsyncFd::register(fd) }.ok()
    });
    collector.probes = probes;
    let mut batcher = ship::Batcher::new(&cfg, info, boot_id);
    let mut snap = Snapshot::default();
    // The host's labels travel with the first snapshot of each batch.
    let labels = cfg.label_records();
    // Ticks fall 20 ms after a multiple of the interval on the wall clock, so
    // every host samples at the same instants and a sample's whole-second
    // timestamp never collides with its neighbour's.
    let iv_ms = cfg.interval.as_millis().max(1);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let wait = Duration::from_millis(((iv_ms - now_ms % iv_ms + 20) % iv_ms) as u64);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + wait, cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if collector.collect(&mut snap) {
                    if batcher.is_empty() {
                        snap.host_labels.clone_from(&labels);
                    } else {
                        snap.host_labels.clear();
                    }
                    batcher.push(&snap);
                }
                if batcher.due(Instant::now()) {
                    if let Some(c) = batcher.close() {
                        tracing::debug!(seq = c.seq, bytes = c.frame.len(), samples = c.samples, "batch closed");
                        outbox.push(c.meta(batcher.boot_id()), c.frame);
                    }
                }
            }
            // Kernel events (OOM kills) are picked up at once, while the victim's /proc
            // entry still names its cgroup.
            r = async { events_fd.as_ref().unwrap().readable().await }, if events_fd.is_some() => {
                if let Ok(mut g) = r {
                    if let Some(p) = collector.probes.as_mut() {
                        p.drain_events();
                    }
                    g.clear_ready();
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        if shipper.is_finished() {
            return match shipper.await {
                Ok(Err(e)) => Err(e),
                _ => Err(anyhow::anyhow!("shipper stopped")),
            };
        }
    }
    // The batch being built goes to the spool before anything else.
    if let Some(c) = batcher.close() {
        outbox.push(c.meta(batcher.boot_id()), c.frame);
    }
    let pending = outbox.len();
    tracing::info!(pending, grace = ?cfg.shutdown_grace, "stopping: delivering unacknowledged batches");
    let deadline = tokio::time::Instant::now() + cfg.shutdown_grace;
    while !outbox.is_empty() && tokio::time::Instant::now() < deadline {
        let _ = tokio::time::timeout_at(
            deadline.min(tokio::time::Instant::now() + Duration::from_millis(200)),
            outbox.drained.notified(),
        )
        .await;
    }
    let left = outbox.len();
    if outbox.dropped_batches() > 0 {
        tracing::warn!(
            dropped = outbox.dropped_batches(),
            "batches were dropped this run because the spool was full (reported as gaps)"
        );
    }
    if left > 0 && spool_dir.is_some() {
        tracing::info!(
            batches = left,
            "exiting; unacknowledged batches stay in the spool and are sent on the next start"
        );
    } else if left > 0 {
        tracing::warn!(
            batches = left,
            "exiting with unacknowledged batches (lost: spool_dir is empty, the spool is in memory)"
        );
    } else {
        tracing::info!("all batches delivered; bye");
    }
    Ok(())
}

fn probes_cmd(
    cfg: &Config,
    json: bool,
    measure: Option<Duration>,
    overhead: Option<(Duration, Duration)>,
) -> Result<()> {
    let (mut probes, status) = collect::ebpf::load(
        &cfg.probes,
        &cfg.proc_root,
        cfg.filters.disks.clone(),
        &cfg.cgroup_root(),
    );
    let mut costs = Vec::new();
    if let (Some(d), Some(p)) = (measure, probes.as_ref()) {
        let knob = "/proc/sys/kernel/bpf_stats_enabled";
        let old = std::fs::read_to_string(knob).unwrap_or_else(|_| "0".into());
        std::fs::write(knob, "1").map_err(|e| anyhow::anyhow!("cannot enable {knob}: {e}"))?;
        eprintln!("measuring for {d:?} with BPF statistics on...");
        std::thread::sleep(d);
        costs = p.program_costs();
        let _ = std::fs::write(knob, old.trim());
    }
    let mut slowdown = None;
    if let Some((total, phase)) = overhead {
        let Some(p) = probes.as_mut() else {
            anyhow::bail!("--overhead: no probe is attached (see the table without it)");
        };
        if phase < Duration::from_millis(20) || phase * 2 > total {
            anyhow::bail!(
                "--phase {phase:?} must be at least 20ms and at most half of --overhead {total:?}"
            );
        }
        eprintln!(
            "measuring the probes' overhead for {total:?}: a pipe ping-pong on one CPU, probes detached and attached in phases of {phase:?}..."
        );
        let o = overhead::measure(p, total, phase, |k, n| {
            if k % 20 == 0 || k == n {
                eprintln!("  {k}/{n} pairs of phases");
            }
        })
        .map_err(|e| anyhow::anyhow!("--overhead: {e}"))?;
        slowdown = Some(o);
    }
    drop(probes); // detaches everything
    if json {
        let c: Vec<_> = costs
            .iter()
            .map(|(n, r, ns)| serde_json::json!({"program": n, "runs": r, "avg_ns": ns}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"probes": status, "costs": c, "overhead": slowdown})
            )?
        );
    } else {
        println!("{:<10} {:<9} REASON", "PROBE", "STATE");
        for s in &status {
            println!("{:<10} {:<9} {}", s.name, s.state, s.reason);
        }
        if measure.is_some() {
            println!(
                "\n{:<20} {:>12} {:>10} {:>12}",
                "PROGRAM", "RUNS", "AVG NS", "CPU MS"
            );
            for (n, r, ns) in &costs {
                println!("{n:<20} {r:>12} {ns:>10.0} {:>12.1}", *r as f64 * ns / 1e6);
            }
        }
        if let Some(o) = &slowdown {
            println!(
                "\npipe ping-pong on CPU {}, {} pairs of {} ms phases:\n  without probes {:.0} ns per round trip, with {:.0} ns\n  slowdown {:.2}% (median of the pairs; interquartile {:.2}% to {:.2}%)",
                o.cpu,
                o.pairs,
                o.phase_ms,
                o.ns_per_round_trip_off,
                o.ns_per_round_trip_on,
                o.slowdown_pct,
                o.slowdown_p25_pct,
                o.slowdown_p75_pct
            );
        }
    }
    if status.iter().any(|s| s.state == "refused") {
        std::process::exit(1);
    }
    Ok(())
}

fn record(cfg: &Config, count: u32, interval: Duration, out: &std::path::Path) -> Result<()> {
    use std::io::Write;
    let mut c = collect::Collector::new(cfg);
    let (probes, _) = collect::ebpf::load(
        &cfg.probes,
        &cfg.proc_root,
        cfg.filters.disks.clone(),
        &cfg.cgroup_root(),
    );
    c.probes = probes;
    let mut snap = Snapshot::default();
    c.collect(&mut snap);
    // Each snapshot is appended as soon as it is taken, so a long recording that is
    // stopped early keeps everything up to then.
    let mut file =
        std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut enc = protocol::recording_header().to_vec();
    let mut n = 0;
    let mut bytes = 0usize;
    // Ticks on the interval grid (no drift over hours of recording).
    let start = std::time::Instant::now();
    let mut k = 0u32;
    while n < count {
        k += 1;
        let due = start + interval * k;
        if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
            std::thread::sleep(wait);
        }
        if c.collect(&mut snap) {
            protocol::record_snapshot(&snap, &mut enc);
            file.write_all(&enc)
                .with_context(|| format!("cannot write {}", out.display()))?;
            bytes += enc.len();
            enc.clear();
            n += 1;
        }
    }
    file.flush()?;
    eprintln!(
        "recorded {count} snapshots ({bytes} bytes) to {}",
        out.display()
    );
    Ok(())
}

/// A snapshot as JSON keyed like the database: table name → row (or list of rows),
/// column name → value, label codes as their names, histograms as `bucket_upper` and
/// `bucket_count` — all from the table declarations.
fn snapshot_json(snap: &Snapshot) -> serde_json::Value {
    use protocol::tables::{Card, Record, Val, Visitor};
    use serde_json::{json, Map, Value};
    struct J(Map<String, Value>);
    impl Visitor for J {
        fn record<R: Record>(&mut self, _: usize, r: &R) {
            let t = R::TABLE;
            let mut row = Map::new();
            let mut i = 0;
            r.for_each_val(|v| {
                let name = t.columns[i].name.to_string();
                match v {
                    Val::U32(x) => drop(row.insert(name, x.into())),
                    Val::U64(x) => drop(row.insert(name, x.into())),
                    Val::F32(x) => drop(row.insert(name, json!(x))),
                    Val::Str(x) => drop(row.insert(name, x.into())),
                    Val::Buckets(b) => {
                        let up: Vec<u64> = b
                            .iter()
                            .map(|x| protocol::tables::bucket_upper(x.index))
                            .collect();
                        let n: Vec<u64> = b.iter().map(|x| x.count).collect();
                        row.insert("bucket_upper".into(), up.into());
                        row.insert("bucket_count".into(), n.into());
                    }
                }
                i += 1;
            });
            match t.card {
                Card::One | Card::Optional => drop(self.0.insert(t.name.into(), row.into())),
                Card::Many => {
                    if let Some(Value::Array(a)) = self.0.get_mut(t.name) {
                        a.push(row.into())
                    }
                }
            }
        }
    }
    let mut m = Map::new();
    m.insert("ts_ms".into(), snap.ts_ms.into());
    m.insert("interval_ms".into(), snap.interval_ms.into());
    for t in protocol::TABLES {
        m.insert(
            t.name.into(),
            match t.card {
                Card::Many => Value::Array(Vec::new()),
                _ => Value::Null,
            },
        );
    }
    let mut j = J(m);
    snap.visit(&mut j);
    Value::Object(j.0)
}

fn once(cfg: &Config, json: bool, interval: Duration) -> Result<()> {
    let mut c = collect::Collector::new(cfg);
    // Probes too when this process may load them (root); silently /proc only otherwise.
    let (probes, status) = collect::ebpf::load(
        &cfg.probes,
        &cfg.proc_root,
        cfg.filters.disks.clone(),
        &cfg.cgroup_root(),
    );
    c.probes = probes;
    let mut snap = Snapshot::default();
    c.collect(&mut snap);
    std::thread::sleep(interval);
    c.collect(&mut snap);
    let mut info = collect::host::host_info(&cfg.proc_root);
    info.probes = collect::ebpf::active_list(&status);
    if json {
        let v = serde_json::json!({ "host": info, "snapshot": snapshot_json(&snap) });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{} ({}, kernel {}, {} CPUs, {:.1} GiB)",
        info.hostname,
        info.os,
        info.kernel,
        info.cpus,
        info.memory_bytes as f64 / (1u64 << 30) as f64
    );
    if let Some(t) = snap.cpu.iter().find(|c| c.cpu == CPU_TOTAL) {
        println!(
            "cpu      user {:.1}%  system {:.1}%  iowait {:.1}%  idle {:.1}%",
            t.user, t.system, t.iowait, t.idle
        );
    }
    let s = &snap.system;
    println!(
        "load     {:.2} {:.2} {:.2}  ctxt/s {:.0}  forks/s {:.1}  running {}  blocked {}",
        s.load1, s.load5, s.load15, s.ctxt_per_s, s.forks_per_s, s.procs_running, s.procs_blocked
    );
    let m = &snap.memory;
    println!(
        "memory   total {} MiB  available {} MiB  swap used {} MiB",
        m.total >> 20,
        m.available >> 20,
        (m.swap_total - m.swap_free.min(m.swap_total)) >> 20
    );
    for p in &snap.pressure {
        println!(
            "psi      {:<6} some {:.2}%  full {:.2}%",
            PRESSURE_RESOURCES[p.resource as usize % 3],
            p.some_stall_pct,
            p.full_stall_pct
        );
    }
    for d in &snap.disks {
        println!(
            "disk     {:<10} r/s {:.1}  w/s {:.1}  util {:.1}%",
            d.device, d.reads_per_s, d.writes_per_s, d.util_pct
        );
    }
    for f in &snap.filesystems {
        println!(
            "fs       {:<20} {} used {:.1}%",
            f.mount,
            f.fstype,
            f.used_bytes as f64 * 100.0 / f.size_bytes.max(1) as f64
        );
    }
    for n in &snap.nets {
        println!(
            "net      {:<10} rx {:.0} B/s  tx {:.0} B/s",
            n.interface, n.rx_bytes_per_s, n.tx_bytes_per_s
        );
    }
    println!(
        "tcp      estab {}  retrans/s {:.2}  resets/s {:.2}",
        snap.tcp.curr_estab, snap.tcp.retrans_segs_per_s, snap.tcp.out_rsts_per_s
    );
    // The busiest cgroups by CPU (of how many), then the top processes by CPU.
    let mut cgs: Vec<&protocol::CgroupRec> = snap.cgroups.iter().collect();
    cgs.sort_by(|a, b| b.cpu_pct.total_cmp(&a.cpu_pct));
    for c in cgs.iter().take(5) {
        let limit = if c.memory_limit > 0 {
            format!(" of {} MiB", c.memory_limit >> 20)
        } else {
            String::new()
        };
        println!(
            "cgroup   {:<40} {} cpu {:.1}%  throttled {}/{}  mem {} MiB{limit}  pids {}",
            c.cgroup,
            if c.container.is_empty() {
                "-"
            } else {
                &c.container
            },
            c.cpu_pct,
            c.cpu_throttled_periods,
            c.cpu_periods,
            c.memory_working_set >> 20,
            c.pids
        );
    }
    if snap.cgroups.len() > 5 {
        println!(
            "cgroup   ... {} cgroups in all (--json for every one)",
            snap.cgroups.len()
        );
    }
    let mut ps: Vec<&protocol::ProcessRec> = snap.processes.iter().collect();
    ps.sort_by(|a, b| b.cpu_pct.total_cmp(&a.cpu_pct));
    for p in ps.iter().take(5) {
        println!(
            "process  {:>7} {:<16} {:<10} cpu {:.1}%  rss {} MiB  io {:.0}/{:.0} B/s  ({} process{})",
            p.pid,
            p.comm,
            p.user,
            p.cpu_pct,
            p.rss >> 20,
            p.read_bytes_per_s,
            p.write_bytes_per_s,
            p.processes,
            if p.processes == 1 { "" } else { "es" }
        );
    }
    if info.probes.is_empty() {
        println!("ebpf     no probes attached (see `sensor probes`)");
    } else {
        println!("ebpf     probes: {}", info.probes);
    }
    if let Some(p) = &snap.probes {
        println!(
            "procs    execs/s {:.1}  exits/s {:.1}  short-lived/s {:.1}  tcp retrans/s {:.1}  oom kills {}",
            p.execs_per_s, p.exits_per_s, p.short_lived_per_s, p.retransmits_per_s, p.oom_kills
        );
    }
    for l in &snap.latency {
        let pct = |q: f64| -> u64 {
            let target = (l.count as f64 * q).ceil() as u64;
            let mut acc = 0;
            for b in &l.buckets {
                acc += b.count;
                if acc >= target {
                    return 1u64 << b.index;
                }
            }
            0
        };
        println!(
            "latency  {:<24} n {:<7} mean {:.1} {}  p50 < {}  p99 < {}",
            l.source,
            l.count,
            l.sum as f64 / l.count.max(1) as f64,
            l.unit,
            pct(0.5),
            pct(0.99)
        );
    }
    Ok(())
}
