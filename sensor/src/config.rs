//! Sensor configuration: TOML file, then `SONDE_*` environment variables and
//! command-line flags on top (flags win). Unknown keys are errors.

use crate::filter::Filter;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Collection interval.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// A batch is closed and shipped after this long...
    #[serde(with = "humantime_serde")]
    pub batch_interval: Duration,
    /// ...or once its encoded snapshots reach this many bytes.
    pub batch_max_bytes: usize,
    /// Aggregator addresses (host:port), tried in order.
    pub aggregator: Vec<String>,
    /// The name in the aggregator's certificate.
    pub server_name: String,
    /// Deployment CA certificate (PEM).
    pub ca: PathBuf,
    /// This host's certificate (PEM), issued by the CA. Its common name is the host identity.
    pub cert: PathBuf,
    /// This host's private key (PEM).
    pub key: PathBuf,
    /// Directory of the on-disk spool of unacknowledged batches ("" = memory only,
    /// lost on restart). One directory per sensor.
    pub spool_dir: PathBuf,
    /// Bound of the spool in bytes: beyond it the oldest batches are dropped and the
    /// gap is reported to the aggregator (`gaps` table).
    #[serde(alias = "max_unacked_bytes")]
    pub spool_max_bytes: usize,
    /// Batches in flight on one connection.
    pub max_in_flight: usize,
    /// zstd level for batches (1..19).
    pub zstd_level: i32,
    /// On SIGTERM, wait this long for unacknowledged batches to be delivered.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Root of procfs and sysfs (for containers that mount the host's elsewhere).
    pub proc_root: String,
    pub sys_root: String,
    pub filters: Filters,
    /// eBPF probes.
    pub probes: crate::collect::ebpf::ProbeConfig,
    /// Log format: "text" or "json".
    pub log_format: String,
    /// Started as root: become this user once probes are loaded ("" = stay root,
    /// but without capabilities).
    pub user: String,
    /// Labels of this host (`labels = { env = "prod", role = "db" }`): stored in the
    /// `host_labels` table, shown and filtered on in the console, selectable in rules.
    /// Names: lower-case letters, digits and `_`, not `host` (the host name always comes
    /// from the certificate); values: up to 256 printable characters; at most 32 labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Per-cgroup metrics (containers, pods, systemd units): tables `cgroups`, `cgroup_io`.
    pub cgroups: CgroupConfig,
    /// The busiest processes: table `processes`.
    pub processes: ProcessConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CgroupConfig {
    pub enabled: bool,
    /// Where the hierarchies are mounted ("" = `<sys_root>/fs/cgroup`); every cgroup v1
    /// and cgroup2 mount at or below it is read.
    pub root: String,
    /// At most this many cgroups are reported (the first by path beyond it, with a warning).
    pub max_cgroups: usize,
    /// Path globs (`/system.slice/*`, `/kubepods*`): if non-empty, only matching cgroups.
    pub include: Vec<String>,
    /// Path globs never reported.
    pub exclude: Vec<String>,
    /// The list of cgroups is rebuilt when the kernel's cgroup counts change, when a
    /// tracked cgroup vanishes, and at least this often.
    #[serde(with = "humantime_serde")]
    pub rescan: Duration,
    /// A cgroup that used no CPU in its last 3 reads has only its CPU usage read each
    /// interval and everything else every this many intervals (1 = all, every
    /// interval); its rows in between repeat the last gauges with zero rates, and the
    /// next full read counts over the time since the previous one.
    pub idle_stride: u32,
}

