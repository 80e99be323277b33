//! Ingest load generator: N simulated sensors against a running aggregator,
//! over real QUIC with mutual TLS (one certificate per simulated host, issued
//! here from the deployment CA), sending realistic batches (8 CPUs, 2 disks,
//! 2 interfaces, 3 filesystems, PSI, TCP; 5 one-second snapshots per batch).
//!
//! Run by `cargo xtask bench`; by hand:
//!
//! ```text
//! cargo bench -p sonde-aggregator --bench loadgen -- \
//!     --aggregator 127.0.0.1:4433 --certs target/bench/certs \
//!     rate --sensors 200 --samples-per-s 1000000 --secs 30
//! cargo bench -p sonde-aggregator --bench loadgen -- ... connections --sensors 10000 --hold 20
//! ```
//!
//! In rate mode every batch is encoded and compressed before the timed run (`--live-encode`:
//! when due), stamped with the time it is due to be sent: the real sensors are on other
//! machines, and here the generator's encoding would take the aggregator's cores.
//!
//! Prints one JSON object. Lag is measured per batch as (time its ack
//! arrived) − (timestamp of its newest sample): the aggregator acks only
//! after the rows are committed in ClickHouse, so at ack time they are
//! queryable.

use anyhow::{bail, Context, Result};
use protocol::*;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::json;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const ALPN: &[u8] = b"sonde/2";
const SNAPS_PER_BATCH: u64 = 5;

struct Args {
    aggregator: SocketAddr,
    server_name: String,
    certs: PathBuf,
    mode: String,
    sensors: usize,
    samples_per_s: f64,
    secs: f64,
    hold: f64,
    endpoints: usize,
    prefix: String,
    input: PathBuf,
    /// Encode each batch when it is due instead of before the run (the generator's own
    /// CPU then competes with the aggregator for this machine's cores).
    live_encode: bool,
    /// Processes whose CPU time is reported over the timed run (aggregator, ClickHouse).
    watch: Vec<u32>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        aggregator: "127.0.0.1:4433".parse()?,
        server_name: "sonde-aggregator".into(),
        certs: PathBuf::from("target/bench/certs"),
        mode: String::new(),
        sensors: 100,
        samples_per_s: 100_000.0,
        secs: 20.0,
        hold: 10.0,
        endpoints: 8,
        prefix: "load".into(),
        input: PathBuf::new(),
        live_encode: false,
        watch: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--bench" => {}
            "--aggregator" => a.aggregator = v()?.parse().context("--aggregator")?,
            "--server-name" => a.server_name = v()?,
            "--certs" => a.certs = v()?.into(),
            "--sensors" => a.sensors = v()?.parse().context("--sensors")?,
            "--samples-per-s" => a.samples_per_s = v()?.parse().context("--samples-per-s")?,
            "--secs" => a.secs = v()?.parse().context("--secs")?,
            "--hold" => a.hold = v()?.parse().context("--hold")?,
            "--endpoints" => a.endpoints = v()?.parse().context("--endpoints")?,
            "--prefix" => a.prefix = v()?,
            "--input" => a.input = v()?.into(),
            "--live-encode" => a.live_encode = true,
            "--watch" => {
                a.watch = v()?
                    .split(',')
                    .filter(|p| !p.is_empty())
                    .map(|p| p.parse().context("--watch: process ids, comma-separated"))
                    .collect::<Result<_>>()?
            }
            "rate" | "connections" | "wire" => a.mode = k,
            other => bail!("unknown argument {other:?}"),
        }
    }
    if a.mode.is_empty() {
        bail!("say `rate`, `connections` or `wire`");
    }
    Ok(a)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// One client configuration per simulated host, each with its own certificate.
