//! Storage on real data, per tier, on both server generations, and the codec study:
//! the recorded host of the detection corpus (1.6 h at 1 s, every probe) is stored with
//! `aggregator import` through the live insert path into its own database (so its rollup
//! tiers fill through their views), then measured table by table; the same raw rows are
//! loaded into a current engine (chdb-core) with this build's modern DDL, where each
//! column kind is also tried with several codecs.

use super::*;

const DB: &str = "sonde_rec";

fn recording() -> PathBuf {
    root().join("aggregator/corpus/recorded/host.rec.zst")
}

/// Samples in a raw table, counted as the wire counts them (one per value column and one
/// per histogram bucket, per row).
fn samples_in(env: &Env, t: &protocol::tables::TableDef) -> Result<u64> {
    let buckets = if t.has_histogram() {
        "sum(length(bucket_count))"
    } else {
        "0"
    };
    let r = ch(
        env,
        &format!(
            "SELECT count(), {buckets} FROM {DB}.{} FORMAT TabSeparated",
            t.name
        ),
    )?;
    let f: Vec<u64> = r
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    Ok(f.first().copied().unwrap_or(0) * t.value_columns() as u64 + f.get(1).copied().unwrap_or(0))
}

/// Bytes on disk of each table of `db` (18.16 over HTTP).
fn sizes(env: &Env, db: &str) -> Result<std::collections::HashMap<String, (u64, u64)>> {
    Ok(ch(
        env,
        &format!(
            "SELECT table, sum(data_compressed_bytes), sum(rows) FROM system.parts WHERE database = '{db}' AND active \
             GROUP BY table FORMAT TabSeparated"
        ),
    )?
    .lines()
    .filter_map(|l| {
        let f: Vec<&str> = l.split('\t').collect();
        Some((f.first()?.to_string(), (f.get(1)?.parse().ok()?, f.get(2)?.parse().ok()?)))
    })
    .collect())
}

