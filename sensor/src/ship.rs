//! Batching and delivery: snapshots are encoded into a growing buffer,
//! closed into compressed batch frames, held in the spool until the
//! aggregator acknowledges them, and (re)sent over QUIC with reconnects and
//! failover between aggregator addresses.

use crate::config::Config;
use crate::spool::{Kind, Meta, Spool as Outbox};
use protocol::{encode_batch_parts, BatchParts, HostInfo, Snapshot};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Batcher {
    snaps: Vec<u8>,
    scratch: Vec<u8>,
    count: u64,
    samples: u64,
    opened: Option<Instant>,
    first_ms: u64,
    last_ms: u64,
    next_seq: u64,
    boot_id: String,
    info: HostInfo,
    level: i32,
    max_age: Duration,
    max_bytes: usize,
    /// batch_interval / interval: a 5 s batch at 1 s holds 5 snapshots.
    per_batch: u64,
    /// Every this many batches carry the host facts.
    info_every: u64,
}

pub struct Closed {
    pub seq: u64,
    pub frame: Vec<u8>,
    pub samples: u64,
    pub from_ms: u64,
    pub to_ms: u64,
}

impl Closed {
    pub fn meta(&self, boot_id: &str) -> Meta {
        Meta {
            kind: Kind::Batch,
            boot_id: boot_id.to_string(),
            first_seq: self.seq,
            last_seq: self.seq,
            from_ms: self.from_ms,
            to_ms: self.to_ms,
            batches: 1,
            samples: self.samples,
        }
    }
}

impl Batcher {
    pub fn new(cfg: &Config, info: HostInfo, boot_id: String) -> Self {
        Batcher {
            snaps: Vec::with_capacity(cfg.batch_max_bytes + 4096),
            scratch: Vec::with_capacity(cfg.batch_max_bytes + 8192),
            count: 0,
            samples: 0,
            opened: None,
            first_ms: 0,
            last_ms: 0,
            next_seq: 1,
            boot_id,
            info,
            level: cfg.zstd_level,
            max_age: cfg.batch_interval,
            max_bytes: cfg.batch_max_bytes,
            per_batch: (cfg.batch_interval.as_secs_f64() / cfg.interval.as_secs_f64())
                .round()
                .max(1.0) as u64,
            info_every: (60.0 / cfg.batch_interval.as_secs_f64()).round().max(1.0) as u64,
        }
    }

    pub fn push(&mut self, s: &Snapshot) {
        use protocol::Encode;
        s.encode(&mut self.snaps);
        if self.count == 0 {
            self.first_ms = s.ts_ms;
        }
        self.last_ms = s.ts_ms;
        self.count += 1;
        self.samples += s.sample_count();
        self.opened.get_or_insert_with(Instant::now);
    }

    /// True once the open batch holds a batch interval's worth of snapshots,
    /// is big enough, or is older than the batch interval (collections were skipped).
    /// No snapshot in the batch being built yet.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn due(&self, now: Instant) -> bool {
        self.count >= self.per_batch
            || self.snaps.len() >= self.max_bytes
            || self.opened.is_some_and(|o| now >= o + self.max_age)
    }

    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    pub fn close(&mut self) -> Option<Closed> {
        if self.count == 0 {
            return None;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        // Host facts change rarely: the first batch, then about one a minute, carry them.
        let info = (self.info_every == 1 || seq % self.info_every == 1).then_some(&self.info);
        let parts = BatchParts {
            host: &self.info.hostname,
            boot_id: &self.boot_id,
            seq,
            info,
        };
        let frame = encode_batch_parts(
            &parts,
            self.count,
            &self.snaps,
            self.level,
            &mut self.scratch,
        );
        let samples = self.samples;
        self.snaps.clear();
        self.count = 0;
        self.samples = 0;
        self.opened = None;
        Some(Closed {
            seq,
            frame,
            samples,
            from_ms: self.first_ms,
            to_ms: self.last_ms,
        })
    }
}

enum SendError {
    Rejected(String),
    Connection(String),
}

/// The wire version the aggregator chose for this connection (ALPN `sonde/N`); this
/// build's when it chose none.
fn negotiated_version(conn: &quinn::Connection) -> u8 {
    conn.handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol)
        .and_then(|p| {
            std::str::from_utf8(&p)
                .ok()?
                .strip_prefix("sonde/")?
                .parse::<u8>()
                .ok()
        })
        .filter(|v| (protocol::MIN_VERSION..=protocol::VERSION).contains(v))
        .unwrap_or(protocol::VERSION)
}

