use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use sonde_aggregator::config::Config;
use sonde_aggregator::store::{managed::Managed, schema, writer};
use sonde_aggregator::{api, ingest, metrics::Metrics};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// mimalloc instead of glibc's allocator: at 2 M samples/s glibc's malloc and free
/// (with `malloc_consolidate`) were about 28 % of the aggregator's CPU, from the many
/// short-lived strings and vectors of decoded batches crossing threads.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// sonde aggregator.
///
/// Accepts batches from sonde sensors over QUIC with mutual TLS (only
/// certificates issued by the deployment CA get in; the host name stored is
/// the certificate's), stores them in ClickHouse, and acknowledges each batch
/// only once its rows are committed. Without a ClickHouse URL it runs a
/// managed clickhouse-server under --data-dir.
///
/// Settings come from the TOML file given by --config, then SONDE_*
/// environment variables, then flags (flags win). See README.md,
/// "Configuration", for every key.
#[derive(Parser)]
#[command(name = "aggregator", version, about, long_about, max_term_width = 100)]
struct Cli {
    /// TOML configuration file.
    #[arg(
        short,
        long,
        global = true,
        env = "SONDE_AGGREGATOR_CONFIG",
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
    /// Run the aggregator until SIGTERM or Ctrl-C.
    Run(RunArgs),
    /// Check a rules file and print what it defines; errors name the file, line and field.
    CheckRules {
        /// The rules file (TOML).
        file: PathBuf,
    },
    /// Replay history through the rules with the live detector code and print the alerts
    /// that would have fired.
    ///
    /// History comes from a CSV file (`timestamp,value` at least; timestamps in Unix
    /// seconds, milliseconds or RFC 3339; extra columns become labels, a `host` column names
    /// the host) — every rule with a series is applied to the CSV's value — or from
    /// ClickHouse (--host, --from, --to), where each rule reads its own series.
    Backtest(sonde_aggregator::detect::backtest::Args),
    /// Measure detection quality on a labelled corpus: every detector kind, and the default
    /// rules, through the live engine; prints (and with --out writes) a Markdown report.
    ///
    /// The corpus directory holds a recording of a real host with injected incidents
    /// (recorded/host.rec.zst from `sensor record`, recorded/labels.tsv from
    /// xtask/scripts/inject-incidents.sh); the synthetic part is generated from fixed seeds.
    /// `cargo xtask detect-eval` runs this and writes docs/DETECTION.md.
    Evaluate(sonde_aggregator::detect::eval::Args),
    /// Store a `sensor record` file in ClickHouse under a host name, through the same insert
    /// path as live batches (its rollup tiers fill too): offline analysis of a recorded
    /// host, or real data for trying queries and the console. Importing the same file twice
    /// is refused.
    Import(sonde_aggregator::store::import::Args),
    /// Print the built-in default rules (a starting point for your own rules file).
    DefaultRules,
    /// Print the DDL this build would create, for a given server version.
    Schema {
        /// ClickHouse version to generate for (e.g. 18.16.1 or 26.9).
        #[arg(long, default_value = "18.16.1")]
        server_version: String,
        /// Database name.
        #[arg(long, default_value = "sonde")]
        database: String,
        /// Retention of raw rows in days (TTL on current servers).
        #[arg(long, default_value_t = 30)]
        retention_days: u32,
        /// Retention of the 1-minute tier in days.
        #[arg(long, default_value_t = 90)]
        retention_1m_days: u32,
        /// Retention of the 1-hour tier in days.
        #[arg(long, default_value_t = 730)]
        retention_1h_days: u32,
        /// Stop after this schema migration (default: the newest) — the database an
        /// earlier release created.
        #[arg(long, value_name = "N")]
        upto: Option<u32>,
        /// Print the cluster form (`ON CLUSTER NAME`, per-shard Replicated tables `T_local`
        /// and Distributed tables `T`), as `[clickhouse] cluster = "NAME"` creates it.
        #[arg(long, value_name = "NAME")]
        cluster: Option<String>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// QUIC listen address for sensors.
    #[arg(long, env = "SONDE_LISTEN", value_name = "ADDR")]
    listen: Option<String>,
    /// HTTP listen address for health, metrics and the API.
    #[arg(long, env = "SONDE_HTTP_LISTEN", value_name = "ADDR")]
    http_listen: Option<String>,
    /// Deployment CA certificate (PEM).
    #[arg(long, env = "SONDE_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
    /// The aggregator's certificate (PEM).
    #[arg(long, env = "SONDE_CERT", value_name = "FILE")]
    cert: Option<PathBuf>,
    /// The aggregator's private key (PEM).
    #[arg(long, env = "SONDE_KEY", value_name = "FILE")]
    key: Option<PathBuf>,
    /// State directory; the managed ClickHouse keeps its data here.
    #[arg(long, env = "SONDE_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// ClickHouse HTTP URL; empty runs a managed server.
    #[arg(long, env = "SONDE_CLICKHOUSE_URL", value_name = "URL")]
    clickhouse_url: Option<String>,
    /// ClickHouse user.
    #[arg(long, env = "SONDE_CLICKHOUSE_USER", value_name = "USER")]
    clickhouse_user: Option<String>,
    /// ClickHouse password.
    #[arg(
        long,
        env = "SONDE_CLICKHOUSE_PASSWORD",
        value_name = "PASSWORD",
        hide_env_values = true
    )]
    clickhouse_password: Option<String>,
    /// ClickHouse database (created if missing).
    #[arg(long, env = "SONDE_CLICKHOUSE_DATABASE", value_name = "NAME")]
    clickhouse_database: Option<String>,
    /// ClickHouse cluster (defined in the servers' remote_servers) to create the schema on:
    /// Replicated tables per shard, Distributed tables under the usual names, rows sharded
    /// by host. The URL is then one server of that cluster.
    #[arg(long, env = "SONDE_CLICKHOUSE_CLUSTER", value_name = "NAME")]
    clickhouse_cluster: Option<String>,
    /// On a cluster: replicas of the shard that must have a batch's rows before it is
    /// acknowledged (default: a majority of the shard's replicas).
    #[arg(long, env = "SONDE_INSERT_QUORUM", value_name = "N")]
    insert_quorum: Option<u32>,
    /// Insert rounds in flight at once (an extra one starts only when full; default 1).
    #[arg(long, env = "SONDE_INSERT_ROUNDS", value_name = "N")]
    insert_rounds: Option<usize>,
    /// Detection rules file (TOML). Checked at start; reloaded on SIGHUP. Without one the
    /// built-in default rules run (`aggregator default-rules` prints them).
    #[arg(long, env = "SONDE_RULES", value_name = "FILE")]
    rules: Option<PathBuf>,
    /// No built-in default rules when no rules file is given (config: default_rules = false).
    #[arg(long)]
    no_default_rules: bool,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = real_main(cli) {
        eprintln!("aggregator: error: {e:#}");
        std::process::exit(2);
    }
}

