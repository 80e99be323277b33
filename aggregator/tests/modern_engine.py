#!/usr/bin/env python3
"""Checks the DDL the aggregator emits for a current ClickHouse, and every
SQL query of the README, on a current engine (chdb-core, in-process).

Usage: modern_engine.py DDL_FILE README.md
Exits non-zero naming the statement that failed."""
import sys
import tempfile

from chdb import session

LABELS = {"cpu": "total", "resource": "memory", "device": "vda", "interface": "eth0",
          "mount": "/", "fstype": "ext4", "sensor_boot_id": "b1", "source": "runqueue",
          "unit": "us", "kind": "oom_kill", "state": "resolved", "severity": "critical",
          "rule": "cpu busy"}


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
