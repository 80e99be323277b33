CREATE DATABASE IF NOT EXISTS sonde;
CREATE TABLE IF NOT EXISTS sonde.schema_migrations (`version` UInt32, `name` String, `applied` DateTime) ENGINE = MergeTree() ORDER BY version;
CREATE TABLE IF NOT EXISTS sonde.cpu (
    `ts` DateTime CODEC(Delta, ZSTD(1)),
    `host` LowCardinality(String),
    `cpu` LowCardinality(String),
    `user` Float32 CODEC(Gorilla, ZSTD(1)),
    `nice` Float32 CODEC(Gorilla, ZSTD(1)),
    `system` Float32 CODEC(Gorilla, ZSTD(1)),
    `idle` Float32 CODEC(Gorilla, ZSTD(1)),
    `iowait` Float32 CODEC(Gorilla, ZSTD(1)),
    `irq` Float32 CODEC(Gorilla, ZSTD(1)),
    `softirq` Float32 CODEC(Gorilla, ZSTD(1)),
    `steal` Float32 CODEC(Gorilla, ZSTD(1)),
    `guest` Float32 CODEC(Gorilla, ZSTD(1))
) ENGINE = MergeTree()
PARTITION BY toDate(ts)
ORDER BY (host, cpu, ts)
TTL ts + INTERVAL 30 DAY;
CREATE TABLE IF NOT EXISTS sonde.system (
    `ts` DateTime CODEC(Delta, ZSTD(1)),
    `host` LowCardinality(String),
    `load1` Float32 CODEC(Gorilla, ZSTD(1)),
    `load5` Float32 CODEC(Gorilla, ZSTD(1)),
    `load15` Float32 CODEC(Gorilla, ZSTD(1)),
    `ctxt_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `forks_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `interrupts_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `procs_running` UInt32 CODEC(T64, ZSTD(1)),
    `procs_blocked` UInt32 CODEC(T64, ZSTD(1))
) ENGINE = MergeTree()
PARTITION BY toDate(ts)
ORDER BY (host, ts)
TTL ts + INTERVAL 30 DAY;
CREATE TABLE IF NOT EXISTS sonde.memory (
    `ts` DateTime CODEC(Delta, ZSTD(1)),
    `host` LowCardinality(String),
    `total` UInt64 CODEC(T64, ZSTD(1)),
    `available` UInt64 CODEC(T64, ZSTD(1)),
    `free` UInt64 CODEC(T64, ZSTD(1)),
    `buffers` UInt64 CODEC(T64, ZSTD(1)),
    `cached` UInt64 CODEC(T64, ZSTD(1)),
    `dirty` UInt64 CODEC(T64, ZSTD(1)),
    `swap_total` UInt64 CODEC(T64, ZSTD(1)),
    `swap_free` UInt64 CODEC(T64, ZSTD(1)),
    `page_faults_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `major_faults_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `swap_in_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `swap_out_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `oom_kills_per_s` Float32 CODEC(Gorilla, ZSTD(1))
) ENGINE = MergeTree()
PARTITION BY toDate(ts)
ORDER BY (host, ts)
TTL ts + INTERVAL 30 DAY;
CREATE TABLE IF NOT EXISTS sonde.pressure (
    `ts` DateTime CODEC(Delta, ZSTD(1)),
    `host` LowCardinality(String),
    `resource` LowCardinality(String),
    `some_avg10` Float32 CODEC(Gorilla, ZSTD(1)),
    `some_avg60` Float32 CODEC(Gorilla, ZSTD(1)),
    `some_avg300` Float32 CODEC(Gorilla, ZSTD(1)),
    `some_stall_pct` Float32 CODEC(Gorilla, ZSTD(1)),
    `full_avg10` Float32 CODEC(Gorilla, ZSTD(1)),
    `full_avg60` Float32 CODEC(Gorilla, ZSTD(1)),
    `full_avg300` Float32 CODEC(Gorilla, ZSTD(1)),
    `full_stall_pct` Float32 CODEC(Gorilla, ZSTD(1))
) ENGINE = MergeTree()
PARTITION BY toDate(ts)
ORDER BY (host, resource, ts)
TTL ts + INTERVAL 30 DAY;
CREATE TABLE IF NOT EXISTS sonde.disk (
    `ts` DateTime CODEC(Delta, ZSTD(1)),
    `host` LowCardinality(String),
    `device` LowCardinality(String),
    `reads_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `writes_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `read_bytes_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `write_bytes_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `r_await_ms` Float32 CODEC(Gorilla, ZSTD(1)),
    `w_await_ms` Float32 CODEC(Gorilla, ZSTD(1)),
    `util_pct` Float32 CODEC(Gorilla, ZSTD(1)),
    `in_flight` UInt32 CODEC(T64, ZSTD(1))
) ENGINE = MergeTree()
PARTITION BY toDate(ts)
ORDER BY (host, device, ts)
TTL ts + INTERVAL 30 DAY;
CREATE TABLE IF NOT EXISTS sonde.filesystem (
    `ts` DateTime CODEC(Delta, ZSTD(1)),
    `host` LowCardinality(String),
    `mount` LowCardinality(String),
    `device` LowCardinality(String),
    `fstype` LowCardinality(String),
    `size_bytes` UInt64 CODEC(T64, ZSTD(1)),
    `used_bytes` UInt64 CODEC(T64, ZSTD(1)),
    `avail_bytes` UInt64 CODEC(T64, ZSTD(1)),
    `inodes_total` UInt64 CODEC(T64, ZSTD(1)),
    `inodes_used` UInt64 CODEC(T64, ZSTD(1))
) ENGINE = MergeTree()
PARTITION BY toDate(ts)
ORDER BY (host, mount, ts)
TTL ts + INTERVAL 30 DAY;
CREATE TABLE IF NOT EXISTS sonde.net (
    `ts` DateTime CODEC(Delta, ZSTD(1)),
    `host` LowCardinality(String),
    `interface` LowCardinality(String),
    `rx_bytes_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `tx_bytes_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `rx_packets_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `tx_packets_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `rx_errors_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `tx_errors_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `rx_drops_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `tx_drops_per_s` Float32 CODEC(Gorilla, ZSTD(1))
) ENGINE = MergeTree()
PARTITION BY toDate(ts)
ORDER BY (host, interface, ts)
TTL ts + INTERVAL 30 DAY;
CREATE TABLE IF NOT EXISTS sonde.tcp (
    `ts` DateTime CODEC(Delta, ZSTD(1)),
    `host` LowCardinality(String),
    `retrans_segs_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `active_opens_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `passive_opens_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `attempt_fails_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `estab_resets_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `out_rsts_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `in_errs_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `in_segs_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `out_segs_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `curr_estab` UInt32 CODEC(T64, ZSTD(1)),
    `udp_in_datagrams_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `udp_out_datagrams_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `udp_in_errors_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `udp_rcvbuf_errors_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `udp_no_ports_per_s` Float32 CODEC(Gorilla, ZSTD(1))
) ENGINE = MergeTree()
PARTITION BY toDate(ts)
ORDER BY (host, ts)
TTL ts + INTERVAL 30 DAY;
CREATE TABLE IF NOT EXISTS sonde.hosts (
    `host` LowCardinality(String),
    `first_seen` DateTime,
    `last_seen` DateTime,
    `sensor_version` String,
    `kernel` String,
    `os` String,
    `arch` LowCardinality(String),
    `cpus` UInt32,
    `memory_bytes` UInt64,
    `kernel_boot_id` String,
    `sensor_boot_id` String
) ENGINE = ReplacingMergeTree(last_seen)
ORDER BY host;
CREATE TABLE IF NOT EXISTS sonde.batches (
    `host` LowCardinality(String),
    `sensor_boot_id` String,
    `seq` UInt64,
    `received` DateTime,
    `snapshots` UInt32,
    `samples` UInt32,
    `bytes` UInt32
) ENGINE = MergeTree()
PARTITION BY toDate(received)
ORDER BY (host, sensor_boot_id, seq)
TTL received + INTERVAL 30 DAY;
CREATE TABLE IF NOT EXISTS sonde.latency (
    `ts` DateTime CODEC(Delta, ZSTD(1)),
    `host` LowCardinality(String),
    `source` LowCardinality(String),
    `unit` LowCardinality(String),
    `count` UInt64 CODEC(T64, ZSTD(1)),
    `sum` UInt64 CODEC(T64, ZSTD(1)),
    `bucket_upper` Array(UInt64) CODEC(ZSTD(1)),
    `bucket_count` Array(UInt64) CODEC(ZSTD(1))
) ENGINE = MergeTree()
PARTITION BY toDate(ts)
ORDER BY (host, source, ts)
TTL ts + INTERVAL 30 DAY;
CREATE TABLE IF NOT EXISTS sonde.events (
    `ts` DateTime CODEC(Delta, ZSTD(1)),
    `host` LowCardinality(String),
    `kind` LowCardinality(String),
    `pid` UInt32 CODEC(T64, ZSTD(1)),
    `comm` LowCardinality(String),
    `cgroup` String,
    `detail` String
) ENGINE = MergeTree()
PARTITION BY toDate(ts)
ORDER BY (host, kind, ts)
TTL ts + INTERVAL 30 DAY;
CREATE TABLE IF NOT EXISTS sonde.probes (
    `ts` DateTime CODEC(Delta, ZSTD(1)),
    `host` LowCardinality(String),
    `execs_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `exits_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `short_lived_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `retransmits_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `resets_sent_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `resets_received_per_s` Float32 CODEC(Gorilla, ZSTD(1)),
    `oom_kills` UInt32 CODEC(T64, ZSTD(1))
) ENGINE = MergeTree()
PARTITION BY toDate(ts)
ORDER BY (host, ts)
TTL ts + INTERVAL 30 DAY;
CREATE TABLE IF NOT EXISTS sonde.tcp_ports (
    `ts` DateTime CODEC(Delta, ZSTD(1)),
    `host` LowCardinality(String),
    `port` UInt32 CODEC(T64, ZSTD(1)),
    `retransmits` UInt32 CODEC(T64, ZSTD(1))
) ENGINE = MergeTree()
PARTITION BY toDate(ts)
ORDER BY (host, port, ts)
TTL ts + INTERVAL 30 DAY;
ALTER TABLE sonde.hosts ADD COLUMN probes String;
CREATE TABLE IF NOT EXISTS sonde.alerts (
    `ts` DateTime CODEC(Delta, ZSTD(1)),
    `alert_id` String,
    `rule` LowCardinality(String),
    `host` LowCardinality(String),
    `state` LowCardinality(String),
    `severity` LowCardinality(String),
    `labels` String,
    `value` Float64 CODEC(Gorilla, ZSTD(1)),
    `threshold` Nullable(Float64) CODEC(ZSTD(1)),
    `score` Nullable(Float64) CODEC(ZSTD(1)),
    `starts_at` DateTime,
    `ends_at` Nullable(DateTime)
) ENGINE = MergeTree()
PARTITION BY toDate(ts)
ORDER BY (rule, host, ts)
TTL ts + INTERVAL 30 DAY;
CREATE TABLE IF NOT EXISTS sonde.gaps (
    `host` LowCardinality(String),
    `sensor_boot_id` String,
    `first_seq` UInt64,
    `last_seq` UInt64,
    `from_ts` DateTime,
    `to_ts` DateTime,
    `batches` UInt64,
    `samples` UInt64,
    `received` DateTime
) ENGINE = ReplacingMergeTree(received)
PARTITION BY toDate(from_ts)
ORDER BY (host, sensor_boot_id, first_seq)
TTL from_ts + INTERVAL 30 DAY;
CREATE TABLE IF NOT EXISTS sonde.batch_intents (
    `host` LowCardinality(String),
    `sensor_boot_id` String,
    `seq` UInt64,
    `created` DateTime
) ENGINE = MergeTree()
PARTITION BY toDate(created)
ORDER BY (host, sensor_boot_id, seq)
TTL created + INTERVAL 30 DAY;
