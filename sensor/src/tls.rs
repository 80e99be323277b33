//! Client side of mutual TLS 1.3 over QUIC.

use anyhow::{bail, Context, Result};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

/// Wire versions this sensor can send, newest first (ALPN `sonde/N`): the aggregator picks
/// the newest it reads, and batches are sent in that version (see `ship.rs`): `sonde/2` is
/// an aggregator before columnar batches, `sonde/1` one before length-delimited records.
pub const ALPN: [&[u8]; 3] = [b"sonde/3", b"sonde/2", b"sonde/1"];

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let data = std::fs::read(path)
        .with_context(|| format!("cannot read certificate file {}", path.display()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut &data[..])
        .collect::<Result<_, _>>()
        .with_context(|| format!("{}: not a PEM certificate file", path.display()))?;
    if certs.is_empty() {
        bail!("{}: contains no PEM certificate", path.display());
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let data =
        std::fs::read(path).with_context(|| format!("cannot read key file {}", path.display()))?;
    rustls_pemfile::private_key(&mut &data[..])
        .with_context(|| format!("{}: not a PEM private key", path.display()))?
        .with_context(|| format!("{}: contains no PEM private key", path.display()))
}

pub fn client_config(ca: &Path, cert: &Path, key: &Path) -> Result<quinn::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots
            .add(c)
            .with_context(|| format!("{}: not a usable CA certificate", ca.display()))?;
    }
    // Refuse to start with a certificate the configured CA did not sign: the
    // aggregator would refuse every connection, and the cause would be far away.
    let leaf = load_certs(cert)?;
    let ca_cert = load_certs(ca)?;
    let (_, c) = x509_parser::parse_x509_certificate(&leaf[0])
        .map_err(|e| anyhow::anyhow!("{}: unparsable certificate: {e}", cert.display()))?;
    // Any CA in the file will do (a file with two CAs during a CA rotation).
    let signed = ca_cert.iter().any(|der| {
        x509_parser::parse_x509_certificate(der)
            .map(|(_, a)| c.verify_signature(Some(a.public_key())).is_ok())
            .unwrap_or(false)
    });
    signed.then_some(()).ok_or_else(|| {
        anyhow::anyhow!(
            "cert: {} was not issued by the CA in {} (ca)",
            cert.display(),
            ca.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(leaf, load_key(key)?)
        .with_context(|| {
            format!(
                "{} and {} do not form a usable certificate/key pair",
                cert.display(),
                key.display()
            )
        })?;
    tls.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    // An aggregator that vanished (killed, host down) is given up after 10 s of silence
    // (pings every 2 s), and the sensor moves to its next aggregator.
    transport.keep_alive_interval(Some(std::time::Duration::from_secs(2)));
    transport.max_idle_timeout(Some(std::time::Duration::from_secs(10).try_into()?));
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// The host identity in a certificate file: its subject's common name (what the aggregator
/// reads), or None when the file cannot be read or has none.
pub fn identity(cert: &Path) -> Option<String> {
    let c = load_certs(cert).ok()?.into_iter().next()?;
    let (_, x) = x509_parser::parse_x509_certificate(&c).ok()?;
    let cn = x
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    Some(cn)
}