impl Default for CgroupConfig {
    fn default() -> Self {
        CgroupConfig {
            enabled: true,
            root: String::new(),
            max_cgroups: 500,
            include: Vec::new(),
            exclude: Vec::new(),
            rescan: Duration::from_secs(30),
            idle_stride: 5,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessConfig {
    pub enabled: bool,
    /// N: the union of the top N by CPU, by resident memory and by I/O is reported,
    /// plus one `other` row for the rest.
    pub top: usize,
    /// Command lines are cut to this many bytes.
    pub cmdline_max: usize,
    /// A process that used no CPU in its last 3 reads is re-read every this many
    /// intervals only (1 = every process every interval); what it used in between is
    /// averaged over the time since its previous read. Most processes sleep: this is
    /// what keeps the cost with hundreds of them low.
    pub idle_stride: u32,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        ProcessConfig {
            enabled: true,
            top: 10,
            cmdline_max: 256,
            idle_stride: 5,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Filters {
    pub disks: Filter,
    /// Report partitions (sda1) as well as whole disks.
    pub disk_partitions: bool,
    pub interfaces: Filter,
    pub mounts: Filter,
}

impl Default for Filters {
    fn default() -> Self {
        Filters {
            disks: Filter::new(&[], &["ram*", "zram*", "fd*", "sr*"]),
            disk_partitions: false,
            interfaces: Filter::default(),
            mounts: Filter::new(
                &[],
                &[
                    "/run/*",
                    "/snap/*",
                    "/var/lib/docker/*",
                    "/var/lib/kubelet/*",
                ],
            ),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            interval: Duration::from_secs(1),
            batch_interval: Duration::from_secs(5),
            batch_max_bytes: 256 * 1024,
            aggregator: vec!["127.0.0.1:4433".into()],
            server_name: "sonde-aggregator".into(),
            ca: "/etc/sonde/ca.pem".into(),
            cert: "/etc/sonde/sensor.pem".into(),
            key: "/etc/sonde/sensor-key.pem".into(),
            spool_dir: "/var/lib/sonde/spool".into(),
            spool_max_bytes: 256 << 20,
            max_in_flight: 8,
            zstd_level: 3,
            shutdown_grace: Duration::from_secs(5),
            proc_root: "/proc".into(),
            sys_root: "/sys".into(),
            filters: Filters::default(),
            probes: Default::default(),
            log_format: "text".into(),
            user: String::new(),
            labels: Default::default(),
            cgroups: Default::default(),
            processes: Default::default(),
        }
    }
}

impl Config {
    /// Where the cgroup hierarchies are mounted: `[cgroups] root`, else `<sys_root>/fs/cgroup`.
    pub fn cgroup_root(&self) -> String {
        if self.cgroups.root.is_empty() {
            format!("{}/fs/cgroup", self.sys_root)
        } else {
            self.cgroups.root.clone()
        }
    }

    pub fn load(path: Option<&Path>) -> Result<Config> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let cfg: Config =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        if self.interval < Duration::from_millis(100) {
            bail!("interval: {:?} is too short (minimum 100ms)", self.interval);
        }
        if self.batch_interval < self.interval {
            bail!(
                "batch_interval ({:?}) must be at least interval ({:?})",
                self.batch_interval,
                self.interval
            );
        }
        if self.aggregator.is_empty() {
            bail!("aggregator: at least one address is required");
        }
        if !(1..=19).contains(&self.zstd_level) {
            bail!("zstd_level: {} is outside 1..19", self.zstd_level);
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            bail!(
                "log_format: {:?} is neither \"text\" nor \"json\"",
                self.log_format
            );
        }
        if self.labels.len() > 32 {
            bail!("labels: {} labels (at most 32)", self.labels.len());
        }
        for (k, v) in &self.labels {
            let name_ok = !k.is_empty()
                && k.len() <= 64
                && k.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                && k.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !name_ok {
                bail!("labels: name {k:?}: use lower-case letters, digits and '_' (not starting with a digit, at most 64)");
            }
            if k == "host" {
                bail!("labels: \"host\" is not a label: the host name comes from the certificate");
            }
            if v.len() > 256 || v.chars().any(|c| c.is_control()) {
                bail!("labels: {k} = {v:?}: at most 256 printable characters");
            }
        }
        if self.cgroups.max_cgroups == 0 || self.cgroups.max_cgroups > 100_000 {
            bail!(
                "cgroups.max_cgroups: {} is outside 1..100000 (turn collection off with cgroups.enabled = false)",
                self.cgroups.max_cgroups
            );
        }
        if self.cgroups.rescan < Duration::from_secs(1) {
            bail!(
                "cgroups.rescan: {:?} is too short (minimum 1s)",
                self.cgroups.rescan
            );
        }
        if !(1..=60).contains(&self.cgroups.idle_stride) {
            bail!(
                "cgroups.idle_stride: {} is outside 1..60",
                self.cgroups.idle_stride
            );
        }
        if self.processes.top == 0 || self.processes.top > 1000 {
            bail!(
                "processes.top: {} is outside 1..1000 (turn it off with processes.enabled = false)",
                self.processes.top
            );
        }
        if !(1..=60).contains(&self.processes.idle_stride) {
            bail!(
                "processes.idle_stride: {} is outside 1..60",
                self.processes.idle_stride
            );
        }
        if self.processes.cmdline_max > 4096 {
            bail!(
                "processes.cmdline_max: {} is over 4096",
                self.processes.cmdline_max
            );
        }
        Ok(())
    }

    /// The labels as the records sent with each batch.
    pub fn label_records(&self) -> Vec<protocol::HostLabelRec> {
        self.labels
            .iter()
            .map(|(name, value)| protocol::HostLabelRec {
                name: name.clone(),
                value: value.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_checked() {
        let mut c = Config {
            aggregator: vec!["a:1".into()],
            ..Default::default()
        };
        c.labels.insert("env".into(), "prod".into());
        c.labels.insert("rack_2".into(), "b 7".into());
        c.validate().unwrap();
        assert_eq!(c.label_records().len(), 2);
        for (k, v, want) in [
            ("host", "x", "host name comes from the certificate"),
            ("Env", "x", "lower-case"),
            ("2x", "x", "lower-case"),
            ("a-b", "x", "lower-case"),
            ("ok", "line\nbreak", "printable"),
        ] {
            let mut bad = c.clone();
            bad.labels.insert(k.into(), v.into());
            let e = bad.validate().unwrap_err().to_string();
            assert!(
                e.contains(want) && e.starts_with("labels"),
                "{k}={v:?}: {e}"
            );
        }
    }

    #[test]
    fn parses_and_rejects_unknown_keys() {
        let c: Config = toml::from_str("interval = \"2s\"\naggregator = [\"a:1\", \"b:2\"]\n[filters.disks]\nexclude = [\"loop*\"]\n").unwrap();
        assert_eq!(c.interval, Duration::from_secs(2));
        assert_eq!(c.aggregator.len(), 2);
        assert!(!c.filters.disks.allows("loop3"));
        let e = toml::from_str::<Config>("intervall = \"2s\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("intervall"), "{e}");
        let e = toml::from_str::<Config>("interval = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("interval"), "{e}");
    }
}
