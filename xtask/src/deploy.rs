//! `cargo xtask deploy` / `undeploy`: the sensor on many hosts over SSH.
//!
//! Per host, in parallel: probe it (name, architecture, init system, root),
//! issue its certificate from the local deployment CA (the CA key never leaves
//! this machine), copy binary, config and certificates with the system's
//! scp, install them in standard places and (re)start the service: a systemd
//! unit when the host runs systemd, otherwise a small supervisor with a pid
//! file. Then wait until each host reports to the aggregator (`/api/hosts`).
//! Deploying again upgrades in place: the sensor is stopped with SIGTERM (its
//! open batch goes to the spool), replaced, and started; the spool in
//! /var/lib/sonde survives, so nothing is lost.

use crate::setup::{root, run, step};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// One target: `[name=]user@addr[:port] [label=value ...]`.
#[derive(Clone, Debug)]
pub struct Target {
    pub name: Option<String>,
    pub user: String,
    pub addr: String,
    pub port: u16,
    /// The host's labels (written into its sensor's configuration).
    pub labels: Vec<(String, String)>,
}

impl Target {
    pub fn parse(line: &str) -> Result<Target> {
        // The target, then labels (`env=prod role=db`, or comma-separated).
        let mut words = line.split_whitespace();
        let s = words.next().unwrap_or("");
        let mut labels = Vec::new();
        for w in words.flat_map(|w| w.split(',')).filter(|w| !w.is_empty()) {
            let (k, v) = w
                .split_once('=')
                .with_context(|| format!("{line:?}: label {w:?}: expected name=value"))?;
            let ok = k.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                && k.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                && k != "host";
            if !ok || v.is_empty() {
                bail!("{line:?}: label {w:?}: names are lower-case letters, digits and '_' (not `host`), values not empty");
            }
            labels.push((k.to_string(), v.to_string()));
        }
        let (name, rest) = match s.split_once('=') {
            Some((n, r)) => (Some(n.trim().to_string()), r.trim()),
            None => (None, s),
        };
        let (user, hostport) = rest
            .split_once('@')
            .with_context(|| format!("{s:?}: expected [name=]user@address[:port]"))?;
        if user.is_empty() {
            bail!("{s:?}: empty user");
        }
        // [v6]:port, v4:port, name:port, or no port.
        let (addr, port) = if let Some(r) = hostport.strip_prefix('[') {
            let (a, p) = r
                .split_once(']')
                .with_context(|| format!("{s:?}: unclosed ["))?;
            let port = match p.strip_prefix(':') {
                Some(p) => p.parse().with_context(|| format!("{s:?}: bad port"))?,
                None => 22,
            };
            (a.to_string(), port)
        } else {
            match hostport.rsplit_once(':') {
                Some((a, p)) if !a.contains(':') => (
                    a.to_string(),
                    p.parse()
                        .with_context(|| format!("{s:?}: bad port {p:?}"))?,
                ),
                _ => (hostport.to_string(), 22),
            }
        };
        if addr.is_empty() {
            bail!("{s:?}: empty address");
        }
        if let Some(n) = &name {
            check_name(n)?;
        }
        Ok(Target {
            name,
            user: user.to_string(),
            addr,
            port,
            labels,
        })
    }

    fn label(&self) -> String {
        format!("{}@{}:{}", self.user, self.addr, self.port)
    }
}

fn check_name(n: &str) -> Result<()> {
    if n.is_empty()
        || n.len() > 253
        || !n
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
    {
        bail!("{n:?} is not usable as a host name");
    }
    Ok(())
}

pub struct Opts {
    pub targets: Vec<Target>,
    pub aggregators: Vec<String>,
    pub server_name: String,
    pub identity: Option<PathBuf>,
    pub certs: PathBuf,
    pub api: Option<String>,
    pub api_token: Option<String>,
    pub wait: Duration,
    pub rotate_certs: bool,
    pub parallel: usize,
    pub sensor_binary: Option<PathBuf>,
    pub ssh_options: Vec<String>,
}

pub fn read_hosts_file(p: &Path) -> Result<Vec<Target>> {
    let text =
        std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
    let mut v = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.split('#').next().unwrap_or("").trim();
        if l.is_empty() {
            continue;
        }
        v.push(Target::parse(l).with_context(|| format!("{}:{}", p.display(), i + 1))?);
    }
    Ok(v)
}

