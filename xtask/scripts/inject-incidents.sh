#!/usr/bin/env bash
# Injects the recorded corpus's incidents one at a time on this host (run as root, while
# `sensor record` runs), with quiet stretches between, and writes their labels.
#
#   inject-incidents.sh LABELS.tsv [QUIET_SECONDS]
#
# Labels are the injection times themselves: one line per incident,
#   name <TAB> start_unix <TAB> end_unix <TAB> series it is expected to show in (space separated)
# written before any detector has seen the data. Needs: stress-ng, fio, iperf3, iptables,
# ip (iproute2), python3, a mounted loop filesystem at /mnt/sonde-fill and an idle loop device
# named in $SONDE_IO_DEV (both created before the recording starts, so their series have
# history; the device must have done some I/O — the sensor skips disks that never did any —
# which this script checks).
set -euo pipefail
LABELS=${1:?usage: inject-incidents.sh LABELS.tsv [QUIET_SECONDS]}
QUIET=${2:-300}
IO_DEV=${SONDE_IO_DEV:?set SONDE_IO_DEV to an idle loop device, e.g. /dev/loop1}
FILL=/mnt/sonde-fill
mountpoint -q "$FILL" || { echo "$FILL is not a mounted filesystem" >&2; exit 2; }
printf 'name\tstart\tend\tseries\n' > "$LABELS"
DEV=$(basename "$IO_DEV")
awk -v d="$DEV" '$3 == d && ($4 + $8) > 0 { ok = 1 } END { exit !ok }' /proc/diskstats || {
  echo "$IO_DEV has done no I/O yet, so the sensor does not report it: read it once first" >&2; exit 2; }

incident() { # name series... ; the body runs between the two timestamps
  local name=$1; shift
  echo "$(date -u +%T) quiet ${QUIET}s before $name" >&2
  sleep "$QUIET"
  local start; start=$(date +%s)
  echo "$(date -u +%T) start $name" >&2
  "inject_$name"
  local end; end=$(date +%s)
  echo "$(date -u +%T) end $name ($((end - start)) s)" >&2
  printf '%s\t%s\t%s\t%s\n' "$name" "$start" "$end" "$*" >> "$LABELS"
}

inject_cpu_saturation() { stress-ng --cpu 2 --timeout 150s --quiet || true; }

inject_memory_leak_oom() {
  local cg=/sys/fs/cgroup/memory/sonde-leak
  mkdir -p "$cg"
  echo $((1024 * 1024 * 1024)) > "$cg/memory.limit_in_bytes"
  # 8 MiB more every second, touched, until the cgroup's OOM killer takes it (~2 min).
  sh -c "echo \$\$ > $cg/cgroup.procs; exec python3 -c '
import time
keep = []
while True:
    keep.append(b\"x\" * (8 << 20))
    time.sleep(1)
'" || true
  sleep 5
  rmdir "$cg" 2>/dev/null || true
}

inject_disk_fill() {
  # ~7 MB/s until the filesystem is full, then it stays full for 30 s and is freed.
  python3 - "$FILL/fill" <<'PY' || true
import sys, time, os
chunk = b"\0" * (1 << 20)
with open(sys.argv[1], "wb") as f:
    try:
        while True:
            f.write(chunk); f.flush(); os.fsync(f.fileno()) if f.tell() % (64 << 20) == 0 else None
            time.sleep(0.14)
    except OSError:
        pass
PY
  sleep 30
  rm -f "$FILL/fill"
}

inject_io_saturation() {
  fio --name=sat --filename="$IO_DEV" --direct=1 --rw=randwrite --bs=4k --iodepth=32 \
      --ioengine=libaio --time_based --runtime=150 --output=/dev/null || true
}

inject_packet_loss() {
  ip netns add sonde-pl
  ip link add sonde-pl0 type veth peer name sonde-pl1
  ip link set sonde-pl1 netns sonde-pl
  ip addr add 10.213.7.1/24 dev sonde-pl0
  ip link set sonde-pl0 up
  ip netns exec sonde-pl ip addr add 10.213.7.2/24 dev sonde-pl1
  ip netns exec sonde-pl ip link set sonde-pl1 up
  ip netns exec sonde-pl ip link set lo up
  ip netns exec sonde-pl iptables -A INPUT -p tcp -m statistic --mode random --probability 0.03 -j DROP
  ip netns exec sonde-pl iperf3 -s -D -B 10.213.7.2
  sleep 1
  iperf3 -c 10.213.7.2 -t 150 -b 300M > /dev/null || true
  ip netns exec sonde-pl pkill iperf3 || true
  ip link del sonde-pl0 2>/dev/null || true
  ip netns del sonde-pl
}

inject_fork_storm() {
  stress-ng --fork 1 --timeout 120s --quiet &
  local p=$!
  timeout 120 sh -c 'while :; do /bin/true; done' || true
  wait "$p" || true
}

inject_runqueue_storm() { stress-ng --cpu 16 --sched other --timeout 150s --quiet || true; }

incident cpu_saturation     'cpu.busy{cpu=total}' system.load1 system.procs_running latency.runqueue.p99
incident memory_leak_oom    memory.used memory.available_pct memory.oom_kills_per_s probes.oom_kills 'pressure.some_avg10{resource=memory}'
incident disk_fill          "filesystem.used_pct{mount=$FILL}" "filesystem.avail_bytes{mount=$FILL}" "disk.write_bytes_per_s{device=loop*}"
incident io_saturation      "disk.util_pct{device=$DEV}" "disk.w_await_ms{device=$DEV}" "disk.writes_per_s{device=$DEV}" "latency.disk:$DEV:write.p99"
incident packet_loss        tcp.retrans_segs_per_s probes.retransmits_per_s
incident fork_storm         system.forks_per_s probes.execs_per_s probes.exits_per_s probes.short_lived_per_s
incident runqueue_storm     latency.runqueue.p99 system.procs_running system.load1
echo "$(date -u +%T) quiet ${QUIET}s after the last incident" >&2
sleep "$QUIET"
echo "$(date -u +%T) done; labels in $LABELS" >&2
