//! Project tasks: `cargo xtask <task>`.

mod bench;
mod certs;
mod cluster;
mod deploy;
mod detect_eval;
mod docs;
mod ebpf;
mod fuzz;
mod setup;
mod up;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// sonde project tasks.
#[derive(Parser)]
#[command(name = "cargo xtask", max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run everything on this machine: install what is missing (ClickHouse),
    /// build, create certificates, start a managed ClickHouse, the aggregator
    /// and a sensor for this host, and print example queries. Ctrl-C stops all
    /// of it; running it again reuses the data.
    Up {
        /// Where certificates, ClickHouse data and logs live.
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
        /// QUIC address of the aggregator.
        #[arg(long, default_value = "127.0.0.1:4433")]
        listen: String,
        /// HTTP address of the aggregator (health, metrics, API).
        #[arg(long, default_value = "127.0.0.1:9464")]
        http_listen: String,
        /// Debug build instead of release.
        #[arg(long)]
        debug: bool,
    },
    /// Scale-out on this machine: `cluster up` starts ZooKeeper, a ClickHouse cluster of
    /// 2 shards × 2 replicas (ClickHouse 18.16, Replicated tables per shard, Distributed
    /// tables under the usual names) and two aggregators sharing it, on loopback (QUIC 4433
    /// and 4434, consoles on 9464 and 9465), plus a sensor for this host that prefers one
    /// aggregator and fails over to the other. Ctrl-C stops all of it; running it again
    /// reuses the data.
    Cluster {
        #[command(subcommand)]
        action: ClusterCmd,
    },
    /// Install the eBPF toolchain when missing (nightly's rust-src, bpf-linker 0.10.1) and
    /// build the sensor's eBPF programs with BTF into target/ebpf/. The sensor embeds the
    /// object at its next build.
    BuildEbpf,
    /// Measure overhead, wire size, eBPF probe cost and detection speed on this machine, next
    /// to node_exporter and Netdata in the same run; writes docs/BENCHMARKS.md (with --quick:
    /// BENCHMARKS.md in the benchmark's directory, target/bench unless --dir) and
    /// results.json there. Needs root.
    Bench {
        /// A short version of each benchmark (a few minutes: every section, shorter; the
        /// cluster left out), written to BENCHMARKS.md in the benchmark's directory (see
        /// --dir) instead of docs/.
        #[arg(long)]
        quick: bool,
        /// Run one section only and print it (also written to BENCHMARKS-<section>.md in the
        /// benchmark's directory): `containers` (section 8), `ebpf` (section 4), `wire`
        /// (section 2's encodings, on snapshots of this host recorded for the purpose),
        /// `ingest` (section 3's sustained rates, one and four insert rounds in flight) or
        /// `cluster` (section 9: ZooKeeper, 2 shards × 2 replicas, 2 aggregators).
        #[arg(long, value_name = "SECTION")]
        only: Option<String>,
        /// Where the benchmark keeps its servers' data, certificates and partial results:
        /// DIR/sonde-bench (default: target/bench). ClickHouse's inserts are much slower on
        /// an ext4 without a journal (docs/BENCHMARKS.md, section 3; the benchmark warns and
        /// says so in its report): give a directory on a journaled filesystem or a tmpfs
        /// there.
        #[arg(long, value_name = "DIR")]
        dir: Option<std::path::PathBuf>,
    },
    /// Measure storage on real data: the detection corpus's recorded host stored through the
    /// live insert path, bytes per sample for raw rows and each rollup tier on ClickHouse
    /// 18.16 and a current engine (chdb-core), and a codec study per column kind. Writes
    /// docs/STORAGE.md (`cargo xtask bench` reports the same section).
    Storage,
    /// Measure detection quality: every detector kind and the default rules over the
    /// labelled corpus (aggregator/corpus: a recording of a real host with injected
    /// incidents, plus generated synthetic series), through the live engine. Prints the
    /// report and writes it into docs/DETECTION.md. Figures are reported, never asserted.
    DetectEval {
        /// First record a new corpus on this host (root; injects CPU, memory/OOM, disk-fill,
        /// I/O, packet-loss, fork and run-queue incidents one at a time; about an hour plus
        /// --normal-minutes). Replaces aggregator/corpus/recorded.
        #[arg(long)]
        record: bool,
        /// With --record: minutes of normal operation recorded before the incidents.
        #[arg(long, default_value_t = 120)]
        normal_minutes: u64,
    },
    /// Put the sensor on hosts over SSH and prove each one reports.
    ///
    /// Builds the release sensor once (with its eBPF object), issues a certificate per host
    /// from the local deployment CA (the CA key never leaves this machine), copies binary,
    /// config and certificates with the system's ssh/scp, installs them in /usr/local/bin,
    /// /etc/sonde and /var/lib/sonde (spool), and starts a hardened systemd unit — or, on
    /// hosts without systemd, a supervisor with a pid file (/run/sonde-sensor.pid). Then waits
    /// until each host appears in the aggregator's /api/hosts and prints one line per host.
    /// Running it again upgrades in place (the spool survives). Exit status 1 when any host
    /// failed.
    Deploy {
        #[command(flatten)]
        fleet: Fleet,
        /// Aggregator address host:port the sensors send to (repeatable: failover order).
        #[arg(long, value_name = "ADDR", required = true)]
        aggregator: Vec<String>,
        /// Name in the aggregator's certificate.
        #[arg(long, default_value = "sonde-aggregator")]
        server_name: String,
        /// Deployment CA directory (from `cargo xtask certs`).
        #[arg(long, default_value = "data/certs")]
        certs: PathBuf,
        /// The aggregator's HTTP base URL, to check each host reports (default: the first
        /// aggregator's host, port 9464).
        #[arg(long, value_name = "URL")]
        api: Option<String>,
        /// Bearer token for the aggregator's /api (when `[api] token` is set).
        #[arg(long, env = "SONDE_API_TOKEN", value_name = "TOKEN")]
        api_token: Option<String>,
        /// How long to wait for hosts to report.
        #[arg(long, default_value = "60s", value_parser = humantime_parse)]
        wait: std::time::Duration,
        /// Issue new certificates even for hosts that have one (rotation).
        #[arg(long)]
        rotate_certs: bool,
        /// Ship this sensor binary instead of building the release one.
        #[arg(long, value_name = "FILE")]
        sensor_binary: Option<PathBuf>,
    },
    /// Remove the sensor from hosts: stop it, delete its unit or supervisor, binary,
    /// /etc/sonde, /var/lib/sonde (spool included), logs and the sonde user.
    Undeploy {
        #[command(flatten)]
        fleet: Fleet,
    },
    /// Fuzz the protocol decoder (frame, zstd, records) with cargo-fuzz/libFuzzer for a
    /// bounded time, starting from the committed seed corpus (fuzz/corpus/decode).
    /// Installs cargo-fuzz when missing. Exit status 1 when an input made it fail.
    Fuzz {
        /// How long to fuzz.
        #[arg(long, default_value_t = 60)]
        secs: u64,
    },
    /// Regenerate the README's table of tables and docs/TABLES.md from the table
    /// declarations (protocol/src/records.rs).
    Docs {
        /// Write nothing; exit 1 when either file differs from the declarations (CI).
        #[arg(long)]
        check: bool,
    },
    /// Install what the tests need (ClickHouse, chdb-core), build, and run the whole test suite.
    Test {
        /// Extra arguments passed to `cargo test` (after --).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Create the deployment CA (once), the aggregator's certificate and sensor certificates.
    Certs {
        /// Directory for ca.pem, ca-key.pem, aggregator.pem and hosts/NAME.pem.
        #[arg(long, default_value = "data/certs")]
        dir: PathBuf,
        /// Issue a sensor certificate for this host name (repeatable). Default: this machine's name.
        #[arg(long = "host", value_name = "NAME")]
        hosts: Vec<String>,
        /// Extra DNS names or IP addresses for the aggregator's certificate (repeatable).
        #[arg(long = "aggregator-name", value_name = "NAME")]
        aggregator_names: Vec<String>,
        /// Re-issue leaf certificates that already exist (the CA is never replaced).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Start the local cluster, two aggregators and a sensor; Ctrl-C stops them.
    Up {
        /// Where certificates, ClickHouse data, ZooKeeper data and logs live.
        #[arg(long, default_value = "data-cluster")]
        data_dir: PathBuf,
        /// Replicas of a shard that must have a batch's rows before it is acknowledged
        /// (0: a majority, here 2 of 2; 1 lets ingest go on with a replica down).
        #[arg(long, default_value_t = 0)]
        insert_quorum: u32,
        /// Debug build instead of release.
        #[arg(long)]
        debug: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let r: Result<()> = match cli.cmd {
        Cmd::Up {
            data_dir,
            listen,
            http_listen,
            debug,
        } => up::run(&data_dir, &listen, &http_listen, !debug),
        Cmd::Test { args } => setup::test(&args),
        Cmd::Cluster {
            action:
                ClusterCmd::Up {
                    data_dir,
                    insert_quorum,
                    debug,
                },
        } => cluster::up(&data_dir, !debug, insert_quorum),
        Cmd::Fuzz { secs } => fuzz::run_fuzz(secs).map(|_| ()),
        Cmd::Deploy {
            fleet,
            aggregator,
            server_name,
            certs,
            api,
            api_token,
            wait,
            rotate_certs,
            sensor_binary,
        } => fleet.targets().and_then(|targets| {
            deploy::deploy(deploy::Opts {
                targets,
                aggregators: aggregator,
                server_name,
                identity: fleet.identity,
                certs,
                api,
                api_token,
                wait,
                rotate_certs,
                parallel: fleet.parallel,
                sensor_binary,
                ssh_options: fleet.ssh_options,
            })
        }),
        Cmd::Undeploy { fleet } => fleet
            .targets()
            .and_then(|t| deploy::undeploy(t, fleet.identity, fleet.ssh_options, fleet.parallel)),
        Cmd::Bench { quick, only, dir } => bench::run_bench(quick, only.as_deref(), dir),
        Cmd::Storage => bench::run_storage(),
        Cmd::Docs { check } => docs::run(&setup::root(), check),
        Cmd::DetectEval {
            record,
            normal_minutes,
        } => detect_eval::run_eval(record, normal_minutes),
        Cmd::BuildEbpf => ebpf::build().map(|_| ()),
        Cmd::Certs {
            dir,
            mut hosts,
            aggregator_names,
            force,
        } => {
            if hosts.is_empty() {
                hosts.push(certs::hostname());
            }
            certs::run(&dir, &hosts, &aggregator_names, force)
        }
    };
    if let Err(e) = r {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn humantime_parse(s: &str) -> Result<std::time::Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected e.g. 60s or 2m"))?;
    match unit {
        "" | "s" => Ok(std::time::Duration::from_secs(n)),
        "m" => Ok(std::time::Duration::from_secs(n * 60)),
        "ms" => Ok(std::time::Duration::from_millis(n)),
        _ => Err(format!("{s:?}: expected e.g. 60s or 2m")),
    }
}

/// The hosts and SSH settings `deploy` and `undeploy` share.
#[derive(clap::Args)]
struct Fleet {
    /// A host: [name=]user@address[:port] (repeatable). Without name=, the host's own
    /// `hostname` is its identity.
    #[arg(long = "host", value_name = "TARGET")]
    hosts: Vec<String>,
    /// A file of hosts, one TARGET per line (# comments).
    #[arg(long = "hosts", value_name = "FILE")]
    hosts_file: Option<PathBuf>,
    /// SSH private key (default: your ssh configuration).
    #[arg(long, value_name = "KEY")]
    identity: Option<PathBuf>,
    /// Hosts handled at once.
    #[arg(long, default_value_t = 16)]
    parallel: usize,
    /// Extra ssh -o options, e.g. UserKnownHostsFile=FILE (repeatable).
    #[arg(long = "ssh-option", value_name = "OPT")]
    ssh_options: Vec<String>,
}

impl Fleet {
    fn targets(&self) -> anyhow::Result<Vec<deploy::Target>> {
        let mut v = Vec::new();
        for h in &self.hosts {
            v.push(deploy::Target::parse(h)?);
        }
        if let Some(f) = &self.hosts_file {
            v.extend(deploy::read_hosts_file(f)?);
        }
        Ok(v)
    }
}
