#!/usr/bin/env bash
# Instructions the daemon executes per durable consume, counted by callgrind:
# unlike wall-clock figures on two shared cores, the count repeats to within
# a fraction of a per cent from run to run, so it shows changes of a few per
# cent that an A/B in req/s cannot. It counts user-space instructions of all
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
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: bash benches/instructions.sh BINARY [BINARY...]" >&2; exit 2; }
CONFIGS=${CONFIGS:-one-limit shipped}
N1=${N1:-2000}
N2=${N2:-12000}
command -v valgrind >/dev/null || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
}
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
    one-limit)
      cat <<TOML
[server]
listen = ["$ADDR"]
[storage]
data_dir = "$2"
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
      ;;
    shipped)
      sed -e "s|^listen = .*|listen = [\"$ADDR\"]|" -e "s|^data_dir = .*|data_dir = \"$2\"|" quotad.toml
      printf '\n[log]\nlevel = "warn"\n'
      ;;
    *) echo "unknown config $1 (one-limit or shipped)" >&2; exit 2 ;;
  esac
}

count() { # $1 binary, $2 config, $3 consumes: prints the instructions counted
  local run="$WORK/run" out
  rm -rf "$run"
  mkdir -p "$run"
  config "$2" "$run/data" >"$run/q.toml"
  valgrind --tool=callgrind --callgrind-out-file="$run/cg.out" "$1" serve --config "$run/q.toml" 2>"$run/vg.log" &
  PID=$!
  for _ in $(seq 600); do "$CLIENT" health --addr "$ADDR" >/dev/null 2>&1 && break; sleep 0.1; done
  local extra=()
  [ "$2" = shipped ] && extra=(--event llm.chat --attr model=gpt-4o-mini --tokens 3)
  "$CLIENT" bench --addr "$ADDR" -c 8 -n "$3" --warmup 0 --subjects 100000 --op consume "${extra[@]}" --json \
    >"$run/r.json"
  python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); sys.exit(1 if r["errors"] else 0)' "$run/r.json" ||
    { echo "calls failed: $(cat "$run/r.json")" >&2; exit 1; }
  callgrind_control -d "$PID" >/dev/null 2>&1
  sleep 0.5
  kill -INT "$PID"
  wait "$PID" 2>/dev/null || true
  PID=
  out=$(ls "$run"/cg.out.* | head -1)
  if [ -n "${KEEP:-}" ]; then
    mkdir -p "$KEEP"
    cp "$out" "$KEEP/callgrind.out.$(basename "$1").$2.$3"
  fi
  awk '/^(summary|totals):/ {print $2; exit}' "$out"
}

printf '%-12s %-40s %14s\n' config binary "instr/consume"
for cfg in $CONFIGS; do
  for bin in "$@"; do
    bin=$(realpath "$bin")
    a=$(count "$bin" "$cfg" "$N1")
    b=$(count "$bin" "$cfg" "$N2")
    printf '%-12s %-40s %14d\n' "$cfg" "$bin" $(((b - a) / (N2 - N1)))
  done
done
