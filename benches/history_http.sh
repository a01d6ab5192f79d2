#!/usr/bin/env bash
# Usage history over HTTP: the release daemon, SUBJECTS subjects charged by
# `quotad bench` (2 consumes each), then timed: one subject's usage query,
# the month export as JSON pages of 1000 subjects, and as one CSV.
#
#   bash benches/history_http.sh              # 100000 subjects
#   SUBJECTS=20000 bash benches/history_http.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SUBJECTS=${SUBJECTS:-100000}
cargo build --release --locked -q
BIN=$PWD/target/release/quotad
WORK=$(mktemp -d)
PID=
cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
cat >"$WORK/q.toml" <<TOML
metrics = ["tokens"]
[server]
listen = ["127.0.0.1:7979"]
[storage]
data_dir = "$WORK/data"
durability = "batch"
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
"$BIN" serve --config "$WORK/q.toml" 2>"$WORK/q.log" &
PID=$!
for _ in $(seq 200); do "$BIN" health --addr 127.0.0.1:7979 >/dev/null 2>&1 && break; sleep 0.05; done
"$BIN" bench --addr 127.0.0.1:7979 -c 50 -n $((SUBJECTS * 2)) --warmup 0 --subjects "$SUBJECTS" --op consume \
  --event llm.chat --tokens 1000 --json >"$WORK/r.json"
# A restart: the final snapshot moves the buckets to disk, where queries read them.
kill -TERM "$PID"; wait "$PID" 2>/dev/null || true
"$BIN" serve --config "$WORK/q.toml" 2>>"$WORK/q.log" &
PID=$!
for _ in $(seq 200); do "$BIN" health --addr 127.0.0.1:7979 >/dev/null 2>&1 && break; sleep 0.05; done
today=$(date -u +%F)
month=$(date -u +%Y-%m-01)
next=$(date -u -d "$month +1 month" +%F)
base=http://127.0.0.1:7979

subject=$(python3 - "$base" "$month" "$next" <<'PY'
import json, sys, urllib.request
page = json.load(urllib.request.urlopen(f"{sys.argv[1]}/v1/usage?from={sys.argv[2]}&to={sys.argv[3]}&limit=1"))
print(page["rows"][0]["subject"])
PY
)
# curl's own time per request (connect to last byte), so process start-up is not counted.
total=0
for _ in $(seq 100); do
  t=$(curl -sf -o /dev/null -w '%{time_total}' "$base/v1/subjects/$subject/usage?from=$month&to=$next&granularity=day")
  total=$(python3 -c "print($total + $t)")
done
echo "one subject's month per day, over HTTP: $(python3 -c "print(f'{$total * 10:.2f}')") ms per query (mean of 100)"

total=0 pages=0 rows=0 after=""
while :; do
  t=$(curl -sf -o "$WORK/page.json" -w '%{time_total}' "$base/v1/usage?from=$month&to=$next&granularity=month&limit=1000$after")
  total=$(python3 -c "print($total + $t)")
  read -r n next_after < <(python3 -c "import json,sys; p=json.load(open(sys.argv[1])); print(len(p['rows']), p['next_after'] or '')" "$WORK/page.json")
  pages=$((pages + 1)); rows=$((rows + n))
  [ -z "$next_after" ] && break
  after="&after=$next_after"
done
echo "month export as JSON: $pages pages, $rows rows, $(python3 -c "print(f'{$total * 1000:.0f}')") ms in all the requests"

t=$(curl -sf -o "$WORK/all.csv" -w '%{time_total}' "$base/v1/usage?from=$month&to=$next&granularity=month&format=csv")
echo "month export as CSV: $(wc -l <"$WORK/all.csv") lines, $(python3 -c "print(f'{$t * 1000:.0f}')") ms"
echo "(buckets read from snapshot.redb after a restart; $(nproc) cores, quotad $("$BIN" --version | cut -d' ' -f2))"
