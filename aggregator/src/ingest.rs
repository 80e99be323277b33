//! Ingest stage: QUIC with mutual TLS 1.3, sensor identity from its client
//! certificate, bounded reads and decoding, hand-off to the writer, acks.

use crate::metrics::Metrics;
use crate::store::writer::{GapJob, Job, Work};
use anyhow::{bail, Context, Result};
use protocol::{decode_batch, encode_ack, encode_error, Limits, FRAME_HEADER_LEN};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// ALPN names of the wire versions (`sonde/N`), newest first, up to `max`.
pub fn alpn(max: u8) -> Vec<Vec<u8>> {
    (protocol::MIN_VERSION..=max.min(protocol::VERSION))
        .rev()
        .map(|v| format!("sonde/{v}").into_bytes())
        .collect()
}

/// QUIC application error codes the aggregator closes connections with.
pub const CLOSE_SHUTDOWN: u32 = 0;
pub const CLOSE_MALFORMED: u32 = 1;
pub const CLOSE_TOO_LARGE: u32 = 2;
pub const CLOSE_NO_IDENTITY: u32 = 3;

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let data = std::fs::read(path)
        .with_context(|| format!("cannot read certificate file {}", path.display()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut &data[..])
        .collect::<Result<_, _>>()
        .with_context(|| format!("{}: not PEM", path.display()))?;
    if certs.is_empty() {
        bail!("{}: contains no PEM certificate", path.display());
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let data =
        std::fs::read(path).with_context(|| format!("cannot read key file {}", path.display()))?;
    rustls_pemfile::private_key(&mut &data[..])
        .with_context(|| format!("{}: not PEM", path.display()))?
        .with_context(|| format!("{}: contains no PEM private key", path.display()))
}

pub fn server_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
    max_streams: u32,
    max_wire_version: u8,
) -> Result<quinn::ServerConfig> {
    anyhow::ensure!(
        (protocol::MIN_VERSION..=protocol::VERSION).contains(&max_wire_version),
        "limits.max_wire_version: {max_wire_version} is not a version this build speaks ({} to {})",
        protocol::MIN_VERSION,
        protocol::VERSION
    );
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots
            .add(c)
            .with_context(|| format!("{}: not a usable CA certificate", ca.display()))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .with_context(|| format!("{}: cannot verify clients with this CA", ca.display()))?;
    let certs = load_certs(cert)?;
    // Refuse to start with a certificate the configured CA did not sign.
    let cas = load_certs(ca)?;
    cas.iter()
        .map(|a| check_signed_by(&certs[0], a))
        .find(Result::is_ok)
        .unwrap_or_else(|| check_signed_by(&certs[0], &cas[0]))
        .with_context(|| {
            format!(
                "{} was not issued by the CA in {}",
                cert.display(),
                ca.display()
            )
        })?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, load_key(key)?)
        .with_context(|| {
            format!(
                "{} and {} do not form a usable certificate/key pair",
                cert.display(),
                key.display()
            )
        })?;
    tls.alpn_protocols = alpn(max_wire_version);
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(max_streams.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.max_idle_timeout(Some(Duration::from_secs(30).try_into()?));
    cfg.transport_config(Arc::new(t));
    Ok(cfg)
}

fn check_signed_by(cert: &CertificateDer<'_>, ca: &CertificateDer<'_>) -> Result<()> {
    let (_, c) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| anyhow::anyhow!("unparsable certificate: {e}"))?;
    let (_, a) = x509_parser::parse_x509_certificate(ca)
        .map_err(|e| anyhow::anyhow!("unparsable CA certificate: {e}"))?;
    c.verify_signature(Some(a.public_key()))
        .map_err(|e| anyhow::anyhow!("signature check failed: {e}"))
}

/// The host name a connection proved: the common name of its client
/// certificate (or its first DNS name).
pub fn peer_host(conn: &quinn::Connection) -> Option<String> {
    let ident = conn.peer_identity()?;
    let certs = ident.downcast_ref::<Vec<CertificateDer<'static>>>()?;
    let (_, c) = x509_parser::parse_x509_certificate(certs.first()?).ok()?;
    let cn = c
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    let name = cn.or_else(|| {
        c.subject_alternative_name().ok().flatten().and_then(|san| {
            san.value.general_names.iter().find_map(|g| match g {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                _ => None,
            })
        })
    })?;
    (!name.is_empty() && name.len() <= 253 && !name.chars().any(char::is_control)).then_some(name)
}

pub struct Ingest {
    pub tx: mpsc::Sender<Work>,
    /// One permit per batch between "start reading its stream" and "answered":
    /// when the writer is held (ClickHouse slow or down), streams are not read,
    /// QUIC flow control stops the sensors, and memory stays bounded.
    pub permits: Arc<tokio::sync::Semaphore>,
    /// Decoded batches for live detection (None when no rules are configured).
    pub detect: Option<mpsc::Sender<crate::detect::live::Arrival>>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// Frames of a newer wire version are refused (see `limits.max_wire_version`).
    pub max_wire_version: u8,
    pub in_flight: AtomicUsize,
    /// Per-connection byte rate limit (0 = none).
    pub conn_bytes_per_s: u64,
}

