//! Store stage: the ClickHouse schema (created and migrated on start),
//! batched inserts, duplicate suppression and retention.

pub mod cluster;
pub mod import;
pub mod localcluster;
pub mod lock;
pub mod managed;
pub mod rows;
pub mod schema;
pub mod tiers;
pub mod writer;

use crate::config::ClickHouseConfig;
use anyhow::{bail, Context, Result};
use clickhouse::{Client, Row, RowWrite};
use protocol::Batch;
use rows::{BatchRow, HostRow, Rows};
use schema::{Ddl, SCHEMA_VERSION};
use serde::Deserialize;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// The store once ClickHouse has answered and the schema is current (see
/// [`open_in_background`]); until then, why not. Tasks that need the database wait on it,
/// so the aggregator starts in any order with its database.
#[derive(Clone)]
pub struct StoreHandle {
    rx: tokio::sync::watch::Receiver<Option<Store>>,
    why: Arc<std::sync::Mutex<String>>,
    /// Tasks that query the store for as long as it is open (the schema-lock watch).
    background: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl StoreHandle {
    /// The store, if it is open.
    pub fn get(&self) -> Option<Store> {
        self.rx.borrow().clone()
    }

    /// Waits until the store is open.
    pub async fn wait(&mut self) -> Store {
        loop {
            if let Some(s) = self.rx.borrow_and_update().clone() {
                return s;
            }
            if self.rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Stops the tasks that query the store in the background: at shutdown, before the
    /// managed server is stopped (a query every second would keep it from exiting).
    pub fn stop_background(&self) {
        for t in self.background.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    /// Why the store is not open yet (empty once it is).
    pub fn why(&self) -> String {
        self.why.lock().unwrap().clone()
    }

    /// A handle to an already open store (tests, tools).
    pub fn ready(store: Store) -> StoreHandle {
        let (_tx, rx) = tokio::sync::watch::channel(Some(store));
        StoreHandle {
            rx,
            why: Default::default(),
            background: Default::default(),
        }
    }
}

/// How often a running aggregator on a cluster looks for servers added to the cluster.
const NEW_SERVER_POLL: std::time::Duration = std::time::Duration::from_secs(10);

/// On a cluster: notices servers added to `remote_servers` while the aggregator runs (a new
/// shard or replica; ClickHouse reloads that section without a restart) and creates the
/// current schema there, under the schema lock, as a start does. Until then an insert round
/// with rows the sharding key sends to a new shard fails there and is held as in an outage
/// (nothing is acked, sensors spool); before this, that lasted until some aggregator
/// restarted. A failed attempt (the lock is another's, a server does not answer) is tried
/// again at the next poll.
async fn watch_new_servers(store: Store) {
    let mut known = store.cluster_servers().await.ok();
    loop {
        tokio::time::sleep(NEW_SERVER_POLL).await;
        let Ok(n) = store.cluster_servers().await else {
            continue;
        };
        if known == Some(n) {
            continue;
        }
        let bare = store.servers_without_schema().await;
        if bare.is_empty() {
            known = Some(n);
            continue;
        }
        tracing::info!(servers = %bare.join(", "), "servers of the cluster without the schema (a new shard or replica): creating it there");
        // The database and `schema_migrations` first, as a start does: the lock is a
        // table in the database, created on every server, and its `CREATE … ON CLUSTER`
        // fails on a server without the database (leaving the lock on the others, stale
        // only after 60 s); `schema_migrations` is not part of the current schema's
        // statements, and a server without it would count one table short for ever.
        let ddl = store.ddl();
        let first = async {
            store
                .exec_ddl(&format!("CREATE DATABASE IF NOT EXISTS {}", store.db))
                .await?;
            store.exec_ddl(&ddl.migrations_table()).await
        };
        if let Err(e) = first.await {
            tracing::warn!(error = %format!("{e:#}"), "cannot create the database on the cluster's new servers; trying again in {} s", NEW_SERVER_POLL.as_secs());
            continue;
        }
        let lock = match lock::MigrationLock::acquire(&store, &lock_holder()).await {
            Ok(l) => l,
            Err(e) => {
                tracing::info!(error = %format!("{e:#}"), "not creating the schema on the new servers now; trying again in {} s", NEW_SERVER_POLL.as_secs());
                continue;
            }
        };
        let r = store.complete_schema(&lock, &ddl).await;
        lock.release(&store).await;
        match r {
            Ok(()) => known = Some(n),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "creating the schema on the cluster's new servers failed; trying again in {} s", NEW_SERVER_POLL.as_secs())
            }
        }
    }
}

/// Opens the store (connect, create, migrate), retrying every 2 s while ClickHouse cannot
/// be reached or refuses, so the aggregator does not depend on start order: meanwhile
/// ingest is held (the writer waits; the bounded queue pushes back on the sensors, which
/// spool), `/readyz` answers 503 with the reason and `sonde_clickhouse_down` is 1.
pub fn open_in_background(
    url: String,
    cfg: ClickHouseConfig,
    metrics: Arc<crate::metrics::Metrics>,
) -> StoreHandle {
    use std::sync::atomic::Ordering::Relaxed;
    let (tx, rx) = tokio::sync::watch::channel(None);
    let why = Arc::new(std::sync::Mutex::new(format!(
        "connecting to ClickHouse at {url}"
    )));
    let why2 = why.clone();
    let background: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Default::default();
    let bg = background.clone();
    tokio::spawn(async move {
        let mut failures = 0u32;
        loop {
            match Store::open(&url, &cfg).await {
                Ok(store) => {
                    if failures > 0 {
                        tracing::info!(
                            attempts = failures + 1,
                            "ClickHouse answers: schema current, ingest starts"
                        );
                    }
                    metrics.clickhouse_down.store(0, Relaxed);
                    why2.lock().unwrap().clear();
                    let w = tokio::spawn(lock::watch(store.clone(), store.fenced.clone()));
                    bg.lock().unwrap().push(w.abort_handle());
                    if store.cluster.is_some() {
                        let w = tokio::spawn(watch_new_servers(store.clone()));
                        bg.lock().unwrap().push(w.abort_handle());
                    }
                    let _ = tx.send(Some(store));
                    return;
                }
                Err(e) => {
                    let e = format!("{e:#}");
                    if failures == 0 {
                        tracing::warn!(error = %e, "ClickHouse not ready at start; retrying every 2 s (ingest is held, sensors spool)");
                    } else if failures % 30 == 0 {
                        tracing::warn!(error = %e, attempts = failures + 1, "ClickHouse still not ready");
                    }
                    failures += 1;
                    metrics.clickhouse_down.store(1, Relaxed);
                    *why2.lock().unwrap() = e;
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                }
            }
        }
    });
    StoreHandle {
        rx,
        why,
        background,
    }
}

#[derive(Clone)]
pub struct Store {
    pub client: Client,
    pub db: String,
    pub version: String,
    pub modern: bool,
    pub retention_days: u32,
    pub tier_days: [u32; 2],
    /// The cluster the schema lives on (`[clickhouse] cluster`), if any.
    pub cluster: Option<String>,
    /// On a cluster: the insert quorum in force (1 on a single server).
    pub quorum: u32,
    /// True while another aggregator holds the schema lock: no insert attempt starts
    /// (`lock::watch` keeps it).
    pub fenced: Arc<std::sync::atomic::AtomicBool>,
    /// `, 'user', 'password'` for `remote()` (empty without a user).
    remote_auth: String,
}

/// This aggregator process, as its intent rows and query ids name it: host, process and
/// a random part (a restarted process may get the same pid). Another aggregator that
/// finds an open intent of this writer looks for its queries still running.
pub fn writer_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!(
            "{}-{}-{:08x}",
            host.trim(),
            std::process::id(),
            writer::rand_u64() as u32
        )
    })
}

