#!/usr/bin/env bash
# Where a durable consume's time goes: the release daemon (durability
# "fsync") under `quotad bench` (50 keep-alive connections over TCP, 100k
# random subjects), sampled with `perf record` for the length of the run,
# on two configurations:
#   one-limit  one fixed daily limit, usage history on (the redis_compare.sh config)
#   shipped    the shipped quotad.toml (prices, caps, alerts, breaker, anomaly, per-model history)
# Prints, per configuration: throughput, the split of samples between the
# kernel and quotad's own code, and the top symbols by self time (flat
# profile). With FLAME=1 also writes folded stacks and an SVG flame graph
# per configuration into target/profile/ (needs `inferno`: cargo install inferno).
#
#   bash benches/profile.sh
#   REQUESTS=400000 TOP=30 bash benches/profile.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/configs.sh
REQUESTS=${REQUESTS:-300000}
TOP=${TOP:-25}
command -v perf >/dev/null || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >/dev/null
}
cargo build --release --locked -q
BIN=$PWD/target/release/quotad
OUT=$PWD/target/profile
mkdir -p "$OUT"
WORK=$(mktemp -d)
PID=
cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

config() { # $1 = one-limit | shipped
  case "$1" in
    one-limit) one_limit_config '"127.0.0.1:7979"' "$WORK/data" ;;
    shipped) shipped_config '"127.0.0.1:7979"' "$WORK/data" ;;
  esac
}

for name in one-limit shipped; do
  rm -rf "$WORK/data"
  config "$name" >"$WORK/q.toml"
  "$BIN" serve --config "$WORK/q.toml" 2>"$WORK/q.log" &
  PID=$!
  for _ in $(seq 200); do "$BIN" health --addr 127.0.0.1:7979 >/dev/null 2>&1 && break; sleep 0.05; done
  perf record -q -F 1999 -g -p "$PID" -o "$WORK/perf.data" 2>/dev/null &
  PERF=$!
  sleep 0.5
  extra=()
  # On the shipped config every call is a priced chat. gpt-4o-mini at 3
  # tokens costs under a micro-dollar a call, so neither the global token
  # bucket nor the spend breaker (it opens at $1 on a fresh daemon with no
  # baseline) trips within the run: every call takes the full allowed path.
  [ "$name" = shipped ] && extra=(--event llm.chat --attr model=gpt-4o-mini --tokens 3)
  "$BIN" bench --addr 127.0.0.1:7979 -c 50 -n "$REQUESTS" --warmup 0 --subjects 100000 --op consume \
    "${extra[@]}" --json >"$WORK/r.json"
  kill -INT "$PERF"
  wait "$PERF" 2>/dev/null || true
  kill "$PID"
  wait "$PID" 2>/dev/null || true
  PID=
  python3 - "$WORK/r.json" "$name" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"== {sys.argv[2]}: {r['ops_per_sec']:.0f} consumes/s, p99 {r['p99_us'] / 1000:.2f} ms, {r['denied']} denied")
if r["errors"]:
    sys.exit(f"{r['errors']} of {r['operations']} calls failed: the profile would not be of the consume path")
PY
  # Flat profiles: by binary, then by symbol (self time).
  perf report -i "$WORK/perf.data" --no-children --sort dso --stdio 2>/dev/null >"$WORK/dso.txt"
  perf report -i "$WORK/perf.data" --no-children --sort symbol --stdio 2>/dev/null >"$WORK/sym.txt"
  grep -E '^ +[0-9]' "$WORK/dso.txt" | sed -n 1,6p | sed -E 's/[ -]+$//; s/^/  dso /'
  grep -E '^ +[0-9]' "$WORK/sym.txt" | sed -n "1,${TOP}p" | sed -E 's/[ -]+$//; s/^/  /'
  if [ "${FLAME:-}" = 1 ]; then
    perf script -i "$WORK/perf.data" 2>/dev/null | inferno-collapse-perf >"$OUT/$name.folded"
    inferno-flamegraph <"$OUT/$name.folded" >"$OUT/$name.svg"
    echo "  flame graph: $OUT/$name.svg"
  fi
done