fn ssh_base(cmd: &str, t: &Target, o: &[String], identity: Option<&Path>) -> Command {
    let mut c = Command::new(cmd);
    // ssh keeps the first value given for an option: the user's come first.
    for x in o {
        c.args(["-o", x]);
    }
    c.args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]);
    c.args(["-o", "StrictHostKeyChecking=accept-new"]);
    c.args(["-o", "ServerAliveInterval=10"]);
    if let Some(i) = identity {
        c.arg("-i").arg(i);
    }
    c.arg(if cmd == "scp" { "-P" } else { "-p" });
    c.arg(t.port.to_string());
    c.stdin(Stdio::null());
    c
}

/// Runs `script` with sh on the target (as root: via `sudo -n` when the login is not root).
fn ssh_sh(t: &Target, o: &[String], id: Option<&Path>, script: &str) -> Result<String> {
    let mut c = ssh_base("ssh", t, o, id);
    let shell = if t.user == "root" {
        "sh -s"
    } else {
        "sudo -n sh -s"
    };
    c.arg(format!("{}@{}", t.user, t.addr)).arg(shell);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c
        .spawn()
        .context("cannot run ssh (install openssh-client)")?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let reason = err
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with("Warning: Permanently added"))
            .last()
            .unwrap_or("")
            .trim()
            .to_string();
        bail!(
            "{}",
            if reason.is_empty() {
                format!("remote command failed ({})", out.status)
            } else {
                reason
            }
        );
    }
    Ok(stdout)
}

struct Probe {
    hostname: String,
    arch: String,
    systemd: bool,
    stage: String,
    /// `sonde-sensor --version` of what is installed, "none" when nothing is.
    installed: String,
}

const PROBE: &str = r#"set -e
uname -m
hostname
if [ -d /run/systemd/system ]; then echo systemd; else echo none; fi
mktemp -d /tmp/sonde-deploy.XXXXXX
(/usr/local/bin/sonde-sensor --version 2>/dev/null || echo none) | head -n 1
"#;

fn probe(t: &Target, o: &Opts) -> Result<Probe> {
    let out = ssh_sh(t, &o.ssh_options, o.identity.as_deref(), PROBE)?;
    let l: Vec<&str> = out.lines().map(str::trim).collect();
    if l.len() < 4 {
        bail!("unexpected answer from the host: {out:?}");
    }
    Ok(Probe {
        arch: l[0].into(),
        hostname: l[1].into(),
        systemd: l[2] == "systemd",
        stage: l[3].into(),
        installed: version_of(l.get(4).copied().unwrap_or("none")),
    })
}

const UNIT: &str = "[Unit]
Description=sonde host sensor
Documentation=https://github.com/sonde/sonde
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User=sonde
Group=sonde
ExecStart=/usr/local/bin/sonde-sensor run --config /etc/sonde/sensor.toml
Restart=always
RestartSec=2
KillSignal=SIGTERM
TimeoutStopSec=20
# Loading eBPF programs: CAP_BPF + CAP_PERFMON; reading tracefs (tracepoint ids and
# formats) and other users' /proc entries: CAP_DAC_READ_SEARCH; OOM details from
# /dev/kmsg: CAP_SYSLOG. The sensor gives them all up once its probes are attached.
AmbientCapabilities=CAP_BPF CAP_PERFMON CAP_DAC_READ_SEARCH CAP_SYSLOG
CapabilityBoundingSet=CAP_BPF CAP_PERFMON CAP_DAC_READ_SEARCH CAP_SYSLOG
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
ReadWritePaths=/var/lib/sonde
PrivateTmp=yes
PrivateDevices=no
ProtectKernelModules=yes
ProtectControlGroups=yes
ProtectClock=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryMax=128M

[Install]
WantedBy=multi-user.target
";

/// Without systemd: restarts the sensor when it exits; SIGTERM stops both.
const SUPERVISOR: &str = r#"#!/bin/sh
# sonde-sensor supervisor, installed by `cargo xtask deploy` on hosts without systemd.
PIDFILE=/run/sonde-sensor.pid
echo $$ > "$PIDFILE"
child=
stop() { [ -n "$child" ] && kill -TERM "$child" 2>/dev/null && wait "$child"; rm -f "$PIDFILE"; exit 0; }
trap stop TERM INT
while :; do
    /usr/local/bin/sonde-sensor run --config /etc/sonde/sensor.toml >>/var/log/sonde/sensor.log 2>&1 &
    child=$!
    wait "$child"
    echo "$(date -u +%FT%TZ) sonde-sensor exited ($?); restarting in 2 s" >>/var/log/sonde/sensor.log
    sleep 2
