//! `cargo xtask deploy` against real sshd "hosts": Debian's openssh-server in
//! two network namespaces on a private bridge, each in its own mount and UTS
//! namespace (its own hostname, and private copies of /etc, /usr/local,
//! /var/lib, /var/log and /run, so the two hosts do not share installs),
//! key-based auth with a key the test generates.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

struct Net {
    bridge: String,
    namespaces: Vec<String>,
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            sh(&format!("ip netns del {ns}"));
            sh(&format!("ip link del {ns}h"));
        }
        sh(&format!("ip link del {}", self.bridge));
    }
}

struct FakeHost {
    root: PathBuf,
    addr: String,
    _sshd: Proc,
}

fn fake_host(dir: &Path, net: &mut Net, subnet: &str, idx: u32, name: &str) -> FakeHost {
    let ns = format!("{}n{idx}", net.bridge);
    net.namespaces.push(ns.clone());
    let addr = format!("{subnet}.{}", idx + 1);
    for c in [
        format!("ip netns add {ns}"),
        format!("ip link add {ns}h type veth peer name {ns}s"),
        format!("ip link set {ns}h master {} up", net.bridge),
        format!("ip link set {ns}s netns {ns}"),
        format!("ip netns exec {ns} ip addr add {addr}/24 dev {ns}s"),
        format!("ip netns exec {ns} ip link set {ns}s up"),
        format!("ip netns exec {ns} ip link set lo up"),
    ] {
        must(&c);
    }
    let root = dir.join(name);
    for d in [
        "usrlocal/bin",
        "usrlocal/lib",
        "varlib",
        "varlog",
        "run/sshd",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    must(&format!("cp -a /etc {}/etc", root.display()));
    must(&format!(
        "ssh-keygen -q -t ed25519 -N '' -f {}/hostkey",
        root.display()
    ));
    let cfg = root.join("sshd_config");
    std::fs::write(
        &cfg,
        format!(
            "Port 22\nListenAddress {addr}\nHostKey {r}/hostkey\nPidFile /run/sshd.pid\n\
             AuthorizedKeysFile {d}/id.pub\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nLogLevel VERBOSE\nSubsystem sftp /usr/lib/openssh/sftp-server\n",
            r = root.display(),
            d = dir.display()
        ),
    )
    .unwrap();
    let r = root.display();
    let script = format!(
        "hostname {name} && mount --bind {r}/etc /etc && mount --bind {r}/usrlocal /usr/local && \
         mount --bind {r}/varlib /var/lib && mount --bind {r}/varlog /var/log && \
         mount --bind {r}/run /run && exec /usr/sbin/sshd -D -e -f {r}/sshd_config"
    );
    let log = root.join("sshd.log");
    let child = Command::new("ip")
        .args([
            "netns", "exec", &ns, "unshare", "--mount", "--uts", "sh", "-c",
        ])
        .arg(&script)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let sshd = Proc::new(child, log, &format!("sshd {name}"));
    wait_until("sshd listening", Duration::from_secs(10), || {
        std::net::TcpStream::connect_timeout(
            &format!("{addr}:22").parse().unwrap(),
            Duration::from_millis(300),
        )
        .is_ok()
    });
    FakeHost {
        root,
        addr,
        _sshd: sshd,
    }
}

fn xtask(args: &[String]) -> (i32, String) {
    let out = Command::new(bin("xtask")).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("$ xtask {}\n{text}", args.join(" "));
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn deploy_two_hosts_upgrade_in_place_one_unreachable_then_undeploy() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: namespaces and sshd need root");
        return;
    }
    let d = Dir::new("deploy");
    certs(&d.0.join("certs"), &[]);
    must(&format!(
        "ssh-keygen -q -t ed25519 -N '' -f {}/id",
        d.0.display()
    ));
    let tag = std::process::id() % 10000;
    let subnet = format!("10.234.{}", tag % 250);
    let mut net = Net {
        bridge: format!("sdb{tag}"),
        namespaces: Vec::new(),
    };
    must(&format!("ip link add {} type bridge", net.bridge));
    must(&format!("ip addr add {subnet}.1/24 dev {}", net.bridge));
    must(&format!("ip link set {} up", net.bridge));
    let h1 = fake_host(&d.0, &mut net, &subnet, 1, "web-1");
    let h2 = fake_host(&d.0, &mut net, &subnet, 2, "web-2");
    let agg = start_aggregator_at(&d.0, &format!("{subnet}.1:{}", free_udp_port()), "a", &[]);
    let base = |hosts: &[String]| -> Vec<String> {
        let mut v: Vec<String> = vec!["deploy".into()];
        for h in hosts {
            v.push("--host".into());
            v.push(h.clone());
        }
        v.extend(
            [
                "--aggregator",
                &agg.quic,
                "--certs",
                &d.0.join("certs").display().to_string(),
                "--identity",
                &d.0.join("id").display().to_string(),
                "--api",
                &format!("http://{}", agg.http),
                "--wait",
                "15s",
                "--sensor-binary",
                &bin("sensor").display().to_string(),
                "--ssh-option",
                &format!("UserKnownHostsFile={}/known_hosts", d.0.display()),
                "--ssh-option",
                "ConnectTimeout=4",
            ]
            .map(String::from),
        );
        v
    };
    // web-1 gets labels, as a hosts file's label column would give them.
    let good = [
        format!("root@{} env=test,role=web", h1.addr),
        format!("root@{}", h2.addr),
    ];
    // 1. Two good hosts and one nobody answers: the good ones report within 15 s, the
    //    bad one fails with its reason, the exit status says something failed.
    let mut all = good.to_vec();
    all.push(format!("root@{subnet}.99"));
    let (code, out) = xtask(&base(&all));
    assert_ne!(code, 0, "exit status must say a host failed");
    for name in ["web-1", "web-2"] {
        let line = out
            .lines()
            .find(|l| l.starts_with("ok") && l.contains(name))
            .unwrap_or_else(|| panic!("no ok line for {name}:\n{out}"));
        let secs: f64 = line
            .split("reporting ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{line}"));
        assert!(secs <= 15.0, "{name} reported after {secs} s");
        assert!(line.contains("supervised"), "{line}");
        // A fresh host: nothing installed before, this build after.
        assert!(
            line.contains("sensor none -> 0.1.0 (commit ")
                && line.contains(&format!(", wire {})", protocol::VERSION)),
            "{line}"
        );
    }
    let bad = out
        .lines()
        .find(|l| l.starts_with("FAILED") && l.contains(&format!("{subnet}.99")))
        .unwrap_or_else(|| panic!("no FAILED line for the unreachable host:\n{out}"));
    assert!(
        bad.contains("ssh") || bad.contains("connect") || bad.contains("route"),
        "reason: {bad}"
    );
    // Installed where the README says, with the key private.
    for h in [&h1, &h2] {
        for p in [
            "usrlocal/bin/sonde-sensor",
            "etc/sonde/sensor.toml",
            "etc/sonde/ca.pem",
            "etc/sonde/sensor.pem",
            "etc/sonde/sensor-key.pem",
            "varlib/sonde/spool",
            "run/sonde-sensor.pid",
        ] {
            assert!(h.root.join(p).exists(), "{} missing", p);
        }
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(h.root.join("etc/sonde/sensor-key.pem"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let passwd = std::fs::read_to_string(h.root.join("etc/passwd")).unwrap();
        assert!(passwd.lines().any(|l| l.starts_with("sonde:")));
    }
    let pids: Vec<String> = [&h1, &h2]
        .iter()
        .map(|h| {
            std::fs::read_to_string(h.root.join("run/sonde-sensor.pid"))
                .unwrap()
                .trim()
                .to_string()
        })
        .collect();

    // The labels reached the sensor's configuration and, through its batches, ClickHouse.
    let cfg = std::fs::read_to_string(h1.root.join("etc/sonde/sensor.toml")).unwrap();
    assert!(
        cfg.contains("labels = { env = \"test\", role = \"web\" }"),
        "{cfg}"
    );
    wait_until(
        "web-1's labels in host_labels",
        Duration::from_secs(20),
        || {
            query(
            &agg,
            "SELECT DISTINCT name, value FROM sonde.host_labels WHERE host = 'web-1' ORDER BY name FORMAT TabSeparated",
        ) == "env\ttest\nrole\tweb\n"
        },
    );
    assert_eq!(
        count(
            &agg,
            "SELECT count() FROM sonde.host_labels WHERE host = 'web-2'"
        ),
        0
    );

    // 2. Deploy again: an upgrade in place, no gap in sequences, no duplicate.
    std::thread::sleep(Duration::from_secs(6));
    let t_up = now_s();
    let (code, out) = xtask(&base(&good));
    let t_done = now_s();
    assert_eq!(code, 0, "upgrade failed:\n{out}");
    // An upgrade says what ran before and what runs now.
    for name in ["web-1", "web-2"] {
        let line = out
            .lines()
            .find(|l| l.starts_with("ok") && l.contains(name))
            .unwrap_or_else(|| panic!("no ok line for {name}:\n{out}"));
        let versions = line.split("; sensor ").nth(1).unwrap_or("");
        let (before, after) = versions.split_once(" -> ").unwrap_or(("", ""));
        assert!(
            before.starts_with("0.1.0 (commit ") && after.starts_with("0.1.0 (commit "),
            "{line}"
        );
    }
    std::thread::sleep(Duration::from_secs(8));
    for name in ["web-1", "web-2"] {
        let boots = query(
            &agg,
            &format!(
                "SELECT sensor_boot_id, min(seq), max(seq), count(), uniqExact(seq) FROM sonde.batches \
                 WHERE host = '{name}' GROUP BY sensor_boot_id ORDER BY min(received) FORMAT TabSeparated"
            ),
        );
        let rows: Vec<Vec<String>> = boots
            .lines()
            .map(|l| l.split('\t').map(String::from).collect())
            .collect();
        assert_eq!(
            rows.len(),
            2,
            "{name}: one boot before and one after the upgrade: {boots}"
        );
        for r in &rows {
            assert_eq!(r[1], "1", "{name}: sequence starts at 1: {boots}");
            assert_eq!(r[2], r[3], "{name}: gap in the sequence: {boots}");
            assert_eq!(r[3], r[4], "{name}: duplicated batch: {boots}");
        }
        let tsv = query(
            &agg,
            &format!(
                "SELECT toUInt32(ts), count() FROM sonde.cpu WHERE host = '{name}' AND cpu = 'total' GROUP BY ts ORDER BY ts FORMAT TabSeparated"
            ),
        );
        let mut prev: Option<u64> = None;
        for l in tsv.lines() {
            let mut f = l.split('\t');
            let ts: u64 = f.next().unwrap().parse().unwrap();
            let n: u64 = f.next().unwrap().parse().unwrap();
            assert_eq!(n, 1, "{name}: second {ts} stored {n} times");
            if let Some(p) = prev {
                if ts > p + 1 {
                    // Only while the sensor was being replaced.
                    assert!(
                        p + 1 >= t_up && ts - 1 <= t_done + 1,
                        "{name}: samples missing {}..={} outside the upgrade ({t_up}..{t_done})",
                        p + 1,
                        ts - 1
                    );
                }
            }
            prev = Some(ts);
        }
    }
    for (h, old) in [&h1, &h2].iter().zip(&pids) {
        let new = std::fs::read_to_string(h.root.join("run/sonde-sensor.pid")).unwrap();
        assert_ne!(new.trim(), old, "the supervisor was restarted");
        assert!(
            !Path::new(&format!("/proc/{old}")).exists(),
            "the old supervisor {old} is gone"
        );
    }

    // 3. Undeploy: nothing of sonde remains.
    let mut args: Vec<String> = vec!["undeploy".into()];
    for h in &good {
        args.push("--host".into());
        args.push(h.clone());
    }
    args.extend(
        [
            "--identity",
            &d.0.join("id").display().to_string(),
            "--ssh-option",
            &format!("UserKnownHostsFile={}/known_hosts", d.0.display()),
        ]
        .map(String::from),
    );
    let (code, out) = xtask(&args);
    assert_eq!(code, 0, "undeploy failed:\n{out}");
    for h in [&h1, &h2] {
        for p in [
            "usrlocal/bin/sonde-sensor",
            "usrlocal/lib/sonde",
            "etc/sonde",
            "varlib/sonde",
            "varlog/sonde",
            "run/sonde-sensor.pid",
        ] {
            assert!(!h.root.join(p).exists(), "{} left behind", p);
        }
        for f in ["etc/passwd", "etc/group", "etc/shadow"] {
            let t = std::fs::read_to_string(h.root.join(f)).unwrap_or_default();
            assert!(
                !t.lines().any(|l| l.starts_with("sonde:")),
                "sonde left in {f}"
            );
        }
    }
    let left = Command::new("pgrep")
        .args(["-f", "/usr/local/bin/sonde-sensor run"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&left.stdout).trim().is_empty(),
        "sensor processes left running"
    );
    drop(agg);
}
