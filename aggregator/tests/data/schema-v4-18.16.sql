CREATE DATABASE IF NOT EXISTS sonde;
CREATE TABLE IF NOT EXISTS sonde.schema_migrations (`version` UInt32, `name` String, `applied` DateTime) ENGINE = MergeTree() ORDER BY version;
CREATE TABLE IF NOT EXISTS sonde.cpu (
    `ts` DateTime,
    `host` String,
    `cpu` String,
    `user` Float32,
    `nice` Float32,
    `system` Float32,
    `idle` Float32,
    `iowait` Float32,
    `irq` Float32,
    `softirq` Float32,
    `steal` Float32,
    `guest` Float32
) ENGINE = MergeTree()
PARTITION BY toDate(ts)
ORDER BY (host, cpu, ts);
CREATE TABLE IF NOT EXISTS sonde.system (
    `ts` DateTime,
    `host` String,
    `load1` Float32,
    `load5` Float32,
    `load15` Float32,
    `ctxt_per_s` Float32,
    `forks_per_s` Float32,
    `interrupts_per_s` Float32,
    `procs_running` UInt32,
    `procs_blocked` UInt32
) ENGINE = MergeTree()
PARTITION BY toDate(ts)
ORDER BY (host, ts);
CREATE TABLE IF NOT EXISTS sonde.memory (
    `ts` DateTime,
    `host` String,
    `total` UInt64,
    `available` UInt64,
    `free` UInt64,
    `buffers` UInt64,
    `cached` UInt64,
    `dirty` UInt64,
    `swap_total` UInt64,
    `swap_free` UInt64,
    `page_faults_per_s` Float32,
    `major_faults_per_s` Float32,
    `swap_in_per_s` Float32,
    `swap_out_per_s` Float32,
    `oom_kills_per_s` Float32
) ENGINE = MergeTree()
PARTITION BY toDate(ts)
ORDER BY (host, ts);
CREATE TABLE IF NOT EXISTS sonde.pressure (
    `ts` DateTime,
    `host` String,
    `resource` String,
    `some_avg10` Float32,
    `some_avg60` Float32,
    `some_avg300` Float32,
    `some_stall_pct` Float32,
    `full_avg10` Float32,
    `full_avg60` Float32,
    `full_avg300` Float32,
    `full_stall_pct` Float32
) ENGINE = MergeTree()
PARTITION BY toDate(ts)
ORDER BY (host, resource, ts);
CREATE TABLE IF NOT EXISTS sonde.disk (
    `ts` DateTime,
    `host` String,
    `device` String,
    `reads_per_s` Float32,
    `writes_per_s` Float32,
    `read_bytes_per_s` Float32,
    `write_bytes_per_s` Float32,
    `r_await_ms` Float32,
    `w_await_ms` Float32,
    `util_pct` Float32,
    `in_flight` UInt32
) ENGINE = MergeTree()
PARTITION BY toDate(ts)
ORDER BY (host, device, ts);
CREATE TABLE IF NOT EXISTS sonde.filesystem (
    `ts` DateTime,
    `host` String,
    `mount` String,
    `device` String,
    `fstype` String,
    `size_bytes` UInt64,
    `used_bytes` UInt64,
    `avail_bytes` UInt64,
    `inodes_total` UInt64,
    `inodes_used` UInt64
) ENGINE = MergeTree()
PARTITION BY toDate(ts)
ORDER BY (host, mount, ts);
CREATE TABLE IF NOT EXISTS sonde.net (
    `ts` DateTime,
    `host` String,
    `interface` String,
    `rx_bytes_per_s` Float32,
    `tx_bytes_per_s` Float32,
    `rx_packets_per_s` Float32,
    `tx_packets_per_s` Float32,
    `rx_errors_per_s` Float32,
    `tx_errors_per_s` Float32,
    `rx_drops_per_s` Float32,
    `tx_drops_per_s` Float32
) ENGINE = MergeTree()
PARTITION BY toDate(ts)
ORDER BY (host, interface, ts);
CREATE TABLE IF NOT EXISTS sonde.tcp (
    `ts` DateTime,
    `host` String,
    `retrans_segs_per_s` Float32,
    `active_opens_per_s` Float32,
    `passive_opens_per_s` Float32,
    `attempt_fails_per_s` Float32,
    `estab_resets_per_s` Float32,
    `out_rsts_per_s` Float32,
    `in_errs_per_s` Float32,
    `in_segs_per_s` Float32,
    `out_segs_per_s` Float32,
    `curr_estab` UInt32,
    `udp_in_datagrams_per_s` Float32,
    `udp_out_datagrams_per_s` Float32,
    `udp_in_errors_per_s` Float32,
    `udp_rcvbuf_errors_per_s` Float32,
    `udp_no_ports_per_s` Float32
) ENGINE = MergeTree()
PARTITION BY toDate(ts)
ORDER BY (host, ts);
CREATE TABLE IF NOT EXISTS sonde.hosts (
    `host` String,
    `first_seen` DateTime,
    `last_seen` DateTime,
    `sensor_version` String,
    `kernel` String,
    `os` String,
    `arch` String,
    `cpus` UInt32,
    `memory_bytes` UInt64,
    `kernel_boot_id` String,
    `sensor_boot_id` String
) ENGINE = ReplacingMergeTree(last_seen)
ORDER BY host;
CREATE TABLE IF NOT EXISTS sonde.batches (
    `host` String,
    `sensor_boot_id` String,
    `seq` UInt64,
    `received` DateTime,
    `snapshots` UInt32,
    `samples` UInt32,
    `bytes` UInt32
) ENGINE = MergeTree()
PARTITION BY toDate(received)
ORDER BY (host, sensor_boot_id, seq);
CREATE TABLE IF NOT EXISTS sonde.latency (
    `ts` DateTime,
    `host` String,
    `source` String,
    `unit` String,
    `count` UInt64,
    `sum` UInt64,
    `bucket_upper` Array(UInt64),
    `bucket_count` Array(UInt64)
) ENGINE = MergeTree()
PARTITION BY toDate(ts)
ORDER BY (host, source, ts);
CREATE TABLE IF NOT EXISTS sonde.events (
    `ts` DateTime,
    `host` String,
    `kind` String,
    `pid` UInt32,
    `comm` String,
    `cgroup` String,
    `detail` String
) ENGINE = MergeTree()
PARTITION BY toDate(ts)
ORDER BY (host, kind, ts);
CREATE TABLE IF NOT EXISTS sonde.probes (
    `ts` DateTime,
    `host` String,
    `execs_per_s` Float32,
    `exits_per_s` Float32,
    `short_lived_per_s` Float32,
    `retransmits_per_s` Float32,
    `resets_sent_per_s` Float32,
    `resets_received_per_s` Float32,
    `oom_kills` UInt32
) ENGINE = MergeTree()
PARTITION BY toDate(ts)
ORDER BY (host, ts);
CREATE TABLE IF NOT EXISTS sonde.tcp_ports (
    `ts` DateTime,
    `host` String,
    `port` UInt32,
    `retransmits` UInt32
) ENGINE = MergeTree()
PARTITION BY toDate(ts)
ORDER BY (host, port, ts);
ALTER TABLE sonde.hosts ADD COLUMN probes String;
CREATE TABLE IF NOT EXISTS sonde.alerts (
    `ts` DateTime,
    `alert_id` String,
    `rule` String,
    `host` String,
    `state` String,
    `severity` String,
    `labels` String,
    `value` Float64,
    `threshold` Nullable(Float64),
    `score` Nullable(Float64),
    `starts_at` DateTime,
    `ends_at` Nullable(DateTime)
) ENGINE = MergeTree()
PARTITION BY toDate(ts)
ORDER BY (rule, host, ts);
CREATE TABLE IF NOT EXISTS sonde.gaps (
    `host` String,
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
ORDER BY (host, sensor_boot_id, first_seq);
CREATE TABLE IF NOT EXISTS sonde.batch_intents (
    `host` String,
    `sensor_boot_id` String,
    `seq` UInt64,
    `created` DateTime
) ENGINE = MergeTree()
PARTITION BY toDate(created)
ORDER BY (host, sensor_boot_id, seq);
