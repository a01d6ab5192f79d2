#!/usr/bin/env bash
# What a configured feature costs on the hot path, side by side in one run:
# consume throughput of the release daemon under `quotad bench` (50 keep-alive
# connections over TCP, 100k random subjects), for several configurations,
# interleaved round by round (A B C … A B C …) so that machine noise hits every
# one alike; the median of the rounds is printed. Each configuration is run
# with durability "fsync" (what users run; the fdatasync dominates) and
# "batch" (CPU-bound: shows the decision path itself).
#
#   bash benches/feature_cost.sh                    # this tree only
#   BASE_REV=b1ab9aa bash benches/feature_cost.sh   # also the plain config on an older commit
#   ROUNDS=5 REQUESTS=200000 bash benches/feature_cost.sh
#   CONFIGS="pricing signals" bash benches/feature_cost.sh   # only these (this tree)
#
# Configurations (same requests: event llm.chat, model gpt-4o, 1000 tokens):
#   plain    one fixed daily request limit (the redis_compare.sh config)
#   limits   plain + a monthly per-subject limit on tokens + a global daily one
#   pricing  plain + [pricing] with three prices + the same two limits counting
#            cost_micros instead of tokens: the money version of "limits"
#   nohistory  plain with [history] enabled = false (usage history is on by default)
#   dims     plain with [history] dimensions = ["model"] (usage also kept per model)
#   signals  pricing + what the shipped quotad.toml adds for signals: alerts
#            [0.8, 1.0] on the monthly limit, the spend-surge breaker and the
#            usage-spike anomaly rule (every bench call matches all three)
set -euo pipefail
cd "$(dirname "$0")/.."
REQUESTS=${REQUESTS:-150000}
ROUNDS=${ROUNDS:-3}
SUBJECTS=100000

cargo build --release --locked -q
NEW=$PWD/target/release/quotad
BASE=""
if [ -n "${BASE_REV:-}" ]; then
  tree=$PWD/target/base-src
  [ -d "$tree" ] || git worktree add -q --detach "$tree" "$BASE_REV"
  git -C "$tree" checkout -q --detach "$BASE_REV"
  (cd "$tree" && CARGO_TARGET_DIR="$PWD/../base-target" cargo build --release --locked -q)
  BASE=$PWD/target/base-target/release/quotad
fi
WORK=$(mktemp -d)
cleanup() {
  [ -n "${PID:-}" ] && kill "$PID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

header() { # $1 = durability
  cat <<TOML
metrics = ["tokens"]
[server]
listen = ["127.0.0.1:7979"]
max_connections = 1000
[storage]
data_dir = "$WORK/data"
durability = "$1"
[log]
level = "warn"
TOML
}

config() { # $1 = name, $2 = durability
  header "$2"
  case "$1" in
    plain) ;;
    nohistory)
      printf '[history]\nenabled = false\n'
      ;;
    dims)
      printf '[history]\ndimensions = ["model"]\n'
      ;;
    limits)
      cat <<'TOML'
[[limits]]
name = "tokens-per-day-global"
metric = "tokens"
scope = "global"
period = "1d"
max = 9000000000000000
TOML
      ;;
    pricing | signals)
      cat <<'TOML'
[pricing]
currency = "USD"
[[pricing.prices]]
name = "gpt-4o"
match = { event = "llm.*", attributes = { model = "gpt-4o" } }
tokens = "5.00/1M"
[[pricing.prices]]
name = "gpt-4o-mini"
match = { event = "llm.*", attributes = { model = "gpt-4o-mini" } }
tokens = "0.30/1M"
[[pricing.prices]]
name = "other-llm"
match = { event = "llm.*" }
tokens = "1.00/1M"
[[limits]]
name = "spend-per-day-global"
metric = "cost_micros"
scope = "global"
period = "1d"
max = 9000000000000000
TOML
      ;;
  esac
  if [ "$1" = signals ]; then
    cat <<'TOML'
