#!/usr/bin/env bash
# Peak memory of the CSV billing export: the release daemon, SUBJECTS
# subjects' usage for this month (requests and tokens: two CSV lines a
# subject), restarted so the buckets are on disk, then one month export as
# CSV while the daemon's peak RSS is tracked (VmHWM, reset just before the
# export through /proc/PID/clear_refs). With BASE_REV, the same run on an
# older commit's binary first, side by side.
#
#   bash benches/export_rss.sh                     # ~1,000,000 lines
#   BASE_REV=1e4f71f bash benches/export_rss.sh    # and the commit before streaming
#   SUBJECTS=100000 bash benches/export_rss.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SUBJECTS=${SUBJECTS:-600000}
BASE_REV=${BASE_REV:-}
cargo build --release --locked -q
NEW=$PWD/target/release/quotad
BINS=("$NEW")
if [ -n "$BASE_REV" ]; then
  tree=$PWD/target/base-src
  [ -d "$tree" ] || git worktree add -q --detach "$tree" "$BASE_REV"
  git -C "$tree" checkout -q --detach "$BASE_REV"
  (cd "$tree" && CARGO_TARGET_DIR="$PWD/../base-target" cargo build --release --locked -q)
  BINS=("$PWD/target/base-target/release/quotad" "$NEW")
fi
WORK=$(mktemp -d)
PID=
cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
kib() { awk -v k="$1" '$1 == k":" {print $2}' "/proc/$PID/status"; }
start() {
  "$1" serve --config "$WORK/q.toml" 2>>"$WORK/q.log" &
  PID=$!
  for _ in $(seq 600); do "$1" health --addr 127.0.0.1:7979 >/dev/null 2>&1 && return; sleep 0.05; done
  echo "daemon did not start" >&2; cat "$WORK/q.log" >&2; exit 1
}
month=$(date -u +%Y-%m-01)
next=$(date -u -d "$month +1 month" +%F)
for bin in "${BINS[@]}"; do
  rm -rf "$WORK/data"
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
  start "$bin"
  # Random picks: 2.5 calls a subject reach ~92% of them.
  "$bin" bench --addr 127.0.0.1:7979 -c 50 -n $((SUBJECTS * 5 / 2)) --warmup 0 --subjects "$SUBJECTS" \
    --op consume --event llm.chat --tokens 1000 --json >"$WORK/r.json"
  kill -TERM "$PID"; wait "$PID" 2>/dev/null || true
  start "$bin"
  sleep 1
  before=$(kib VmRSS)
  echo 5 >"/proc/$PID/clear_refs"
  t=$(curl -sf -o "$WORK/all.csv" -w '%{time_total}' \
    "http://127.0.0.1:7979/v1/usage?from=$month&to=$next&granularity=month&format=csv")
  peak=$(kib VmHWM)
  lines=$(wc -l <"$WORK/all.csv")
  rev="base $BASE_REV"
  [ "$bin" = "$NEW" ] && rev="this tree ($(git rev-parse --short HEAD))"
  echo "$rev: CSV month export, $lines lines, $(python3 -c "print(f'{$t:.2f}')") s; RSS before $((before / 1024)) MiB, peak during $((peak / 1024)) MiB: +$(((peak - before) / 1024)) MiB"
  kill -TERM "$PID"; wait "$PID" 2>/dev/null || true
  PID=
done
echo "($(nproc) cores; peak RSS from VmHWM, reset before the export)"
