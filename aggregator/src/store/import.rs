//! `aggregator import`: stores a `sensor record` file through the same insert path as live
//! batches (rows, tiers through their views), for offline analysis of a recorded host and
//! for the storage benchmark's real data.

use super::Store;
use crate::config::Config;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A recording written by `sensor record` (zstd-compressed or not).
    pub recording: PathBuf,
    /// The host name to store it under.
    #[arg(long, value_name = "HOST")]
    pub host: String,
    /// Shift the recording in time so its last snapshot lands here: `now`, Unix seconds or
    /// RFC 3339. Default: the times as recorded (older than the retention is dropped by it).
    #[arg(long, value_name = "TIME")]
    pub end_at: Option<String>,
    /// ClickHouse HTTP URL (default: the config's; needed when the config uses a managed
    /// server: its port is in DATA_DIR/clickhouse/ports).
    #[arg(long, value_name = "URL")]
    pub clickhouse_url: Option<String>,
    /// Snapshots per stored batch.
    #[arg(long, default_value_t = 300, value_name = "N")]
    pub batch: usize,
}

pub async fn run(args: Args, cfg: &Config) -> Result<()> {
    if args.host.is_empty()
        || !args
            .host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        bail!(
            "--host {:?}: use letters, digits, '-', '_' and '.'",
            args.host
        );
    }
    let url = cfg
        .clickhouse
        .url_for_tools(args.clickhouse_url.as_deref())?;
    let raw = std::fs::read(&args.recording)
        .with_context(|| format!("cannot read {}", args.recording.display()))?;
    let mut snaps = crate::detect::eval::read_recording(&args.recording)?;
    if snaps.is_empty() {
        bail!("{}: no snapshots", args.recording.display());
    }
    let last_ms = snaps.iter().map(|s| s.ts_ms).max().unwrap_or(0);
    let shift_ms: i64 = match args.end_at.as_deref() {
        None => 0,
        Some("now") => {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis() as i64
                - last_ms as i64
        }
        Some(t) => {
            crate::detect::backtest::parse_time(t).context("--end-at")? as i64 - last_ms as i64
        }
    };
    // Whole seconds, so rows keep their sub-second phase.
    let shift_ms = shift_ms / 1000 * 1000;
    for s in &mut snaps {
        s.ts_ms = (s.ts_ms as i64 + shift_ms).max(0) as u64;
        for e in &mut s.events {
            e.ts_ms = (e.ts_ms as i64 + shift_ms).max(0) as u64;
        }
    }
    // One sequence space per file and host: importing it twice is refused.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in raw.iter() {
        h = (h ^ *b as u64).wrapping_mul(0x100000001b3);
    }
    let boot_id = format!("import-{h:016x}");
    let store = Store::open(&url, &cfg.clickhouse).await?;
    let n: u64 = store
        .client
        .query("SELECT count() FROM batches WHERE host = ? AND sensor_boot_id = ?")
        .bind(&args.host)
        .bind(&boot_id)
        .fetch_one()
        .await
        .context("reading batches")?;
    if n > 0 {
        bail!(
            "{} is already stored for host {} ({n} batches of import {boot_id}); nothing imported",
            args.recording.display(),
            args.host
        );
    }
    let total = snaps.len();
    let (first_ts, last_ts) = (
        (snaps.iter().map(|s| s.ts_ms).min().unwrap_or(0) / 1000) as u32,
        (snaps.iter().map(|s| s.ts_ms).max().unwrap_or(0) / 1000) as u32,
    );
    let probes: Vec<&str> = {
        // What the recording shows was attached.
        let any = |f: &dyn Fn(&protocol::Snapshot) -> bool| snaps.iter().any(f);
        let mut v = Vec::new();
        if any(&|s| s.latency.iter().any(|l| l.source == "runqueue")) {
            v.push("runqueue");
        }
        if any(&|s| s.latency.iter().any(|l| l.source.starts_with("disk:"))) {
            v.push("block");
        }
        if any(&|s| s.probes.is_some()) {
            v.extend(["tcp", "oom", "process"]);
        }
        v
    };
    let probes = probes.join(",");
    let version = format!("imported: {}", args.recording.display());
    let started = std::time::Instant::now();
    let mut samples = 0u64;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as u32;
    let chunks: Vec<Vec<protocol::Snapshot>> = {
        let mut v = Vec::new();
        let mut it = snaps.into_iter().peekable();
        while it.peek().is_some() {
            v.push(it.by_ref().take(args.batch.max(1)).collect());
        }
        v
    };
    let nchunks = chunks.len();
    for (i, snapshots) in chunks.into_iter().enumerate() {
        let b = protocol::Batch {
            host: args.host.clone(),
            boot_id: boot_id.clone(),
            seq: i as u64 + 1,
            info: None,
            snapshots,
        };
        samples += b.sample_count();
        store
            .write(
                &[(&args.host, &b, 0)],
                &[super::rows::HostRow {
                    host: &args.host,
                    first_seen: first_ts,
                    last_seen: last_ts,
                    sensor_version: &version,
                    kernel: "",
                    os: "",
                    arch: "",
                    cpus: 0,
                    memory_bytes: 0,
                    kernel_boot_id: "",
                    sensor_boot_id: &boot_id,
                    probes: &probes,
                }],
                now,
                &std::collections::HashSet::new(),
            )
            .await
            .with_context(|| format!("storing batch {} of {nchunks}", i + 1))?;
        if (i + 1) % 20 == 0 || i + 1 == nchunks {
            eprintln!(
                "import: {}/{nchunks} batches, {samples} samples, {:.1} s",
                i + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    println!(
        "imported {total} snapshots ({samples} samples) of {} as host {} (shifted {} s)",
        args.recording.display(),
        args.host,
        shift_ms / 1000
    );
    Ok(())
}