[[breakers]]
name = "spend-surge"
metric = "cost_micros"
match = { event = "llm.*" }
window = "10m"
baseline = "24h"
ratio = 3.0
min_amount = 1000000
cooldown = "15m"
pass_priority = "critical"
[[anomalies]]
name = "usage-spike"
metric = "requests"
match = { event = "llm.*" }
period = "1d"
baseline_periods = 7
ratio = 10.0
min_amount = 500
TOML
  fi
  local metric=tokens
  [ "$1" = pricing ] || [ "$1" = signals ] && metric=cost_micros
  cat <<TOML
[[plans]]
name = "bench"
default = true
  [[plans.limits]]
  name = "requests-per-day"
  period = "1d"
  max = 1000000000
TOML
  if [ "$1" != plain ] && [ "$1" != nohistory ] && [ "$1" != dims ]; then
    cat <<TOML
  [[plans.limits]]
  name = "per-month"
  metric = "$metric"
  period = "1mo"
  max = 9000000000000000
TOML
  fi
  [ "$1" = signals ] && echo '  alerts = [0.8, 1.0]'
  return 0
}

cpu_ticks() { # $1 = pid → user + system clock ticks so far
  awk '{print $14 + $15}' "/proc/$1/stat"
}

run() { # $1 = binary, $2 = config name, $3 = durability → "ops/s server-CPU-µs/op"
  rm -rf "$WORK/data"
  config "$2" "$3" >"$WORK/q.toml"
  "$1" serve --config "$WORK/q.toml" 2>"$WORK/q.log" &
  PID=$!
  local up=0
  for _ in $(seq 200); do "$NEW" health --addr 127.0.0.1:7979 >/dev/null 2>&1 && up=1 && break; sleep 0.05; done
  [ "$up" = 1 ] || { echo "the $2 daemon did not start:" >&2; cat "$WORK/q.log" >&2; exit 1; }
  local t0 t1
  t0=$(cpu_ticks "$PID")
  "$NEW" bench --addr 127.0.0.1:7979 -c 50 -n "$REQUESTS" --warmup 0 --subjects "$SUBJECTS" --op consume \
    --event llm.chat --attr model=gpt-4o --tokens 1000 --json >"$WORK/r.json"
  t1=$(cpu_ticks "$PID")
  # Server CPU per decision is far steadier than throughput on a shared VM.
  python3 - "$WORK/r.json" "$((t1 - t0))" "$(getconf CLK_TCK)" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["errors"] == 0, r
print(f'{r["ops_per_sec"]:.0f}/{int(sys.argv[2]) / int(sys.argv[3]) * 1e6 / r["operations"]:.2f}')
PY
  kill "$PID"
  wait "$PID" 2>/dev/null || true
  PID=""
}

variants=()
[ -n "$BASE" ] && variants+=("base:$BASE:plain")
for c in ${CONFIGS:-plain limits pricing signals}; do variants+=("new:$NEW:$c"); done

for durability in fsync batch; do
  declare -A results=()
  for round in $(seq "$ROUNDS"); do
    for v in "${variants[@]}"; do
      IFS=: read -r label bin name <<<"$v"
      results["$label/$name"]+="$(run "$bin" "$name" "$durability") "
    done
  done
  echo "durability=$durability, $ROUNDS rounds of $REQUESTS consumes, 50 connections, TCP"
  echo "  config          ops/s median [rounds]                    server CPU µs/decision median [rounds]"
  for v in "${variants[@]}"; do
    IFS=: read -r label bin name <<<"$v"
    python3 - "$label/$name" ${results["$label/$name"]} <<'PY'
import statistics, sys
name, pairs = sys.argv[1], [v.split("/") for v in sys.argv[2:]]
ops, cpu = [float(p[0]) for p in pairs], [float(p[1]) for p in pairs]
print(f"  {name:<14} {statistics.median(ops):>8.0f} [{' '.join(f'{v:.0f}' for v in ops)}]"
      f"   {statistics.median(cpu):>6.2f} [{' '.join(f'{v:.2f}' for v in cpu)}]")
PY
  done
  unset results
done
echo "versions: quotad $("$NEW" --version | cut -d' ' -f2)${BASE_REV:+, base $BASE_REV}, $(nproc) cores"
