//! Schema changes coordinated between aggregators that share a database (a cluster, or
//! one server behind several aggregators).
//!
//! **The lock.** An aggregator with migrations to apply first creates the table
//! `DB.schema_lock_gN` (on a cluster `ON CLUSTER`, replicated on every server). Creating a
//! table whose name exists fails, and a cluster's DDL queue runs its entries in one order
//! on every server, so of two aggregators creating the same generation one succeeds and
//! the other gets "already exists": the winner migrates, the other waits (its start is
//! retried every 2 s) and then finds the migrations applied. The holder writes a beat
//! into the table every 5 s; a lock silent for [`STALE_AFTER_S`] (its holder died) is
//! taken over by creating generation N+1, which only one aggregator can do, and dropping
//! N. Before each statement the holder checks that its generation is still the newest,
//! so a holder that was taken over stops.
//!
//! **The fence.** Every running aggregator polls for a live lock every second
//! ([`FENCE_POLL`]) and, while one exists, starts no insert attempt: the rows of a round
//! cannot land between a migration's `DROP VIEW` and its `CREATE MATERIALIZED VIEW` and
//! miss a tier. The holder waits [`FENCE_GRACE`] after taking the lock, so that attempts
//! already running finish first. Held batches stay queued (sensors spool), as during a
//! ClickHouse outage.

use super::Store;
use anyhow::{bail, Context, Result};
use clickhouse::Row;
use serde::Deserialize;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

pub const PREFIX: &str = "schema_lock_g";
/// A lock whose newest beat is older than this is its dead holder's: taken over.
pub const STALE_AFTER_S: u32 = 60;
const BEAT: Duration = Duration::from_secs(5);
/// How often a running aggregator looks for a live lock.
pub const FENCE_POLL: Duration = Duration::from_secs(1);
/// How long the holder waits after taking the lock before its first statement: a fence
/// poll, plus an insert attempt that started before the lock (measured rounds: under
/// 2 s on one server at 3 M samples/s, up to about 5 s on the local cluster).
pub const FENCE_GRACE: Duration = Duration::from_secs(10);

/// One lock table as read from the server: its generation, its holder (empty before the
/// first beat) and the seconds since its newest beat (before the first beat: since the
/// table was created).
#[derive(Debug, Clone, PartialEq)]
pub struct LockState {
    pub gen: u32,
    pub holder: String,
    pub age_s: u32,
}

#[derive(Debug, PartialEq)]
pub enum Decision {
    /// No lock: create generation N.
    Take(u32),
    /// A live lock: wait for its holder.
    Wait(LockState),
    /// The newest lock is stale: take generation N+1 over it.
    Break { stale: LockState, take: u32 },
}

/// What an aggregator that wants to migrate does, given the lock tables it sees.
pub fn decide(locks: &[LockState], stale_after_s: u32) -> Decision {
    match locks.iter().max_by_key(|l| l.gen) {
        None => Decision::Take(1),
        Some(l) if l.age_s < stale_after_s => Decision::Wait(l.clone()),
        Some(l) => Decision::Break {
            stale: l.clone(),
            take: l.gen + 1,
        },
    }
}

/// The generation in a lock table's name (`schema_lock_g12` → 12).
pub fn generation(table: &str) -> Option<u32> {
    table.strip_prefix(PREFIX)?.parse().ok()
}

/// The lock tables of the store's database, each with its holder and age.
pub async fn read(store: &Store) -> Result<Vec<LockState>> {
    #[derive(Row, Deserialize)]
    struct T {
        name: String,
        age: u32,
    }
    // `_` in LIKE matches any character: the name is parsed after.
    let tables: Vec<T> = store
        .client
        .query("SELECT name, toUInt32(greatest(toInt64(now()) - toInt64(metadata_modification_time), 0)) AS age FROM system.tables WHERE database = ? AND name LIKE 'schema_lock_g%'")
        .bind(&store.db)
        .fetch_all()
        .await
        .context("reading the schema lock tables")?;
    let mut out = Vec::new();
    for t in tables {
        let Some(gen) = generation(&t.name) else {
            continue;
        };
        #[derive(Row, Deserialize)]
        struct B {
            holder: String,
            beats: u64,
            age: u32,
        }
        let beat: Result<B, _> = store
            .client
            .query(&format!(
                "SELECT argMax(holder, beat) AS holder, count() AS beats, toUInt32(greatest(toInt64(now()) - toInt64(max(beat)), 0)) AS age FROM {}.{}",
                store.db, t.name
            ))
            .fetch_one()
            .await;
        match beat {
            Ok(b) => out.push(LockState {
                gen,
                holder: b.holder,
                // Before its first beat (written right after the table), the table's age.
                age_s: if b.beats == 0 { t.age } else { b.age },
            }),
            // Dropped between the two reads: released.
            Err(e) if format!("{e:#}").contains("doesn't exist") => {}
            Err(e) => return Err(e).context("reading a schema lock's beat"),
        }
    }
    Ok(out)
}

/// The lock, held: dropped by [`MigrationLock::release`].
pub struct MigrationLock {
    pub gen: u32,
    table: String,
    on: String,
    beat: tokio::task::JoinHandle<()>,
}