fn real_main(cli: Cli) -> Result<()> {
    let mut cfg = Config::load(cli.config.as_deref())?;
    if let Some(f) = cli.log_format {
        cfg.log_format = f;
    }
    match cli.cmd {
        Cmd::Schema {
            server_version,
            database,
            retention_days,
            retention_1m_days,
            retention_1h_days,
            upto,
            cluster,
        } => {
            let ddl = schema::Ddl {
                db: &database,
                modern: schema::is_modern(&server_version),
                retention_days,
                tier_days: [retention_1m_days, retention_1h_days],
            };
            let upto = upto.unwrap_or(schema::SCHEMA_VERSION);
            if upto > schema::SCHEMA_VERSION {
                anyhow::bail!(
                    "--upto {upto}: this build's newest schema migration is {}",
                    schema::SCHEMA_VERSION
                );
            }
            let out = match cluster {
                None => ddl.script(upto),
                Some(c) => {
                    let mut out = String::new();
                    for stmt in ddl.script(upto).split(";\n").filter(|s| !s.is_empty()) {
                        for s in sonde_aggregator::store::cluster::rewrite(stmt, &database, &c) {
                            out.push_str(&s);
                            out.push_str(";\n");
                        }
                    }
                    out
                }
            };
            // A reader that stops early (`| head`) is not an error.
            use std::io::Write;
            match std::io::stdout().write_all(out.as_bytes()) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                r => r.context("writing the schema to stdout"),
            }
        }
        Cmd::CheckRules { file } => {
            let rules = sonde_aggregator::detect::rules::load_rules(&file)?;
            println!("{}: {} rules OK", file.display(), rules.len());
            for r in &rules {
                println!(
                    "  {:<28} {:<12} {:<28} for {:?}",
                    r.name,
                    format!("{:?}", r.kind)
                        .split([' ', '{'])
                        .next()
                        .unwrap_or(""),
                    r.series
                        .as_ref()
                        .map(|s| s.name())
                        .unwrap_or_else(|| "-".into()),
                    r.for_
                );
            }
            Ok(())
        }
        Cmd::Evaluate(args) => {
            sonde_aggregator::detect::eval::run(args, sonde_aggregator::detect::DEFAULT_RULES)
        }
        Cmd::DefaultRules => {
            print!("{}", sonde_aggregator::detect::DEFAULT_RULES);
            Ok(())
        }
        Cmd::Import(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(sonde_aggregator::store::import::run(args, &cfg)),
        Cmd::Backtest(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(sonde_aggregator::detect::backtest::run(args, &cfg)),
        Cmd::Run(a) => {
            cfg.rules = a.rules.or(cfg.rules);
            if a.no_default_rules {
                cfg.default_rules = false;
            }
            cfg.listen = a.listen.unwrap_or(cfg.listen);
            cfg.http_listen = a.http_listen.unwrap_or(cfg.http_listen);
            cfg.ca = a.ca.unwrap_or(cfg.ca);
            cfg.cert = a.cert.unwrap_or(cfg.cert);
            cfg.key = a.key.unwrap_or(cfg.key);
            cfg.data_dir = a.data_dir.unwrap_or(cfg.data_dir);
            cfg.clickhouse.url = a.clickhouse_url.unwrap_or(cfg.clickhouse.url);
            cfg.clickhouse.user = a.clickhouse_user.unwrap_or(cfg.clickhouse.user);
            cfg.clickhouse.password = a.clickhouse_password.unwrap_or(cfg.clickhouse.password);
            cfg.clickhouse.database = a.clickhouse_database.unwrap_or(cfg.clickhouse.database);
            cfg.clickhouse.cluster = a.clickhouse_cluster.unwrap_or(cfg.clickhouse.cluster);
            cfg.clickhouse.insert_quorum = a.insert_quorum.unwrap_or(cfg.clickhouse.insert_quorum);
            cfg.clickhouse.insert_rounds = a.insert_rounds.unwrap_or(cfg.clickhouse.insert_rounds);
            cfg.validate()?;
            init_logs(&cfg.log_format);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(run(cfg))
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

async fn run(cfg: Config) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let token = cfg.api.resolve()?;
    let rules = match &cfg.rules {
        Some(p) => Some(sonde_aggregator::detect::rules::load_rules(p)?),
        None if cfg.default_rules => Some(sonde_aggregator::detect::rules::parse_rules(
            "built-in default rules",
            sonde_aggregator::detect::DEFAULT_RULES,
        )?),
        None => None,
    };
    for w in &cfg.alerting.webhook {
        if !w.url.starts_with("http://") && !w.url.starts_with("https://") {
            anyhow::bail!(
                "alerting.webhook.url: {:?} must be an http:// or https:// URL",
                w.url
            );
        }
    }
    for a in &cfg.alerting.alertmanager {
        if !a.url.starts_with("http://") && !a.url.starts_with("https://") {
            anyhow::bail!(
                "alerting.alertmanager.url: {:?} must be an http:// or https:// URL",
                a.url
            );
        }
    }
    // Everything that can be wrong with the configuration fails here, before anything runs.
    let server_cfg = ingest::server_config(
        &cfg.ca,
        &cfg.cert,
        &cfg.key,
        cfg.limits.max_streams_per_connection,
        cfg.limits.max_wire_version,
    )?;
    let listen: std::net::SocketAddr = cfg
        .listen
        .parse()
        .with_context(|| format!("listen: {:?} is not an address:port", cfg.listen))?;
    let http = tokio::net::TcpListener::bind(&cfg.http_listen)
        .await
        .with_context(|| format!("http_listen: cannot bind {}", cfg.http_listen))?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("data_dir: cannot create {}", cfg.data_dir.display()))?;

    let mut managed = None;
    let url = if cfg.clickhouse.url.is_empty() {
        let m = Managed::start(
            &cfg.data_dir,
            &cfg.clickhouse.server_binary,
            &cfg.clickhouse.server_config,
        )
        .await?;
        let url = m.url();
        m.lower_merge_priority(cfg.clickhouse.managed_merge_nice);
        managed = Some(m);
        url
    } else {
        cfg.clickhouse.url.clone()
    };
    let metrics = Arc::new(Metrics::default());
    // Opened (and retried) in the background: the aggregator comes up whatever the start
    // order, and holds ingest until the database answers.
    let store = sonde_aggregator::store::open_in_background(
        url.clone(),
        cfg.clickhouse.clone(),
        metrics.clone(),
    );

    let (tx, rx) = tokio::sync::mpsc::channel(cfg.clickhouse.queue_batches);
    let wcfg = writer::WriterConfig {
        max_rows: cfg.clickhouse.insert_max_rows,
        flush_interval: cfg.clickhouse.flush_interval,
        rounds: cfg.clickhouse.insert_rounds,
    };
    let writer = tokio::spawn(writer::run(store.clone(), rx, metrics.clone(), wcfg));

    // Detection and alerting.
    let mut reload_tx = None;
    let detect = match rules {
        Some(rules) => {
            let (atx, arx) = tokio::sync::mpsc::channel(10_000);
            let mut alerts_store = store.clone();
            tokio::spawn(async move {
                let s = alerts_store.wait().await;
                sonde_aggregator::detect::live::store_alerts(s, arx).await
            });
            let alerter =
                sonde_aggregator::alert::Alerter::start(&cfg.alerting, Some(atx), metrics.clone());
            let (dtx, drx) = tokio::sync::mpsc::channel(4096);
            let (rtx, rrx) = tokio::sync::mpsc::channel(4);
            reload_tx = Some(rtx);
            tracing::info!(
                rules = rules.len(),
                from = %cfg
                    .rules
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "built-in default rules (aggregator default-rules; off with default_rules = false)".into()),
                webhooks = cfg.alerting.webhook.len(),
                alertmanagers = cfg.alerting.alertmanager.len(),
                "detection on"
            );
            tokio::spawn(sonde_aggregator::detect::live::run(
                sonde_aggregator::detect::Engine::new(rules),
                drx,
                rrx,
                alerter,
                metrics.clone(),
                store.clone(),
            ));
            Some(dtx)
        }
        None => None,
    };

    // The stateless-reset key is derived from the aggregator's private key, so that after a
    // restart (or `kill -9`) this aggregator can tell sensors still holding a connection to
    // the previous process that it is gone, and they reconnect at once instead of after the
    // 30 s idle timeout. Another aggregator with another key cannot forge those resets.
    let reset_key = {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(b"sonde stateless reset key\0");
        h.update(std::fs::read(&cfg.key).unwrap_or_default());
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &h.finalize())
    };
    let socket = std::net::UdpSocket::bind(listen)
        .with_context(|| format!("listen: cannot bind UDP {listen}"))?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::new(Arc::new(reset_key)),
        Some(server_cfg),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .with_context(|| format!("listen: cannot serve QUIC on UDP {listen}"))?;
    let ingest_state = Arc::new(ingest::Ingest {
        tx,
        permits: Arc::new(tokio::sync::Semaphore::new(cfg.clickhouse.queue_batches)),
        detect,
        metrics: metrics.clone(),
        limits: cfg.limits.protocol(),
        max_wire_version: cfg.limits.max_wire_version,
        in_flight: Default::default(),
        conn_bytes_per_s: cfg.limits.max_bytes_per_second_per_connection,
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let ingest_task = tokio::spawn(ingest::serve(endpoint, ingest_state, stop_rx.clone()));

    let router = api::router(api::Api {
        store: store.clone(),
        metrics: metrics.clone(),
        token: token.map(Into::into),
        open_metrics: !cfg.api.protect_metrics,
        sessions: Default::default(),
    });
    let mut http_stop = stop_rx.clone();
    let http_task = tokio::spawn(async move {
        let _ = axum::serve(http, router)
            .with_graceful_shutdown(async move {
                let _ = http_stop.changed().await;
            })
            .await;
    });

    let mut retention_handle = store.clone();
    let retention = tokio::spawn(async move {
        let retention_store = retention_handle.wait().await;
        // Tiers created by this start's migration are filled from the raw rows stored
        // before they existed (retried after a minute on failure; resumes after a restart).
        loop {
            match retention_store.backfill_tiers().await {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "rollup tier backfill failed; retrying in 60 s");
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
            }
        }
        loop {
            if let Err(e) = retention_store.drop_old_partitions().await {
                tracing::warn!(error = %e, "retention pass failed");
            }
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    });

    tracing::info!(quic = %listen, http = %cfg.http_listen, clickhouse = %url, database = %cfg.clickhouse.database, "aggregator ready");
    if let Some(m) = &managed {
        tracing::info!(
            "query with: clickhouse-client --port {} --database {}",
            m.tcp_port,
            cfg.clickhouse.database
        );
    }

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                // Reload the rules; a broken file keeps the running rules.
                match (&cfg.rules, &reload_tx) {
                    (Some(p), Some(tx)) => match sonde_aggregator::detect::rules::load_rules(p) {
                        Ok(r) => { let _ = tx.send(r).await; }
                        Err(e) => tracing::error!(error = %format!("{e:#}"), "SIGHUP: rules not reloaded; keeping the running ones"),
                    },
                    _ => tracing::info!("SIGHUP: no rules file configured (the built-in default rules, if on, stay)"),
                }
            }
        }
    }
    tracing::info!("stopping: no new connections; finishing in-flight batches");
    let _ = stop_tx.send(true);
    let _ = ingest_task.await; // waits for in-flight batches to be stored and acked
    let _ = tokio::time::timeout(Duration::from_secs(30), writer).await;
    retention.abort();
    let _ = http_task.await;
    store.stop_background();
    if let Some(mut m) = managed {
        m.stop();
    }
    tracing::info!("aggregator stopped");
    Ok(())
}
