#!/usr/bin/env bash
# Instructions the daemon executes per durable consume, counted by callgrind:
# unlike wall-clock figures on two shared cores, the count repeats to within
# 1 % from run to run, so it shows changes of a few per cent that an A/B in
# req/s cannot. It counts user-space instructions of all
# the daemon's threads (the kernel's share, TCP and fdatasync, is not in it).
#
# Each binary serves twice under callgrind, for N1 and for N2 consumes from
# `quotad bench` (8 connections, random subjects of 100k); the counts are
# taken before shutdown (the final snapshot is left out) and the difference
# divided by N2 - N1, so start-up cancels out.
#
#   bash benches/instructions.sh BINARY [BINARY...]
#   CONFIGS="shipped" N2=22000 bash benches/instructions.sh /tmp/quotad-old target/release/quotad
#   KEEP=target/cg bash benches/instructions.sh target/release/quotad   # keeps callgrind.out files
#
# Environment: CONFIGS ("one-limit shipped"), N1 (2000), N2 (12000).
# On the shipped config every call is a priced chat (gpt-4o-mini, 3 tokens),
# as in benches/profile.sh. callgrind_annotate --inclusive=yes on a kept file
# shows where the instructions go.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: bash benches/instructions.sh BINARY [BINARY...]" >&2; exit 2; }
# Resolved where the caller stands, before the cd below.
BINS=()
for b in "$@"; do
  [ -x "$b" ] || { echo "not an executable: $b" >&2; exit 2; }
  BINS+=("$(realpath "$b")")
done
cd "$(dirname "$0")/.."
. benches/configs.sh
command -v python3 >/dev/null || { echo "python3 is needed (it reads the bench's JSON)" >&2; exit 2; }
CONFIGS=${CONFIGS:-one-limit shipped}
N1=${N1:-2000}
N2=${N2:-12000}
command -v valgrind >/dev/null || {
  echo "installing valgrind (Debian's package; needs root)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
}
# The load generator and health checks are this tree's (a binary passed in
# may be this very file: it is only rebuilt if the tree changed).
cargo build --release --locked -q
CLIENT=$PWD/target/release/quotad
WORK=$(mktemp -d)
PID=
cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
ADDR=127.0.0.1:7983

config() { # $1 = one-limit | shipped, $2 = data dir
  case "$1" in
    one-limit) one_limit_config "\"$ADDR\"" "$2" ;;
    shipped) shipped_config "\"$ADDR\"" "$2" ;;
    *) echo "unknown config $1 (one-limit or shipped)" >&2; exit 2 ;;
  esac
}

# $1 binary, $2 config, $3 consumes: sets COUNT to the instructions counted.
# Runs in this shell (not in $( )), so a failure's exit reaches the trap
# with PID set and the daemon is stopped.
count() {
  local run="$WORK/run" out
  rm -rf "$run"
  mkdir -p "$run"
  config "$2" "$run/data" >"$run/q.toml"
  valgrind --tool=callgrind --callgrind-out-file="$run/cg.out" "$1" serve --config "$run/q.toml" 2>"$run/vg.log" &
  PID=$!
  for _ in $(seq 600); do "$CLIENT" health --addr "$ADDR" >/dev/null 2>&1 && break; sleep 0.1; done
  local extra=(--op consume)
  [ "$2" = shipped ] && extra+=(--event llm.chat --attr model=gpt-4o-mini --tokens 3)
  "$CLIENT" bench --addr "$ADDR" -c 8 -n "$3" --warmup 0 --subjects 100000 "${extra[@]}" --json >"$run/r.json"
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); sys.exit(1 if r["errors"] else 0)' "$run/r.json" ||
    { echo "calls failed: $(cat "$run/r.json")" >&2; exit 1; }
  callgrind_control -d "$PID" >"$run/dump.log" 2>&1 ||
    { echo "callgrind_control could not dump the counts:" >&2; cat "$run/dump.log" "$run/vg.log" >&2; exit 1; }
  out=
  for _ in $(seq 100); do
    out=$(find "$run" -name 'cg.out.*' -size +0 | head -1)
    [ -n "$out" ] && break
    sleep 0.1
  done
  [ -n "$out" ] || { echo "no callgrind dump appeared:" >&2; cat "$run/vg.log" >&2; exit 1; }
  sleep 0.5 # the dump file is written whole before the next one starts
  kill -INT "$PID"
  wait "$PID" 2>/dev/null || true
  PID=
  if [ -n "${KEEP:-}" ]; then
    mkdir -p "$KEEP"
    cp "$out" "$KEEP/callgrind.out.$(basename "$1").$2.$3"
  fi
  COUNT=$(awk '/^(summary|totals):/ {print $2; exit}' "$out")
}

printf '%-12s %-40s %14s\n' config binary "instr/consume"
for cfg in $CONFIGS; do
  for bin in "${BINS[@]}"; do
    count "$bin" "$cfg" "$N1"
    a=$COUNT
    count "$bin" "$cfg" "$N2"
    b=$COUNT
    printf '%-12s %-40s %14d\n' "$cfg" "$bin" $(((b - a) / (N2 - N1)))
  done
done
