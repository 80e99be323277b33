//! 8: containers and processes. The sensor's cost with 200 cgroups and ~500 processes on
//! the host — without its cgroup and process collectors, with them (defaults), and with
//! every cgroup and process read in full every interval (`idle_stride = 1`) — side by side
//! with collectd's cgroups and processes plugins and Netdata (its cgroups.plugin and
//! apps.plugin run by default); then the bytes per sample of the new tables on the wire.

use super::*;

const CGROUPS: usize = 200;
const PROCESSES: usize = 500;
const BUSY: usize = 20;

/// The cgroups and processes the section puts on the host; removed on drop.
struct Load {
    dirs: Vec<PathBuf>,
    children: Vec<Child>,
}

impl Drop for Load {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
        // Leaves first.
        for d in self.dirs.iter().rev() {
            for _ in 0..20 {
                if std::fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn processes_now() -> usize {
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
                .count()
        })
        .unwrap_or(0)
}

fn load() -> Result<Load> {
    let root = Path::new("/sys/fs/cgroup");
    let hier: Vec<PathBuf> = if root.join("memory").is_dir() {
        ["cpu", "cpuacct", "memory", "blkio", "pids"]
            .iter()
            .map(|c| root.join(c))
            .filter(|p| p.is_dir())
            .collect()
    } else {
        vec![root.to_path_buf()]
    };
    let mut l = Load {
        dirs: Vec::new(),
        children: Vec::new(),
    };
    for h in &hier {
        let base = h.join("sonde-bench");
        std::fs::create_dir_all(&base).with_context(|| format!("mkdir {}", base.display()))?;
        l.dirs.push(base);
    }
    for i in 0..CGROUPS {
        for h in &hier {
            let d = h.join("sonde-bench").join(format!("c{i}"));
            std::fs::create_dir_all(&d)?;
            l.dirs.push(d);
        }
    }
    let place = |pid: u32, i: usize| {
        for h in &hier {
            let _ = std::fs::write(
                h.join("sonde-bench")
                    .join(format!("c{}", i % CGROUPS))
                    .join("cgroup.procs"),
                pid.to_string(),
            );
        }
    };
    // A few light workers (wake 100 times a second, a little work each), as services do...
    for i in 0..BUSY {
        let c = Command::new("perl")
            .args([
                "-e",
                "while (1) { select(undef, undef, undef, 0.01); my $i = 0; $i++ for 1..2000 }",
            ])
            .stdout(Stdio::null())
            .spawn()?;
        place(c.id(), i);
        l.children.push(c);
    }
    // ...and sleepers up to the process count.
    let mut i = BUSY;
    while processes_now() < PROCESSES && l.children.len() < PROCESSES {
        let c = Command::new("sleep").arg("3600").spawn()?;
        place(c.id(), i);
        l.children.push(c);
        i += 1;
    }
    Ok(l)
}

fn config(env: &Env, name: &str, extra: &str) -> Result<PathBuf> {
    let p = sensor_config(env, name, "none")?;
    let mut text = std::fs::read_to_string(&p)?;
    text.push('\n');
    text.push_str(extra);
    std::fs::write(&p, text)?;
    Ok(p)
}

pub(super) fn containers(env: &Env, secs: u64) -> Result<Value> {
    step(&format!(
        "containers and processes: {CGROUPS} cgroups and {PROCESSES} processes on the host; sensor without / with its cgroup and process collectors, collectd (cgroups + processes plugins), netdata — {secs} s side by side"
    ));
    let l = load()?;
    let procs = processes_now();
    let variants = [
        (
            "sensor, /proc only, cgroups and processes off",
            "bench-cg-off",
            "[cgroups]\nenabled = false\n[processes]\nenabled = false\n",
        ),
        (
            "sensor, /proc + cgroups + top processes (defaults)",
            "bench-cg-on",
            "",
        ),
        (
            "sensor, /proc + cgroups + top processes, idle_stride = 1 (everything every second)",
            "bench-cg-all",
            "[cgroups]\nidle_stride = 1\n[processes]\nidle_stride = 1\n",
        ),
    ];
    let mut running: Vec<(String, Vec<u32>, Proc)> = Vec::new();
    for (label, host, extra) in variants {
        let cfg = config(env, host, extra)?;
        let p = spawn(
            &format!("sensor {host}"),
            Command::new(env.bin.join("sensor"))
                .arg("run")
                .arg("--config")
                .arg(&cfg)
                .env("RUST_LOG", "warn"),
            &env.dir.join(format!("sensor-{host}.log")),
        )?;
        running.push((label.to_string(), vec![p.child.id()], p));
    }
    let cd_conf = env.dir.join("collectd.conf");
    std::fs::write(
        &cd_conf,
        "Interval 1\nFQDNLookup false\nLoadPlugin cgroups\nLoadPlugin processes\n<Plugin processes>\n  ProcessMatch \"all\" \".*\"\n  CollectContextSwitch true\n  CollectFileDescriptor false\n</Plugin>\n",
    )?;
    let cd = spawn(
        "collectd",
        Command::new("collectd").args(["-f", "-C"]).arg(&cd_conf),
        &env.dir.join("collectd.log"),
    )?;
    let nd_port = free_port();
    let nd = if have("netdata") || Path::new("/usr/sbin/netdata").exists() {
        Some(spawn(
            "netdata",
            Command::new("netdata").args(["-D", "-p", &nd_port.to_string()]),
            &env.dir.join("netdata-containers.log"),
        )?)
    } else {
        None
    };
    // Start-up (first scans, netdata's plugins) is not measured.
    std::thread::sleep(Duration::from_secs(8));
    for (label, _, p) in &mut running {
        if let Ok(Some(st)) = p.child.try_wait() {
            bail!("{label} exited ({st}) before the measurement: see its log in target/bench");
        }
    }
    let mut groups: Vec<(String, Vec<u32>)> = running
        .iter()
        .map(|(l, p, _)| (l.clone(), p.clone()))
        .collect();
    groups.push((
        "collectd (cgroups + processes plugins, 1 s)".into(),
        vec![cd.child.id()],
    ));
    if let Some(nd) = &nd {
        groups.push((
            "netdata (default: cgroups.plugin, apps.plugin, 1 s)".into(),
            tree(nd.child.id()),
        ));
    }
    let start: Vec<u64> = groups
        .iter()
        .map(|(_, p)| p.iter().map(|&p| cpu_ns(p)).sum())
        .collect();
    let mut steady = vec![0u64; groups.len()];
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        for (i, (_, p)) in groups.iter().enumerate() {
            steady[i] = steady[i].max(p.iter().map(|&p| rss_kb(p)).sum());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let wall = t0.elapsed().as_secs_f64();
    let mut rows = Vec::new();
    for (i, (name, p)) in groups.iter().enumerate() {
        let cpu = p
            .iter()
            .map(|&p| cpu_ns(p))
            .sum::<u64>()
            .saturating_sub(start[i]);
        rows.push(json!({
            "name": name,
            "cpu_ms_per_s": cpu as f64 / 1e6 / wall,
            "cpu_pct_of_one_core": cpu as f64 / 1e9 / wall * 100.0,
            "steady_rss_mb": steady[i] as f64 / 1024.0,
            "peak_rss_mb": p.iter().map(|&p| hwm_kb(p)).sum::<u64>() as f64 / 1024.0,
        }));
    }
    drop(cd);
    drop(nd);
    drop(running);
    // Wire: the new tables' share of real batches (5 snapshots, zstd 3, as the sensor
    // ships them): bytes added by cgroups, cgroup_io and processes per sample they add.
    let rec = env.dir.join("containers.rec");
    let cfg = config(env, "bench-cg-on", "")?;
    run(Command::new(env.bin.join("sensor"))
        .args(["record", "--count", "21", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&rec)
        .env("RUST_LOG", "warn"))?;
    let wire = new_tables_wire(&rec).unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
    drop(l);
    Ok(json!({
        "cgroups": CGROUPS,
        "processes": procs,
        "busy_processes": BUSY,
        "secs": wall,
        "rows": rows,
        "wire": wire,
    }))
}

fn new_tables_wire(rec: &Path) -> Result<Value> {
    let data = std::fs::read(rec)?;
    let (snaps, _) = protocol::read_recording(&data).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let (mut with, mut without, mut samples, mut rows) = (0usize, 0usize, 0u64, [0usize; 3]);
    let mut scratch = Vec::new();
    for (i, chunk) in snaps.chunks(5).enumerate() {
        if chunk.len() < 5 {
            break;
        }
        let batch = |strip: bool| protocol::Batch {
            host: "h".into(),
            boot_id: "b".into(),
            seq: i as u64 + 1,
            info: None,
            snapshots: chunk
                .iter()
                .cloned()
                .map(|mut s| {
                    if strip {
                        s.cgroups.clear();
                        s.cgroup_io.clear();
                        s.processes.clear();
                    }
                    s
                })
                .collect(),
        };
        let full = batch(false);
        let base = batch(true);
        with += protocol::encode_batch(&full, 3, &mut scratch).len();
        without += protocol::encode_batch(&base, 3, &mut scratch).len();
        samples += full.sample_count() - base.sample_count();
        for s in &full.snapshots {
            rows[0] += s.cgroups.len();
            rows[1] += s.cgroup_io.len();
            rows[2] += s.processes.len();
        }
    }
    let n = (snaps.len() / 5 * 5).max(1);
    Ok(json!({
        "snapshots": n,
        "rows_per_snapshot": { "cgroups": rows[0] / n, "cgroup_io": rows[1] / n, "processes": rows[2] / n },
        "bytes_per_snapshot_with": with as f64 / n as f64,
        "bytes_per_snapshot_without": without as f64 / n as f64,
        "new_samples_per_snapshot": samples as f64 / n as f64,
        "bytes_per_new_sample": (with.saturating_sub(without)) as f64 / samples.max(1) as f64,
    }))
}