/// The prefix of the query ids of `writer`'s statements.
const QUERY_ID_PREFIX: &str = "sonde-w:";

/// A fresh query id of this writer's: `sonde-w:WRITER:N`.
fn query_id() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "{QUERY_ID_PREFIX}{}:{}",
        writer_id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// The writer a query id of `query_id()` names.
fn writer_of_query(id: &str) -> Option<&str> {
    id.strip_prefix(QUERY_ID_PREFIX)?
        .rsplit_once(':')
        .map(|(w, _)| w)
}

/// A ClickHouse client. Its HTTP client is the crate's own defaults (a pooled
/// connection idle for 2 s is dropped, under the server's 3 s keep-alive; TCP keepalive
/// 60 s) plus a timer, without which an idle connection is only dropped when it is next
/// taken from the pool. One made for a request cancelled while it connected (a task
/// aborted at shutdown) then stayed open without ever sending a request, and an 18.16
/// server waits for that first request for `http_receive_timeout` (30 min) before it can
/// exit: the managed server was killed after 15 s at some stops.
pub fn client(url: &str, cfg: &ClickHouseConfig) -> Client {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_keepalive(Some(std::time::Duration::from_secs(60)));
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(std::time::Duration::from_secs(2))
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .build(connector);
    let mut c = Client::with_http_client(http)
        .with_url(url)
        .with_validation(false);
    if !cfg.user.is_empty() {
        c = c.with_user(&cfg.user);
    }
    if !cfg.password.is_empty() {
        c = c.with_password(&cfg.password);
    }
    c
}

/// Who holds the schema lock, for the other aggregators' logs: this process's
/// [`writer_id`].
fn lock_holder() -> String {
    writer_id().to_string()
}

impl Store {
    /// Connects, creates the database and applies pending migrations.
    pub async fn open(url: &str, cfg: &ClickHouseConfig) -> Result<Store> {
        let c = client(url, cfg);
        let version: String = c
            .query("SELECT version()")
            .fetch_one()
            .await
            .with_context(|| format!("cannot reach ClickHouse at {url}"))?;
        let modern = schema::is_modern(&version);
        let (cluster, quorum) = if cfg.cluster.is_empty() {
            (None, 1)
        } else {
            (
                Some(cfg.cluster.clone()),
                Self::check_cluster(&c, url, cfg).await?,
            )
        };
        let c = if cluster.is_some() {
            // A round's rows are on their shard (and on `quorum` of its replicas) when
            // the insert returns, not queued in the Distributed table for later.
            let c = c.with_setting("insert_distributed_sync", "1");
            if quorum > 1 {
                c.with_setting("insert_quorum", quorum.to_string())
                    .with_setting("insert_quorum_timeout", "60000")
            } else {
                c
            }
        } else {
            c
        };
        let store = Store {
            client: c.clone(),
            db: cfg.database.clone(),
            version: version.clone(),
            modern,
            retention_days: cfg.retention_days,
            tier_days: [cfg.retention_1m_days, cfg.retention_1h_days],
            cluster,
            quorum,
            fenced: Default::default(),
            remote_auth: remote_auth(cfg),
        };
        store
            .exec_ddl(&format!("CREATE DATABASE IF NOT EXISTS {}", cfg.database))
            .await
            .context("CREATE DATABASE")?;
        let ddl = store.ddl();
        store
            .exec_ddl(&ddl.migrations_table())
            .await
            .context("creating schema_migrations")?;
        let applied = store.applied_migrations().await?;
        let pending = ddl
            .migrations()
            .iter()
            .any(|(v, _, _)| !applied.contains(v));
        if pending {
            // Several aggregators may share this database: one changes the schema at a
            // time, and the others hold their inserts meanwhile (`lock`).
            let holder = lock_holder();
            let lock = lock::MigrationLock::acquire(&store, &holder).await?;
            let r = store.migrate_locked(&lock, &ddl, !applied.is_empty()).await;
            lock.release(&store).await;
            r?;
        } else if store.cluster.is_some() {
            // A shard or replica added to `remote_servers` since the schema was created:
            // its servers have no tables yet.
            let bare = store.servers_without_schema().await;
            if !bare.is_empty() {
                tracing::info!(servers = %bare.join(", "), "servers of the cluster without the schema (a new shard or replica): creating it there");
                let lock = lock::MigrationLock::acquire(&store, &lock_holder()).await?;
                let r = store.complete_schema(&lock, &ddl).await;
                lock.release(&store).await;
                r?;
            }
        }
        store.apply_ttl().await?;
        tracing::info!(%version, modern, database = %cfg.database, schema = SCHEMA_VERSION, "ClickHouse schema current");
        // Inserts name tables without the database.
        Ok(Store {
            client: c.with_database(&cfg.database),
            ..store
        })
    }

    async fn applied_migrations(&self) -> Result<Vec<u32>> {
        self.client
            .query(&format!(
                "SELECT version FROM {}.schema_migrations",
                self.db
            ))
            .fetch_all()
            .await
            .context("reading schema_migrations")
    }

    async fn record_migration(&self, v: u32, name: &str) -> Result<()> {
        // Bound, not spliced: a migration's name may hold a quote.
        self.client
            .query(&format!(
                "INSERT INTO {}.schema_migrations (version, name, applied) VALUES (?, ?, now())",
                self.db
            ))
            .bind(v)
            .bind(name)
            .execute()
            .await
            .context("recording a schema migration")
    }

    /// Applies the pending migrations under the schema lock. The migrations applied are
    /// read again first: another aggregator may have applied them while this one waited.
    /// `in_use`: the database had a schema already, so other aggregators may be writing.
    async fn migrate_locked(
        &self,
        lock: &lock::MigrationLock,
        ddl: &schema::Ddl<'_>,
        in_use: bool,
    ) -> Result<()> {
        let applied = self.applied_migrations().await?;
        if ddl.migrations().iter().all(|(v, _, _)| applied.contains(v)) {
            tracing::info!("schema migrations applied by another aggregator meanwhile");
            return Ok(());
        }
        if in_use {
            tracing::info!(
                grace_s = lock::FENCE_GRACE.as_secs(),
                "schema lock taken: waiting for other aggregators' inserts to stop before changing the schema"
            );
            tokio::time::sleep(lock::FENCE_GRACE).await;
        }
        if self.cluster.is_some() && applied.is_empty() {
            // A new cluster: the current schema at once (no ALTERs), every migration
            // recorded as applied.
            tracing::info!(
                schema = SCHEMA_VERSION,
                "new cluster: creating the current schema ON CLUSTER"
            );
            self.create_current_schema(lock, ddl).await?;
            for (v, name, _) in ddl.migrations() {
                self.record_migration(v, &name).await?;
            }
            return Ok(());
        }
        for (v, name, stmts) in ddl.migrations() {
            if applied.contains(&v) {
                continue;
            }
            tracing::info!(version = v, name = %name, "applying schema migration");
            if v == tiers::TIERS_SINCE {
                // Ingest is held while migrations run: what the raw tables hold now is
                // exactly what the new tiers' views will not see. Keep it aside for the
                // background backfill (hard links, instant).
                self.snapshot_for_backfill().await?;
            }
            for s in stmts {
                lock.check(self).await?;
                self.exec_ddl(&s)
                    .await
                    .with_context(|| format!("migration {v} ({name}) failed on:\n{s}"))?;
            }
            self.record_migration(v, &name).await?;
        }
        Ok(())
    }

