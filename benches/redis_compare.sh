#!/usr/bin/env bash
# Side-by-side: Redis 7 with appendfsync always running a Lua fixed-window
# check-and-consume (EVALSHA) under redis-benchmark, against durable quotad
# (durability = "fsync", an equivalent one-limit plan) under `quotad bench`,
# with the same connections and 100k random subjects, at 50 and 200
# connections, over TCP and a Unix socket. Also consume vs the same server's
# no-op endpoint (GET /healthz): the HTTP ceiling.
#
#   bash benches/redis_compare.sh            # builds quotad --release if needed
#   REQUESTS=300000 bash benches/redis_compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REQUESTS=${REQUESTS:-200000}
SUBJECTS=100000

if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null
fi
cargo build --release --locked -q
QUOTAD=$PWD/target/release/quotad
WORK=$(mktemp -d)
cleanup() {
  [ -n "${REDIS_PID:-}" ] && kill "$REDIS_PID" 2>/dev/null || true
  [ -n "${QUOTAD_PID:-}" ] && kill "$QUOTAD_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# --- Redis: AOF fsynced on every write, no RDB snapshots.
redis-server --port 6390 --unixsocket "$WORK/redis.sock" --unixsocketperm 700 --dir "$WORK" \
  --appendonly yes --appendfsync always --save "" --daemonize no --logfile "$WORK/redis.log" &
REDIS_PID=$!
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

redis_rps() { # $1 = connections, $2 = tcp|unix
  local where=(-p 6390)
  [ "$2" = unix ] && where=(-s "$WORK/redis.sock")
  redis-benchmark "${where[@]}" -c "$1" -n "$REQUESTS" -r "$SUBJECTS" --csv \
    EVALSHA "$SHA" 1 "quota:__rand_int__" 1 1000000000 86400 | tail -1 | cut -d, -f2 | tr -d '"'
}

# --- quotad: one fixed daily limit per subject, fsync durability.
cat > "$WORK/quotad.toml" <<TOML
[server]
listen = ["127.0.0.1:7979", "unix:$WORK/quotad.sock"]
max_connections = 1000
[storage]
data_dir = "$WORK/data"
durability = "fsync"
[log]
level = "warn"
[[plans]]
name = "bench"
default = true
  [[plans.limits]]
  name = "requests-per-day"
  period = "1d"
  max = 1000000000
TOML
"$QUOTAD" serve --config "$WORK/quotad.toml" 2>"$WORK/quotad.log" &
QUOTAD_PID=$!
for _ in $(seq 200); do "$QUOTAD" health --addr 127.0.0.1:7979 >/dev/null 2>&1 && break; sleep 0.05; done

quotad_json() { # $1 = connections, $2 = tcp|unix, $3 = op, $4 = requests
  local where=(--addr 127.0.0.1:7979)
  [ "$2" = unix ] && where=(--socket "$WORK/quotad.sock")
  "$QUOTAD" bench "${where[@]}" -c "$1" -n "${4:-$REQUESTS}" --subjects "$SUBJECTS" --op "$3" --json
}
field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }

printf '%-6s %-5s %12s %12s %7s %12s %12s %10s\n' conns via redis_rps quotad_rps ratio noop_rps consume/noop p99_ms
for c in 50 200; do
  for via in tcp unix; do
    r=$(redis_rps "$c" "$via")
    q=$(quotad_json "$c" "$via" consume)
    n=$(quotad_json "$c" "$via" noop)
    qr=$(echo "$q" | field ops_per_sec); p99=$(echo "$q" | field p99_us); nr=$(echo "$n" | field ops_per_sec)
    python3 - "$c" "$via" "$r" "$qr" "$nr" "$p99" <<'PY'
import sys
c, via, r, q, n, p99 = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
print(f"{c:<6} {via:<5} {r:12.0f} {q:12.0f} {q/r:7.2f} {n:12.0f} {q/n:12.2f} {p99/1000:10.3f}")
PY
  done
done
echo "batch of 100 consumes per request (50 connections, tcp, REQUESTS/20 requests):"
quotad_json 50 tcp batch $((REQUESTS / 20)) | field decisions_per_sec | xargs printf '  %.0f durable decisions/s\n'
echo "versions: $(redis-server --version | cut -d' ' -f3), quotad $("$QUOTAD" --version | cut -d' ' -f2), $(nproc) cores"