async fn send_one(
    conn: quinn::Connection,
    frame: Arc<Vec<u8>>,
    version: u8,
) -> Result<(), SendError> {
    let c = |e: &dyn std::fmt::Display| SendError::Connection(e.to_string());
    // A batch written in a newer version than the aggregator reads is rewritten in the
    // version it reads; spooled frames stay as they were written.
    let is_batch = frame.get(5) == Some(&(protocol::FrameKind::Batch as u8));
    let frame = if is_batch && version < frame.get(4).copied().unwrap_or(0) {
        match protocol::downgrade_batch_frame_to(&frame, version, &protocol::Limits::default()) {
            Ok(f) => Arc::new(f),
            Err(e) => {
                tracing::warn!(error = %e, version, "cannot rewrite a spooled batch in the aggregator's version; sending it as written");
                frame
            }
        }
    } else {
        frame
    };
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| c(&e))?;
    send.write_all(&frame).await.map_err(|e| c(&e))?;
    send.finish().map_err(|e| c(&e))?;
    let reply = recv.read_to_end(4096).await.map_err(|e| c(&e))?;
    match protocol::decode_ack(&reply) {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((_, msg))) => Err(SendError::Rejected(msg)),
        Err(e) => Err(SendError::Connection(format!(
            "unreadable reply from aggregator: {e}"
        ))),
    }
}

/// The aggregator addresses in the order this host prefers them: rendezvous (highest
/// random weight) hashing of (host, address). Every host of a fleet ranks the same list
/// differently, so load spreads evenly; when an aggregator is added or lost only the hosts
/// that rank it first (1/N of them) move, and a lost aggregator's hosts spread over the
/// others by their second choice.
pub fn preference(host: &str, addrs: &[String]) -> Vec<String> {
    let mut v: Vec<(u64, &String)> = addrs.iter().map(|a| (weight(host, a), a)).collect();
    v.sort_by(|x, y| y.0.cmp(&x.0).then_with(|| x.1.cmp(y.1)));
    v.into_iter().map(|(_, a)| a.clone()).collect()
}