/// A per-connection byte budget: each frame read moves `next_free` forward by
/// its share of a second; a new stream of this connection is not read before
/// `next_free - 1 s` (one second of burst). Only that sensor waits.
struct Budget {
    next_free: std::sync::Mutex<tokio::time::Instant>,
    rate: u64,
}

impl Budget {
    async fn wait(&self) {
        if self.rate == 0 {
            return;
        }
        let at = *self.next_free.lock().unwrap() - Duration::from_secs(1);
        tokio::time::sleep_until(at).await;
    }

    fn spend(&self, bytes: usize) {
        if self.rate == 0 {
            return;
        }
        let mut n = self.next_free.lock().unwrap();
        let now = tokio::time::Instant::now();
        *n = (*n).max(now) + Duration::from_secs_f64(bytes as f64 / self.rate as f64);
    }
}

/// Accepts connections until `stop` turns true; then waits for in-flight
/// batches to be stored and acknowledged, and closes every connection.
pub async fn serve(
    endpoint: quinn::Endpoint,
    ingest: Arc<Ingest>,
    mut stop: watch::Receiver<bool>,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            inc = endpoint.accept() => {
                let Some(inc) = inc else { break };
                conns.spawn(connection(inc, ingest.clone(), stop.clone()));
            }
            _ = stop.changed() => break,
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while ingest.in_flight.load(Relaxed) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    endpoint.close(CLOSE_SHUTDOWN.into(), b"aggregator shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    conns.abort_all();
}

async fn connection(inc: quinn::Incoming, ingest: Arc<Ingest>, mut stop: watch::Receiver<bool>) {
    let remote = inc.remote_address();
    let conn = match inc.await {
        Ok(c) => c,
        Err(e) => {
            ingest.metrics.connections_rejected.fetch_add(1, Relaxed);
            tracing::warn!(%remote, error = %e, "connection refused in the handshake");
            return;
        }
    };
    let Some(host) = peer_host(&conn) else {
        ingest.metrics.connections_rejected.fetch_add(1, Relaxed);
        tracing::warn!(%remote, "client certificate carries no usable host name");
        conn.close(
            CLOSE_NO_IDENTITY.into(),
            b"client certificate has no usable common name",
        );
        return;
    };
    let host: Arc<str> = host.into();
    ingest.metrics.connections_accepted.fetch_add(1, Relaxed);
    ingest.metrics.sensors_connected.fetch_add(1, Relaxed);
    tracing::info!(%remote, %host, "sensor connected");
    // Before any of its batches: the writer loads what the database knows of this host
    // (it may have been writing through another aggregator).
    let _ = ingest.tx.send(Work::Arrived(host.clone())).await;
    let budget = Arc::new(Budget {
        next_free: std::sync::Mutex::new(tokio::time::Instant::now()),
        rate: ingest.conn_bytes_per_s,
    });
    let reason = loop {
        tokio::select! {
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    ingest.in_flight.fetch_add(1, Relaxed);
                    let (ingest, conn, host, budget) = (ingest.clone(), conn.clone(), host.clone(), budget.clone());
                    tokio::spawn(async move {
                        budget.wait().await;
                        stream(&ingest, &conn, host, send, recv, &budget).await;
                        ingest.in_flight.fetch_sub(1, Relaxed);
                    });
                }
                Err(e) => break e.to_string(),
            },
            _ = stop.changed() => break "aggregator shutting down".to_string(),
        }
    };
    ingest.metrics.sensors_connected.fetch_sub(1, Relaxed);
    tracing::info!(%remote, %host, %reason, "sensor disconnected");
}

