#!/usr/bin/env bash
# Checks the Prometheus alert rules shipped in packaging/: syntax and PromQL
# (`promtool check rules`) and their behaviour on sample series (`promtool
# test rules`), and the PromQL of every panel of packaging/grafana-dashboard.json. promtool comes from Debian's prometheus package, installed
# here when missing. Run from anywhere: bash .ci/promtool.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null 2>&1; then
  apt-get update -qq || true
  # Not `grep -q`: under pipefail its early exit makes apt-cache die of
  # SIGPIPE, and the pipeline fails even when the package is there.
  has_candidate() { apt-cache policy prometheus 2>/dev/null | grep 'Candidate: [0-9]' >/dev/null; }
  if ! has_candidate; then
    # A mirror hiccup leaves the lists incomplete: one more try before giving up.
    sleep 5
    apt-get update -qq || true
  fi
  if ! has_candidate; then
    echo "promtool.sh: this system's package lists have no prometheus package, so promtool cannot be installed; the rules were not checked" >&2
    exit 1
  fi
  # --no-install-recommends: promtool only, not the node exporter and friends.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  if ! command -v promtool >/dev/null 2>&1; then
    echo "promtool.sh: Debian's prometheus package was installed but provides no promtool; the rules were not checked" >&2
    exit 1
  fi
fi

promtool --version 2>&1 | head -n 1
promtool check rules packaging/prometheus-rules.yml
# Paths in the test file are relative to it.
(cd packaging && promtool test rules prometheus-rules.test.yml)

# The dashboard's queries, with Grafana's variables filled in, as recording
# rules: promtool then parses each one as Prometheus would.
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 - packaging/grafana-dashboard.json >"$tmp/dashboard-rules.yml" <<'PY'
import json, sys
dash = json.load(open(sys.argv[1]))
print("groups:\n  - name: grafana-dashboard\n    rules:")
n = 0
for panel in dash["panels"]:
    for t in panel.get("targets", []):
        expr = (t["expr"].replace("$__rate_interval", "5m")
                .replace("$job", "quotad").replace("$instance", ".*"))
        n += 1
        print(f"      - record: dashboard:panel_{panel['id']}_{t['refId']}")
        print(f"        expr: {json.dumps(expr)}")
if n == 0:
    sys.exit("no queries found in the dashboard")
PY
echo "dashboard queries:"
promtool check rules "$tmp/dashboard-rules.yml"
