//! `cargo xtask certs`: a deployment CA, the aggregator's certificate and
//! per-host sensor certificates. The CA key stays in the certs directory of
//! the machine that ran this (mode 0600); nothing here copies it anywhere.

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn write_private(path: &Path, pem: &str) -> Result<()> {
    std::fs::write(path, pem).with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

fn dn(cn: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::OrganizationName, "sonde");
    d.push(DnType::CommonName, cn);
    d
}

/// Loads the CA in `dir`, or creates it.
pub fn ca(dir: &Path) -> Result<Ca> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (cp, kp) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    if cp.exists() && kp.exists() {
        let key = KeyPair::from_pem(&std::fs::read_to_string(&kp)?)
            .with_context(|| format!("{}: not a private key", kp.display()))?;
        let params = CertificateParams::from_ca_cert_pem(&std::fs::read_to_string(&cp)?)
            .with_context(|| format!("{}: not a CA certificate", cp.display()))?;
        // Re-signing the parsed parameters gives an issuer object with the same
        // name and key; certificates it signs verify against the original ca.pem.
        let cert = params.self_signed(&key)?;
        return Ok(Ca { cert, key });
    }
    if cp.exists() != kp.exists() {
        bail!(
            "{} has only one of ca.pem and ca-key.pem; remove it or restore the other",
            dir.display()
        );
    }
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.distinguished_name = dn("sonde deployment CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::days(1);
    p.not_after = now + Duration::days(3650);
    let cert = p.self_signed(&key)?;
    std::fs::write(&cp, cert.pem())?;
    write_private(&kp, &key.serialize_pem())?;
    println!(
        "created deployment CA {} (key {} stays here, mode 0600)",
        cp.display(),
        kp.display()
    );
    Ok(Ca { cert, key })
}

/// Issues a leaf certificate `name` into `out_dir/name.pem` + `name-key.pem`.
pub fn issue(
    ca: &Ca,
    out_dir: &Path,
    file: &str,
    cn: &str,
    sans: &[String],
    server: bool,
) -> Result<PathBuf> {
    std::fs::create_dir_all(out_dir)?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(sans.to_vec())
        .with_context(|| format!("bad subject alternative names {sans:?}"))?;
    p.distinguished_name = dn(cn);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::days(1);
    p.not_after = now + Duration::days(825);
    let cert = p.signed_by(&key, &ca.cert, &ca.key)?;
    let cp = out_dir.join(format!("{file}.pem"));
    std::fs::write(&cp, cert.pem())?;
    write_private(
        &out_dir.join(format!("{file}-key.pem")),
        &key.serialize_pem(),
    )?;
    Ok(cp)
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// What `cargo xtask certs` does. Existing leaf certificates are kept unless `force`.
pub fn run(dir: &Path, hosts: &[String], aggregator_names: &[String], force: bool) -> Result<()> {
    let ca = ca(dir)?;
    let agg = dir.join("aggregator.pem");
    if force || !agg.exists() {
        let mut sans: Vec<String> = vec![
            "sonde-aggregator".into(),
            "localhost".into(),
            "127.0.0.1".into(),
            "::1".into(),
        ];
        sans.extend(aggregator_names.iter().cloned());
        issue(&ca, dir, "aggregator", "sonde-aggregator", &sans, true)?;
        println!("issued {} for {}", agg.display(), sans.join(", "));
    }
    for h in hosts {
        if h.is_empty() || h.contains('/') || h.starts_with('.') {
            bail!("host name {h:?} cannot be used as a certificate name");
        }
        let p = dir.join("hosts").join(format!("{h}.pem"));
        if force || !p.exists() {
            issue(&ca, &dir.join("hosts"), h, h, &[h.clone()], false)?;
            println!("issued {} (sensor identity {h})", p.display());
        }
    }
    Ok(())
}