fn client_configs(a: &Args) -> Result<Vec<(String, quinn::ClientConfig)>> {
    let ca_pem = std::fs::read_to_string(a.certs.join("ca.pem"))
        .with_context(|| format!("{}/ca.pem", a.certs.display()))?;
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(a.certs.join("ca-key.pem"))?)?;
    let ca_cert = CertificateParams::from_ca_cert_pem(&ca_pem)?.self_signed(&ca_key)?;
    let ca_der = rustls_pemfile::certs(&mut ca_pem.as_bytes())
        .next()
        .context("ca.pem has no certificate")??;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der)?;
    let roots = Arc::new(roots);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(5)));
    transport.max_idle_timeout(Some(Duration::from_secs(60).try_into()?));
    let transport = Arc::new(transport);
    let mut out = Vec::with_capacity(a.sensors);
    for i in 0..a.sensors {
        let host = format!("{}-{i:05}", a.prefix);
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(vec![host.clone()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host.as_str());
        p.distinguished_name = dn;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&key, &ca_cert, &ca_key)?;
        let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let mut cfg = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls)?,
        ));
        cfg.transport_config(transport.clone());
        out.push((host, cfg));
    }
    Ok(out)
}

/// A plausible host: values drift with a per-host phase so columns are not constant.
fn snapshot(ts_ms: u64, phase: f32) -> Snapshot {
    let t = (ts_ms / 1000) as f32 * 0.05 + phase;
    let w = |base: f32, amp: f32| base + amp * t.sin().abs();
    Snapshot {
        ts_ms,
        interval_ms: 1000,
        cpu: (0..9)
            .map(|c| CpuRec {
                cpu: if c == 0 { u32::MAX } else { c - 1 },
                user: w(12.0, 30.0),
                system: w(4.0, 6.0),
                idle: w(50.0, 30.0),
                iowait: w(0.5, 2.0),
                softirq: w(0.2, 0.5),
                ..Default::default()
            })
            .collect(),
        system: SystemRec {
            ctxt_per_s: w(9000.0, 4000.0),
            forks_per_s: w(5.0, 20.0),
            interrupts_per_s: w(7000.0, 3000.0),
            procs_running: 3,
            procs_blocked: 0,
            ..Default::default()
        },
        memory: MemoryRec {
            total: 32 << 30,
            available: (20u64 << 30) + (t.sin().abs() * 1e9) as u64,
            free: (8u64 << 30) + (t.cos().abs() * 1e8) as u64,
            cached: 10 << 30,
            page_faults_per_s: w(2000.0, 500.0),
            ..Default::default()
        },
        pressure: (0..3)
            .map(|r| PressureRec {
                resource: r,
                some_stall_pct: w(0.1, 2.0),
                ..Default::default()
            })
            .collect(),
        disks: ["nvme0n1", "nvme1n1"]
            .iter()
            .map(|d| DiskRec {
                device: d.to_string(),
                reads_per_s: w(100.0, 400.0),
                writes_per_s: w(50.0, 300.0),
                read_bytes_per_s: w(1e6, 4e7),
                write_bytes_per_s: w(5e5, 2e7),
                r_await_ms: w(0.1, 0.5),
                w_await_ms: w(0.2, 1.0),
                util_pct: w(1.0, 20.0),
                ..Default::default()
            })
            .collect(),
        filesystems: [
            ("/", "nvme0n1p2"),
            ("/boot", "nvme0n1p1"),
            ("/data", "nvme1n1"),
        ]
        .iter()
        .map(|(m, d)| FsRec {
            mount: m.to_string(),
            device: d.to_string(),
            fstype: "ext4".into(),
            size_bytes: 500 << 30,
            used_bytes: (200u64 << 30) + (ts_ms % 1_000_000) * 1000,
            avail_bytes: 280 << 30,
            inodes_total: 30_000_000,
            inodes_used: 1_200_000,
            ..Default::default()
        })
        .collect(),
        nets: ["eth0", "eth1"]
            .iter()
            .map(|n| NetRec {
                interface: n.to_string(),
                rx_bytes_per_s: w(1e6, 5e7),
                tx_bytes_per_s: w(1e6, 3e7),
                rx_packets_per_s: w(1e3, 4e4),
                tx_packets_per_s: w(1e3, 3e4),
                ..Default::default()
            })
            .collect(),
        tcp: TcpRec {
            retrans_segs_per_s: w(0.0, 3.0),
            active_opens_per_s: w(10.0, 50.0),
            in_segs_per_s: w(1e3, 4e4),
            out_segs_per_s: w(1e3, 3e4),
            curr_estab: 120,
            ..Default::default()
        },
        ..Default::default()
    }
}

