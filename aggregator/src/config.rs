//! Aggregator configuration: TOML file, then SONDE_* environment variables
//! and flags on top. Unknown keys are errors that name the file and key.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// QUIC address sensors connect to.
    pub listen: String,
    /// HTTP address for /healthz, /readyz, /metrics and /api/*.
    pub http_listen: String,
    /// Deployment CA (PEM): only sensors with certificates it signed get in.
    pub ca: PathBuf,
    /// The aggregator's certificate and key (PEM).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// State directory (managed ClickHouse data lives under it).
    pub data_dir: PathBuf,
    /// "text" or "json".
    pub log_format: String,
    pub clickhouse: ClickHouseConfig,
    pub limits: LimitsConfig,
    /// Detection rules file (TOML); none = the built-in default rules.
    pub rules: Option<PathBuf>,
    /// Use the built-in default rules when no `rules` file is given.
    pub default_rules: bool,
    /// Where alerts go.
    pub alerting: crate::alert::AlertingConfig,
    pub api: ApiConfig,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Bearer token required on /api/* (empty: open). Prefer `token_file`.
    pub token: String,
    /// File holding the token (first line).
    pub token_file: Option<PathBuf>,
    /// Require the token on /metrics too.
    pub protect_metrics: bool,
}

impl ApiConfig {
    pub fn resolve(&self) -> Result<Option<String>> {
        if let Some(f) = &self.token_file {
            let t = std::fs::read_to_string(f)
                .with_context(|| format!("api.token_file: cannot read {}", f.display()))?;
            let t = t.lines().next().unwrap_or("").trim().to_string();
            if t.is_empty() {
                bail!("api.token_file: {} is empty", f.display());
            }
            return Ok(Some(t));
        }
        Ok(Some(self.token.trim().to_string()).filter(|t| !t.is_empty()))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseConfig {
    /// HTTP URL of an existing server. Empty: run a managed server under data_dir.
    pub url: String,
    pub user: String,
    pub password: String,
    pub database: String,
    /// Days raw (per-interval) rows are kept (TTL on current servers, day partition drops
    /// on old ones). 0 keeps everything. Also the bookkeeping tables' retention.
    pub retention_days: u32,
    /// Days the 1-minute rollup tier keeps (`cpu_1m`, ...). 0 keeps everything.
    pub retention_1m_days: u32,
    /// Days the 1-hour rollup tier keeps (`cpu_1h`, ...; month partitions on old
    /// servers). 0 keeps everything.
    pub retention_1h_days: u32,
    /// A cluster defined in the servers' `remote_servers` (empty: one server). The schema
    /// is then created `ON CLUSTER`: per-shard `Replicated*MergeTree` tables `T_local` and
    /// `Distributed` tables `T` under the usual names, rows sharded by host. Needs
    /// ZooKeeper (or ClickHouse Keeper) for the servers' replication and distributed DDL.
    pub cluster: String,
    /// On a cluster: replicas of a host's shard that must have a round's rows before its
    /// batches are acknowledged (`insert_quorum`). 0: a majority of the shard's replicas.
    /// 1 lets ingest go on with one replica of a shard down (the other catches up).
    pub insert_quorum: u32,
    /// For the managed server: the binary and its base configuration.
    pub server_binary: String,
    pub server_config: PathBuf,
    /// For the managed server: the nice value (0–19) its background merge threads run at,
    /// so that on a machine it shares with the aggregator, inserts (and so acks) come
    /// before merges, which use the CPU left over. 0 leaves them as they are. At 3 M
    /// samples/s here, the p99 ack lag was 2.5–7.2 s in seven runs at 0 and 1.5–1.8 s in
    /// three runs at 19 (1.7 s in `cargo xtask bench --only ingest`; docs/BENCHMARKS.md,
    /// section 3). Not applied to a server given by `url`: tune that one on its own machine.
    pub managed_merge_nice: u8,
    /// Most rows in one insert round.
    pub insert_max_rows: usize,
    /// How long the writer waits to gather batches into one insert. ClickHouse advises
    /// about one insert per table per second: each insert is a part its merges rewrite.
    /// At 3 M samples/s here, 1 s instead of 200 ms took ClickHouse from 1.25 to 0.9 core
    /// and the p99 ack lag from 8–21 s to 6.5–7.7 s (two runs each). A batch is
    /// acknowledged up to this much later on a quiet aggregator.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Decoded batches held at once, queued or in an insert round; when full, sensors are
    /// slowed down. It also bounds a round's size: 1024 kept rounds too small to catch up
    /// at 2 M samples/s here (p99 ack lag 4.7 s against 1.9 s with 4096).
    pub queue_batches: usize,
    /// Insert rounds in flight at once (each: intents, every table's rows, `batches`); an
    /// extra round starts only when it is full. More than one lets a ClickHouse on its own
    /// cores insert one round while the next is gathered; on a machine shared with
    /// ClickHouse it measured slower, hence 1. Exactly-once holds across them.
    pub insert_rounds: usize,
}

impl ClickHouseConfig {
    /// The server a command-line tool (backtest, import) talks to: `--clickhouse-url`, else
    /// the configured one; a managed server has no fixed URL, so it must be given.
    pub fn url_for_tools(&self, flag: Option<&str>) -> anyhow::Result<String> {
        flag.filter(|u| !u.is_empty())
            .map(str::to_string)
            .or_else(|| Some(self.url.clone()).filter(|u| !u.is_empty()))
            .context("no ClickHouse URL: pass --clickhouse-url (a managed server's port is in DATA_DIR/clickhouse/ports)")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest compressed frame accepted.
    pub max_frame_bytes: usize,
    /// Largest decompressed batch accepted.
    pub max_decompressed_bytes: usize,
    /// Batches one sensor may have in flight at once (QUIC streams).
    pub max_streams_per_connection: u32,
    /// Compressed bytes per second one connection may send on average (bursts of one
    /// second's worth allowed); beyond it its streams are read later. 0 = no limit.
    pub max_bytes_per_second_per_connection: u64,
    /// Newest wire version accepted and offered to sensors (ALPN `sonde/N`). Sensors of
    /// this release send what the aggregator offers; 1 makes this aggregator behave like
    /// the previous release (to try a fleet's downgrade path).
    pub max_wire_version: u8,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:4433".into(),
            http_listen: "127.0.0.1:9464".into(),
            ca: "/etc/sonde/ca.pem".into(),
            cert: "/etc/sonde/aggregator.pem".into(),
            key: "/etc/sonde/aggregator-key.pem".into(),
            data_dir: "/var/lib/sonde".into(),
            log_format: "text".into(),
            clickhouse: ClickHouseConfig::default(),
            limits: LimitsConfig::default(),
            rules: None,
            default_rules: true,
            alerting: Default::default(),
            api: Default::default(),
        }
    }
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        ClickHouseConfig {
            url: String::new(),
            user: String::new(),
            password: String::new(),
            database: "sonde".into(),
            retention_days: 30,
            retention_1m_days: 90,
            retention_1h_days: 730,
            cluster: String::new(),
            insert_quorum: 0,
            server_binary: "clickhouse-server".into(),
            server_config: "/etc/clickhouse-server/config.xml".into(),
            insert_max_rows: 500_000,
            flush_interval: Duration::from_secs(1),
            queue_batches: 4096,
            managed_merge_nice: 19,
            insert_rounds: 1,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let l = protocol::Limits::default();
        LimitsConfig {
            max_frame_bytes: l.max_frame,
            max_decompressed_bytes: l.max_decompressed,
            max_streams_per_connection: 16,
            max_bytes_per_second_per_connection: 4 << 20,
            max_wire_version: protocol::VERSION,
        }
    }
}

impl LimitsConfig {
    pub fn protocol(&self) -> protocol::Limits {
        protocol::Limits {
            max_frame: self.max_frame_bytes,
            max_decompressed: self.max_decompressed_bytes,
            ..Default::default()
        }
    }
}

impl Config {
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e))
    }

    pub fn validate(&self) -> Result<()> {
        let db = &self.clickhouse.database;
        if db.is_empty() || !db.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            bail!("clickhouse.database: {db:?} must be letters, digits and underscores");
        }
        let cl = &self.clickhouse.cluster;
        if !cl.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            bail!("clickhouse.cluster: {cl:?} must be letters, digits and underscores");
        }
        if !cl.is_empty() && self.clickhouse.url.is_empty() {
            bail!("clickhouse.cluster: {cl:?} needs clickhouse.url (a server of that cluster); a managed server is a single server");
        }
        if !self.clickhouse.url.is_empty() && !self.clickhouse.url.starts_with("http") {
            bail!(
                "clickhouse.url: {:?} must be an http:// or https:// URL",
                self.clickhouse.url
            );
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            bail!(
                "log_format: {:?} is neither \"text\" nor \"json\"",
                self.log_format
            );
        }
        if self.clickhouse.managed_merge_nice > 19 {
            bail!(
                "clickhouse.managed_merge_nice: {} must be 0 to 19",
                self.clickhouse.managed_merge_nice
            );
        }
        if !(1..=64).contains(&self.clickhouse.insert_rounds) {
            bail!(
                "clickhouse.insert_rounds: {} must be 1 to 64",
                self.clickhouse.insert_rounds
            );
        }
        if self.limits.max_frame_bytes > u32::MAX as usize {
            bail!("limits.max_frame_bytes: at most {}", u32::MAX);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_errors() {
        let c: Config = toml::from_str("listen = \"127.0.0.1:1\"\n[clickhouse]\nurl = \"http://x:8123\"\nflush_interval = \"50ms\"\n").unwrap();
        assert_eq!(c.clickhouse.flush_interval, Duration::from_millis(50));
        let e = toml::from_str::<Config>("[clickhouse]\nurll = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("urll"), "{e}");
        let mut c = Config::default();
        c.clickhouse.database = "a;drop".into();
        assert!(c.validate().is_err());
    }
}