impl MigrationLock {
    /// Takes the lock, or fails with what holds it (the caller retries).
    pub async fn acquire(store: &Store, holder: &str) -> Result<MigrationLock> {
        let locks = read(store).await?;
        let take = match decide(&locks, STALE_AFTER_S) {
            Decision::Wait(l) => bail!(
                "another aggregator{} is changing the schema (lock {}.{PREFIX}{}, last heard from {} s ago); waiting for it (a lock silent for {STALE_AFTER_S} s is taken over)",
                if l.holder.is_empty() { String::new() } else { format!(" ({})", l.holder) },
                store.db,
                l.gen,
                l.age_s
            ),
            Decision::Take(g) => g,
            Decision::Break { stale, take } => {
                tracing::warn!(
                    holder = %stale.holder,
                    generation = stale.gen,
                    silent_s = stale.age_s,
                    "schema lock: its holder has been silent for more than {STALE_AFTER_S} s; taking it over"
                );
                take
            }
        };
        let table = format!("{}.{PREFIX}{take}", store.db);
        let (on, engine) = match &store.cluster {
            None => (String::new(), "MergeTree()".to_string()),
            // A ZooKeeper path of its own per holder: a path left by a drop that did not
            // reach every server cannot make a later lock fail.
            Some(c) => (
                format!(" ON CLUSTER {c}"),
                format!(
                    "ReplicatedMergeTree('/clickhouse/tables/all/{}/{PREFIX}{take}_{}', '{{replica}}')",
                    store.db,
                    holder.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
                ),
            ),
        };
        store
            .client
            .query(&format!(
                "CREATE TABLE {table}{on} (`holder` String, `beat` DateTime) ENGINE = {engine} ORDER BY beat"
            ))
            .execute()
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "another aggregator took the schema lock {table} first; waiting for its migration ({})",
                    format!("{e:#}").lines().next().unwrap_or("")
                )
            })?;
        beat_once(store, &table, holder).await?;
        // Older generations are dead holders' locks (this one superseded them).
        for l in locks.iter().filter(|l| l.gen < take) {
            let _ = store
                .client
                .query(&format!(
                    "DROP TABLE IF EXISTS {}.{PREFIX}{}{on}",
                    store.db, l.gen
                ))
                .execute()
                .await;
        }
        tracing::info!(lock = %table, %holder, "schema lock taken");
        let (s, t, h) = (store.clone(), table.clone(), holder.to_string());
        let beat = tokio::spawn(async move {
            loop {
                tokio::time::sleep(BEAT).await;
                if let Err(e) = beat_once(&s, &t, &h).await {
                    tracing::warn!(error = %e, lock = %t, "schema lock: cannot write a beat");
                }
            }
        });
        Ok(MigrationLock {
            gen: take,
            table,
            on,
            beat,
        })
    }

    /// Fails when another aggregator took the lock over (this holder was silent too long).
    pub async fn check(&self, store: &Store) -> Result<()> {
        let locks = read(store).await?;
        let newest = locks.iter().map(|l| l.gen).max();
        if newest != Some(self.gen) {
            bail!(
                "the schema lock {} was taken over by another aggregator (newest generation {:?}); stopping this migration",
                self.table,
                newest
            );
        }
        Ok(())
    }

    pub async fn release(self, store: &Store) {
        self.beat.abort();
        match store
            .client
            .query(&format!("DROP TABLE IF EXISTS {}{}", self.table, self.on))
            .execute()
            .await
        {
            Ok(()) => tracing::info!(lock = %self.table, "schema lock released"),
            Err(e) => {
                tracing::warn!(error = %e, lock = %self.table, "cannot drop the schema lock; it is taken over when stale ({STALE_AFTER_S} s)")
            }
        }
    }
}

async fn beat_once(store: &Store, table: &str, holder: &str) -> Result<()> {
    store
        .client
        .query(&format!("INSERT INTO {table} SELECT ?, now()"))
        .bind(holder)
        .execute()
        .await
        .with_context(|| format!("writing a beat into {table}"))
}

/// Keeps `fenced` true while another aggregator holds a live lock (polled every
/// [`FENCE_POLL`]). A failed read leaves the flag as it was: an unreachable server fails
/// the inserts anyway.
pub async fn watch(store: Store, fenced: Arc<AtomicBool>) {
    loop {
        if let Ok(locks) = read(&store).await {
            let live = locks.iter().find(|l| l.age_s < STALE_AFTER_S);
            let was = fenced.swap(live.is_some(), Relaxed);
            match (was, live) {
                (false, Some(l)) => tracing::warn!(
                    holder = %l.holder,
                    generation = l.gen,
                    "another aggregator is changing the schema: holding inserts until it is done (sensors spool meanwhile)"
                ),
                (true, None) => tracing::info!("schema change done: inserts resume"),
                _ => {}
            }
        }
        tokio::time::sleep(FENCE_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(gen: u32, age_s: u32) -> LockState {
        LockState {
            gen,
            holder: format!("h{gen}"),
            age_s,
        }
    }

    #[test]
    fn decisions() {
        assert_eq!(decide(&[], 60), Decision::Take(1));
        assert_eq!(decide(&[l(3, 5)], 60), Decision::Wait(l(3, 5)));
        assert_eq!(
            decide(&[l(3, 61)], 60),
            Decision::Break {
                stale: l(3, 61),
                take: 4
            }
        );
        // Only the newest generation counts: an old one left behind is garbage.
        assert_eq!(decide(&[l(2, 500), l(3, 1)], 60), Decision::Wait(l(3, 1)));
        assert_eq!(
            decide(&[l(3, 500), l(2, 1)], 60),
            Decision::Break {
                stale: l(3, 500),
                take: 4
            }
        );
        // Exactly at the limit: stale.
        assert!(matches!(decide(&[l(1, 60)], 60), Decision::Break { .. }));
    }

    #[test]
    fn generations() {
        assert_eq!(generation("schema_lock_g1"), Some(1));
        assert_eq!(generation("schema_lock_g12"), Some(12));
        assert_eq!(generation("schema_lockxg1"), None);
        assert_eq!(generation("schema_lock_g"), None);
        assert_eq!(generation("schema_lock_g1_local"), None);
    }
}