    /// On a cluster: the servers (host:port) with fewer tables in the database than the
    /// server with the most, read through `remote()`. A server that does not answer is
    /// left out (a replica down must not stop a start).
    async fn servers_without_schema(&self) -> Vec<String> {
        if self.cluster.is_none() {
            return Vec::new();
        }
        let servers = match self.cluster_addrs().await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot list the cluster's servers; not checking that each has the schema");
                return Vec::new();
            }
        };
        let auth = &self.remote_auth;
        let mut counts = Vec::new();
        for addr in servers {
            let sql = format!(
                "SELECT count() FROM remote('{}', system, tables{auth}) WHERE database = '{}'",
                quote(&addr),
                quote(&self.db)
            );
            match self.client.query(&sql).fetch_one::<u64>().await {
                Ok(n) => counts.push((addr, n)),
                Err(e) => {
                    tracing::debug!(server = %addr, error = %e, "cannot count a server's tables")
                }
            }
        }
        let most = counts.iter().map(|c| c.1).max().unwrap_or(0);
        counts
            .into_iter()
            .filter(|c| c.1 < most)
            .map(|c| c.0)
            .collect()
    }

    /// The servers (`host:port`, native protocol) `remote_servers` defines for the cluster.
    async fn cluster_addrs(&self) -> Result<Vec<String>> {
        #[derive(Row, Deserialize)]
        struct S {
            host_name: String,
            port: u16,
        }
        let Some(cluster) = &self.cluster else {
            return Ok(Vec::new());
        };
        let servers: Vec<S> = self
            .client
            .query("SELECT host_name, port FROM system.clusters WHERE cluster = ?")
            .bind(cluster)
            .fetch_all()
            .await
            .context("listing the cluster's servers")?;
        Ok(servers
            .into_iter()
            .map(|s| format!("{}:{}", s.host_name, s.port))
            .collect())
    }

    /// The number of servers (shards × replicas) `remote_servers` defines for the cluster.
    async fn cluster_servers(&self) -> Result<u64> {
        let Some(cluster) = &self.cluster else {
            return Ok(0);
        };
        Ok(self
            .client
            .query("SELECT count() FROM system.clusters WHERE cluster = ?")
            .bind(cluster)
            .fetch_one::<u64>()
            .await?)
    }

    /// Creates the current schema on the servers that lack it (`CREATE … IF NOT EXISTS ON
    /// CLUSTER`: the others already have every table), under the schema lock.
    async fn complete_schema(
        &self,
        lock: &lock::MigrationLock,
        ddl: &schema::Ddl<'_>,
    ) -> Result<()> {
        if self.servers_without_schema().await.is_empty() {
            return Ok(());
        }
        self.create_current_schema(lock, ddl).await?;
        tracing::info!("schema created on the cluster's new servers");
        Ok(())
    }

    /// Runs the current schema's `CREATE … IF NOT EXISTS` statements (`ON CLUSTER` on a
    /// cluster), checking before each that the lock is still this aggregator's.
    async fn create_current_schema(
        &self,
        lock: &lock::MigrationLock,
        ddl: &schema::Ddl<'_>,
    ) -> Result<()> {
        for s in ddl.current_schema() {
            lock.check(self).await?;
            self.exec_ddl(&s)
                .await
                .with_context(|| format!("creating the schema failed on:\n{s}"))?;
        }
        Ok(())
    }

    /// Checks that `cfg.cluster` is a cluster of the server at `url`; the insert quorum
    /// (configured, or a majority of the smallest shard's replicas).
    async fn check_cluster(c: &Client, url: &str, cfg: &ClickHouseConfig) -> Result<u32> {
        #[derive(Row, Deserialize)]
        struct Shard {
            cluster: String,
            replicas: u64,
        }
        let all: Vec<Shard> = c
            .query("SELECT cluster, count() AS replicas FROM system.clusters GROUP BY cluster, shard_num ORDER BY cluster, shard_num")
            .fetch_all()
            .await
            .with_context(|| format!("reading system.clusters at {url}"))?;
        let mine: Vec<&Shard> = all.iter().filter(|s| s.cluster == cfg.cluster).collect();
        if mine.is_empty() {
            let mut names: Vec<&str> = all.iter().map(|s| s.cluster.as_str()).collect();
            names.dedup();
            bail!(
                "clickhouse.cluster: {:?} is not a cluster of the server at {url} (its remote_servers define: {})",
                cfg.cluster,
                if names.is_empty() { "none".to_string() } else { names.join(", ") }
            );
        }
        let min = mine.iter().map(|s| s.replicas).min().unwrap_or(1) as u32;
        let q = if cfg.insert_quorum == 0 {
            cluster::default_quorum(min)
        } else {
            cfg.insert_quorum
        };
        if q > min {
            bail!(
                "clickhouse.insert_quorum: {q} is more than the {min} replicas of a shard of cluster {:?}",
                cfg.cluster
            );
        }
        tracing::info!(cluster = %cfg.cluster, shards = mine.len(), replicas_per_shard = min, insert_quorum = q, "ClickHouse cluster");
        Ok(q)
    }

    /// Runs one statement of the schema: as written on a single server, in its cluster
    /// form (`ON CLUSTER`, local and Distributed tables) on a cluster.
    pub async fn exec_ddl(&self, stmt: &str) -> Result<()> {
        let stmts = match &self.cluster {
            None => vec![stmt.to_string()],
            Some(c) => cluster::rewrite(stmt, &self.db, c),
        };
        for s in stmts {
            // ClickHouse 18.16 has no ADD COLUMN IF NOT EXISTS: a migration retried after
            // failing half-way skips the columns it already added.
            if let Some((table, col)) = cluster::added_column(&s, &self.db) {
                let n: u64 = self
                    .client
                    .query("SELECT count() FROM system.columns WHERE database = ? AND table = ? AND name = ?")
                    .bind(&self.db)
                    .bind(table)
                    .bind(col)
                    .fetch_one()
                    .await
                    .context("reading system.columns")?;
                if n > 0 {
                    continue;
                }
            }
            self.client
                .query(&s)
                .execute()
                .await
                .with_context(|| format!("DDL failed: {}", s.lines().next().unwrap_or("")))?;
        }
        Ok(())
    }

    /// The table that holds a table's parts: `T` on a single server, `T_local` on a cluster.
    pub fn local_name(&self, t: &str) -> String {
        if self.cluster.is_some() {
            format!("{t}_local")
        } else {
            t.to_string()
        }
    }

    /// A read of the dedup state: on a cluster with a quorum, with sequential consistency
    /// (a replica that lacks a quorum-acknowledged insert refuses rather than answer).
    /// On a cluster, a subquery over a Distributed table runs against the shard's local
    /// table: a host's intents and batches live on one shard.
    fn dedup_query(&self, q: &str) -> clickhouse::query::Query {
        let mut q = self.client.query(q).with_setting("query_id", query_id());
        if self.cluster.is_some() {
            q = q.with_setting("distributed_product_mode", "local");
            if self.quorum > 1 {
                q = q.with_setting("select_sequential_consistency", "1");
            }
        }
        q
    }

    pub fn ddl(&self) -> Ddl<'_> {
        Ddl {
            db: &self.db,
            modern: self.modern,
            retention_days: self.retention_days,
            tier_days: self.tier_days,
        }
    }

    /// True when ClickHouse answers and the schema is at this build's version.
    pub async fn ready(&self) -> bool {
        let q = format!("SELECT max(version) FROM {}.schema_migrations", self.db);
        matches!(self.client.query(&q).fetch_one::<u32>().await, Ok(v) if v >= SCHEMA_VERSION)
    }

    async fn insert<T: RowWrite>(&self, table: &str, rows: &[T::Value<'_>]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut ins = self
            .client
            .insert::<T>(table)
            .await?
            .with_setting("query_id", query_id());
        for r in rows {
            ins.write(r).await?;
        }
        ins.end()
            .await
            .with_context(|| format!("INSERT INTO {}.{table}", self.db))?;
        Ok(())
    }

    /// One metric table's rows, as one RowBinary INSERT naming its columns.
    async fn insert_rows(&self, t: &rows::TableRows<'_>) -> Result<()> {
        if t.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "INSERT INTO {}.{} ({}) FORMAT RowBinary",
            self.db,
            t.def.name,
            t.column_list()
        );
        let mut ins = self
            .client
            .insert_formatted_with(sql)
            .with_setting("query_id", query_id());
        ins.send(bytes::Bytes::copy_from_slice(t.bytes())).await?;
        ins.end()
            .await
            .with_context(|| format!("INSERT INTO {}.{}", self.db, t.def.name))?;
        Ok(())
    }

    /// Inserts all rows of the given batches (already deduplicated), then
    /// records the batches themselves. Returns the number of rows written.
    ///
    /// Exactly once: an intent row per batch goes first, the `batches` row
    /// last. A batch in `uncertain` (its intent may exist without its `batches`
    /// row: an earlier attempt failed or the aggregator died mid-round) has
    /// its rows checked table by table, and rows already present (same host and
    /// timestamp) are not inserted again. Each table's insert of one round is a
    /// single block, which ClickHouse commits whole or not at all.
    pub async fn write(
        &self,
        batches: &[(&str, &Batch, u32)],
        hosts: &[HostRow<'_>],
        now: u32,
        uncertain: &std::collections::HashSet<(String, String, u64)>,
    ) -> Result<usize> {
        let t0 = std::time::Instant::now();
        let attempt = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or(now);
        let mut rows = Rows::default();
        let mut rows_u = Rows::default();
        for (host, b, _) in batches {
            if uncertain.contains(&(host.to_string(), b.boot_id.clone(), b.seq)) {
                rows_u.add(host, b);
            } else {
                rows.add(host, b);
            }
        }
        let intents: Vec<rows::IntentRow> = batches
            .iter()
            .map(|(host, b, _)| rows::IntentRow {
                host,
                sensor_boot_id: &b.boot_id,
                seq: b.seq,
                // The time of this attempt (a retry writes its intents again).
                created: attempt,
                writer: writer_id(),
            })
            .collect();
        let t_rows = t0.elapsed();
        self.insert::<rows::IntentRow>("batch_intents", &intents)
            .await?;
        let t_intents = t0.elapsed();
        // The metric tables' inserts run concurrently: each is one block ClickHouse
        // commits whole, and on 18.16 an insert (with its tier views) runs on one server
        // thread, so a round of one table after another left the second core to merges.
        // Exactly once is unchanged: `batches` is written only after all of them succeeded.
        let inserts =
            rows.tables
                .iter_mut()
                .zip(rows_u.tables.iter_mut())
                .map(|(t, tu)| async move {
                    let mut skipped = 0usize;
                    if !tu.is_empty() {
                        let present = self.present(t.def.name, tu.keys()).await?;
                        let before = tu.len();
                        tu.retain(|h, ts| !present.contains(&(h.to_string(), ts)));
                        skipped += before - tu.len();
                        t.append(tu);
                    }
                    self.insert_rows(t).await?;
                    Ok::<usize, anyhow::Error>(skipped)
                });
        // The `hosts` rows of this round go in beside them.
        let (per_table, ()) = tokio::try_join!(
            futures_util::future::try_join_all(inserts),
            self.insert::<HostRow>("hosts", hosts)
        )?;
        let skipped: usize = per_table.into_iter().sum();
        if skipped > 0 {
            tracing::info!(
                rows = skipped,
                "recovery: rows of partly stored batches were already in ClickHouse; not inserted again"
            );
        }
        // A batch in `uncertain` may have its `batches` row already: on a cluster an
        // insert through a Distributed table that failed on one shard (a new shard still
        // without the schema, a quorum not reached in time) has committed on the others.
        let in_doubt = |(h, b, _): &&(&str, &Batch, u32)| {
            uncertain.contains(&(h.to_string(), b.boot_id.clone(), b.seq))
        };
        let recorded = if batches.iter().any(|x| in_doubt(&x)) {
            self.recorded(batches.iter().filter(in_doubt)).await?
        } else {
            Default::default()
        };
        let br: Vec<BatchRow> = batches
            .iter()
            .filter(|(host, b, _)| {
                !recorded.contains(&(host.to_string(), b.boot_id.clone(), b.seq))
            })
            .map(|(host, b, bytes)| BatchRow {
                host,
                sensor_boot_id: &b.boot_id,
                seq: b.seq,
                received: now,
                snapshots: b.snapshots.len() as u32,
                samples: b.sample_count() as u32,
                bytes: *bytes,
            })
            .collect();
        let t_tables = t0.elapsed();
        self.insert::<BatchRow>("batches", &br).await?;
        tracing::debug!(
            batches = batches.len(),
            rows = rows.len(),
            rows_ms = t_rows.as_millis() as u64,
            intents_ms = (t_intents - t_rows).as_millis() as u64,
            tables_ms = (t_tables - t_intents).as_millis() as u64,
            batches_ms = (t0.elapsed() - t_tables).as_millis() as u64,
            "insert round stored"
        );
        Ok(rows.len())
    }

    /// Which of `batches` already have their `batches` row.
    async fn recorded<'b>(
        &self,
        batches: impl Iterator<Item = &'b (&'b str, &'b Batch, u32)>,
    ) -> Result<std::collections::HashSet<(String, String, u64)>> {
        let mut hosts = BTreeSet::new();
        let mut seqs = BTreeSet::new();
        let mut keys = std::collections::HashSet::new();
        for (h, b, _) in batches {
            hosts.insert(h.to_string());
            seqs.insert(b.seq);
            keys.insert((h.to_string(), b.boot_id.clone(), b.seq));
        }
        #[derive(Row, Deserialize)]
        struct K {
            host: String,
            sensor_boot_id: String,
            seq: u64,
        }
        let found: Vec<K> = self
            .dedup_query("SELECT DISTINCT toString(host) AS host, sensor_boot_id, seq FROM batches WHERE has(?, toString(host)) AND has(?, seq)")
            .bind(hosts.into_iter().collect::<Vec<_>>())
            .bind(seqs.into_iter().collect::<Vec<_>>())
            .fetch_all()
            .await
            .context("recovery check on batches")?;
        Ok(found
            .into_iter()
            .map(|k| (k.host, k.sensor_boot_id, k.seq))
            .filter(|k| keys.contains(k))
            .collect())
    }

    /// Which of the (host, ts) keys already have rows in `table`.
    async fn present<'k>(
        &self,
        table: &str,
        keys: impl Iterator<Item = (&'k str, u32)>,
    ) -> Result<std::collections::HashSet<(String, u32)>> {
        let mut hosts = BTreeSet::new();
        let mut ts = BTreeSet::new();
        for (h, t) in keys {
            hosts.insert(h.to_string());
            ts.insert(t);
        }
        #[derive(Row, Deserialize)]
        struct K {
            host: String,
            ts: u32,
        }
        let q = format!(
            "SELECT DISTINCT toString(host) AS host, toUInt32(ts) AS ts FROM {table} WHERE has(?, toString(host)) AND has(?, toUInt32(ts))"
        );
        let found: Vec<K> = self
            .dedup_query(&q)
            .bind(hosts.into_iter().collect::<Vec<_>>())
            .bind(ts.into_iter().collect::<Vec<_>>())
            .fetch_all()
            .await
            .with_context(|| format!("recovery check on {table}"))?;
        Ok(found.into_iter().map(|k| (k.host, k.ts)).collect())
    }

    /// Batches with an intent but no `batches` row in the last day: possibly
    /// partly stored by an aggregator that died mid-round, or being stored right now by
    /// another. Each with the writers of its intents (`writer_id`; empty for intents of
    /// releases before migration 12). `hosts`: only those hosts' (None: all).
    pub async fn uncertain_batches(
        &self,
        hosts: Option<&[String]>,
    ) -> Result<Vec<((String, String, u64), Vec<String>)>> {
        #[derive(Row, Deserialize)]
        struct R {
            host: String,
            sensor_boot_id: String,
            seq: u64,
            writers: Vec<String>,
        }
        let only = host_filter(hosts);
        let rows: Vec<R> = self
            .dedup_query(&format!(
                "SELECT toString(host) AS host, sensor_boot_id, seq, groupUniqArray(writer) AS writers \
                 FROM {db}.batch_intents WHERE created > now() - 86400 {only} \
                 AND (toString(host), sensor_boot_id, seq) NOT IN \
                 (SELECT toString(host), sensor_boot_id, seq FROM {db}.batches WHERE received > now() - 90000 {only}) \
                 GROUP BY host, sensor_boot_id, seq",
                db = self.db
            ))
            .fetch_all()
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| ((r.host, r.sensor_boot_id, r.seq), r.writers))
            .collect())
    }

    /// Which of `writers` have a statement running on ClickHouse now (any server of the
    /// cluster: through a Distributed table the shards' parts of an insert carry its id
    /// as their initial query id). An insert's rows are committed before it ends, so a
    /// writer with nothing running has committed or abandoned every insert it began.
    /// A server that does not answer is skipped.
    pub async fn writers_running(
        &self,
        writers: &std::collections::HashSet<String>,
    ) -> Result<std::collections::HashSet<String>> {
        #[derive(Row, Deserialize)]
        struct P {
            query_id: String,
            initial_query_id: String,
        }
        let filter = format!(
            "WHERE query_id LIKE '{QUERY_ID_PREFIX}%' OR initial_query_id LIKE '{QUERY_ID_PREFIX}%'"
        );
        let sql = if self.cluster.is_none() {
            format!("SELECT query_id, initial_query_id FROM system.processes {filter}")
        } else {
            format!(
                "SELECT query_id, initial_query_id FROM remote('{}', system, processes{}) {filter}",
                quote(&self.cluster_addrs().await?.join(",")),
                self.remote_auth
            )
        };
        let running: Vec<P> = self
            .client
            .query(&sql)
            .with_setting("skip_unavailable_shards", "1")
            .fetch_all()
            .await
            .context("reading system.processes")?;
        Ok(running
            .iter()
            .flat_map(|p| [&p.query_id, &p.initial_query_id])
            .filter_map(|id| writer_of_query(id))
            .filter(|w| writers.contains(*w))
            .map(str::to_string)
            .collect())
    }

    /// (host, sensor boot id, seq) rows of a query selecting those three columns.
    async fn batch_keys(&self, q: &str) -> Result<Vec<(String, String, u64)>> {
        #[derive(Row, Deserialize)]
        struct R {
            host: String,
            sensor_boot_id: String,
            seq: u64,
        }
        let rows: Vec<R> = self.dedup_query(q).fetch_all().await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.host, r.sensor_boot_id, r.seq))
            .collect())
    }

    /// How many of `host`'s batches `first..=last` of sensor boot `boot` are stored.
    pub async fn stored_count(&self, host: &str, boot: &str, first: u64, last: u64) -> Result<u64> {
        let q = format!(
            "SELECT uniqExact(seq) FROM {db}.batches WHERE toString(host) = ? AND sensor_boot_id = ? \
             AND seq >= ? AND seq <= ?",
            db = self.db
        );
        let n: u64 = self
            .dedup_query(&q)
            .bind(host)
            .bind(boot)
            .bind(first)
            .bind(last)
            .fetch_one()
            .await?;
        Ok(n)
    }

    /// Records gaps reported by sensors.
    pub async fn write_gaps(&self, gaps: &[rows::GapRow<'_>]) -> Result<()> {
        self.insert::<rows::GapRow>("gaps", gaps).await
    }

    /// True when ClickHouse answers at all (tells an outage from a bad insert).
    pub async fn reachable(&self) -> bool {
        matches!(
            tokio::time::timeout(
                std::time::Duration::from_secs(5),
                self.client.query("SELECT 1").fetch_one::<u8>()
            )
            .await,
            Ok(Ok(1))
        )
    }

    /// Records alert transitions in the `alerts` table.
    pub async fn write_alerts(
        &self,
        events: &[std::sync::Arc<crate::detect::AlertEvent>],
    ) -> Result<()> {
        let rows: Vec<rows::AlertRow> = events
            .iter()
            .map(|e| rows::AlertRow {
                ts: (e.at_ms / 1000) as u32,
                alert_id: &e.id,
                rule: &e.rule,
                host: &e.host,
                state: e.state,
                severity: e.severity,
                labels: e
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(","),
                value: if e.value.is_finite() { e.value } else { 0.0 },
                threshold: e.threshold,
                score: e.score.filter(|s| s.is_finite()),
                starts_at: (e.starts_at_ms / 1000) as u32,
                ends_at: e.ends_at_ms.map(|t| (t / 1000) as u32),
            })
            .collect();
        self.insert::<rows::AlertRow>("alerts", &rows).await
    }

    /// Sequence numbers stored in the last day, to refuse duplicates after a restart
    /// (`hosts`: only those hosts', for a sensor that connects).
    pub async fn recent_batches(
        &self,
        hosts: Option<&[String]>,
    ) -> Result<Vec<(String, String, u64)>> {
        self.batch_keys(&format!(
            "SELECT toString(host) AS host, sensor_boot_id, seq FROM {}.batches WHERE received > now() - 86400 {}",
            self.db,
            host_filter(hosts)
        ))
        .await
    }

    /// The alerts of `hosts` that are firing according to the alerts table (their latest
    /// transition is "firing"; the last week), by host. One query for all of them.
    pub async fn open_alerts(
        &self,
        hosts: &[String],
    ) -> Result<HashMap<String, Vec<crate::detect::OpenAlert>>> {
        #[derive(Row, Deserialize)]
        struct A {
            host: String,
            alert_id: String,
            rule: String,
            labels: String,
            severity: String,
            starts_at: u32,
        }
        let q = format!(
            "SELECT toString(host) AS host, alert_id, any(toString(rule)) AS rule, any(labels) AS labels, toString(argMax(severity, ts)) AS severity, \
             toUInt32(min(starts_at)) AS starts_at FROM {}.alerts WHERE has(?, toString(host)) AND ts > now() - 604800 \
             GROUP BY host, alert_id HAVING countIf(state = 'firing') > 0 AND countIf(state IN ('resolved', 'cleared')) = 0",
            self.db
        );
        let rows: Vec<A> = self.client.query(&q).bind(hosts).fetch_all().await?;
        let mut out: HashMap<String, Vec<crate::detect::OpenAlert>> = HashMap::new();
        for a in rows {
            out.entry(a.host)
                .or_default()
                .push(crate::detect::OpenAlert {
                    id: a.alert_id,
                    rule: a.rule,
                    labels: a
                        .labels
                        .split(',')
                        .filter_map(|kv| kv.split_once('='))
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    severity: a.severity,
                    starts_at_ms: a.starts_at as u64 * 1000,
                });
        }
        Ok(out)
    }

    /// When each of `hosts` last had a batch stored (by any aggregator), in seconds.
    pub async fn last_received(&self, hosts: &[String]) -> Result<HashMap<String, u64>> {
        #[derive(Row, Deserialize)]
        struct R {
            host: String,
            last: u32,
        }
        let q = format!(
            "SELECT toString(host) AS host, toUInt32(max(received)) AS last FROM {}.batches \
             WHERE received > now() - 3600 {} GROUP BY host",
            self.db,
            host_filter(Some(hosts))
        );
        let rows: Vec<R> = self.dedup_query(&q).fetch_all().await?;
        Ok(rows.into_iter().map(|r| (r.host, r.last as u64)).collect())
    }

    /// First-seen time per host.
    pub async fn first_seen(&self) -> Result<HashMap<String, u32>> {
        #[derive(Row, Deserialize)]
        struct R {
            host: String,
            first: u32,
        }
        let q = format!(
            "SELECT host, toUInt32(min(first_seen)) AS first FROM {}.hosts GROUP BY host",
            self.db
        );
        let rows: Vec<R> = self.client.query(&q).fetch_all().await?;
        Ok(rows.into_iter().map(|r| (r.host, r.first)).collect())
    }

    /// Active partitions of the given tables: (table, partition as printed).
    async fn partitions(&self, tables: &[String]) -> Result<Vec<(String, String)>> {
        #[derive(Row, Deserialize)]
        struct P {
            table: String,
            partition: String,
        }
        if tables.is_empty() {
            return Ok(Vec::new());
        }
        // On a cluster: the parts of this server's `T_local` tables (every shard has a
        // day's partition as soon as one of its hosts wrote that day).
        let local: Vec<String> = tables.iter().map(|t| self.local_name(t)).collect();
        let q = "SELECT DISTINCT table, partition FROM system.parts WHERE database = ? AND active \
             AND has(?, table) ORDER BY table, partition";
        let parts: Vec<P> = self
            .client
            .query(q)
            .bind(&self.db)
            .bind(&local)
            .fetch_all()
            .await
            .context("listing partitions")?;
        let cluster = self.cluster.is_some();
        Ok(parts
            .into_iter()
            .map(|p| {
                let t = if cluster {
                    p.table
                        .strip_suffix("_local")
                        .unwrap_or(&p.table)
                        .to_string()
                } else {
                    p.table
                };
                (t, p.partition)
            })
            .collect())
    }

    /// The tier backfill copies: (raw table, tier, `<table>_backfill_<tier>`).
    fn backfill_copies() -> Vec<(&'static protocol::tables::TableDef, tiers::Tier, String)> {
        tiers::tier_tables()
            .map(|(t, tier, _)| (t, tier, format!("{}_backfill_{}", t.name, tier.name)))
            .collect()
    }

    /// Copies every raw table that gets tiers into `<table>_backfill_<tier>`, one copy per
    /// tier (partition by partition, as hard links: instant, no extra space).
    /// [`Store::backfill_tiers`] aggregates the copies into the tiers in the background.
    async fn snapshot_for_backfill(&self) -> Result<()> {
        if self.cluster.is_some() {
            tracing::warn!("rollup tiers: on a cluster, rows stored before the tiers existed are not backfilled (a cluster created by this release has none)");
            return Ok(());
        }
        let raw: Vec<String> = protocol::TABLES
            .iter()
            .filter(|t| t.rolled_up())
            .map(|t| t.name.to_string())
            .collect();
        let parts = self.partitions(&raw).await?;
        let db = &self.db;
        for (t, _, copy) in Self::backfill_copies() {
            let t = t.name;
            let mine: Vec<&String> = parts
                .iter()
                .filter(|(pt, _)| pt == t)
                .map(|(_, p)| p)
                .collect();
            if mine.is_empty() {
                continue;
            }
            self.client
                .query(&format!(
                    "CREATE TABLE IF NOT EXISTS {db}.{copy} AS {db}.{t}"
                ))
                .execute()
                .await
                .with_context(|| format!("creating {copy}"))?;
            for p in &mine {
                self.client
                    .query(&format!(
                        "ALTER TABLE {db}.{copy} REPLACE PARTITION '{p}' FROM {db}.{t}"
                    ))
                    .execute()
                    .await
                    .with_context(|| {
                        format!("copying partition {p} of {t} for the tier backfill")
                    })?;
            }
            tracing::info!(table = %t, %copy, days = mine.len(), "rollup tiers: raw rows kept aside for the backfill");
        }
        Ok(())
    }

    /// Fills the tiers from the raw rows stored before they existed (the copies made by
    /// migration 6), one day of one table and tier at a time, logging progress; ingest
    /// goes on meanwhile (new rows reach the tiers through their views). A day leaves its
    /// copy as soon as its tier rows are written, so a restart resumes where this
    /// stopped (only a crash between that insert and that drop would count the day
    /// twice in that tier). Returns the raw rows aggregated.
    pub async fn backfill_tiers(&self) -> Result<u64> {
        let copies = Self::backfill_copies();
        let names: Vec<String> = copies.iter().map(|c| c.2.clone()).collect();
        let present: Vec<String> = self
            .client
            .query("SELECT name FROM system.tables WHERE database = ? AND has(?, name)")
            .bind(&self.db)
            .bind(&names)
            .fetch_all()
            .await
            .context("looking for tier backfill copies")?;
        if present.is_empty() {
            return Ok(0);
        }
        let parts = self.partitions(&present).await?;
        let total = parts.len();
        tracing::info!(
            copies = present.len(),
            chunks = total,
            "rollup tiers: backfilling from raw rows stored before the tiers existed"
        );
        let started = std::time::Instant::now();
        let mut rows_done = 0u64;
        let db = &self.db;
        let ddl = self.ddl();
        for (i, (copy, p)) in parts.iter().enumerate() {
            let (t, tier, _) = copies.iter().find(|c| c.2 == *copy).expect("a known copy");
            let filter = format!("toDate(ts) = toDate('{p}')");
            let rows: u64 = self
                .client
                .query(&format!("SELECT count() FROM {db}.{copy} WHERE {filter}"))
                .fetch_one()
                .await?;
            let sql = format!(
                "INSERT INTO {db}.{}_{}_agg ({}) {}",
                t.name,
                tier.name,
                ddl.tier_columns(t, SCHEMA_VERSION),
                ddl.tier_select(t, tier, SCHEMA_VERSION, copy, &filter)
            );
            self.client
                .query(&sql)
                .execute()
                .await
                .with_context(|| format!("tier backfill of {} {p} into {}", t.name, tier.name))?;
            self.client
                .query(&format!("ALTER TABLE {db}.{copy} DROP PARTITION '{p}'"))
                .execute()
                .await?;
            rows_done += rows;
            tracing::info!(
                table = t.name,
                tier = tier.name,
                day = %p,
                rows,
                progress = format!("{}/{total}", i + 1),
                elapsed_s = started.elapsed().as_secs(),
                "rollup tiers: backfilled"
            );
        }
        for copy in &present {
            self.client
                .query(&format!("DROP TABLE IF EXISTS {db}.{copy}"))
                .execute()
                .await?;
        }
        tracing::info!(
            raw_rows = rows_done,
            chunks = total,
            secs = started.elapsed().as_secs(),
            "rollup tiers: backfill done"
        );
        Ok(rows_done)
    }

    /// Every table with a retention: (table, time column, days, monthly partitions).
    fn retained_tables(&self) -> Vec<(String, &'static str, u32, bool)> {
        let mut v: Vec<(String, &'static str, u32, bool)> = schema::partitioned_tables()
            .map(|t| {
                let col = match t {
                    "batches" => "received",
                    "gaps" => "from_ts",
                    "batch_intents" => "created",
                    _ => "ts",
                };
                (t.to_string(), col, self.retention_days, false)
            })
            .collect();
        let ddl = self.ddl();
        for (_, tier, name) in tiers::tier_tables() {
            v.push((name, "bucket", ddl.tier_days(&tier), tier.monthly()));
        }
        v
    }

    /// On current servers, makes each table's TTL what the configuration says (a changed
    /// retention applies on the next start; ClickHouse rewrites the parts it affects).
    async fn apply_ttl(&self) -> Result<()> {
        if !self.modern {
            return Ok(());
        }
        #[derive(Row, Deserialize)]
        struct T {
            name: String,
            engine_full: String,
        }
        let have: Vec<T> = self
            .client
            .query("SELECT name, engine_full FROM system.tables WHERE database = ?")
            .bind(&self.db)
            .fetch_all()
            .await
            .context("reading table TTLs")?;
        for (table, col, days, _) in self.retained_tables() {
            let local = self.local_name(&table);
            let Some(t) = have.iter().find(|t| t.name == local) else {
                continue;
            };
            let current = ttl_days(&t.engine_full);
            if current == days {
                continue;
            }
            let sql = if days == 0 {
                format!("ALTER TABLE {}.{table} REMOVE TTL", self.db)
            } else {
                format!(
                    "ALTER TABLE {}.{table} MODIFY TTL {col} + INTERVAL {days} DAY",
                    self.db
                )
            };
            tracing::info!(%table, from_days = current, to_days = days, "retention changed: applying the new TTL");
            self.exec_ddl(&sql)
                .await
                .with_context(|| format!("changing the retention of {table}"))?;
        }
        Ok(())
    }

    /// Retention on servers without TTL: drop day (or, for the 1-hour tier, month)
    /// partitions wholly older than each table's limit.
    pub async fn drop_old_partitions(&self) -> Result<usize> {
        if self.modern {
            return Ok(0);
        }
        let tables = self.retained_tables();
        let names: Vec<String> = tables
            .iter()
            .filter(|t| t.2 > 0)
            .map(|t| t.0.clone())
            .collect();
        let today = (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            / 86400) as i64;
        struct P {
            table: String,
            partition: String,
        }
        let parts: Vec<P> = self
            .partitions(&names)
            .await?
            .into_iter()
            .filter(|(t, p)| {
                let (_, _, days, monthly) = tables.iter().find(|x| &x.0 == t).unwrap();
                partition_expired(p, *monthly, *days, today)
            })
            .map(|(table, partition)| P { table, partition })
            .collect();
        for p in &parts {
            tracing::info!(table = %p.table, partition = %p.partition, "retention: dropping partition");
            self.exec_ddl(&format!(
                "ALTER TABLE {}.{} DROP PARTITION {}",
                self.db,
                p.table,
                partition_literal(&p.partition)
            ))
            .await?;
        }
        Ok(parts.len())
    }
}

/// `, 'user', 'password'` for `remote()` (empty without a user).
fn remote_auth(cfg: &ClickHouseConfig) -> String {
    if cfg.user.is_empty() {
        String::new()
    } else {
        format!(", '{}', '{}'", quote(&cfg.user), quote(&cfg.password))
    }
}

/// `s` escaped for a ClickHouse string literal (between single quotes).
fn quote(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\'', "\\'")
}