/// `studies`: also the codec and sort-order studies (skipped by `bench --quick`).
pub(super) fn tier_storage(env: &Env, studies: bool) -> Result<Value> {
    let rec = recording();
    step(&format!(
        "storage per tier on real data: importing {} (aggregator import)",
        rec.display()
    ));
    let cfg = env.dir.join("import.toml");
    std::fs::write(
        &cfg,
        format!(
            "[clickhouse]\nurl = \"http://{}\"\ndatabase = \"{DB}\"\n",
            env.ch_http
        ),
    )?;
    let _ = ch(env, &format!("DROP DATABASE IF EXISTS {DB}"));
    let out = Command::new(env.bin.join("aggregator"))
        .arg("--config")
        .arg(&cfg)
        .args(["import", "--host", "rec", "--end-at", "now"])
        .arg(&rec)
        .output()?;
    if !out.status.success() {
        bail!(
            "aggregator import failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let tables: Vec<&protocol::tables::TableDef> = protocol::TABLES
        .iter()
        .copied()
        .filter(|t| t.rolled_up())
        .collect();
    for t in &tables {
        for suffix in ["", "_1m_agg", "_1h_agg"] {
            ch(
                env,
                &format!("OPTIMIZE TABLE {DB}.{}{suffix} FINAL", t.name),
            )?;
        }
    }
    let old = sizes(env, DB)?;
    // The raw rows for the current engine, in Native format.
    let native = env.dir.join("rec-native");
    std::fs::create_dir_all(&native)?;
    for t in &tables {
        let body = ch_bytes(env, &format!("SELECT * FROM {DB}.{} FORMAT Native", t.name))?;
        std::fs::write(native.join(format!("{}.native", t.name)), body)?;
    }
    step("storage per tier on real data: the same rows on a current engine, and the codec study");
    let modern = modern_tiers(env, &native, &tables, studies)?;
    let mut per_table = Vec::new();
    let (mut samples, mut raw_b, mut m1_b, mut h1_b) = (0u64, 0u64, 0u64, 0u64);
    let (mut raw_b26, mut m1_b26, mut h1_b26) = (0u64, 0u64, 0u64);
    for t in &tables {
        let get = |m: &std::collections::HashMap<String, (u64, u64)>, s: &str| {
            m.get(&format!("{}{s}", t.name)).copied().unwrap_or((0, 0))
        };
        let (rb, rows) = get(&old, "");
        let (mb, mrows) = get(&old, "_1m_agg");
        let (hb, hrows) = get(&old, "_1h_agg");
        let m = &modern["sizes"];
        let g26 = |s: &str| m[format!("{}{s}", t.name)].as_u64().unwrap_or(0);
        let n = samples_in(env, t)?;
        samples += n;
        raw_b += rb;
        m1_b += mb;
        h1_b += hb;
        raw_b26 += g26("");
        m1_b26 += g26("_1m_agg");
        h1_b26 += g26("_1h_agg");
        per_table.push(json!({
            "table": t.name, "rows": rows, "samples": n,
            "raw_18": rb, "tier_1m_18": mb, "tier_1m_rows": mrows, "tier_1h_18": hb, "tier_1h_rows": hrows,
            "raw_26": g26(""), "tier_1m_26": g26("_1m_agg"), "tier_1h_26": g26("_1h_agg"),
        }));
    }
    let per = |b: u64| b as f64 / samples.max(1) as f64;
    Ok(json!({
        "recording": rec.strip_prefix(root()).unwrap_or(&rec).display().to_string(),
        "samples": samples,
        "bytes_per_sample": {
            "raw_18": per(raw_b), "tier_1m_18": per(m1_b), "tier_1h_18": per(h1_b),
            "raw_26": per(raw_b26), "tier_1m_26": per(m1_b26), "tier_1h_26": per(h1_b26),
        },
        "tables": per_table,
        "codecs": modern["codecs"].clone(),
        "order": modern["order"].clone(),
        "engine": modern["engine"].clone(),
    }))
}

fn ch_bytes(env: &Env, sql: &str) -> Result<Vec<u8>> {
    let mut s = std::net::TcpStream::connect(&env.ch_http)?;
    write!(
        s,
        "POST / HTTP/1.0\r\nHost: x\r\nContent-Length: {}\r\n\r\n{sql}",
        sql.len()
    )?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no HTTP body")?;
    if !out.starts_with(b"HTTP/1.0 200") && !out.starts_with(b"HTTP/1.1 200") {
        bail!("ClickHouse: {}", String::from_utf8_lossy(&out[split..]));
    }
    Ok(out[split + 4..].to_vec())
}

/// Candidate codecs per column kind (the first is what this build uses).
const CODECS: &[(&str, &[&str])] = &[
    (
        "float",
        &[
            "Gorilla, ZSTD(1)",
            "ZSTD(1)",
            "ZSTD(3)",
            "Gorilla, ZSTD(3)",
            "FPC, ZSTD(1)",
            "Delta, ZSTD(1)",
        ],
    ),
    (
        "int",
        &[
            "T64, ZSTD(1)",
            "ZSTD(1)",
            "ZSTD(3)",
            "T64, ZSTD(3)",
            "DoubleDelta, ZSTD(1)",
            "Delta, ZSTD(1)",
        ],
    ),
];

fn modern_tiers(
    env: &Env,
    native: &Path,
    tables: &[&protocol::tables::TableDef],
    studies: bool,
) -> Result<Value> {
    let ddl = Command::new(env.bin.join("aggregator"))
        .args([
            "schema",
            "--server-version",
            "26.9",
            "--retention-days",
            "0",
        ])
        .args(["--retention-1m-days", "0", "--retention-1h-days", "0"])
        .output()?;
    // Kind of every stored value column: table -> [(column, kind)].
    let mut kinds = serde_json::Map::new();
    for t in tables {
        let cols: Vec<Value> = t
            .stored_columns()
            .iter()
            .filter(|c| c.kind.is_value())
            .map(|c| json!([c.name, c.kind.name()]))
            .collect();
        kinds.insert(t.name.to_string(), Value::Array(cols));
    }
    let script = format!(
        r#"
import json, re, sys, tempfile
from chdb import session
s = session.Session(tempfile.mkdtemp(prefix='sonde-tiers-'))
ddl = {ddl:?}
for st in [x.strip() for x in ddl.split(';\n') if x.strip()]:
    s.query(st)
kinds = json.loads({kinds:?})
codecs = json.loads({codecs:?})
native = {native:?}
def q(x):
    return s.query(x, 'TSV').data()
for t in kinds:
    q(f"INSERT INTO sonde.{{t}} SELECT * FROM file('{{native}}/{{t}}.native', Native)")
for t in kinds:
    for suf in ('', '_1m_agg', '_1h_agg'):
        q(f'OPTIMIZE TABLE sonde.{{t}}{{suf}} FINAL')
sizes = {{}}
for line in q("SELECT table, sum(data_compressed_bytes) FROM system.parts WHERE database = 'sonde' AND active GROUP BY table").strip().split('\n'):
    if line:
        a, b = line.split('\t')
        sizes[a] = int(b)
# Codec study: every value column of every table under each candidate, per kind.
res = {{}}
for t, cols in (kinds.items() if {studies} else []):
    types = dict(l.split('\t') for l in q(f"SELECT name, type FROM system.columns WHERE database='sonde' AND table='{{t}}'").strip().split('\n'))
    for i in range(max(len(v) for v in codecs.values())):
        name = f'cs_{{t}}_{{i}}'
        q(f'CREATE TABLE sonde.{{name}} AS sonde.{{t}}')
        # Wide parts: per-column sizes (compact parts report none).
        q(f'ALTER TABLE sonde.{{name}} MODIFY SETTING min_bytes_for_wide_part = 0, min_rows_for_wide_part = 0')
        for c, kind in cols:
            base = types[c].split(' CODEC')[0]
            cls = 'float' if base.startswith('Float') else 'int' if base.startswith('UInt') else None
            if cls is None:
                continue
            cand = codecs[cls]
            codec = cand[i % len(cand)]
            q(f'ALTER TABLE sonde.{{name}} MODIFY COLUMN `{{c}}` {{base}} CODEC({{codec}})')
        q(f'INSERT INTO sonde.{{name}} SELECT * FROM sonde.{{t}}')
        q(f'OPTIMIZE TABLE sonde.{{name}} FINAL')
        for line in q(f"SELECT name, type, data_compressed_bytes FROM system.columns WHERE database='sonde' AND table='{{name}}'").strip().split('\n'):
            c, typ, b = line.split('\t')
            kind = dict(cols).get(c)
            if kind is None:
                continue
            base = typ.split(' CODEC')[0]
            cls = 'float' if base.startswith('Float') else 'int' if base.startswith('UInt') else None
            if cls is None:
                continue
            codec = codecs[cls][i % len(codecs[cls])]
            key = f'{{kind}} {{cls}}'
            res.setdefault(key, {{}}).setdefault(codec, 0)
            res[key][codec] += int(b)
        q(f'DROP TABLE sonde.{{name}}')
# Sort order study: the label before the time (this DDL) or the time before the label.
order = {{}}
for t in (kinds if {studies} else []):
    key = q(f"SELECT sorting_key FROM system.tables WHERE database='sonde' AND name='{{t}}'").strip()
    parts = [x.strip() for x in key.split(',')]
    if len(parts) < 3:
        continue
    alt = ', '.join([parts[0], parts[-1]] + parts[1:-1])
    for name, k in (('label_then_ts', key), ('ts_then_label', alt)):
        create = q(f'SHOW CREATE TABLE sonde.{{t}}').replace('\\n', '\n').replace("\\'", "'")
        create = re.sub(r'CREATE TABLE sonde\.' + t + r'\b', f'CREATE TABLE sonde.os_{{t}}', create, count=1)
        create = re.sub(r'ORDER BY \([^)]*\)', f'ORDER BY ({{k}})', create, count=1)
        q(create)
        q(f'INSERT INTO sonde.os_{{t}} SELECT * FROM sonde.{{t}}')
        q(f'OPTIMIZE TABLE sonde.os_{{t}} FINAL')
        b = int(q(f"SELECT sum(data_compressed_bytes) FROM system.parts WHERE database='sonde' AND table='os_{{t}}' AND active").strip() or 0)
        order.setdefault(t, {{}})[name] = b
        q(f'DROP TABLE sonde.os_{{t}}')
print(json.dumps({{'engine': q('SELECT version()').strip(), 'sizes': sizes, 'codecs': res, 'order': order}}))
"#,
        ddl = String::from_utf8_lossy(&ddl.stdout),
        kinds = Value::Object(kinds).to_string(),
        codecs = json!(CODECS
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect::<serde_json::Map<_, _>>())
        .to_string(),
        native = native.display().to_string(),
        studies = if studies { "True" } else { "False" },
    );
    let path = env.dir.join("tier_storage.py");
    std::fs::write(&path, script)?;
    let out = Command::new("python3").arg(&path).output()?;
    if !out.status.success() {
        bail!(
            "the current-engine storage study failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(serde_json::from_str(text.lines().last().unwrap_or("{}"))?)
}

/// The report section (also the body of docs/STORAGE.md).
pub(super) fn tier_markdown(t: &Value) -> String {
    use super::report::f;
    if let Some(e) = t.get("error") {
        return format!("\n### Storage per tier on real data\n\nNot measured: {e}\n");
    }
    let b = &t["bytes_per_sample"];
    let mut s = format!(
        "\n### Storage per tier on real data\n\nMethod: `{}` (this host recorded at 1 s with every probe: {} samples) stored with \
         `aggregator import` through the live insert path (the tiers fill through their materialized views), `OPTIMIZE … FINAL`, then \
         compressed bytes of the active parts over the raw samples. A tier's figure is what it costs per raw sample it summarises. \
         The same raw rows are then loaded into ClickHouse {} (chdb-core) with this build's modern DDL.\n\n\
         | | raw | 1-minute tier | 1-hour tier |\n|---|---|---|---|\n\
         | ClickHouse 18.16, bytes per sample | {} | {} | {} |\n| ClickHouse {}, bytes per sample | {} | {} | {} |\n",
        t["recording"].as_str().unwrap_or(""),
        t["samples"],
        t["engine"].as_str().unwrap_or("?"),
        f(&b["raw_18"]),
        f(&b["tier_1m_18"]),
        f(&b["tier_1h_18"]),
        t["engine"].as_str().unwrap_or("?"),
        f(&b["raw_26"]),
        f(&b["tier_1m_26"]),
        f(&b["tier_1h_26"]),
    );
    s.push_str("\nPer table (bytes on disk; 18.16 / current):\n\n| table | raw rows | samples | raw | 1m rows | 1m | 1h rows | 1h |\n|---|---|---|---|---|---|---|---|\n");
    for x in t["tables"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "| {} | {} | {} | {} / {} | {} | {} / {} | {} | {} / {} |\n",
            x["table"].as_str().unwrap_or(""),
            x["rows"],
            x["samples"],
            x["raw_18"],
            x["raw_26"],
            x["tier_1m_rows"],
            x["tier_1m_18"],
            x["tier_1m_26"],
            x["tier_1h_rows"],
            x["tier_1h_18"],
            x["tier_1h_26"],
        ));
    }
    if let Some(o) = t["order"].as_object().filter(|o| !o.is_empty()) {
        s.push_str("\nSort order study (current engine, same rows): bytes of each labelled table sorted with its label before the time \
                    (`ORDER BY (host, label, ts)`, the DDL) or after it (`ORDER BY (host, ts, label)`).\n\n| table | label, then ts | ts, then label |\n|---|---|---|\n");
        for (table, v) in o {
            s.push_str(&format!(
                "| {table} | {} | {} |\n",
                v["label_then_ts"], v["ts_then_label"]
            ));
        }
    }
    if let Some(c) = t["codecs"].as_object() {
        s.push_str("\nCodec study (current engine, the raw rows above): compressed bytes of every value column of one kind, under each candidate; \
                    **bold** is the smallest, ✓ what schema migration 7 chose for current servers (before it: Gorilla + ZSTD(1) for floats, \
                    T64 + ZSTD(1) for integers). Kinds as declared (`docs/TABLES.md`); histogram arrays and labels are not in the study.\n\n| column kind | candidates (bytes) |\n|---|---|\n");
        for (kind, m) in c {
            let Some(m) = m.as_object() else { continue };
            let best = m.values().filter_map(|v| v.as_u64()).min().unwrap_or(0);
            let cells: Vec<String> = m
                .iter()
                .map(|(codec, v)| {
                    let n = v.as_u64().unwrap_or(0);
                    let chosen = if kind.starts_with("counter") {
                        "T64, ZSTD(1)"
                    } else {
                        "ZSTD(3)"
                    };
                    let mark = if codec == chosen { " ✓" } else { "" };
                    if n == best {
                        format!("**{codec}: {n}**{mark}")
                    } else {
                        format!("{codec}: {n}{mark}")
                    }
                })
                .collect();
            s.push_str(&format!("| {kind} | {} |\n", cells.join("; ")));
        }
    }
    s
}

/// `cargo xtask storage`: the real-data storage study alone, written to docs/STORAGE.md.
pub fn run_storage() -> Result<()> {
    let root = root();
    crate::setup::ensure_clickhouse()?;
    step("building the release aggregator");
    run(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "sonde-aggregator",
    ]))?;
    let dir = root.join("target/bench-storage");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    crate::certs::run(&dir.join("certs"), &[], &[], false)?;
    let (agg, env) = start_env(&dir, root.join("target/release"))?;
    let t = tier_storage(&env, true)?;
    drop(agg);
    let _ = std::fs::remove_dir_all(dir.join("agg"));
    std::fs::write(dir.join("results.json"), serde_json::to_string_pretty(&t)?)?;
    let md = format!(
        "# Storage per tier\n\nWritten by `cargo xtask storage` ({}). The generated-history figures and query speeds are in [BENCHMARKS.md](BENCHMARKS.md).\n{}",
        Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default(),
        tier_markdown(&t)
    );
    std::fs::write(root.join("docs/STORAGE.md"), &md)?;
    println!("{md}");
    step("written: docs/STORAGE.md");
    Ok(())
}
