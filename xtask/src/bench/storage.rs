//! Storage per sample on both server generations and README query speed over generated history.

use super::*;

/// Tables generated for the storage and query benchmarks: (table, label column, its values).
pub(super) const GEN: &[(&str, Option<(&str, &[&str])>)] = &[
    ("cpu", Some(("cpu", &["total", "0", "1"]))),
    ("system", None),
    ("memory", None),
    ("pressure", Some(("resource", &["cpu", "memory", "io"]))),
    ("disk", Some(("device", &["vda"]))),
    ("filesystem", Some(("mount", &["/"]))),
    ("net", Some(("interface", &["eth0", "lo"]))),
    ("tcp", None),
];

/// SQL that fills `db.table` with `hosts` × `secs` seconds of plausible history (smooth
/// curves plus noise, so compression is neither flattered nor punished).
pub(super) fn gen_sql(
    db: &str,
    table: &str,
    label: Option<(&str, &[&str])>,
    cols: &[(String, String)],
    hosts: u64,
    secs: u64,
) -> String {
    let nl = label.map_or(1, |l| l.1.len()) as u64;
    let per_ts = hosts * nl;
    let mut exprs = Vec::new();
    for (name, typ) in cols {
        let e = match (name.as_str(), typ.as_str()) {
            ("ts", _) => format!("toDateTime(toUInt32(now()) - {secs} + intDiv(number, {per_ts}))"),
            ("host", _) => format!("concat('gen-', toString(intDiv(number, {nl}) % {hosts}))"),
            (n, _) if label.is_some_and(|l| l.0 == n) => {
                let vals: Vec<String> = label.unwrap().1.iter().map(|v| format!("'{v}'")).collect();
                format!("[{}][number % {nl} + 1]", vals.join(","))
            }
            ("device", _) => "'/dev/vda1'".into(),
            ("fstype", _) => "'ext4'".into(),
            (_, t) if t.contains("String") => "''".into(),
            (_, t) if t.starts_with("Float") => {
                "toFloat32(round((sin(number / 7919.0 + intDiv(number, 50)) + 1) * 25 + (rand() % 1000) / 100.0, 2))".into()
            }
            (_, t) if t.starts_with("UInt64") => "toUInt64(20000000000 + (intDiv(number, 60) % 1000) * 4096)".into(),
            (_, t) if t.starts_with("UInt32") => "toUInt32(rand() % 8)".into(),
            (_, t) => format!("CAST(0 AS {t})"),
        };
        exprs.push(format!("{e} AS `{name}`"));
    }
    format!(
        "INSERT INTO {db}.{table} SELECT {} FROM numbers({})",
        exprs.join(", "),
        per_ts * secs
    )
}

pub(super) fn columns(env: &Env, table: &str) -> Result<Vec<(String, String)>> {
    Ok(ch(
        env,
        &format!("SELECT name, type FROM system.columns WHERE database = 'sonde' AND table = '{table}' FORMAT TabSeparated"),
    )?
    .lines()
    .filter_map(|l| l.split_once('\t').map(|(a, b)| (a.to_string(), b.to_string())))
    .collect())
}

/// 5 + 6: bytes per sample on disk (18.16 here; current codecs in chdb) and the README's
/// queries over generated history.
pub(super) fn storage_and_queries(env: &Env, quick: bool) -> Result<Value> {
    let (hosts, secs) = if quick {
        (10u64, 3600u64)
    } else {
        (100, 86400)
    };
    step(&format!(
        "storage and queries: generating {hosts} hosts × {} h of history",
        secs / 3600
    ));
    let t = Instant::now();
    let mut samples = 0u64;
    let mut ddl_cols = Vec::new();
    for (table, label) in GEN {
        let cols = columns(env, table)?;
        let numeric = cols
            .iter()
            .filter(|(n, t)| n != "ts" && !t.contains("String"))
            .count() as u64;
        let rows = hosts * secs * label.map_or(1, |l| l.1.len()) as u64;
        samples += rows * numeric;
        ch(env, &gen_sql("sonde", table, *label, &cols, hosts, secs))?;
        ddl_cols.push((table.to_string(), cols));
    }
    let gen_secs = t.elapsed().as_secs_f64();
    let _ = ch(env, "OPTIMIZE TABLE sonde.cpu FINAL");
    let tables: Vec<String> = GEN.iter().map(|g| format!("'{}'", g.0)).collect();
    let bytes: f64 = ch(
        env,
        &format!(
            "SELECT sum(data_compressed_bytes) FROM system.parts WHERE database = 'sonde' AND active AND table IN ({}) FORMAT TabSeparated",
            tables.join(",")
        ),
    )?
    .trim()
    .parse()
    .unwrap_or(0.0);
    // The README's queries (the first seven are over these tables), three runs each.
    let readme = std::fs::read_to_string(root().join("README.md"))?;
    let queries: Vec<String> = readme
        .split("```sql\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .map(|q| q.trim().to_string())
        .collect();
    let mut qres = Vec::new();
    for q in &queries {
        let title = q.lines().next().unwrap_or("").to_string();
        let mut times = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            ch(env, &format!("{q}\nFORMAT Null"))?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let first_table = q
            .split("FROM sonde.")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_alphanumeric() && c != '_').next())
            .unwrap_or("")
            .to_string();
        qres.push(json!({ "query": title, "table": first_table, "median_ms": median(&mut times.clone()), "range_ms": spread(&times) }));
    }
    // The same history on a current engine with the modern codecs (chdb-core).
    let modern = modern_storage(env, hosts, secs.min(if quick { 3600 } else { 6 * 3600 }));
    Ok(json!({
        "hosts": hosts,
        "hours": secs / 3600,
        "samples": samples,
        "generate_seconds": gen_secs,
        "clickhouse_18_bytes_per_sample": bytes / samples.max(1) as f64,
        "modern": modern,
        "queries": qres,
    }))
}

