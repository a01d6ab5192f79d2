#!/usr/bin/env bash
# A/B of two quotad binaries on one durable config: each round starts a fresh
# daemon per binary (before, then after), warms it with WARMUP calls on the
# same random subjects, then measures REQUESTS calls with `quotad bench`.
# Rounds interleave, so drift on the machine falls on both alike. Prints one
# line per run and the medians: decisions/s, the server's CPU per decision
# (user+system of all its threads, /proc/PID/stat, so a snapshot it writes
# counts) and p99. The load generator is this tree's.
#
#   bash benches/ab.sh BEFORE AFTER                 # binaries; one-limit config
#   ROUNDS=5 CONNS=200 VIA=unix bash benches/ab.sh /tmp/quotad-old target/release/quotad
#   SNAPSHOT_EVERY=150000 bash benches/ab.sh A B    # a snapshot falls into each run
#   CONFIG=quotad.toml BENCH_ARGS="--event llm.chat --attr model=gpt-4o-mini --tokens 3" \
#     bash benches/ab.sh A B                        # another config (its listen and
#                                                   # data_dir are replaced)
#
# Environment: ROUNDS (5), CONNS (50), VIA (tcp or unix), REQUESTS (200000),
# WARMUP (100000), SUBJECTS (100000), PIPELINE (1: one request per round trip),
# SNAPSHOT_EVERY (the config's own when unset), CONFIG, BENCH_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/configs.sh
[ $# -eq 2 ] || { echo "usage: bash benches/ab.sh BEFORE-BINARY AFTER-BINARY" >&2; exit 2; }
BEFORE=$(realpath "$1")
AFTER=$(realpath "$2")
for b in "$BEFORE" "$AFTER"; do
  [ -x "$b" ] || { echo "not an executable: $b" >&2; exit 2; }
done
ROUNDS=${ROUNDS:-5}
CONNS=${CONNS:-50}
VIA=${VIA:-tcp}
REQUESTS=${REQUESTS:-200000}
WARMUP=${WARMUP:-100000}
SUBJECTS=${SUBJECTS:-100000}
PIPELINE=${PIPELINE:-1}
BENCH_ARGS=${BENCH_ARGS:-}
case "$VIA" in tcp | unix) ;; *) echo "VIA is tcp or unix, not $VIA" >&2; exit 2 ;; esac

cargo build --release --locked -q
QUOTAD=$PWD/target/release/quotad
WORK=$(mktemp -d)
PID=""
cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
PORT=7981

# The config: the one-limit plan of redis_compare.sh, or CONFIG with its
# [server] listen and [storage] data_dir pointed at this run's.
if [ -n "${CONFIG:-}" ]; then
  python3 - "$CONFIG" "$WORK/ab.toml" "$PORT" "$WORK" <<'PY'
import re, sys
src, dst, port, work = sys.argv[1:]
text = open(src).read()
text = re.sub(r'(?m)^listen\s*=.*$', f'listen = ["127.0.0.1:{port}", "unix:{work}/ab.sock"]', text, count=1)
text = re.sub(r'(?m)^data_dir\s*=.*$', f'data_dir = "{work}/data"', text, count=1)
text = re.sub(r'(?m)^durability\s*=.*$', 'durability = "fsync"', text, count=1)
open(dst, "w").write(text)
PY
else
  one_limit_config "\"127.0.0.1:$PORT\", \"unix:$WORK/ab.sock\"" "$WORK/data" >"$WORK/ab.toml"
fi
if [ -n "${SNAPSHOT_EVERY:-}" ]; then
  python3 - "$WORK/ab.toml" "$SNAPSHOT_EVERY" <<'PY'
import re, sys
path, every = sys.argv[1:]
text = re.sub(r'(?m)^snapshot_every_records\s*=.*\n', '', open(path).read())
text = re.sub(r'(?m)^\[storage\]\n', f'[storage]\nsnapshot_every_records = {every}\n', text, count=1)
open(path, "w").write(text)
PY
fi

where=(--addr "127.0.0.1:$PORT")
[ "$VIA" = unix ] && where=(--socket "$WORK/ab.sock")
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)

run() { # binary -> "ops/s cpu_us p99_ms"
  rm -rf "$WORK/data" "$WORK/ab.sock"
  "$1" serve --config "$WORK/ab.toml" >/dev/null 2>&1 &
  PID=$!
  for _ in $(seq 200); do "$QUOTAD" health "${where[@]}" >/dev/null 2>&1 && break; sleep 0.05; done
  # shellcheck disable=SC2086
  "$QUOTAD" bench "${where[@]}" -c "$CONNS" -P "$PIPELINE" -n "$WARMUP" --warmup 0 --subjects "$SUBJECTS" $BENCH_ARGS >/dev/null
  local t0 t1 json
  t0=$(ticks "$PID")
  # shellcheck disable=SC2086
  json=$("$QUOTAD" bench "${where[@]}" -c "$CONNS" -P "$PIPELINE" -n "$REQUESTS" --warmup 0 --subjects "$SUBJECTS" $BENCH_ARGS --json)
  t1=$(ticks "$PID")
  kill "$PID"
  wait "$PID" 2>/dev/null || true
  PID=""
  python3 - "$json" $((t1 - t0)) "$TICK" <<'PY'
import json, sys
r = json.loads(sys.argv[1]); ticks, hz = int(sys.argv[2]), int(sys.argv[3])
if r["errors"]:
    sys.exit(f"{r['errors']} errors in the run: is the config right for these requests?")
print(f"{r['ops_per_sec']:.0f} {ticks / hz * 1e6 / r['operations']:.1f} {r['p99_us'] / 1000:.2f}")
PY
}

echo "A/B: $CONNS connections over $VIA, pipeline $PIPELINE, $REQUESTS calls after $WARMUP, $ROUNDS rounds"
: >"$WORK/before"
: >"$WORK/after"
for r in $(seq "$ROUNDS"); do
  for side in before after; do
    bin=$BEFORE
    [ "$side" = after ] && bin=$AFTER
    line=$(run "$bin")
    echo "$line" >>"$WORK/$side"
    read -r ops cpu p99 <<<"$line"
    printf 'round %d %-6s %8s/s  cpu %5s us  p99 %5s ms\n' "$r" "$side" "$ops" "$cpu" "$p99"
  done
done
python3 - "$WORK/before" "$WORK/after" <<'PY'
import statistics, sys
print("median         req/s   cpu us  p99 ms")
for name, path in zip(("before", "after"), sys.argv[1:]):
    rows = [list(map(float, l.split())) for l in open(path) if l.strip()]
    ops, cpu, p99 = (statistics.median(c) for c in zip(*rows))
    print(f"{name:<8} {ops:>12,.0f} {cpu:>8.1f} {p99:>7.2f}")
PY