#[derive(Default)]
struct Stats {
    sent: AtomicU64,
    acked: AtomicU64,
    samples_acked: AtomicU64,
    errors: AtomicU64,
    connected: AtomicUsize,
    connect_failed: AtomicUsize,
    lags_ms: Mutex<Vec<u32>>,
    first_error: Mutex<Option<String>>,
}

impl Stats {
    fn error(&self, e: String) {
        self.errors.fetch_add(1, Relaxed);
        self.first_error.lock().unwrap().get_or_insert(e);
    }
}

async fn send_batch(conn: &quinn::Connection, frame: &[u8]) -> Result<()> {
    let (mut s, mut r) = conn.open_bi().await?;
    s.write_all(frame).await?;
    s.finish()?;
    let reply = r.read_to_end(4096).await?;
    match decode_ack(&reply)? {
        Ok(_) => Ok(()),
        Err((_, msg)) => bail!("aggregator: {msg}"),
    }
}

fn percentile(v: &mut [u32], p: f64) -> u32 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn cpu_s(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = s.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

async fn connect_all(
    a: &Args,
    cfgs: Vec<(String, quinn::ClientConfig)>,
    stats: &Arc<Stats>,
) -> Result<Vec<(String, quinn::Connection)>> {
    let mut eps = Vec::new();
    for _ in 0..a.endpoints.max(1) {
        eps.push(quinn::Endpoint::client("127.0.0.1:0".parse()?)?);
    }
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut set = tokio::task::JoinSet::new();
    for (i, (host, cfg)) in cfgs.into_iter().enumerate() {
        let ep = eps[i % eps.len()].clone();
        let (addr, name, stats, sem) = (
            a.aggregator,
            a.server_name.clone(),
            stats.clone(),
            sem.clone(),
        );
        set.spawn(async move {
            let _p = sem.acquire().await.unwrap();
            let r = async {
                let c = ep.connect_with(cfg, addr, &name)?;
                Ok::<_, anyhow::Error>(tokio::time::timeout(Duration::from_secs(30), c).await??)
            }
            .await;
            match r {
                Ok(c) => {
                    stats.connected.fetch_add(1, Relaxed);
                    Some((host, c))
                }
                Err(e) => {
                    stats.connect_failed.fetch_add(1, Relaxed);
                    stats
                        .first_error
                        .lock()
                        .unwrap()
                        .get_or_insert(format!("connect: {e}"));
                    None
                }
            }
        });
    }
    let mut conns = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Some(c) = r? {
            conns.push(c);
        }
    }
    conns.sort_by(|x, y| x.0.cmp(&y.0));
    Ok(conns)
}

fn one_batch(host: &str, boot: &str, seq: u64, end_ms: u64, phase: f32) -> (Vec<u8>, u64) {
    let snaps: Vec<Snapshot> = (0..SNAPS_PER_BATCH)
        .map(|k| snapshot(end_ms - (SNAPS_PER_BATCH - 1 - k) * 1000, phase))
        .collect();
    let b = Batch {
        host: host.into(),
        boot_id: boot.into(),
        seq,
        info: None,
        snapshots: snaps,
    };
    let n = b.sample_count();
    let mut scratch = Vec::new();
    (encode_batch(&b, 3, &mut scratch), n)
}

