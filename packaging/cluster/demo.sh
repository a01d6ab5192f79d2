#!/usr/bin/env bash
# Three quotad nodes on this machine, as one cluster (docs/cluster.md):
#
#   bash packaging/cluster/demo.sh
#
# Builds the release binary, makes ./cluster-data (the shared secret and one
# data directory per node), starts the nodes from packaging/cluster/node*.toml
# (APIs on 127.0.0.1:7881-7883, peer traffic on 7901-7903), waits for a leader
# and prints what to try. Ctrl-C stops all three; run it again and they come
# back with their state. `rm -rf cluster-data` starts afresh.
set -euo pipefail
cd "$(dirname "$0")/../.."

cargo build --release --locked --quiet
bin=target/release/quotad
mkdir -p cluster-data
chmod 700 cluster-data
if [ ! -s cluster-data/secret ]; then
    (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > cluster-data/secret)
fi

pids=()
stop() {
    trap - INT TERM EXIT
    echo
    echo "stopping the three nodes"
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
}
trap stop INT TERM EXIT

for i in 1 2 3; do
    "$bin" serve --config "packaging/cluster/node$i.toml" > "cluster-data/node$i.log" 2>&1 &
    pids+=($!)
done

admin() { curl -fsS "http://127.0.0.1:$1/v1/cluster" 2>/dev/null; }
leader=""
for _ in $(seq 1 100); do
    for port in 7881 7882 7883; do
        if admin "$port" | grep -q '"serving":true'; then
            leader=$port
        fi
    done
    [ -n "$leader" ] && break
    for i in 0 1 2; do
        if ! kill -0 "${pids[i]}" 2>/dev/null; then
            echo "node $((i + 1)) stopped; the end of its log (cluster-data/node$((i + 1)).log):" >&2
            tail -5 "cluster-data/node$((i + 1)).log" >&2
            exit 1
        fi
    done
    sleep 0.2
done
if [ -z "$leader" ]; then
    echo "no leader after 20 s; the logs are in cluster-data/node*.log" >&2
    exit 1
fi

node=$((leader - 7880))
cat <<EOF
Three nodes are running; node $node leads (API 127.0.0.1:$leader, pid ${pids[node - 1]}).
Any node takes any request (Quotad-Node says which node decided):

  curl -si -X POST 127.0.0.1:7882/v1/consume -d '{"subject":"user:42","idempotency_key":"call-1"}'
  curl -s 127.0.0.1:7881/v1/cluster

Stop the leader (kill -9 ${pids[node - 1]}) and ask another node again: a new
leader takes over within a few seconds and nothing acknowledged is lost.
Logs: cluster-data/node*.log. Ctrl-C stops all three.
EOF
wait
