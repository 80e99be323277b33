//! Detection speed: evaluations per second per core and state per series.

use super::*;

pub(super) fn detect_bench(quick: bool) -> Result<Value> {
    step("detection: evaluations per second per core, state per series");
    let mut c = Command::new("cargo");
    c.current_dir(root()).args([
        "bench",
        "-q",
        "-p",
        "sonde-aggregator",
        "--bench",
        "detect",
        "--",
    ]);
    if quick {
        c.arg("--quick");
    }
    let out = c.output()?;
    if !out.status.success() {
        bail!("detect bench: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}
