#!/usr/bin/env bash
# Side-by-side: Redis 7 with appendfsync always running a Lua fixed-window
# check-and-consume (EVALSHA) under redis-benchmark, against durable quotad
# (durability = "fsync", an equivalent one-limit plan, usage history on as
# shipped) under `quotad bench`, with the same connections and 100k random
# subjects, at 50 and 200 connections, over TCP and a Unix socket. Beside
# them: quotad on the shipped quotad.toml (prices, money caps, alerts, a
# breaker, an anomaly rule, usage per model) consuming priced chat calls, and
# the one-limit daemon's no-op endpoint (GET /healthz), the HTTP ceiling.
#
# Server CPU per decision is the server process's user+system time
# (/proc/PID/stat, all threads, plus reaped children: Redis's AOF rewrites,
# each waited for at the end of the run that set it off) over the run,
# divided by the decisions. quotad's snapshots (one per million
# records by default) fall into whichever run they happen in.
# Every figure is the median of ROUNDS interleaved rounds (each round runs
# every case once, in the same order), so drift on the machine falls on all
# of them alike; the ratio is the median of the per-round ratios.
#
# With PIPELINE=N (16 by default, 0 for none), both also run pipelined at
# 50 connections: each connection sends N requests at once and then reads
# their N answers (redis-benchmark -P N, quotad bench -P N); quotad's side
# is a second one-limit daemon.
#
# With BASELINE=path/to/an/older/quotad, that binary serves the one-limit
# config too (its own data directory), in the same rounds: the "before" of
# a change, side by side. The load generator is always this tree's.
#
#   bash benches/redis_compare.sh            # builds quotad --release if needed
#   REQUESTS=300000 ROUNDS=5 bash benches/redis_compare.sh
#   BASELINE=/tmp/quotad-before bash benches/redis_compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/configs.sh
REQUESTS=${REQUESTS:-200000}
ROUNDS=${ROUNDS:-3}
PIPELINE=${PIPELINE:-16}
SUBJECTS=100000

if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null
fi
cargo build --release --locked -q
QUOTAD=$PWD/target/release/quotad
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# user+system clock ticks of a process, all its threads, and of the children
# it has reaped: Redis rewrites its AOF in a forked child, quotad snapshots
# in-process, and both are part of keeping the log bounded.
ticks() { awk '{print $14 + $15 + $16 + $17}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)

# --- Redis: AOF fsynced on every write, no RDB snapshots.
redis-server --port 6390 --unixsocket "$WORK/redis.sock" --unixsocketperm 700 --dir "$WORK" \
  --appendonly yes --appendfsync always --save "" --daemonize no --logfile "$WORK/redis.log" &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
for _ in $(seq 100); do redis-cli -p 6390 ping >/dev/null 2>&1 && break; sleep 0.05; done
# Fixed window: read, compare to the limit, INCRBY + EXPIRE, return allowed and remaining.
LUA='local used = tonumber(redis.call("GET", KEYS[1]) or "0")
local amount = tonumber(ARGV[1])
local max = tonumber(ARGV[2])
if used + amount > max then return {0, max - used} end
used = redis.call("INCRBY", KEYS[1], amount)
if used == amount then redis.call("EXPIRE", KEYS[1], ARGV[3]) end
return {1, max - used}'
SHA=$(redis-cli -p 6390 SCRIPT LOAD "$LUA")

# --- quotad "one": one fixed daily limit per subject, fsync durability.
one_limit_config "\"127.0.0.1:7979\", \"unix:$WORK/one.sock\"" "$WORK/one" >"$WORK/one.toml"
# --- quotad "shipped": the shipped quotad.toml on other addresses.
shipped_config "\"127.0.0.1:7980\", \"unix:$WORK/shipped.sock\"" "$WORK/shipped" >"$WORK/shipped.toml"
NAMES=(one)
PORTS=(7979)
if [ -n "${BASELINE:-}" ]; then
  sed -e "s|127.0.0.1:7979|127.0.0.1:7981|; s|$WORK/one.sock|$WORK/base.sock|; s|$WORK/one\"|$WORK/base\"|" \
    "$WORK/one.toml" >"$WORK/base.toml"
  NAMES+=(base)
  PORTS+=(7981)
fi
if [ "$PIPELINE" -gt 0 ]; then
  # Its own daemon, so that the pipelined runs' records (and the snapshots
  # they bring) do not land in the other cases' runs.
  sed -e "s|127.0.0.1:7979|127.0.0.1:7982|; s|$WORK/one.sock|$WORK/pipe.sock|; s|$WORK/one\"|$WORK/pipe\"|" \
    "$WORK/one.toml" >"$WORK/pipe.toml"
  NAMES+=(pipe)
  PORTS+=(7982)
fi
declare -A QPID
for name in "${NAMES[@]}"; do
  bin=$QUOTAD
  [ "$name" = base ] && bin=$BASELINE
  "$bin" serve --config "$WORK/$name.toml" 2>"$WORK/$name.log" &
  QPID[$name]=$!
  PIDS+=("$!")
done
for port in "${PORTS[@]}"; do
  for _ in $(seq 200); do "$QUOTAD" health --addr "127.0.0.1:$port" >/dev/null 2>&1 && break; sleep 0.05; done
done

# The shipped daemon starts afresh for each of its runs (an empty data
# directory): every run sees new users with full per-user buckets, and no
# snapshot of an ever larger state runs beside the other cases.
start_shipped() {
  rm -rf "$WORK/shipped"
  "$QUOTAD" serve --config "$WORK/shipped.toml" 2>>"$WORK/shipped.log" &
  QPID[shipped]=$!
  PIDS+=("$!")
  for _ in $(seq 200); do "$QUOTAD" health --addr 127.0.0.1:7980 >/dev/null 2>&1 && break; sleep 0.05; done
}
stop_shipped() {
  kill "${QPID[shipped]}"
  wait "${QPID[shipped]}" 2>/dev/null || true
}

field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }

