#!/bin/bash
# What an aggregator restart costs detection: N simulated hosts (the load generator,
# 188 samples/s each) send to an aggregator with its managed ClickHouse and the default
# rules for SECS1 seconds; the aggregator restarts and a second load generator run sends
# the same hosts for SECS2 seconds. Every host is new to the restarted aggregator's
# detectors, which read its firing alerts and replay its stored history before
# evaluating it. Prints the detection metrics every 2 s and each run's ingest figures.
#
#   cargo build --release -p sonde-aggregator
#   cargo bench -q --no-run -p sonde-aggregator --bench loadgen
#   bash aggregator/benches/restart_warm.sh 3000 600 60
# (SONDE_BIN_DIR=DIR runs DIR/aggregator instead of target/release/aggregator.)
#
# Uses 127.0.0.1:14433 (QUIC) and :19464 (HTTP) and /tmp/sonde-restart-warm.
set -u
N=${1:-3000}; S1=${2:-600}; S2=${3:-60}
R=$((N * 188))
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
B=${SONDE_BIN_DIR:-$ROOT/target/release}
D=/tmp/sonde-restart-warm; rm -rf $D; mkdir -p $D
cd "$ROOT"
cargo run -q -p xtask -- certs --dir $D/certs --host x >/dev/null || exit 1
start() {
  RUST_LOG=${RUST_LOG:-info} $B/aggregator run --listen 127.0.0.1:14433 --http-listen 127.0.0.1:19464 --data-dir $D/agg \
    --ca $D/certs/ca.pem --cert $D/certs/aggregator.pem --key $D/certs/aggregator-key.pem >> $D/agg.log 2>&1 &
  echo $! > $D/agg.pid
  for _ in $(seq 1 300); do
    curl -s -o /dev/null -w '%{http_code}' 127.0.0.1:19464/readyz 2>/dev/null | grep -q 200 && break
    sleep 0.2
  done
}
metrics() {
  curl -s 127.0.0.1:19464/metrics | grep -E "^sonde_detect_(dropped_total|series |hosts|warm|replayed)" \
    | sed 's/^sonde_detect_//' | tr '\n' ' '
  echo "rss_mb $(( $(ps -o rss= -p "$(cat $D/agg.pid)") / 1024 ))"
}
LG=$(ls -t target/release/deps/loadgen-* | grep -v '\.d$' | head -1)
for run in 1 2; do
  S=$([ $run = 1 ] && echo $S1 || echo $S2)
  start
  echo "run $run: $N hosts, $R samples/s, $S s (aggregator started $(date +%T))"
  $LG --aggregator 127.0.0.1:14433 --certs $D/certs rate --sensors $N --samples-per-s $R --secs $S \
    > $D/lg$run.json 2> $D/lg$run.err &
  LGP=$!
  for i in $(seq 1 $((S + 30))); do
    sleep 1
    kill -0 $LGP 2>/dev/null || break
    if [ $run = 2 ] && [ $i -le 40 ] && [ $((i % 2)) = 0 ] || [ $((i % 30)) = 0 ]; then
      echo "  t=${i}s $(metrics)"
    fi
  done
  wait $LGP
  echo "  end: $(metrics)"
  python3 -c "import json; d=json.load(open('$D/lg$run.json')); print('  ingest:', {k: d.get(k) for k in ['offered_samples_per_s', 'acked_samples_per_s', 'lag_ms_p50', 'lag_ms_p99', 'connected', 'errors']})" \
    || tail -3 $D/lg$run.json
  kill $(cat $D/agg.pid)
  while kill -0 $(cat $D/agg.pid) 2>/dev/null; do sleep 0.5; done
done
grep -E "many hosts arrived|start without its history|took over" $D/agg.log | tail -5
