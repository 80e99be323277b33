//! eBPF probe cost: `perf bench sched pipe` and 4k random reads on a loop device, probes on and off.

use super::*;

pub(super) fn perf_pipe(loops: u32) -> Result<f64> {
    // Both tasks on one CPU: every op is two wakeups and two context switches on that CPU,
    // and cross-CPU migration noise is out of the figure.
    let out = Command::new("taskset")
        .args([
            "-c",
            "1",
            "perf",
            "bench",
            "sched",
            "pipe",
            "-l",
            &loops.to_string(),
        ])
        .output()
        .context("perf bench")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "     12.345678 usecs/op"
    text.lines()
        .find(|l| l.contains("usecs/op"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .context("no usecs/op in perf output")
}

pub(super) fn fio_iops(dev: &str, secs: u32) -> Result<f64> {
    let out = Command::new("fio")
        .args([
            "--name=randread",
            &format!("--filename={dev}"),
            "--rw=randread",
            "--bs=4k",
            "--direct=1",
            "--ioengine=psync",
            "--time_based",
            &format!("--runtime={secs}"),
            "--output-format=json",
        ])
        .output()
        .context("fio")?;
    let v: Value = serde_json::from_slice(&out.stdout).context("fio json")?;
    v["jobs"][0]["read"]["iops"].as_f64().context("no iops")
}

/// bpftrace's runqlat (the tool's script without its header include: no kernel headers
/// here, and TASK_RUNNING is 0), tracing until dropped.
struct Runqlat(std::process::Child);

impl Runqlat {
    fn start() -> Result<Runqlat> {
        let script = include_str!("../../../sensor/src/collect/runqlat.bt");
        let mut child = Command::new("bpftrace")
            .args(["-e", script])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("bpftrace")?;
        let mut out = std::io::BufReader::new(child.stdout.take().context("stdout")?);
        let mut line = String::new();
        use std::io::BufRead;
        out.read_line(&mut line)?;
        if !line.contains("Attaching") {
            let _ = child.kill();
            bail!("bpftrace did not attach: {line}");
        }
        // Keep draining its output so it never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        std::thread::sleep(Duration::from_millis(500));
        Ok(Runqlat(child))
    }
}

impl Drop for Runqlat {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// 4: eBPF probe cost on the workloads that hit them hardest, alternating off/on.
pub(super) fn ebpf_overhead(env: &Env, rounds: usize, quick: bool) -> Result<Value> {
    step("eBPF overhead: perf bench sched pipe and 4k random reads on a loop device, probes off/on alternating");
    let img = env.dir.join("loop.img");
    run(Command::new("truncate").arg("-s").arg("256M").arg(&img))?;
    let out = Command::new("losetup")
        .arg("-f")
        .arg("--show")
        .arg(&img)
        .output()?;
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if dev.is_empty() {
        bail!("losetup failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    // Fill it so reads hit data.
    let _ = Command::new("dd")
        .args([
            "if=/dev/zero",
            &format!("of={dev}"),
            "bs=1M",
            "count=256",
            "oflag=direct",
            "status=none",
        ])
        .status();
    let loops = if quick { 50_000 } else { 200_000 };
    let fio_secs = if quick { 3 } else { 10 };
    let (mut pipe_off, mut pipe_on, mut fio_off, mut fio_on) = (vec![], vec![], vec![], vec![]);
    // The run-queue probe's variants and the peer a user would run instead, in the same rounds.
    let (mut pipe_cg, mut pipe_fb, mut pipe_bt, mut pipe_raw) = (vec![], vec![], vec![], vec![]);
    let mut fio_raw = vec![];
    for _ in 0..rounds {
        // Each workload against the probe it stresses (the other probes' cost on the same
        // workload shows in the per-program costs below).
        pipe_off.push(perf_pipe(loops)?);
        for (variant, out) in [
            ("runqueue", &mut pipe_on),
            ("runqueue-raw", &mut pipe_raw),
            ("runqueue-cgroups", &mut pipe_cg),
            ("runqueue-fallback", &mut pipe_fb),
        ] {
            let s = start_sensor(env, "bench-ebpf", variant)?;
            std::thread::sleep(Duration::from_secs(2));
            out.push(perf_pipe(loops)?);
            drop(s);
            std::thread::sleep(Duration::from_millis(500));
        }
        match Runqlat::start() {
            Ok(bt) => {
                pipe_bt.push(perf_pipe(loops)?);
                drop(bt);
            }
            Err(e) => eprintln!("    bpftrace runqlat not measured: {e:#}"),
        }
        std::thread::sleep(Duration::from_millis(500));
        fio_off.push(fio_iops(&dev, fio_secs)?);
        for (variant, out) in [("block", &mut fio_on), ("block-raw", &mut fio_raw)] {
            let s = start_sensor(env, "bench-ebpf", variant)?;
            std::thread::sleep(Duration::from_secs(2));
            out.push(fio_iops(&dev, fio_secs)?);
            drop(s);
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    // What each program costs per run, from the kernel's own BPF statistics, while both
    // workloads run (`sensor probes --measure`): the default designs, then the raw-tracepoint
    // ones.
    let mut costs = Vec::new();
    for cfg in [None, Some(sensor_config(env, "bench-ebpf", "all-raw")?)] {
        let mut cmd = Command::new(env.bin.join("sensor"));
        cmd.args(["probes", "--json", "--measure", "6s"]);
        if let Some(c) = &cfg {
            cmd.arg("--config").arg(c);
        }
        let measure = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
        std::thread::sleep(Duration::from_secs(1));
        let _ = perf_pipe(loops);
        let _ = fio_iops(&dev, 2);
        let out = measure.wait_with_output()?;
        for c in serde_json::from_slice::<Value>(&out.stdout)
            .map(|v: Value| v["costs"].clone())
            .unwrap_or(Value::Null)
            .as_array()
            .into_iter()
            .flatten()
        {
            // Each program once (the raw run repeats the tcp/oom/process ones).
            if !costs.iter().any(|x: &Value| x["program"] == c["program"]) {
                costs.push(c.clone());
            }
        }
    }
    let costs = Value::Array(costs);
    // The same designs toggled in place (`sensor probes --overhead`): the programs stay
    // loaded and are detached and attached again every 50 ms while a pipe ping-pong runs,
    // so the host's drift falls on both halves of each pair alike.
    let secs = if quick { 10 } else { 60 };
    let mut toggled = serde_json::Map::new();
    for variant in [
        "runqueue",
        "runqueue-raw",
        "runqueue-cgroups",
        "runqueue-fallback",
    ] {
        step(&format!(
            "{variant}: detached and attached in 50 ms phases for {secs} s"
        ));
        let out = Command::new(env.bin.join("sensor"))
            .args(["probes", "--json", "--phase", "50ms", "--overhead"])
            .arg(format!("{secs}s"))
            .arg("--config")
            .arg(sensor_config(env, "bench-ebpf", variant)?)
            .stderr(Stdio::null())
            .output()?;
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        toggled.insert(variant.to_string(), v["overhead"].clone());
    }
    let _ = Command::new("losetup").args(["-d", &dev]).status();
    let _ = std::fs::remove_file(&img);
    let (po, pn) = (median(&mut pipe_off.clone()), median(&mut pipe_on.clone()));
    let variant = |v: &Vec<f64>| {
        if v.is_empty() {
            return Value::Null;
        }
        let m = median(&mut v.clone());
        json!({ "median": m, "range": spread(v), "slowdown_pct": (m / po - 1.0) * 100.0 })
    };
    let (fo, fnn) = (median(&mut fio_off.clone()), median(&mut fio_on.clone()));
    Ok(json!({
        "rounds": rounds,
        "sched_pipe_usecs_per_op": { "off": po, "on": pn, "off_range": spread(&pipe_off), "on_range": spread(&pipe_on),
                                      "slowdown_pct": (pn / po - 1.0) * 100.0,
                                      "per_cgroup": variant(&pipe_cg), "wakeup_programs": variant(&pipe_fb),
                                      "bpftrace_runqlat": variant(&pipe_bt), "raw_tracepoint": variant(&pipe_raw) },
        "program_costs": costs,
        "toggled": toggled,
        "randread_4k_iops": { "off": fo, "on": fnn, "off_range": spread(&fio_off), "on_range": spread(&fio_on),
                               "slowdown_pct": (fo / fnn - 1.0) * 100.0,
                               "raw_tracepoints": if fio_raw.is_empty() { Value::Null } else {
                                   let m = median(&mut fio_raw.clone());
                                   json!({ "median": m, "range": spread(&fio_raw), "slowdown_pct": (fo / m - 1.0) * 100.0 })
                               } },
    }))
}