# One case: prints "ops_per_sec cpu_us_per_op p99_ms".
run_redis() { # $1 = connections, $2 = tcp|unix, $3 = requests sent at once (1 by default)
  local where=(-p 6390) t0 t1 rps
  [ "$2" = unix ] && where=(-s "$WORK/redis.sock")
  t0=$(ticks "$REDIS_PID")
  rps=$(redis-benchmark "${where[@]}" -c "$1" -P "${3:-1}" -n "$REQUESTS" -r "$SUBJECTS" --csv \
    EVALSHA "$SHA" 1 "quota:__rand_int__" 1 1000000000 86400 | tail -1 | cut -d, -f2 | tr -d '"')
  # An AOF rewrite the run set off belongs to it: wait for it (at most 60 s)
  # so that its child is reaped and counted here, and does not run beside
  # the next case. Redis checks the AOF's growth ten times a second, so a
  # rewrite the last writes set off has started after 0.3 s.
  sleep 0.3
  local info
  for _ in $(seq 600); do
    info=$(redis-cli -p 6390 INFO persistence)
    grep -Eq '^aof_rewrite_(in_progress|scheduled):1' <<<"$info" || break
    sleep 0.1
  done
  t1=$(ticks "$REDIS_PID")
  awk -v r="$rps" -v t="$((t1 - t0))" -v hz="$TICK" -v n="$REQUESTS" 'BEGIN { printf "%s %.1f 0\n", r, t / hz * 1e6 / n }'
}
run_quotad() { # $1 = one|shipped, $2 = connections, $3 = tcp|unix, $4 = op, $5 = requests sent at once (1 by default)
  local port=7979 pid=${QPID[$1]} where t0 t1 json extra=()
  [ "$1" = shipped ] && port=7980
  [ "$1" = base ] && port=7981
  [ "$1" = pipe ] && port=7982
  where=(--addr "127.0.0.1:$port")
  [ "$3" = unix ] && where=(--socket "$WORK/$1.sock")
  # Priced chat calls on the shipped config. gpt-4o-mini at 3 tokens costs
  # under a micro-dollar a call: neither the global token bucket nor the
  # spend breaker (it opens at $1 on a fresh daemon with no baseline) trips.
  [ "$1" = shipped ] && extra=(--event llm.chat --attr model=gpt-4o-mini --tokens 3)
  t0=$(ticks "$pid")
  json=$("$QUOTAD" bench "${where[@]}" -c "$2" -n "$REQUESTS" --warmup 0 --subjects "$SUBJECTS" \
    --op "$4" -P "${5:-1}" "${extra[@]}" --json)
  t1=$(ticks "$pid")
  python3 - "$json" "$((t1 - t0))" "$TICK" <<'PY'
import json, sys
r = json.loads(sys.argv[1]); ticks, hz = int(sys.argv[2]), int(sys.argv[3])
ops = r["operations"]
if r["errors"]:
    sys.exit(f"{r['errors']} errors in the run: {r}")
if r["denied"]:
    print(f"warning: {r['denied']} of {ops} decisions denied ({r['target']})", file=sys.stderr)
print(f"{r['ops_per_sec']:.0f} {ticks / hz * 1e6 / ops:.1f} {r['p99_us'] / 1000:.3f}")
PY
}

RESULTS=$WORK/results.tsv
for round in $(seq "$ROUNDS"); do
  echo "round $round of $ROUNDS" >&2
  for c in 50 200; do
    for via in tcp unix; do
      echo "redis $c $via $(run_redis "$c" "$via")" >>"$RESULTS"
      echo "one $c $via $(run_quotad one "$c" "$via" consume)" >>"$RESULTS"
      start_shipped
      echo "shipped $c $via $(run_quotad shipped "$c" "$via" consume)" >>"$RESULTS"
      stop_shipped
      echo "noop $c $via $(run_quotad one "$c" "$via" noop)" >>"$RESULTS"
      if [ -n "${BASELINE:-}" ]; then
        echo "base $c $via $(run_quotad base "$c" "$via" consume)" >>"$RESULTS"
      fi
    done
  done
  if [ "$PIPELINE" -gt 0 ]; then
    for via in tcp unix; do
      echo "redis-p 50 $via $(run_redis 50 "$via" "$PIPELINE")" >>"$RESULTS"
      echo "one-p 50 $via $(run_quotad pipe 50 "$via" consume "$PIPELINE")" >>"$RESULTS"
    done
  fi