async fn main_async(a: Args) -> Result<serde_json::Value> {
    let t0 = Instant::now();
    let me = std::process::id();
    let cfgs = tokio::task::block_in_place(|| client_configs(&a))?;
    let certs_s = t0.elapsed().as_secs_f64();
    let stats = Arc::new(Stats::default());
    let t1 = Instant::now();
    let conns = connect_all(&a, cfgs, &stats).await?;
    let connect_s = t1.elapsed().as_secs_f64();
    let boot = format!("loadgen-{}", now_ms());
    let samples_per_batch = one_batch("x", "b", 1, now_ms(), 0.0).1;

    if a.mode == "connections" {
        // Every sensor sends one batch (proving the connection carries data), then all
        // connections are held for `hold` seconds and checked again.
        let mut set = tokio::task::JoinSet::new();
        for (i, (host, c)) in conns.iter().enumerate() {
            let (host, c, stats, boot) = (host.clone(), c.clone(), stats.clone(), boot.clone());
            set.spawn(async move {
                let (frame, n) = one_batch(&host, &boot, 1, now_ms() / 1000 * 1000, i as f32);
                match send_batch(&c, &frame).await {
                    Ok(()) => {
                        stats.acked.fetch_add(1, Relaxed);
                        stats.samples_acked.fetch_add(n, Relaxed);
                    }
                    Err(e) => stats.error(e.to_string()),
                }
            });
        }
        while set.join_next().await.is_some() {}
        tokio::time::sleep(Duration::from_secs_f64(a.hold)).await;
        let alive = conns
            .iter()
            .filter(|(_, c)| c.close_reason().is_none())
            .count();
        let r = json!({
            "mode": "connections",
            "sensors": a.sensors,
            "connected": stats.connected.load(Relaxed),
            "connect_failed": stats.connect_failed.load(Relaxed),
            "batches_acked": stats.acked.load(Relaxed),
            "errors": stats.errors.load(Relaxed),
            "alive_after_hold": alive,
            "hold_s": a.hold,
            "cert_issue_s": certs_s,
            "connect_s": connect_s,
            "first_error": *stats.first_error.lock().unwrap(),
        });
        for (_, c) in &conns {
            c.close(0u32.into(), b"done");
        }
        return Ok(r);
    }

    // Rate mode: each sensor sends one 5-snapshot batch every `period`, staggered.
    let n = conns.len().max(1);
    let batches_per_s = a.samples_per_s / samples_per_batch as f64;
    let period = Duration::from_secs_f64(n as f64 / batches_per_s);
    // Pre-encoded: every sensor's frames for the whole run, each stamped with the time it
    // is due (its newest sample is taken at that moment, as a sensor's would be).
    let per_sensor = (a.secs / period.as_secs_f64()).ceil() as usize + 1;
    let mut plan: Vec<Vec<(u64, Vec<u8>, u64)>> = vec![Vec::new(); n];
    let mut pregen_s = 0.0;
    let mut pregen_bytes = 0usize;
    let start_ms = if a.live_encode {
        now_ms()
    } else {
        // How long encoding takes here (after a warm-up), to choose a start time after it.
        for k in 0..5 {
            std::hint::black_box(one_batch("x", "b", k, now_ms(), k as f32));
        }
        let t = Instant::now();
        for k in 0..20 {
            std::hint::black_box(one_batch("x", "b", k, now_ms(), k as f32));
        }
        let per = t.elapsed().as_secs_f64() / 20.0;
        let threads = std::thread::available_parallelism().map_or(1, |v| v.get());
        let est = per * (n * per_sensor) as f64 / threads as f64;
        let start_ms = now_ms() + (est * 1.5 * 1000.0) as u64 + 2000;
        let t = Instant::now();
        let chunk = n.div_ceil(threads);
        std::thread::scope(|sc| {
            for (ci, part) in plan.chunks_mut(chunk).enumerate() {
                let (conns, boot) = (&conns, &boot);
                sc.spawn(move || {
                    for (j, frames) in part.iter_mut().enumerate() {
                        let i = ci * chunk + j;
                        let offset = period.mul_f64(i as f64 / n as f64);
                        for k in 0..per_sensor {
                            let due = offset + period * k as u32;
                            if due.as_secs_f64() >= a.secs {
                                break;
                            }
                            let newest = start_ms + due.as_millis() as u64;
                            let (f, ns) =
                                one_batch(&conns[i].0, boot, k as u64 + 1, newest, i as f32);
                            frames.push((newest, f, ns));
                        }
                    }
                });
            }
        });
        pregen_s = t.elapsed().as_secs_f64();
        pregen_bytes = plan.iter().flatten().map(|(_, f, _)| f.len()).sum();
        eprintln!(
            "loadgen: {} batches encoded in {pregen_s:.1} s ({:.0} MB); run starts in {:.1} s",
            plan.iter().map(|v| v.len()).sum::<usize>(),
            pregen_bytes as f64 / 1e6,
            (start_ms.saturating_sub(now_ms())) as f64 / 1e3
        );
        start_ms
    };
    let start = Instant::now() + Duration::from_millis(start_ms.saturating_sub(now_ms()));
    tokio::time::sleep_until(tokio::time::Instant::from_std(start)).await;
    let cpu0 = cpu_s(me);
    let watched0: Vec<f64> = a.watch.iter().map(|&p| cpu_s(p)).collect();
    let end = start + Duration::from_secs_f64(a.secs);
    let mut set = tokio::task::JoinSet::new();
    for (i, ((host, c), frames)) in conns.iter().zip(plan).enumerate() {
        let (host, c, stats, boot) = (host.clone(), c.clone(), stats.clone(), boot.clone());
        let offset = period.mul_f64(i as f64 / n as f64);
        let live = a.live_encode;
        set.spawn(async move {
            let mut inflight = tokio::task::JoinSet::new();
            let send =
                |frame: Vec<u8>, newest: u64, ns: u64, inflight: &mut tokio::task::JoinSet<()>| {
                    stats.sent.fetch_add(1, Relaxed);
                    let (c, stats) = (c.clone(), stats.clone());
                    inflight.spawn(async move {
                        match send_batch(&c, &frame).await {
                            Ok(()) => {
                                let lag = now_ms().saturating_sub(newest) as u32;
                                stats.acked.fetch_add(1, Relaxed);
                                stats.samples_acked.fetch_add(ns, Relaxed);
                                stats.lags_ms.lock().unwrap().push(lag);
                            }
                            Err(e) => stats.error(e.to_string()),
                        }
                    });
                    while inflight.try_join_next().is_some() {}
                };
            if live {
                let mut tick = tokio::time::interval_at(
                    tokio::time::Instant::from_std(start) + offset,
                    period,
                );
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let mut seq = 0u64;
                loop {
                    tick.tick().await;
                    if Instant::now() >= end {
                        break;
                    }
                    seq += 1;
                    let newest = now_ms();
                    let (frame, ns) = one_batch(&host, &boot, seq, newest, i as f32);
                    send(frame, newest, ns, &mut inflight);
                }
            } else {
                // Each frame at its due time; one that is late goes at once, and its
                // lateness counts in its lag (stamped with the due time).
                for (newest, frame, ns) in frames {
                    let due = start + Duration::from_millis(newest - start_ms);
                    tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
                    send(frame, newest, ns, &mut inflight);
                }
            }
            // Give outstanding batches time to be acked.
            let _ = tokio::time::timeout(Duration::from_secs(30), async {
                while inflight.join_next().await.is_some() {}
            })
            .await;
        });
    }
    while set.join_next().await.is_some() {}
    let wall = start.elapsed().as_secs_f64();
    let gen_cpu = cpu_s(me) - cpu0;
    let watched: Vec<f64> = a
        .watch
        .iter()
        .zip(&watched0)
        .map(|(&p, c0)| cpu_s(p) - c0)
        .collect();
    let mut lags = std::mem::take(&mut *stats.lags_ms.lock().unwrap());
    let acked = stats.samples_acked.load(Relaxed);
    let r = json!({
        "mode": "rate",
        "sensors": a.sensors,
        "connected": stats.connected.load(Relaxed),
        "offered_samples_per_s": a.samples_per_s,
        "samples_per_batch": samples_per_batch,
        "batches_sent": stats.sent.load(Relaxed),
        "batches_acked": stats.acked.load(Relaxed),
        "errors": stats.errors.load(Relaxed),
        "samples_acked": acked,
        "acked_samples_per_s": acked as f64 / a.secs,
        "wall_s": wall,
        "lag_ms_p50": percentile(&mut lags, 0.5),
        "lag_ms_p99": percentile(&mut lags, 0.99),
        "lag_ms_max": lags.last().copied().unwrap_or(0),
        "generator_cpu_s": gen_cpu,
        "watched_cpu_s": watched,
        "pre_encoded": !a.live_encode,
        "pre_encode_s": pregen_s,
        "pre_encoded_mb": pregen_bytes as f64 / 1e6,
        "cert_issue_s": certs_s,
        "connect_s": connect_s,
        "first_error": *stats.first_error.lock().unwrap(),
    });
    for (_, c) in &conns {
        c.close(0u32.into(), b"done");
    }
    Ok(r)
}