/// `AND host IN (...)` for the given hosts (quoted as ClickHouse string literals), or
/// nothing. Host names come from verified certificates, but are quoted all the same.
fn host_filter(hosts: Option<&[String]>) -> String {
    match hosts {
        None => String::new(),
        Some([]) => "AND 0".to_string(),
        Some(hs) => {
            let list: Vec<String> = hs
                .iter()
                .map(|h| format!("'{}'", h.replace('\\', "\\\\").replace('\'', "\\'")))
                .collect();
            format!("AND toString(host) IN ({})", list.join(", "))
        }
    }
}

/// Which (host, sensor boot, sequence) have been stored: everything at or
/// below `floor`, plus the set above it. Sequences arrive nearly in order,
/// so the set stays small.
#[derive(Default)]
pub struct SeqWindow {
    floor: u64,
    above: BTreeSet<u64>,
}

const MAX_ABOVE: usize = 100_000;

impl SeqWindow {
    pub fn contains(&self, seq: u64) -> bool {
        seq <= self.floor || self.above.contains(&seq)
    }

    pub fn insert(&mut self, seq: u64) {
        if seq <= self.floor {
            return;
        }
        self.above.insert(seq);
        while self.above.remove(&(self.floor + 1)) {
            self.floor += 1;
        }
        // A sensor that lost batches for good leaves a hole; past a bound,
        // give up on the hole rather than grow without limit.
        while self.above.len() > MAX_ABOVE {
            let first = self.above.pop_first().unwrap();
            self.floor = first;
            while self.above.remove(&(self.floor + 1)) {
                self.floor += 1;
            }
        }
    }
}