done

python3 - "$RESULTS" "$ROUNDS" "$PIPELINE" <<'PY'
import statistics, sys
from collections import defaultdict
rows = defaultdict(list)  # (server, conns, via) -> [(rps, cpu, p99)] in round order
for line in open(sys.argv[1]):
    s, c, via, rps, cpu, p99 = line.split()
    rows[(s, c, via)].append((float(rps), float(cpu), float(p99)))
med = lambda xs: statistics.median(xs)
print(f"median of {sys.argv[2]} interleaved rounds; cpu = server CPU µs per decision")
print(f"{'conns':<6}{'via':<5}{'redis/s':>9}{'cpu':>6}{'quotad/s':>10}{'cpu':>6}{'ratio':>7}{'cpu ratio':>10}{'p99 ms':>8}"
      f"{'shipped/s':>11}{'cpu':>6}{'p99 ms':>8}{'noop/s':>9}{'consume/noop':>14}")
for c in ("50", "200"):
    for via in ("tcp", "unix"):
        r, q, s, n = (rows[(k, c, via)] for k in ("redis", "one", "shipped", "noop"))
        ratio = med([qq[0] / rr[0] for qq, rr in zip(q, r)])
        cpu_ratio = med([qq[1] / rr[1] for qq, rr in zip(q, r)])
        noop_ratio = med([qq[0] / nn[0] for qq, nn in zip(q, n)])
        print(f"{c:<6}{via:<5}{med([x[0] for x in r]):>9.0f}{med([x[1] for x in r]):>6.1f}"
              f"{med([x[0] for x in q]):>10.0f}{med([x[1] for x in q]):>6.1f}{ratio:>7.2f}{cpu_ratio:>10.2f}"
              f"{med([x[2] for x in q]):>8.2f}{med([x[0] for x in s]):>11.0f}{med([x[1] for x in s]):>6.1f}"
              f"{med([x[2] for x in s]):>8.2f}{med([x[0] for x in n]):>9.0f}{noop_ratio:>14.2f}")
if rows[("base", "50", "tcp")]:
    print("baseline binary, one-limit config, same rounds:")
    print(f"{'conns':<6}{'via':<5}{'base/s':>9}{'cpu':>6}{'p99 ms':>8}{'quotad/base':>13}{'base/redis':>12}")
    for c in ("50", "200"):
        for via in ("tcp", "unix"):
            b, q, r = (rows[(k, c, via)] for k in ("base", "one", "redis"))
            print(f"{c:<6}{via:<5}{med([x[0] for x in b]):>9.0f}{med([x[1] for x in b]):>6.1f}"
                  f"{med([x[2] for x in b]):>8.2f}{med([qq[0] / bb[0] for qq, bb in zip(q, b)]):>13.2f}"
                  f"{med([bb[0] / rr[0] for bb, rr in zip(b, r)]):>12.2f}")
if rows[("one-p", "50", "tcp")]:
    print(f"pipelined: 50 connections, each sending {sys.argv[3]} requests at once, then reading their answers:")
    print(f"{'via':<5}{'redis/s':>9}{'cpu':>6}{'quotad/s':>10}{'cpu':>6}{'ratio':>7}{'cpu ratio':>10}{'p99 ms':>8}")
    for via in ("tcp", "unix"):
        r, q = rows[("redis-p", "50", via)], rows[("one-p", "50", via)]
        print(f"{via:<5}{med([x[0] for x in r]):>9.0f}{med([x[1] for x in r]):>6.1f}"
              f"{med([x[0] for x in q]):>10.0f}{med([x[1] for x in q]):>6.1f}"
              f"{med([qq[0] / rr[0] for qq, rr in zip(q, r)]):>7.2f}{med([qq[1] / rr[1] for qq, rr in zip(q, r)]):>10.2f}"
              f"{med([x[2] for x in q]):>8.2f}")
print("per round (quotad/s / redis/s):")
for c in ("50", "200"):
    for via in ("tcp", "unix"):
        pairs = zip(rows[("one", c, via)], rows[("redis", c, via)])
        print(f"  {c:<4}{via:<5}" + "  ".join(f"{q[0]:.0f}/{r[0]:.0f}" for q, r in pairs))
PY
echo "batch of 100 consumes per request (50 connections, tcp, REQUESTS/20 requests):"
"$QUOTAD" bench --addr 127.0.0.1:7979 -c 50 -n $((REQUESTS / 20)) --subjects "$SUBJECTS" --op batch --json |
  field decisions_per_sec | xargs printf '  %.0f durable decisions/s\n'
echo "versions: $(redis-server --version | cut -d' ' -f3), quotad $("$QUOTAD" --version | cut -d' ' -f2), $(nproc) cores"