pub(super) fn modern_storage(env: &Env, hosts: u64, secs: u64) -> Value {
    let ddl = Command::new(env.bin.join("aggregator"))
        .args(["schema", "--server-version", "26.9"])
        .output();
    let Ok(ddl) = ddl else {
        return json!({"error": "aggregator schema failed"});
    };
    let mut script = String::from(
        "import sys, tempfile\nfrom chdb import session\ns = session.Session(tempfile.mkdtemp(prefix='sonde-bench-'))\n",
    );
    script.push_str(&format!(
        "ddl = {:?}\nfor st in [x.strip() for x in ddl.split(';\\n') if x.strip()]:\n    s.query(st)\n",
        String::from_utf8_lossy(&ddl.stdout)
    ));
    script.push_str("def cols(t):\n    return [l.split('\\t') for l in s.query(f\"SELECT name, type FROM system.columns WHERE database='sonde' AND table='{t}' ORDER BY position\", 'TSV').data().strip().split('\\n')]\n");
    script.push_str("samples = 0\n");
    for (table, label) in GEN {
        let nl = label.map_or(1, |l| l.1.len());
        // Columns are read inside chdb; the generator SQL is produced here per column type.
        script.push_str(&format!("c = cols('{table}')\n"));
        script.push_str(&format!(
            "samples += {rows} * sum(1 for n, t in c if n != 'ts' and 'String' not in t)\n",
            rows = hosts * secs * nl as u64
        ));
        let _ = label;
    }
    // Generate with the same expressions as for 18.16 by building the SQL in Rust per table
    // against the modern column list: the column names and order are the same on both.
    let mut inserts = Vec::new();
    for (table, label) in GEN {
        if let Ok(cols) = columns(env, table) {
            inserts.push(gen_sql("sonde", table, *label, &cols, hosts, secs));
        }
    }
    for i in inserts {
        script.push_str(&format!("s.query({i:?})\n"));
    }
    script.push_str("s.query('OPTIMIZE TABLE sonde.cpu FINAL')\n");
    let names: Vec<String> = GEN.iter().map(|g| format!("'{}'", g.0)).collect();
    script.push_str(&format!(
        "b = int(s.query(\"SELECT sum(data_compressed_bytes) FROM system.parts WHERE database='sonde' AND active AND table IN ({})\", 'TSV').data().strip() or 0)\n",
        names.join(",")
    ));
    script.push_str("print(b, samples, s.query('SELECT version()', 'TSV').data().strip())\n");
    let path = env.dir.join("modern_storage.py");
    if std::fs::write(&path, script).is_err() {
        return json!({"error": "cannot write script"});
    }
    let out = Command::new("python3").arg(&path).output();
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            let f: Vec<&str> = text.split_whitespace().collect();
            let b: f64 = f.first().and_then(|v| v.parse().ok()).unwrap_or(0.0);
            let n: f64 = f.get(1).and_then(|v| v.parse().ok()).unwrap_or(1.0);
            json!({ "engine": f.get(2).copied().unwrap_or(""), "hosts": hosts, "hours": secs as f64 / 3600.0,
                    "bytes_per_sample": b / n.max(1.0) })
        }
        Ok(o) => {
            json!({"error": String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("").to_string()})
        }
        Err(e) => json!({"error": e.to_string()}),
    }
}
