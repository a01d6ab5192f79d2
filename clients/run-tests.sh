#!/usr/bin/env bash
# Runs the Python and TypeScript client test suites against a real quotad.
#
#   QUOTAD_BIN=/path/to/quotad bash clients/run-tests.sh
#
# QUOTAD_BIN defaults to target/debug/quotad in the repository (what `cargo
# build` / `cargo test` leave). Installs what it needs: a virtualenv in
# clients/python/.venv with the package and pytest, and `npm ci` in
# clients/typescript. Exits non-zero if anything fails or no test ran.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${QUOTAD_BIN:-$ROOT/target/debug/quotad}"
case "$BIN" in /*) ;; *) BIN="$PWD/$BIN" ;; esac
if [ ! -x "$BIN" ]; then
  echo "run-tests: quotad binary not found at $BIN; run 'cargo build' or set QUOTAD_BIN" >&2
  exit 1
fi
export QUOTAD_BIN="$BIN"
export CI="${CI:-}"
LOGS="$(mktemp -d)"
trap 'rm -rf "$LOGS"' EXIT
failed=0

echo "== quotad: $QUOTAD_BIN"

# ---------- Python ----------
echo "== python client (clients/python)"
VENV="$ROOT/clients/python/.venv"
PY=""
if [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" >/dev/null 2>&1; then
  PY="$VENV/bin/python"
else
  echo "run-tests: cannot create a virtualenv; installing into $(command -v python3)" >&2
  PY="$(command -v python3)"
fi
if ! "$PY" -m pip install --quiet --disable-pip-version-check -e "$ROOT/clients/python[test]"; then
  echo "run-tests: pip install of clients/python failed" >&2
  failed=1
else
  (cd "$ROOT/clients/python" && timeout 900 "$PY" -m pytest -p no:cacheprovider -q -rs) 2>&1 | tee "$LOGS/python.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 5 ]; then
    echo "run-tests: pytest ran no test" >&2
    failed=1
  elif [ "$rc" -ne 0 ]; then
    echo "run-tests: python tests failed (exit $rc)" >&2
    failed=1
  fi
fi

# ---------- TypeScript ----------
echo "== typescript client (clients/typescript)"
if (cd "$ROOT/clients/typescript" && npm ci --no-audit --no-fund --loglevel=error && npm run --silent build); then
  (cd "$ROOT/clients/typescript" && timeout 900 node --test test/*.test.mjs) 2>&1 | tee "$LOGS/ts.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "run-tests: typescript tests failed (exit $rc)" >&2
    failed=1
  fi
else
  echo "run-tests: npm ci / build of clients/typescript failed" >&2
  failed=1
fi

# ---------- summary ----------
count() { grep -Eo "$1" "$2" 2>/dev/null | grep -Eo '[0-9]+' | tail -1; }
py_line="$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|error)' "$LOGS/python.log" 2>/dev/null | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')"
py_pass=$(count '[0-9]+ passed' "$LOGS/python.log"); py_fail=$(count '[0-9]+ failed' "$LOGS/python.log")
py_skip=$(count '[0-9]+ skipped' "$LOGS/python.log"); py_err=$(count '[0-9]+ errors?' "$LOGS/python.log")
ts_pass=$(count '^# pass [0-9]+' "$LOGS/ts.log"); ts_fail=$(count '^# fail [0-9]+' "$LOGS/ts.log")
ts_skip=$(count '^# skipped [0-9]+' "$LOGS/ts.log")
echo "== summary"
echo "python:     ${py_line:-no result}"
echo "typescript: ${ts_pass:-0} passed, ${ts_fail:-0} failed, ${ts_skip:-0} skipped"
pass=$(( ${py_pass:-0} + ${ts_pass:-0} ))
fail=$(( ${py_fail:-0} + ${py_err:-0} + ${ts_fail:-0} ))
skip=$(( ${py_skip:-0} + ${ts_skip:-0} ))
if [ "$pass" -eq 0 ]; then
  echo "run-tests: no test passed" >&2
  failed=1
fi
if [ "$failed" -ne 0 ] && [ "$fail" -eq 0 ]; then fail=1; fi
echo "clients: $pass passed, $fail failed, $skip skipped"
exit "$failed"
