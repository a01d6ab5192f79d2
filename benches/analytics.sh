#!/usr/bin/env bash
# The server-side analytics at scale, against what the dashboard did before
# they existed, in the same run: the release daemon, SUBJECTS random subjects
# charged 3 calls each on average by `quotad bench` (1,000 tokens a call; a
# daily limit of 8,000 tokens with an alert at 80 %, so some counters are
# nearly full and events pile up), then timed with curl (connect to last
# byte, median of ROUNDS) and sized:
#   - GET /v1/usage/top?metric=tokens (today, 10 rows): the first call, which
#     scans the snapshot file, and the repeats, which reuse that ranking
#     until the next snapshot
#   - GET /v1/counters?min_fraction=0.8&limit=100
#   - GET /v1/events?order=desc&limit=50 (the newest events)
#   - baseline: the JSON usage export's first page of 1,000 subjects (what
#     the old dashboard read, and got wrong past 1,000 subjects), and every
#     page (what a correct answer built in the browser would need)
#   - baseline: events oldest first from seq 0, every page up to the newest
# once while the daemon runs (recent buckets in memory, older ones already
# on disk) and again after a restart (everything on disk), with the
# daemon's resident memory before the queries and its peak after them.
#
#   bash benches/analytics.sh                     # 100,000 then 1,000,000 subjects
#   SIZES=100000 ROUNDS=3 bash benches/analytics.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${SIZES:-"100000 1000000"}
ROUNDS=${ROUNDS:-5}
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
ADDR=127.0.0.1:7979
BASE=http://$ADDR

start() {
  "$BIN" serve --config "$WORK/q.toml" 2>>"$WORK/q.log" &
  PID=$!
  for _ in $(seq 1200); do "$BIN" health --addr $ADDR >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "the daemon did not start:" >&2
  cat "$WORK/q.log" >&2
  exit 1
}

stop() {
  kill -TERM "$PID"
  wait "$PID" 2>/dev/null || true
  PID=
}

kib() { # $1 = VmRSS or VmHWM
  awk -v k="$1:" '$1 == k {print $2}' "/proc/$PID/status"
}

measure() { # $1 = label
  local rss_before
  rss_before=$(kib VmRSS)
  python3 - "$BASE" "$ROUNDS" "$1" <<'PY'
import json, statistics, subprocess, sys, datetime
base, rounds, label = sys.argv[1], int(sys.argv[2]), sys.argv[3]
today = datetime.datetime.now(datetime.timezone.utc).date()
day = f"from={today}&to={today + datetime.timedelta(days=1)}"

def get(path):
    out = subprocess.run(
        ["curl", "-s", "-o", "/tmp/analytics-body", "-w", "%{http_code} %{time_total} %{size_download}", base + path],
        check=True, capture_output=True, text=True).stdout.split()
    assert out[0] == "200", (path, out, open("/tmp/analytics-body").read()[:300])
    return float(out[1]) * 1e3, int(out[2]), json.load(open("/tmp/analytics-body"))

def timed(path):
    runs = [get(path) for _ in range(rounds)]
    return statistics.median(r[0] for r in runs), runs[0][1], runs[0][2]

def every_page(first, cursor_field, next_param, stop):
    ms = size = pages = 0
    path = first
    while True:
        t, b, body = get(path)
        ms += t; size += b; pages += 1
        nxt = body.get(cursor_field)
        if stop(body, nxt):
            return ms, size, pages
        path = f"{first}&{next_param}={nxt}"

rows = []
# The first top list scans the file; repeats reuse its ranking until the
# next snapshot and read only what memory adds.
runs = [get(f"/v1/usage/top?metric=tokens&{day}&limit=10") for _ in range(rounds)]
top = runs[0][2]
rows.append(("GET /v1/usage/top, 10 rows, first", runs[0][0], runs[0][1], 1, f"top: {top['rows'][0]['subject']} {top['rows'][0]['amount']}"))
rows.append(("GET /v1/usage/top, 10 rows, repeated", statistics.median(r[0] for r in runs[1:]), runs[1][1], 1, f"median of {rounds - 1}"))
t, b, full = timed("/v1/counters?min_fraction=0.8&limit=100")
rows.append(("GET /v1/counters?min_fraction=0.8&limit=100", t, b, 1, f"fullest {full['counters'][0]['fraction']:.3f}"))
t, b, ev = timed("/v1/events?order=desc&limit=50")
newest = ev["events"][0]["seq"] if ev["events"] else 0
rows.append(("GET /v1/events?order=desc&limit=50", t, b, 1, f"newest seq {newest}"))
t, b, page = timed(f"/v1/usage?{day}&limit=1000")
rows.append(("baseline: GET /v1/usage, first page of 1,000", t, b, 1, "wrong past 1,000 subjects"))
ms, size, pages = every_page(f"/v1/usage?{day}&limit=1000", "next_after", "after", lambda body, n: n is None)
rows.append(("baseline: GET /v1/usage, every page", ms, size, pages, "what a correct top in the browser needs"))
ms, size, pages = every_page("/v1/events?limit=1000", "next_after", "after", lambda body, n: not body["events"])
rows.append(("baseline: GET /v1/events from 0, every page", ms, size, pages, "to find the newest oldest-first"))
print(f"{label}")
print(f"  {'request':<48} {'ms':>9} {'bytes':>12} {'requests':>8}")
for name, ms, size, n, note in rows:
    print(f"  {name:<48} {ms:>9.1f} {size:>12,} {n:>8}   {note}")
PY
  echo "  daemon resident memory: $((rss_before / 1024)) MiB before these queries, $(( $(kib VmRSS) / 1024 )) MiB after; peak since start $(( $(kib VmHWM) / 1024 )) MiB (loading or recovery included)"
}

for n in $SIZES; do
  rm -rf "$WORK/data" "$WORK/q.log"
  cat >"$WORK/q.toml" <<TOML
metrics = ["tokens"]
[server]
listen = ["$ADDR"]
max_connections = 1000
[storage]
data_dir = "$WORK/data"
durability = "batch"
[log]
level = "warn"
[[plans]]
name = "bench"
default = true
  [[plans.limits]]
  name = "tokens-per-day"
  metric = "tokens"
  period = "1d"
  max = 8000
  alerts = [0.8]
TOML
  start
  "$BIN" bench --addr $ADDR -c 50 -n $((n * 3)) --warmup 0 --subjects "$n" --op consume \
    --event llm.chat --tokens 1000 --json >"$WORK/r.json"
  subjects=$(curl -s $BASE/metrics | awk '$1 == "quotad_subjects" {print $2}')
  echo "== $n subjects drawn, $subjects with usage, $((n * 3)) consumes =="
  measure "while running (the newest buckets in memory, older ones on disk)"
  stop
  start
  measure "after a restart (everything read from disk)"
  stop
done