async fn stream(
    ingest: &Ingest,
    conn: &quinn::Connection,
    host: Arc<str>,
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    budget: &Budget,
) {
    let max = ingest.limits.max_frame + FRAME_HEADER_LEN;
    let _permit = match ingest.permits.clone().try_acquire_owned() {
        Ok(p) => p,
        Err(_) => {
            ingest.metrics.streams_waiting.fetch_add(1, Relaxed);
            let p = ingest.permits.clone().acquire_owned().await;
            ingest.metrics.streams_waiting.fetch_sub(1, Relaxed);
            match p {
                Ok(p) => p,
                Err(_) => return,
            }
        }
    };
    let buf = match recv.read_to_end(max).await {
        Ok(b) => b,
        Err(quinn::ReadToEndError::TooLong) => {
            ingest.metrics.decode_errors.fetch_add(1, Relaxed);
            tracing::warn!(%host, max, "frame larger than the limit; closing the connection");
            conn.close(
                CLOSE_TOO_LARGE.into(),
                format!("frame exceeds {max} bytes").as_bytes(),
            );
            return;
        }
        Err(e) => {
            tracing::debug!(%host, error = %e, "stream ended before the frame did");
            return;
        }
    };
    budget.spend(buf.len());
    if buf.get(5) == Some(&(protocol::FrameKind::Gap as u8)) {
        return gap(ingest, conn, host, &buf, send).await;
    }
    let decoded = match buf.get(4) {
        Some(&v) if v > ingest.max_wire_version => Err(protocol::Error::UnsupportedVersion(v)),
        _ => decode_batch(&buf, &ingest.limits),
    };
    let batch = match decoded {
        Ok(b) => b,
        Err(e) => {
            ingest.metrics.decode_errors.fetch_add(1, Relaxed);
            tracing::warn!(%host, error = %e, bytes = buf.len(), "malformed frame; closing the connection");
            conn.close(
                CLOSE_MALFORMED.into(),
                format!("malformed frame: {e}").as_bytes(),
            );
            return;
        }
    };
    ingest.metrics.batches_received.fetch_add(1, Relaxed);
    ingest
        .metrics
        .bytes_received
        .fetch_add(buf.len() as u64, Relaxed);
    let seq = batch.seq;
    let batch = Arc::new(batch);
    if let Some(d) = &ingest.detect {
        let a = crate::detect::live::Arrival {
            host: host.clone(),
            batch: batch.clone(),
            at: std::time::Instant::now(),
        };
        if d.try_send(a).is_err() {
            ingest.metrics.detect_dropped.fetch_add(1, Relaxed);
        }
    }
    let (tx, rx) = oneshot::channel();
    let job = Job {
        host: host.clone(),
        batch,
        bytes: buf.len() as u32,
        reply: tx,
    };
    let queued = ingest.tx.send(Work::Batch(job)).await.is_ok();
    ingest.metrics.queue_depth.store(
        (ingest.tx.max_capacity() - ingest.tx.capacity()) as u64,
        Relaxed,
    );
    answer(send, seq, queued, rx, conn).await;
}

/// Writes the writer's verdict (ack after commit, or an error) on the stream.
async fn answer(
    mut send: quinn::SendStream,
    seq: u64,
    queued: bool,
    rx: oneshot::Receiver<Result<(), String>>,
    conn: &quinn::Connection,
) {
    // When the connection closes first (the sensor went away: it resends what was not
    // answered, here or at another aggregator), the writer is told by the dropped
    // receiver and defers the batch instead of storing it (see `store::writer`).
    let verdict = tokio::select! {
        v = rx => v,
        _ = conn.closed() => return,
    };
    let reply = match (queued, verdict) {
        (true, Ok(Ok(()))) => encode_ack(seq),
        (true, Ok(Err(msg))) => encode_error(seq, &msg),
        _ => encode_error(seq, "aggregator is shutting down"),
    };
    let _ = send.write_all(&reply).await;
    let _ = send.finish();
    // Let the reply leave before the stream is dropped.
    let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
}

async fn gap(
    ingest: &Ingest,
    conn: &quinn::Connection,
    host: Arc<str>,
    buf: &[u8],
    send: quinn::SendStream,
) {
    let g = match protocol::decode_gap(buf, &ingest.limits) {
        Ok(g) => g,
        Err(e) => {
            ingest.metrics.decode_errors.fetch_add(1, Relaxed);
            tracing::warn!(%host, error = %e, "malformed gap frame; closing the connection");
            conn.close(
                CLOSE_MALFORMED.into(),
                format!("malformed frame: {e}").as_bytes(),
            );
            return;
        }
    };
    let seq = g.first_seq;
    let (tx, rx) = oneshot::channel();
    let job = GapJob {
        host,
        gap: g,
        reply: tx,
    };
    let queued = ingest.tx.send(Work::Gap(job)).await.is_ok();
    answer(send, seq, queued, rx, conn).await;
}

#[cfg(test)]
mod tests {
    use super::Budget;
    use std::time::Duration;

    #[tokio::test]
    async fn a_connection_over_its_byte_rate_waits_alone() {
        let b = Budget {
            next_free: std::sync::Mutex::new(tokio::time::Instant::now()),
            rate: 10_000,
        };
        // Within the one-second burst: no wait.
        b.spend(5_000);
        let t = tokio::time::Instant::now();
        b.wait().await;
        assert!(t.elapsed() < Duration::from_millis(100));
        // 2.5 s of bytes at once: the next stream waits about 1.5 s (2.5 s − 1 s burst).
        b.spend(20_000);
        let t = tokio::time::Instant::now();
        b.wait().await;
        let w = t.elapsed();
        assert!(
            w >= Duration::from_millis(1300) && w < Duration::from_millis(2500),
            "{w:?}"
        );
        // Unlimited never waits.
        let u = Budget {
            next_free: std::sync::Mutex::new(tokio::time::Instant::now()),
            rate: 0,
        };
        u.spend(1 << 30);
        let t = tokio::time::Instant::now();
        u.wait().await;
        assert!(t.elapsed() < Duration::from_millis(100));
    }
}