/// A stable 64-bit hash of (host, address): FNV-1a then a SplitMix64 finalizer (the same
/// on every build and machine, unlike std's hasher).
fn weight(host: &str, addr: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in host.bytes().chain([0u8]).chain(addr.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// While connected to an aggregator other than the preferred one, how often the preferred
/// one is tried again (the host moves back once it answers).
const FAILBACK_EVERY: Duration = Duration::from_secs(30);

/// Keeps a connection to one of the aggregators and drains the outbox into it: the
/// preferred one (see [`preference`]), else the next that answers, moving back to the
/// preferred one when it returns.
pub async fn run(
    cfg: Arc<Config>,
    client_cfg: quinn::ClientConfig,
    outbox: Arc<Outbox>,
    host: String,
) -> anyhow::Result<()> {
    let mut endpoint = quinn::Endpoint::client("[::]:0".parse().unwrap())
        .or_else(|_| quinn::Endpoint::client("0.0.0.0:0".parse().unwrap()))?;
    endpoint.set_default_client_config(client_cfg);
    let order = preference(&host, &cfg.aggregator);
    if order.len() > 1 {
        tracing::info!(%host, order = ?order, "aggregators in this host's order of preference");
    }
    let mut backoff = Duration::from_millis(100);
    let mut idx = 0usize;
    // A connection already made to the preferred aggregator by the failback check.
    let mut ready: Option<quinn::Connection> = None;
    loop {
        let i = idx % order.len();
        let addr_s = &order[i];
        let conn = match ready.take() {
            Some(c) => Ok(c),
            None => connect(&endpoint, addr_s, &cfg.server_name).await,
        };
        match conn {
            Ok(conn) => {
                tracing::info!(aggregator = %addr_s, preferred = i == 0, pending = outbox.len(), pending_bytes = outbox.bytes(), "connected");
                let v = negotiated_version(&conn);
                if v == 1 {
                    tracing::warn!(aggregator = %addr_s, "the aggregator reads wire version 1 (an older release): batches are sent as version 1, without the columns and tables added since; upgrade the aggregator");
                } else if v < protocol::VERSION {
                    tracing::warn!(aggregator = %addr_s, version = v, "the aggregator reads an older wire version (an older release): batches are rewritten in it, row by row (larger on the wire); upgrade the aggregator");
                }
                backoff = Duration::from_millis(100);
                let failback =
                    (i != 0).then(|| (&endpoint, order[0].as_str(), cfg.server_name.as_str()));
                let (reason, back) = serve(&conn, &outbox, cfg.max_in_flight, failback).await;
                if let Some(c) = back {
                    tracing::info!(from = %addr_s, to = %order[0], pending = outbox.len(), "the preferred aggregator answers again; moving back to it");
                    conn.close(0u32.into(), b"moving to the preferred aggregator");
                    ready = Some(c);
                    idx = 0;
                    continue;
                }
                tracing::warn!(aggregator = %addr_s, %reason, pending = outbox.len(), "disconnected; will reconnect");
                // Start again from the preferred one.
                idx = 0;
            }
            Err(e) => {
                let next = &order[(i + 1) % order.len()];
                if order.len() > 1 {
                    tracing::warn!(aggregator = %addr_s, error = %e, next = %next, "cannot connect; trying the next aggregator");
                } else {
                    tracing::warn!(aggregator = %addr_s, error = %e, retry_in = ?backoff, "cannot connect");
                }
                idx += 1;
                // The whole list failed: back off before going round again.
                if idx % order.len() != 0 {
                    continue;
                }
            }
        }
        let jitter = rand::random::<f64>() * 0.5 + 0.75;
        tokio::time::sleep(backoff.mul_f64(jitter)).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

async fn connect(
    ep: &quinn::Endpoint,
    addr: &str,
    server_name: &str,
) -> anyhow::Result<quinn::Connection> {
    let sa = tokio::net::lookup_host(addr)
        .await?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{addr}: no address"))?;
    let conn = tokio::time::timeout(Duration::from_secs(10), ep.connect(sa, server_name)?)
        .await
        .map_err(|_| anyhow::anyhow!("handshake timed out"))??;
    Ok(conn)
}

/// Sends the outbox over `conn` until it fails (returns why), or, when `failback` names
/// the preferred aggregator and it answers, returns that new connection (batches in flight
/// on the old one are sent again on it; the aggregators' shared dedup state makes any that
/// were stored a duplicate).
async fn serve(
    conn: &quinn::Connection,
    outbox: &Outbox,
    max_in_flight: usize,
    failback: Option<(&quinn::Endpoint, &str, &str)>,
) -> (String, Option<quinn::Connection>) {
    outbox.unmark_all();
    let version = negotiated_version(conn);
    let mut tasks = tokio::task::JoinSet::new();
    // The failback check runs beside the sending (a handshake to an aggregator that is
    // still down may take its whole timeout).
    // (A JoinSet: dropped on return, it aborts a check still running.)
    let mut probe: tokio::task::JoinSet<anyhow::Result<quinn::Connection>> =
        tokio::task::JoinSet::new();
    let mut next_try = tokio::time::Instant::now() + FAILBACK_EVERY;
    loop {
        if let Some((ep, addr, name)) = failback {
            if probe.is_empty() && tokio::time::Instant::now() >= next_try {
                next_try = tokio::time::Instant::now() + FAILBACK_EVERY;
                let (ep, addr, name) = (ep.clone(), addr.to_string(), name.to_string());
                probe.spawn(async move { connect(&ep, &addr, &name).await });
            }
            if let Some(done) = probe.try_join_next() {
                if let Ok(Ok(c)) = done {
                    // Let what is in flight here finish first, then move. Batches this
                    // aggregator still holds unanswered (storage down: it answers once
                    // they are stored) are not sent to the other one meanwhile: both
                    // would store them when storage returns, at the same moment, and the
                    // shared intents make that exactly-once only one after the other.
                    let mut broken = false;
                    let _ = tokio::time::timeout(Duration::from_secs(5), async {
                        while let Some(res) = tasks.join_next().await {
                            let Ok((seq, res)) = res else { continue };
                            match res {
                                Ok(()) => outbox.acked(seq),
                                Err(SendError::Rejected(_)) => {
                                    outbox.retry_later(seq, Duration::from_secs(2))
                                }
                                Err(SendError::Connection(_)) => broken = true,
                            }
                        }
                    })
                    .await;
                    if tasks.is_empty() || broken {
                        tasks.abort_all();
                        outbox.unmark_all();
                        return ("moving back".into(), Some(c));
                    }
                    tracing::info!(
                        unanswered = tasks.len(),
                        "the preferred aggregator answers again, but this one has not answered batches sent to it yet; staying until it does"
                    );
                    c.close(0u32.into(), b"not moving yet");
                    next_try = tokio::time::Instant::now() + Duration::from_secs(5);
                }
            }
        }
        while tasks.len() < max_in_flight {
            let Some((seq, frame)) = outbox.next_to_send() else {
                break;
            };
            let conn = conn.clone();
            tasks.spawn(async move { (seq, send_one(conn, frame, version).await) });
        }
        tokio::select! {
            Some(res) = tasks.join_next(), if !tasks.is_empty() => {
                let Ok((seq, res)) = res else { continue };
                match res {
                    Ok(()) => outbox.acked(seq),
                    Err(SendError::Rejected(msg)) => {
                        tracing::warn!(seq, reason = %msg, "aggregator did not store the batch; retrying in 2s");
                        outbox.retry_later(seq, Duration::from_secs(2));
                    }
                    Err(SendError::Connection(e)) => {
                        tasks.abort_all();
                        outbox.unmark_all();
                        return (e, None);
                    }
                }
            }
            _ = outbox.notify.notified() => {}
            e = conn.closed() => {
                tasks.abort_all();
                outbox.unmark_all();
                return (e.to_string(), None);
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_spreads_hosts_evenly_and_moves_one_nth() {
        let addrs: Vec<String> = (1..=4).map(|i| format!("agg{i}:4433")).collect();
        let hosts: Vec<String> = (0..8000).map(|i| format!("host-{i:05}.dc1")).collect();
        let first = |a: &[String]| -> Vec<String> {
            hosts.iter().map(|h| preference(h, a)[0].clone()).collect()
        };
        let base = first(&addrs);
        // Even: each of 4 gets 25 % ± 2 points.
        for a in &addrs {
            let n = base.iter().filter(|x| *x == a).count();
            assert!((1840..=2160).contains(&n), "{a}: {n} of 8000");
        }
        // A fifth aggregator takes about 1/5 of the hosts, only from the others.
        let mut five = addrs.clone();
        five.push("agg5:4433".into());
        let after = first(&five);
        let moved: Vec<usize> = (0..hosts.len()).filter(|&i| base[i] != after[i]).collect();
        assert!(moved.iter().all(|&i| after[i] == "agg5:4433"));
        assert!(
            (1440..=1760).contains(&moved.len()),
            "moved {}",
            moved.len()
        );
        // Losing one moves only its hosts, each to its second choice.
        let three: Vec<String> = addrs[1..].to_vec();
        let after = first(&three);
        for i in 0..hosts.len() {
            if base[i] != addrs[0] {
                assert_eq!(base[i], after[i]);
            } else {
                assert_eq!(after[i], preference(&hosts[i], &addrs)[1]);
            }
        }
        // The same on every call, whatever the list's order.
        let mut rev = addrs.clone();
        rev.reverse();
        assert_eq!(preference("h", &addrs), preference("h", &rev));
    }

    #[test]
    fn batches_hold_an_interval_of_snapshots_and_carry_host_facts_once_a_minute() {
        let cfg = Config::default(); // 1 s interval, 5 s batches
        let info = HostInfo {
            hostname: "h".into(),
            ..Default::default()
        };
        let mut b = Batcher::new(&cfg, info, "boot".into());
        let snap = Snapshot {
            ts_ms: 1,
            cpu: vec![Default::default()],
            ..Default::default()
        };
        let mut infos = Vec::new();
        for _ in 0..13 {
            for i in 0..5 {
                assert!(!b.due(Instant::now()), "due after {i} snapshots");
                b.push(&snap);
            }
            assert!(b.due(Instant::now()));
            let c = b.close().unwrap();
            let batch = protocol::decode_batch(&c.frame, &protocol::Limits::default()).unwrap();
            assert_eq!(batch.seq, c.seq);
            assert_eq!(batch.snapshots.len(), 5);
            assert_eq!(c.samples, batch.sample_count());
            infos.push(batch.info.is_some());
        }
        assert!(b.close().is_none(), "an empty batch is never sent");
        let with: Vec<usize> = infos
            .iter()
            .enumerate()
            .filter(|(_, x)| **x)
            .map(|(i, _)| i + 1)
            .collect();
        assert_eq!(with, vec![1, 13]);
    }
}