#[derive(Default)]
pub struct Dedup {
    /// host -> sensor boot id -> stored sequence numbers.
    map: HashMap<String, HashMap<String, SeqWindow>>,
}

impl Dedup {
    pub fn seen(&self, host: &str, boot: &str, seq: u64) -> bool {
        self.map
            .get(host)
            .and_then(|b| b.get(boot))
            .is_some_and(|w| w.contains(seq))
    }

    pub fn insert(&mut self, host: &str, boot: &str, seq: u64) {
        let boots = match self.map.get_mut(host) {
            Some(b) => b,
            None => self.map.entry(host.to_string()).or_default(),
        };
        match boots.get_mut(boot) {
            Some(w) => w.insert(seq),
            None => boots.entry(boot.to_string()).or_default().insert(seq),
        }
    }
}

/// The retention in days of a table's TTL as `system.tables.engine_full` prints it
/// (`… TTL ts + toIntervalDay(30) SETTINGS …`); 0 without one.
fn ttl_days(engine_full: &str) -> u32 {
    engine_full
        .split(" TTL ")
        .nth(1)
        .and_then(|x| x.split("toIntervalDay(").nth(1))
        .and_then(|x| x.split(')').next())
        .and_then(|x| x.trim().parse::<u32>().ok())
        .unwrap_or(0)
}

