//! Detection throughput: evaluations per second on one core for threshold and statistical
//! rules, and bytes of state per series. Run by `cargo xtask bench` (or
//! `cargo bench -p sonde-aggregator --bench detect`); prints one JSON object.

use sonde_aggregator::detect::rules::parse_rules;
use sonde_aggregator::detect::Engine;
use std::time::Instant;

fn run(kind: &str, rule: &str, series: usize, rounds: u64) -> serde_json::Value {
    let mut e = Engine::new(parse_rules("bench", rule).unwrap());
    let hosts: Vec<String> = (0..series).map(|i| format!("host-{i}")).collect();
    let mut out = Vec::new();
    // Warm every series up first (state allocated, detectors past warm-up; the forest needs
    // 3 windows of 128).
    for r in 0..if kind.starts_with("forest") || kind.starts_with("drift") {
        420
    } else {
        200
    } {
        for h in &hosts {
            let v = 50.0 + ((r * 31 + h.len() as u64) % 17) as f64;
            e.observe(0, h, &[("cpu", "total")], r * 1000, v, &mut out);
        }
    }
    out.clear();
    let t = Instant::now();
    let mut n = 0u64;
    let start = if kind.starts_with("forest") || kind.starts_with("drift") {
        420
    } else {
        200
    };
    for r in start..start + rounds {
        for h in &hosts {
            let v = 50.0 + ((r * 31 + h.len() as u64) % 17) as f64;
            e.observe(0, h, &[("cpu", "total")], r * 1000, v, &mut out);
            n += 1;
        }
        out.clear();
    }
    let secs = t.elapsed().as_secs_f64();
    let (count, bytes) = e.state_size();
    serde_json::json!({
        "detector": kind,
        "series": count,
        "evaluations": n,
        "evaluations_per_s": (n as f64 / secs).round(),
        "ns_per_evaluation": (secs * 1e9 / n as f64).round(),
        "state_bytes_per_series": bytes / count.max(1),
    })
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rounds = if quick { 50 } else { 500 };
    let series = 10_000;
    let results = vec![
        run("threshold", "[[rule]]\nname = \"t\"\nkind = \"threshold\"\nseries = \"cpu.busy\"\nwarning = 60\ncritical = 90\nfor = \"5s\"\n", series, rounds),
        run("ewma", "[[rule]]\nname = \"e\"\nkind = \"ewma\"\nseries = \"cpu.busy\"\nwarmup = 30\n", series, rounds),
        run("mad (window 120)", "[[rule]]\nname = \"m\"\nkind = \"mad\"\nseries = \"cpu.busy\"\nwindow = 120\n", series, rounds / 5),
        run("anomaly (defaults)", "[[rule]]\nname = \"a\"\nkind = \"anomaly\"\nseries = \"cpu.busy\"\n", series, rounds),
        run("anomaly, 100,000 series", "[[rule]]\nname = \"a\"\nkind = \"anomaly\"\nseries = \"cpu.busy\"\n", 100_000, (rounds / 10).max(5)),
        run("forest (16 trees, depth 7)", "[[rule]]\nname = \"f\"\nkind = \"forest\"\nseries = \"cpu.busy\"\n", series / 10, rounds),
        run("drift (KS, 240 + 60)", "[[rule]]\nname = \"d\"\nkind = \"drift\"\nseries = \"cpu.busy\"\n", series, rounds),
        run("forecast (30 min window)", "[[rule]]\nname = \"p\"\nkind = \"forecast\"\nseries = \"cpu.busy\"\nlimit = 100\nwithin = \"1h\"\n", series, rounds),
    ];
    println!("{}", serde_json::to_string_pretty(&results).unwrap());
}
