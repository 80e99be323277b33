#!/usr/bin/env python3
"""Checks the DDL the aggregator emits for a current ClickHouse, and every
SQL query of the README, on a current engine (chdb-core, in-process).

Usage: modern_engine.py DDL_FILE README.md
Exits non-zero naming the statement that failed."""
import sys
import tempfile
import time

from chdb import session

LABELS = {"cpu": "total", "resource": "memory", "device": "vda", "interface": "eth0",
          "mount": "/", "fstype": "ext4", "sensor_boot_id": "b1", "source": "runqueue",
          "unit": "us", "kind": "oom_kill", "state": "resolved", "severity": "critical",
          "rule": "cpu busy", "name": "env", "value": "prod"}


def check_known_series(s):
    """The tiers of a chosen series hold exactly its per-minute/hour aggregates, also when
    its rows arrive in several late, out-of-order blocks (same series as tests/tiers.rs)."""
    t0 = (int(time.time()) // 3600 - 3) * 3600  # recent: older rows fall to the TTLs
    n = 7200
    keep = "NOT (number % 600 >= 100 AND number % 600 < 130)"
    for part in ("number >= 3600", "number < 3600 AND number % 2 = 1", "number < 3600 AND number % 2 = 0"):
        s.query(f"INSERT INTO sonde.cpu (ts, host, cpu, user) SELECT toDateTime({t0} + number), 'k', 'total', "
                f"((number * 37) % 101) / 4 FROM numbers({n}) WHERE {keep} AND ({part})")
        s.query(f"INSERT INTO sonde.latency (ts, host, source, unit, count, sum, bucket_upper, bucket_count) "
                f"SELECT toDateTime({t0} + number), 'k', 'runqueue', 'us', 1, number, [1, pow(2, 1 + number % 5), 1024], "
                f"[1 + number % 3, 2, 1 + number % 7] FROM numbers({n}) WHERE {part}")
    for tier, width in (("1m", 60), ("1h", 3600)):
        want = {}
        for i in range(n):
            if 100 <= i % 600 < 130:
                continue
            v = ((i * 37) % 101) / 4
            b = want.setdefault(i // width, [])
            b.append(v)
        rows = s.query(f"SELECT toUInt32(ts), samples, user, user_min, user_max, user_last FROM sonde.cpu_{tier} "
                       f"WHERE host = 'k' ORDER BY ts", "TSV").data().strip().split("\n")
        if len(rows) != len(want):
            sys.exit(f"cpu_{tier}: {len(rows)} buckets, want {len(want)}")
        for line in rows:
            f = [float(x) for x in line.split("\t")]
            v = want[(int(f[0]) - t0) // width]
            exp = [len(v), sum(v) / len(v), min(v), max(v), v[-1]]
            if any(abs(a - b) > 1e-6 for a, b in zip(f[1:], exp)):
                sys.exit(f"cpu_{tier} bucket {line} != expected {exp}")
        rng = f"host = 'k' AND ts >= {t0} AND ts < {t0 + n}"
        raw = s.query(f"SELECT sumMap(bucket_upper, bucket_count) FROM sonde.latency WHERE {rng}", "TSV").data()
        got = s.query(f"SELECT sumMap(bucket_upper, bucket_count) FROM sonde.latency_{tier} WHERE {rng}", "TSV").data()
        if raw != got:
            sys.exit(f"latency_{tier} buckets {got} != raw {raw}")
    print("known series: tiers exact on the current engine")


def main():
    ddl = open(sys.argv[1]).read()
    readme = open(sys.argv[2]).read()
    s = session.Session(tempfile.mkdtemp(prefix="sonde-chdb-"))
    print("engine", s.query("SELECT version()", "TSV").data().strip())
    stmts = [x.strip() for x in ddl.split(";\n") if x.strip()]
    for st in stmts:
        try:
            s.query(st)
        except Exception as e:
            sys.exit(f"DDL failed on the current engine:\n{st}\n{e}")
    engines = dict(line.split("\t") for line in s.query(
        "SELECT name, engine FROM system.tables WHERE database = 'sonde' ORDER BY name", "TSV").data().split("\n") if line)
    tables = [t for t, e in engines.items() if e not in ("View", "MaterializedView", "AggregatingMergeTree")]
    views = [t for t, e in engines.items() if e == "View"]
    print("tables", tables)
    print("tier views", views)
    for t, e in engines.items():
        if e == "AggregatingMergeTree":
            create = s.query(f"SHOW CREATE TABLE sonde.{t}", "TSV").data()
            for want in ("LowCardinality", "CODEC", "TTL"):
                if want not in create:
                    sys.exit(f"modern DDL for tier table {t} lacks {want}:\n{create}")
    for t in tables:
        create = s.query(f"SHOW CREATE TABLE sonde.{t}", "TSV").data()
        if t in ("batches", "batch_intents", "gaps"):
            # Bookkeeping: small, no codecs needed, but retention and LowCardinality labels.
            for want in ("LowCardinality", "TTL"):
                if want not in create:
                    sys.exit(f"modern DDL for table {t} lacks {want}:\n{create}")
        elif t not in ("schema_migrations", "hosts"):
            for want in ("LowCardinality", "CODEC", "TTL"):
                if want not in create:
                    sys.exit(f"modern DDL for metric table {t} lacks {want}:\n{create}")
        cols = s.query(f"SELECT name, type FROM system.columns WHERE database = 'sonde' AND table = '{t}' ORDER BY position", "TSV").data()
        exprs = []
        for line in cols.strip().split("\n"):
            name, typ = line.split("\t")
            if typ.startswith("Array"):
                exprs.append(f"[1, 2, 4, 8 * (number % 5 + 1)] AS {name}")
            elif "DateTime" in typ:
                exprs.append(f"now() - number AS {name}")
            elif name == "host":
                exprs.append(f"concat('h', toString(number % 3)) AS {name}")
            elif "String" in typ and name == "source":
                exprs.append(f"if(number % 2 = 0, 'runqueue', 'disk:vda:read') AS {name}")
            elif "String" in typ:
                exprs.append(f"'{LABELS.get(name, 'x')}' AS {name}")
            else:
                exprs.append(f"to{typ.split('(')[0] if '(' not in typ else 'Float64'}(number % 97 + 1) AS {name}")
        s.query(f"INSERT INTO sonde.{t} SELECT {', '.join(exprs)} FROM numbers(600)")
    for v in views:
        # Fed by the materialized views on insert into the raw tables above.
        n = s.query(f"SELECT count() FROM sonde.{v}", "TSV").data().strip()
        if v.startswith("events") or n == "0":
            sys.exit(f"tier view {v} has {n} rows after inserts into its raw table")
    check_known_series(s)
    queries = [b.split("```")[0].strip() for b in readme.split("```sql\n")[1:]]
    if len(queries) < 3:
        sys.exit("README has fewer than 3 SQL queries")
    for q in queries:
        try:
            out = s.query(q, "TSV").data()
        except Exception as e:
            sys.exit(f"README query failed on the current engine:\n{q}\n{e}")
        if not out.strip():
            sys.exit(f"README query returned no rows on the current engine:\n{q}")
    print(f"ok: {len(stmts)} DDL statements and {len(queries)} README queries on the current engine")


main()