/// Wire size on real snapshots recorded by `sensor record`: bytes per sample for
/// several batch sizes, with plain zstd (what the sensor sends) and with a zstd
/// dictionary trained on the first half of the recording, measured on the second half.
fn wire(a: &Args) -> Result<serde_json::Value> {
    let data = std::fs::read(&a.input).with_context(|| format!("{}", a.input.display()))?;
    let (snaps, _) = protocol::read_recording(&data)
        .map_err(|(i, e)| anyhow::anyhow!("{}: snapshot {i}: {e}", a.input.display()))?;
    if snaps.len() < 4 {
        bail!("{}: need at least 4 snapshots", a.input.display());
    }
    let info = HostInfo {
        hostname: "bench-host".into(),
        ..Default::default()
    };
    // The batches of `k` snapshots from `from`, as the sensor would send them.
    let batches = |k: usize, from: &[Snapshot]| -> Vec<Batch> {
        from.chunks(k)
            .filter(|c| c.len() == k)
            .enumerate()
            .map(|(i, c)| Batch {
                host: info.hostname.clone(),
                boot_id: "0b8c1f6e-2f0a-4b7e-9a51-5d2c7f3e9a10".into(),
                seq: i as u64 + 1,
                info: None,
                snapshots: c.to_vec(),
            })
            .collect()
    };
    // Version-3 (columnar) frames: total bytes.
    let columnar = |k: usize, from: &[Snapshot]| -> usize {
        let mut scratch = Vec::new();
        batches(k, from)
            .iter()
            .map(|b| protocol::encode_batch(b, 3, &mut scratch).len())
            .sum()
    };
    // Raw (uncompressed) version-2 batch payloads and their samples.
    let payloads = |k: usize, from: &[Snapshot]| -> Vec<(Vec<u8>, u64)> {
        batches(k, from)
            .iter()
            .map(|b| {
                let mut raw = Vec::new();
                b.encode(&mut raw);
                (raw, b.sample_count())
            })
            .collect()
    };
    let half = snaps.len() / 2;
    let (train, test) = snaps.split_at(half);
    let mut rows = Vec::new();
    for k in [1usize, 5, 15, 30, 60] {
        if k > test.len() {
            continue;
        }
        let test_p = payloads(k, test);
        let samples: u64 = test_p.iter().map(|p| p.1).sum();
        let plain: usize = test_p
            .iter()
            .map(|(raw, _)| zstd::bulk::compress(raw, 3).unwrap().len() + FRAME_HEADER_LEN)
            .sum();
        let raw_total: usize = test_p.iter().map(|p| p.0.len()).sum();
        // Dictionary from the training half, batches of the same size.
        // Sliding windows over the training half give enough samples to train on.
        let train_p: Vec<Vec<u8>> = (0..train.len().saturating_sub(k) + 1)
            .filter(|&i| i + k <= train.len())
            .flat_map(|i| payloads(k, &train[i..i + k]))
            .map(|p| p.0)
            .collect();
        let dict = if train_p.len() >= 5 {
            zstd::dict::from_samples(&train_p, 16 * 1024).ok()
        } else {
            None
        };
        let with_dict = dict.as_ref().map(|d| {
            let mut c = zstd::bulk::Compressor::with_dictionary(3, d).unwrap();
            test_p
                .iter()
                .map(|(raw, _)| c.compress(raw).unwrap().len() + FRAME_HEADER_LEN)
                .sum::<usize>()
        });
        rows.push(json!({
            "snapshots_per_batch": k,
            "batches": test_p.len(),
            "raw_bytes_per_sample": raw_total as f64 / samples as f64,
            "zstd_bytes_per_sample": plain as f64 / samples as f64,
            "dict_bytes_per_sample": with_dict.map(|b| b as f64 / samples as f64),
            "dict_bytes": dict.as_ref().map(|d| d.len()),
            "columnar_bytes_per_sample": columnar(k, test) as f64 / samples as f64,
        }));
    }
    Ok(
        json!({"mode": "wire", "snapshots": snaps.len(), "samples_per_snapshot": snaps[0].sample_count(), "rows": rows}),
    )
}

fn main() -> Result<()> {
    let a = parse_args()?;
    if a.mode == "wire" {
        println!("{}", serde_json::to_string(&wire(&a)?)?);
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let r = rt.block_on(main_async(a))?;
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}
