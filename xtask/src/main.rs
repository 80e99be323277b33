//! Project tasks: `cargo xtask <task>`.

mod bench;
mod certs;
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
    /// Install the eBPF toolchain when missing (nightly's rust-src, bpf-linker 0.10.1) and
    /// build the sensor's eBPF programs with BTF into target/ebpf/. The sensor embeds the
    /// object at its next build.
    BuildEbpf,
    /// Measure overhead, wire size, eBPF probe cost and detection speed on this machine, next
    /// to node_exporter and Netdata in the same run; writes docs/BENCHMARKS.md (with --quick:
    /// target/bench/BENCHMARKS.md) and target/bench/results.json. Needs root.
    Bench {
        /// A short version of each benchmark (under 2 minutes), as CI runs it.
        #[arg(long)]
        quick: bool,
    },
    /// Fuzz the protocol decoder (frame, zstd, records) with cargo-fuzz/libFuzzer for a
    /// bounded time, starting from the committed seed corpus (fuzz/corpus/decode).
    /// Installs cargo-fuzz when missing. Exit status 1 when an input made it fail.
    Fuzz {
        /// How long to fuzz.
        #[arg(long, default_value_t = 60)]
        secs: u64,
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
        Cmd::Fuzz { secs } => fuzz::run_fuzz(secs).map(|_| ()),
        Cmd::Bench { quick } => bench::run_bench(quick),
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
