//! The console's API cost: the requests the host page and the fleet page make (read from
//! the page itself, so the bench follows it), timed against the generated history.

use super::*;

/// `(metric, label filter)` pairs of a `const NAME = [...]` list in the console page.
fn page_metrics(page: &str, list: &str) -> Vec<(String, String)> {
    let Some(start) = page.find(&format!("const {list} = [")) else {
        return Vec::new();
    };
    let body = &page[start..];
    let body = &body[..body.find("];").unwrap_or(body.len())];
    let mut out = Vec::new();
    for part in body.split("[\"").skip(1) {
        let mut f = part.split('"');
        let metric = f.next().unwrap_or("");
        let _ = f.next();
        let labels = f.next().unwrap_or("");
        if metric.contains('.') && !metric.contains(' ') {
            out.push((metric.to_string(), labels.to_string()));
        }
    }
    out
}

fn timed(env: &Env, path: &str) -> (f64, usize, u16) {
    let t = Instant::now();
    let r = http(&env.agg_http, path, false);
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    match r {
        Some((code, body)) => (ms, body.len(), code),
        None => (ms, 0, 0),
    }
}

/// Server time and bytes of the host page for `hours` of 1 s data, and of the fleet page.
pub(super) fn console_bench(env: &Env, host: &str, hosts: u64, hours: u64) -> Value {
    let page = include_str!("../../../aggregator/src/console/index.html");
    let to = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let from = to - hours * 3600;
    let mut host_ms = 0.0;
    let mut host_bytes = 0;
    let mut failed = Vec::new();
    let mut calls = 0;
    for (m, lab) in page_metrics(page, "HOST_CHARTS") {
        let lab = if lab.is_empty() {
            String::new()
        } else {
            format!("&{lab}")
        };
        let (ms, b, code) = timed(
            env,
            &format!("/api/hosts/{host}/series?metric={m}&from={from}&to={to}&points=600{lab}"),
        );
        host_ms += ms;
        host_bytes += b;
        calls += 1;
        if code != 200 {
            failed.push(format!("{m}: {code}"));
        }
    }
    for path in [
        format!("/api/hosts/{host}/heatmap?source=runqueue&from={from}&to={to}&points=200"),
        format!("/api/hosts/{host}/series?metric=probes.oom_kills&from={from}&to={to}&points=500"),
        format!("/api/alerts?host={host}&from={}&to={to}", from - 86400),
    ] {
        let (ms, b, code) = timed(env, &path);
        host_ms += ms;
        host_bytes += b;
        calls += 1;
        if code != 200 {
            failed.push(format!("{path}: {code}"));
        }
    }
    let mut fleet_ms = 0.0;
    let mut fleet_bytes = 0;
    let mut fleet_calls = 1;
    let (ms, b, _) = timed(env, "/api/hosts");
    fleet_ms += ms;
    fleet_bytes += b;
    for (m, lab) in page_metrics(page, "FLEET_METRICS") {
        let lab = if lab.is_empty() {
            String::new()
        } else {
            format!("&{lab}")
        };
        let (ms, b, code) = timed(
            env,
            &format!(
                "/api/fleet/series?metric={m}&from={}&to={to}&points=60{lab}",
                to - 3600
            ),
        );
        fleet_ms += ms;
        fleet_bytes += b;
        fleet_calls += 1;
        if code != 200 {
            failed.push(format!("fleet {m}: {code}"));
        }
    }
    json!({
        "host": host, "hours": hours, "host_calls": calls,
        "host_page_ms": host_ms, "host_page_bytes": host_bytes,
        "fleet_hosts": hosts, "fleet_page_ms": fleet_ms, "fleet_page_bytes": fleet_bytes, "fleet_calls": fleet_calls,
        "failed": failed,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_bench_reads_the_pages_requests() {
        let page = include_str!("../../../aggregator/src/console/index.html");
        let host = super::page_metrics(page, "HOST_CHARTS");
        assert!(host.len() >= 20, "{host:?}");
        assert!(host.contains(&("cpu.busy".to_string(), "cpu=total".to_string())));
        assert!(host.contains(&("net.tx_bytes_per_s".to_string(), String::new())));
        let fleet = super::page_metrics(page, "FLEET_METRICS");
        assert_eq!(fleet.len(), 4, "{fleet:?}");
    }
}