done
"#;

const INSTALL: &str = r#"set -eu
S="$1"
umask 022
trap 'rm -rf "$S"' EXIT
"$S/sonde-sensor" --version >/dev/null
if ! id sonde >/dev/null 2>&1; then
    useradd --system --no-create-home --home-dir /var/lib/sonde --shell /usr/sbin/nologin sonde 2>/dev/null \
      || adduser --system --no-create-home --home /var/lib/sonde --group sonde
fi
install -d -m 0755 /etc/sonde /usr/local/lib/sonde /var/log/sonde
install -d -m 0750 -o sonde -g sonde /var/lib/sonde
install -d -m 0700 -o sonde -g sonde /var/lib/sonde/spool
install -m 0644 "$S/ca.pem" /etc/sonde/ca.pem
install -m 0644 "$S/sensor.pem" /etc/sonde/sensor.pem
install -m 0644 "$S/sensor.toml" /etc/sonde/sensor.toml
if [ "$MODE" = systemd ]; then
    install -m 0600 -o sonde -g sonde "$S/sensor-key.pem" /etc/sonde/sensor-key.pem
    systemctl stop sonde-sensor 2>/dev/null || true
else
    install -m 0600 "$S/sensor-key.pem" /etc/sonde/sensor-key.pem
    if [ -f /run/sonde-sensor.pid ]; then
        pid=$(cat /run/sonde-sensor.pid)
        kill -TERM "$pid" 2>/dev/null || true
        i=0; while kill -0 "$pid" 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
    fi
fi
install -m 0755 "$S/sonde-sensor" /usr/local/bin/sonde-sensor.new
mv -f /usr/local/bin/sonde-sensor.new /usr/local/bin/sonde-sensor
if [ "$MODE" = systemd ]; then
    install -m 0644 "$S/sonde-sensor.service" /etc/systemd/system/sonde-sensor.service
    systemctl daemon-reload
    systemctl enable sonde-sensor >/dev/null 2>&1
    systemctl restart sonde-sensor
