#!/usr/bin/env bash
# A single node against a three-node cluster on this machine, side by side in
# one run: durable consume throughput and latency under `quotad bench` (50
# keep-alive connections over TCP, 100k random subjects, the one-limit plan
# of redis_compare.sh), for
#   single     one node, durability "fsync";
#   leader     the cluster, load sent to the leader;
#   follower   the cluster, load sent to a follower (each request forwarded).
# Interleaved round by round, each on fresh data directories; the median of
# the rounds is printed. The three nodes and the load generator share this
# machine's cores, so the cluster figures are a floor, not what three hosts do.
#
#   bash benches/cluster.sh
#   ROUNDS=5 REQUESTS=50000 bash benches/cluster.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REQUESTS=${REQUESTS:-30000}
ROUNDS=${ROUNDS:-3}
SUBJECTS=100000

cargo build --release --locked -q
BIN=$PWD/target/release/quotad
WORK=$(mktemp -d)
PIDS=()
stop_all() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
}
trap 'stop_all; rm -rf "$WORK"' EXIT
echo "bench-cluster-secret-0123456789" >"$WORK/secret"

plan() {
  cat <<'TOML'
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
}

node_config() { # $1 = node id (1-3), or 0 for the single node
  local i=$1
  local api=$((7970 + i))
  cat <<TOML
[server]
listen = ["127.0.0.1:$api"]
max_connections = 1000
[storage]
data_dir = "$WORK/data$i"
durability = "fsync"
TOML
  if [ "$i" != 0 ]; then
    cat <<TOML
[policy]
source = "api"
[cluster]
node_id = $i
raft_listen = "127.0.0.1:$((7990 + i))"
secret_file = "$WORK/secret"
peers = [
  { id = 1, raft = "127.0.0.1:7991", api = "http://127.0.0.1:7971" },
  { id = 2, raft = "127.0.0.1:7992", api = "http://127.0.0.1:7972" },
  { id = 3, raft = "127.0.0.1:7993", api = "http://127.0.0.1:7973" },
]
TOML
  fi
  plan
}

start() { # $@ = node ids
  for i in "$@"; do
    rm -rf "$WORK/data$i"
    node_config "$i" >"$WORK/n$i.toml"
    "$BIN" serve --config "$WORK/n$i.toml" 2>"$WORK/n$i.log" &
    PIDS+=($!)
  done
}

# The cluster's leader port, once every node names the same leader and it
# still does a second later: a node that starts after the first election
# may call another (openraft orders candidates of one term by node id), and
# a leader change during a run would count as errors.
cluster_leader() { # $@ = node ids
  local prev=""
  for _ in $(seq 60); do
    local port
    port=$(serving_port "$@")
    local all_agree=yes
    for i in "$@"; do
      curl -fsS "127.0.0.1:$((7970 + i))/v1/cluster" 2>/dev/null | grep -q "\"api\":\"http://127.0.0.1:$port\"}" || all_agree=no
    done
    if [ "$all_agree" = yes ] && [ "$port" = "$prev" ]; then
      echo "$port"
      return
    fi
    prev=$port
    [ "$all_agree" = yes ] || prev=""
    sleep 1
  done
  echo "no stable leader; logs:" >&2
  tail -5 "$WORK"/n*.log >&2
  exit 1
}

# The port of the node that serves writes (waits for it).
serving_port() { # $@ = node ids
  for _ in $(seq 400); do
    for i in "$@"; do
      local port=$((7970 + i))
      if [ "$i" = 0 ]; then
        "$BIN" health --addr "127.0.0.1:$port" >/dev/null 2>&1 && { echo "$port"; return; }
      elif curl -fsS "127.0.0.1:$port/v1/cluster" 2>/dev/null | grep -q '"serving":true'; then
        echo "$port"
        return
      fi
    done
    sleep 0.05
  done
  echo "no node serves; logs:" >&2
  tail -5 "$WORK"/n*.log >&2
  exit 1
}

bench() { # $1 = port → "ops/s p50-ms p99-ms"
  "$BIN" bench --addr "127.0.0.1:$1" -c 50 -n "$REQUESTS" --warmup 1 --subjects "$SUBJECTS" --op consume \
    --json >"$WORK/r.json"
  python3 - "$WORK/r.json" <<'PY' || { tail -n 20 "$WORK"/n*.log >&2; exit 1; }
import json, sys
r = json.load(open(sys.argv[1]))
assert r["errors"] == 0, r
print(f'{r["ops_per_sec"]:.0f}/{r["p50_us"] / 1000:.2f}/{r["p99_us"] / 1000:.2f}')
PY
}

declare -A results=()
for round in $(seq "$ROUNDS"); do
  start 0
  results[single]+="$(bench "$(serving_port 0)") "
  stop_all
  for target in leader follower; do
    start 1 2 3
    leader=$(cluster_leader 1 2 3)
    port=$leader
    if [ "$target" = follower ]; then
      port=$((leader == 7971 ? 7972 : 7971))
    fi
    results[$target]+="$(bench "$port") "
    stop_all
  done
done

echo "$ROUNDS rounds of $REQUESTS durable consumes, 50 connections, TCP, 100k subjects"
echo "  target     ops/s median [rounds]          p50 ms median   p99 ms median"
for t in single leader follower; do
  python3 - "$t" ${results[$t]} <<'PY'
import statistics, sys
name, runs = sys.argv[1], [v.split("/") for v in sys.argv[2:]]
ops, p50, p99 = ([float(r[i]) for r in runs] for i in range(3))
print(f"  {name:<9} {statistics.median(ops):>7.0f} [{' '.join(f'{v:.0f}' for v in ops)}]"
      f"   {statistics.median(p50):>8.2f}   {statistics.median(p99):>8.2f}")
PY
done