/// A partition value as SQL: a month (`toYYYYMM`, a number) bare, a day quoted.
fn partition_literal(p: &str) -> String {
    if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) {
        p.to_string()
    } else {
        format!("'{}'", p.replace(['\\', '\''], ""))
    }
}

/// Days since 1970-01-01 of a civil date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// Whether every row of a partition (`YYYY-MM-DD` day, or `YYYYMM` month) is older than
/// `days` before `today` (days since the epoch). Unknown names are kept.
fn partition_expired(p: &str, monthly: bool, days: u32, today: i64) -> bool {
    if days == 0 {
        return false;
    }
    let num = |s: &str| s.parse::<i64>().ok();
    // First day after the partition.
    let end = if monthly {
        match (p.get(0..4).and_then(num), p.get(4..6).and_then(num)) {
            (Some(y), Some(m)) if p.len() == 6 => {
                if m == 12 {
                    days_from_civil(y + 1, 1, 1)
                } else {
                    days_from_civil(y, m + 1, 1)
                }
            }
            _ => return false,
        }
    } else {
        let f: Vec<Option<i64>> = p.split('-').map(num).collect();
        match f.as_slice() {
            [Some(y), Some(m), Some(d)] => days_from_civil(*y, *m, *d) + 1,
            _ => return false,
        }
    };
    end <= today - days as i64
}