else
    install -m 0755 "$S/supervise" /usr/local/lib/sonde/supervise
    setsid /usr/local/lib/sonde/supervise </dev/null >/dev/null 2>&1 &
    i=0; while [ ! -s /run/sonde-sensor.pid ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
fi
echo SONDE_INSTALLED
"#;

const UNINSTALL: &str = r#"set -u
if [ -d /run/systemd/system ] && [ -f /etc/systemd/system/sonde-sensor.service ]; then
    systemctl disable --now sonde-sensor >/dev/null 2>&1 || true
    rm -f /etc/systemd/system/sonde-sensor.service
    systemctl daemon-reload
fi
if [ -f /run/sonde-sensor.pid ]; then
    pid=$(cat /run/sonde-sensor.pid)
    kill -TERM "$pid" 2>/dev/null || true
    i=0; while kill -0 "$pid" 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
fi
rm -rf /usr/local/bin/sonde-sensor /usr/local/lib/sonde /etc/sonde /var/lib/sonde /var/log/sonde /run/sonde-sensor.pid
# userdel refuses while a process of the user is still exiting: wait for them (10 s at most).
if id sonde >/dev/null 2>&1; then
    pkill -TERM -u sonde 2>/dev/null || true
    i=0; while pgrep -u sonde >/dev/null 2>&1 && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
    i=0; until userdel sonde 2>/dev/null || deluser --system sonde >/dev/null 2>&1 || [ $i -ge 20 ]; do sleep 0.2; i=$((i+1)); done
fi
if getent group sonde >/dev/null 2>&1; then groupdel sonde 2>/dev/null || true; fi
echo SONDE_REMOVED
"#;

fn sensor_config(o: &Opts, t: &Target) -> String {
    let aggs: Vec<String> = o.aggregators.iter().map(|a| format!("{a:?}")).collect();
    let labels: Vec<String> = t
        .labels
        .iter()
        .map(|(k, v)| format!("{k} = {}", toml_str(v)))
        .collect();
    format!(
        "# Written by `cargo xtask deploy`; deploying again overwrites it.\n\
         aggregator = [{}]\nserver_name = {:?}\nca = \"/etc/sonde/ca.pem\"\ncert = \"/etc/sonde/sensor.pem\"\n\
         key = \"/etc/sonde/sensor-key.pem\"\nspool_dir = \"/var/lib/sonde/spool\"\nuser = \"sonde\"\nlabels = {{ {} }}\n",
        aggs.join(", "),
        o.server_name,
        labels.join(", ")
    )
}

/// A TOML basic string.
fn toml_str(v: &str) -> String {
    let mut out = String::from("\"");
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The release sensor with its eBPF object, stripped for shipping.
fn build_sensor(o: &Opts) -> Result<PathBuf> {
    let src = match &o.sensor_binary {
        Some(p) => {
            if !p.exists() {
                bail!("--sensor-binary {}: no such file", p.display());
            }
            p.clone()
        }
        None => {
            crate::ebpf::build()?;
            step("building the release sensor");
            run(Command::new("cargo").current_dir(root()).args([
                "build",
                "--release",
                "-p",
                "sonde-sensor",
            ]))?;
            root().join("target/release/sensor")
        }
    };
    let out = root().join("target/deploy");
    std::fs::create_dir_all(&out)?;
    let dst = out.join("sonde-sensor");
    let stripped = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&dst)
        .arg(&src)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !stripped {
        std::fs::copy(&src, &dst)?;
    }
    Ok(dst)
}

enum Outcome {
    Ok {
        name: String,
        mode: &'static str,
        /// Sensor version before and after.
        versions: (String, String),
    },
    Failed(String),
}

/// "0.1.0 (commit …, wire 3)" from a `--version` line ("sensor 0.1.0 (…)").
fn version_of(line: &str) -> String {
    let v = line.trim();
    v.strip_prefix("sensor ").unwrap_or(v).to_string()
}

fn say(label: &str, msg: &str) {
    println!("  [{label}] {msg}");
}

fn deploy_one(t: &Target, o: &Opts, bin: &Path, issue: &Mutex<()>) -> Outcome {
    let label = t.name.clone().unwrap_or_else(|| t.addr.clone());
    let r = (|| -> Result<(String, &'static str, String)> {
        say(&label, &format!("connecting to {}", t.label()));
        let p = probe(t, o)?;
        if p.arch != std::env::consts::ARCH {
            bail!(
                "host is {} but the sensor was built for {}",
                p.arch,
                std::env::consts::ARCH
            );
        }
        let name = t.name.clone().unwrap_or(p.hostname.clone());
        check_name(&name)?;
        let mode = if p.systemd { "systemd" } else { "supervised" };
        // Certificates are issued one at a time (they share the CA files).
        let (cert, key) = {
            let _g = issue.lock().unwrap();
            let dir = o.certs.join("hosts");
            let cp = dir.join(format!("{name}.pem"));
            if o.rotate_certs || !cp.exists() {
                let ca = crate::certs::ca(&o.certs)?;
                crate::certs::issue(&ca, &dir, &name, &name, &[name.clone()], false)?;
                say(&label, &format!("issued certificate {}", cp.display()));
            }
            (cp, dir.join(format!("{name}-key.pem")))
        };
        let stage = root().join("target/deploy").join(&name);
        std::fs::create_dir_all(&stage)?;
        std::fs::write(stage.join("sensor.toml"), sensor_config(o, t))?;
        std::fs::write(stage.join("sonde-sensor.service"), UNIT)?;
        std::fs::write(stage.join("supervise"), SUPERVISOR)?;
        std::fs::copy(o.certs.join("ca.pem"), stage.join("ca.pem"))?;
        std::fs::copy(&cert, stage.join("sensor.pem"))?;
        std::fs::copy(&key, stage.join("sensor-key.pem"))?;
        say(
            &label,
            &format!("copying sensor, config and certificates ({mode})"),
        );
        let mut scp = ssh_base("scp", t, &o.ssh_options, o.identity.as_deref());
        scp.arg("-q").arg(bin);
        for f in [
            "sensor.toml",
            "sonde-sensor.service",
            "supervise",
            "ca.pem",
            "sensor.pem",
            "sensor-key.pem",
        ] {
            scp.arg(stage.join(f));
        }
        scp.arg(format!("{}@{}:{}/", t.user, t.addr, p.stage));
        let out = scp.stderr(Stdio::piped()).output()?;
        let _ = std::fs::remove_file(stage.join("sensor-key.pem"));
        if !out.status.success() {
            bail!(
                "copy failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        say(&label, "installing and (re)starting the sensor");
        let script = format!("MODE={mode}\nset -- {}\n{INSTALL}", p.stage);
        let out = ssh_sh(t, &o.ssh_options, o.identity.as_deref(), &script)?;
        if !out.contains("SONDE_INSTALLED") {
            bail!("install did not finish: {}", out.trim());
        }
        Ok((name, mode, p.installed))
    })();
    match r {
        Ok((name, mode, before)) => {
            let after = Command::new(bin)
                .arg("--version")
                .output()
                .map(|o| version_of(&String::from_utf8_lossy(&o.stdout)))
                .unwrap_or_else(|_| "?".into());
            Outcome::Ok {
                name,
                mode,
                versions: (before, after),
            }
        }
        Err(e) => Outcome::Failed(format!("{e:#}")),
    }
}

/// Hosts the aggregator knows, with when it last stored a batch of theirs (unix seconds).
fn reporting(api: &str, token: Option<&str>) -> Result<Vec<(String, u64)>> {
    let url = format!("{}/api/hosts", api.trim_end_matches('/'));
    let hostport = url
        .strip_prefix("http://")
        .context("--api must be an http:// URL")?
        .split('/')
        .next()
        .unwrap_or("")
        .to_string();
    use std::io::{Read, Write};
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&hostport)?
        .next()
        .context("--api: no address")?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET /api/hosts HTTP/1.0\r\nHost: {hostport}\r\n{auth}\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("");
    if !out.starts_with("HTTP/1.1 200") && !out.starts_with("HTTP/1.0 200") {
        bail!("{url}: {}", out.lines().next().unwrap_or("no answer"));
    }
    let v: serde_json::Value = serde_json::from_str(body)?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| {
            Some((
                h["host"].as_str()?.to_string(),
                h["last_seen_unix"].as_u64().unwrap_or(0),
            ))
        })
        .collect())
}

pub fn deploy(o: Opts) -> Result<()> {
    if o.targets.is_empty() {
        bail!("no hosts: give --host user@address[:port] (repeatable) or --hosts FILE");
    }
    if o.aggregators.is_empty() {
        bail!("--aggregator ADDR:PORT is required (repeatable; sensors fail over between them)");
    }
    if !o.certs.join("ca.pem").exists() || !o.certs.join("ca-key.pem").exists() {
        bail!(
            "no deployment CA in {} (create it with `cargo xtask certs --dir {}`, the same CA the aggregator trusts)",
            o.certs.display(),
            o.certs.display()
        );
    }
    let api = o.api.clone().unwrap_or_else(|| {
        let host = o.aggregators[0]
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(&o.aggregators[0]);
        format!("http://{host}:9464")
    });
    let bin = build_sensor(&o)?;
    let unix = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    };
    step(&format!(
        "deploying to {} host(s), {} at a time",
        o.targets.len(),
        o.parallel.max(1)
    ));
    let issue = Mutex::new(());
    let mut outcomes: Vec<(Target, Outcome, Instant, u64)> = Vec::new();
    for chunk in o.targets.chunks(o.parallel.max(1)) {
        let res: Vec<(Target, Outcome, Instant, u64)> = std::thread::scope(|sc| {
            let hs: Vec<_> = chunk
                .iter()
                .map(|t| {
                    let (o, bin, issue) = (&o, &bin, &issue);
                    sc.spawn(move || {
                        let r = deploy_one(t, o, bin, issue);
                        (t.clone(), r, Instant::now(), unix())
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        outcomes.extend(res);
    }
    // A host counts once the aggregator stored a batch of it after its install finished
    // (on an upgrade, the old sensor's last batch does not count).
    let waiting: Vec<(String, u64)> = outcomes
        .iter()
        .filter_map(|(_, r, _, done)| match r {
            Outcome::Ok { name, .. } => Some((name.clone(), *done)),
            _ => None,
        })
        .collect();
    let mut seen_at: std::collections::HashMap<String, Instant> = Default::default();
    if !waiting.is_empty() {
        step(&format!(
            "waiting up to {:?} for {} host(s) to report to {api}",
            o.wait,
            waiting.len()
        ));
        let deadline = Instant::now() + o.wait;
        let mut last_err = None;
        while seen_at.len() < waiting.len() && Instant::now() < deadline {
            match reporting(&api, o.api_token.as_deref()) {
                Ok(hosts) => {
                    for (h, last) in hosts {
                        let fresh = waiting.iter().any(|(n, done)| *n == h && last > *done);
                        if fresh && !seen_at.contains_key(&h) {
                            seen_at.insert(h, Instant::now());
                        }
                    }
                }
                Err(e) => last_err = Some(format!("{e:#}")),
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        if let (Some(e), true) = (last_err, seen_at.is_empty()) {
            eprintln!("==> the aggregator's API did not answer as expected: {e}");
        }
    }
    println!();
    let mut failed = 0;
    for (t, r, done, _) in &outcomes {
        match r {
            Outcome::Ok {
                name,
                mode,
                versions: (before, after),
            } => match seen_at.get(name) {
                Some(at) => println!(
                    "ok      {name:<24} {:<28} {mode}, reporting {:.1} s after install; sensor {before} -> {after}",
                    t.label(),
                    at.saturating_duration_since(*done).as_secs_f64()
                ),
                None => {
                    failed += 1;
                    println!(
                        "FAILED  {name:<24} {:<28} installed ({mode}) but not reporting to the aggregator after {:?}; see /var/log/sonde/sensor.log or `journalctl -u sonde-sensor` on the host",
                        t.label(),
                        o.wait
                    );
                }
            },
            Outcome::Failed(why) => {
                failed += 1;
                println!(
                    "FAILED  {:<24} {:<28} {why}",
                    t.name.clone().unwrap_or_else(|| t.addr.clone()),
                    t.label()
                );
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} host(s) failed", outcomes.len());
    }
    step(&format!(
        "all {} host(s) deployed and reporting",
        outcomes.len()
    ));
    Ok(())
}

pub fn undeploy(
    targets: Vec<Target>,
    identity: Option<PathBuf>,
    ssh_options: Vec<String>,
    parallel: usize,
) -> Result<()> {
    if targets.is_empty() {
        bail!("no hosts: give --host user@address[:port] (repeatable) or --hosts FILE");
    }
    step(&format!("removing sonde from {} host(s)", targets.len()));
    let mut failed = 0;
    for chunk in targets.chunks(parallel.max(1)) {
        let res: Vec<(Target, Result<String>)> = std::thread::scope(|sc| {
            let hs: Vec<_> = chunk
                .iter()
                .map(|t| {
                    let (id, so) = (identity.as_deref(), &ssh_options);
                    sc.spawn(move || (t.clone(), ssh_sh(t, so, id, UNINSTALL)))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (t, r) in res {
            match r {
                Ok(out) if out.contains("SONDE_REMOVED") => {
                    println!("ok      {:<28} removed", t.label())
                }
                Ok(out) => {
                    failed += 1;
                    println!("FAILED  {:<28} {}", t.label(), out.trim())
                }
                Err(e) => {
                    failed += 1;
                    println!("FAILED  {:<28} {e:#}", t.label())
                }
            }
        }
    }
    if failed > 0 {
        bail!("{failed} host(s) failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = Target::parse("web1=root@10.0.0.5:2222").unwrap();
        assert_eq!(t.name.as_deref(), Some("web1"));
        assert_eq!(
            (t.user.as_str(), t.addr.as_str(), t.port),
            ("root", "10.0.0.5", 2222)
        );
        let t = Target::parse("admin@host.example").unwrap();
        assert_eq!((t.name, t.port), (None, 22));
        let t = Target::parse("root@[fd00::1]:22").unwrap();
        assert_eq!(t.addr, "fd00::1");
        assert!(Target::parse("no-user-here").is_err());
        let t = Target::parse("db1=root@10.0.0.7 env=prod,role=db  rack=r\"7").unwrap();
        assert_eq!(t.name.as_deref(), Some("db1"));
        assert_eq!(
            t.labels,
            [("env", "prod"), ("role", "db"), ("rack", "r\"7")]
                .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        assert_eq!(toml_str("r\"7\\"), "\"r\\\"7\\\\\"");
        assert!(Target::parse("root@x host=evil").is_err());
        assert!(Target::parse("root@x Env=prod").is_err());
        assert!(Target::parse("root@x env").is_err());
        assert!(Target::parse("a b=root@x").is_err());
        assert!(Target::parse("root@x:notaport").is_err());
    }
}