#[cfg(test)]
mod tests {
    #[test]
    fn query_ids_name_their_writer() {
        let id = super::query_id();
        assert_eq!(super::writer_of_query(&id), Some(super::writer_id()));
        assert_ne!(super::query_id(), id, "each statement its own id");
        assert_eq!(
            super::writer_of_query("sonde-w:host-1-ab:cd-12:7"),
            Some("host-1-ab:cd-12")
        );
        assert_eq!(super::writer_of_query("3f1c-other-client"), None);
    }

    use super::*;

    /// The client closes a connection left idle (an 18.16 server waits for a connection's
    /// next request before it exits, so one kept open held a managed server's shutdown until
    /// it was killed). A plain HTTP server on loopback answers one statement, then waits for
    /// the client to hang up while the client is still alive.
    #[test]
    fn an_idle_connection_is_closed_by_the_client() {
        use std::time::Duration;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let server = tokio::spawn(async move {
                let (mut sock, _) = listener.accept().await.unwrap();
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = sock.read(&mut buf).await.unwrap();
                    assert!(n > 0, "the client hung up before its request was read");
                    seen.extend_from_slice(&buf[..n]);
                }
                sock.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                    .await
                    .unwrap();
                let answered = tokio::time::Instant::now();
                // Read until the client closes; a body or a second request is not expected.
                loop {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return answered.elapsed(),
                        Ok(_) => {}
                    }
                }
            });
            let c = client(&url, &ClickHouseConfig::default());
            c.query("SELECT 1").execute().await.unwrap();
            let idle = tokio::time::timeout(Duration::from_secs(10), server)
                .await
                .expect("the connection was still open 10 s after its last answer")
                .unwrap();
            assert!(
                idle >= Duration::from_millis(1500),
                "closed {idle:?} after its answer, before the 2 s idle timeout"
            );
            drop(c);
        });
    }

    #[test]
    fn ttl_days_read_from_engine_full() {
        // As ClickHouse 26.9 prints them (chdb), before and after ALTER … MODIFY/REMOVE TTL.
        assert_eq!(ttl_days("MergeTree PARTITION BY toDate(ts) ORDER BY ts TTL ts + toIntervalDay(30) SETTINGS index_granularity = 8192"), 30);
        assert_eq!(ttl_days("AggregatingMergeTree PARTITION BY toYYYYMM(bucket) ORDER BY (host, bucket) TTL bucket + toIntervalDay(730) SETTINGS index_granularity = 8192"), 730);
        assert_eq!(
            ttl_days(
                "MergeTree PARTITION BY toDate(ts) ORDER BY ts SETTINGS index_granularity = 8192"
            ),
            0
        );
    }

    #[test]
    fn partitions_expire_whole() {
        let today = days_from_civil(2026, 11, 30);
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        // Day partitions: 30 days kept means 2026-10-31 and later stay.
        assert!(partition_expired("2026-10-30", false, 30, today));
        assert!(!partition_expired("2026-10-31", false, 30, today));
        // Month partitions go only when their last day is past the limit.
        // September's last day is 61 days back.
        assert!(partition_expired("202609", true, 60, today));
        assert!(!partition_expired("202609", true, 61, today));
        assert!(!partition_expired("202610", true, 40, today));
        assert!(!partition_expired("202612", true, 730, today));
        assert!(partition_expired("202410", true, 730, today));
        assert!(!partition_expired("202411", true, 730, today));
        assert!(!partition_expired("garbage", false, 1, today));
        assert!(!partition_expired("2020-01-01", false, 0, today));
    }

    #[test]
    fn seq_window() {
        let mut w = SeqWindow::default();
        assert!(!w.contains(1));
        w.insert(2);
        assert!(w.contains(2) && !w.contains(1) && !w.contains(3));
        w.insert(1);
        assert_eq!(w.floor, 2);
        assert!(w.above.is_empty());
        w.insert(5);
        assert!(w.contains(5) && !w.contains(4));
        w.insert(1);
        assert!(w.contains(1));
    }

    #[test]
    fn dedup_keys_are_per_boot() {
        let mut d = Dedup::default();
        d.insert("h", "boot1", 1);
        assert!(d.seen("h", "boot1", 1));
        assert!(!d.seen("h", "boot2", 1));
        assert!(!d.seen("g", "boot1", 1));
    }
}
