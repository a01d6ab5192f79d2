#!/usr/bin/env bash
# Proves both clients can be published (nothing is published from here):
#   Python: `python -m build` makes a wheel and an sdist; each installs into a
#           clean virtualenv, and the client tests pass against the installed
#           wheel (run from a copy of the tests, away from src/).
#   TypeScript: `npm pack` makes a tarball; it installs into an empty project,
#           and the client tests pass against the installed package.
# Versions and licences must agree between the two packages and Cargo.toml.
#
#   QUOTAD_BIN=target/debug/quotad bash .ci/publishable.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
BIN="${QUOTAD_BIN:-$ROOT/target/debug/quotad}"
case "$BIN" in /*) ;; *) BIN="$ROOT/$BIN" ;; esac
export QUOTAD_BIN="$BIN"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# ---------- versions and licences ----------
cargo_version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
py_version=$(sed -n 's/^version = "\(.*\)"/\1/p' clients/python/pyproject.toml | head -1)
ts_version=$(node -p 'require("./clients/typescript/package.json").version')
ts_license=$(node -p 'require("./clients/typescript/package.json").license')
if [ "$cargo_version" != "$py_version" ] || [ "$cargo_version" != "$ts_version" ]; then
  echo "publishable: versions differ: Cargo.toml $cargo_version, python $py_version, typescript $ts_version" >&2
  exit 1
fi
if ! grep -q 'license = "Apache-2.0"' Cargo.toml || ! grep -q '^license = "Apache-2.0"' clients/python/pyproject.toml \
  || [ "$ts_license" != "Apache-2.0" ] || ! grep -q "Apache License" LICENSE \
  || ! cmp -s LICENSE clients/python/LICENSE || ! cmp -s LICENSE clients/typescript/LICENSE; then
  echo "publishable: the licence is not Apache-2.0 everywhere (Cargo.toml, LICENSE, both clients)" >&2
  exit 1
fi
echo "== versions $cargo_version, licence Apache-2.0 everywhere"

# Pipelines below end in `grep >/dev/null`, not `grep -q`: under pipefail an
# early exit of grep -q kills the writer with SIGPIPE and fails the check.

# ---------- Python ----------
echo "== python: build a wheel and an sdist"
python3 -m venv "$WORK/build-venv"
"$WORK/build-venv/bin/pip" install --quiet --disable-pip-version-check build
# Built from a copy: the build leaves egg-info and build/ behind.
cp -r clients/python "$WORK/py-src"
rm -rf "$WORK/py-src/.venv"
"$WORK/build-venv/bin/python" -m build --outdir "$WORK/dist" "$WORK/py-src" >/dev/null
wheel=$(ls "$WORK"/dist/quotad-*.whl)
sdist=$(ls "$WORK"/dist/quotad-*.tar.gz)
echo "   $(basename "$wheel") $(basename "$sdist")"
python3 -m zipfile -l "$wheel" | grep "quotad/py.typed" >/dev/null || { echo "publishable: the wheel has no py.typed" >&2; exit 1; }
python3 -m zipfile -l "$wheel" | grep "licenses/LICENSE" >/dev/null || { echo "publishable: the wheel has no LICENSE" >&2; exit 1; }

echo "== python: the sdist installs into a clean virtualenv"
python3 -m venv "$WORK/sdist-venv"
"$WORK/sdist-venv/bin/pip" install --quiet --disable-pip-version-check "$sdist"
"$WORK/sdist-venv/bin/python" -c 'import quotad; print("   quotad", quotad.__version__ if hasattr(quotad, "__version__") else "imported")'

echo "== python: the client tests against the installed wheel"
python3 -m venv "$WORK/wheel-venv"
"$WORK/wheel-venv/bin/pip" install --quiet --disable-pip-version-check "$wheel" "pytest>=7"
mkdir -p "$WORK/py-tests"
cp -r clients/python/tests "$WORK/py-tests/tests"
(cd "$WORK/py-tests" && "$WORK/wheel-venv/bin/python" - <<'PY'
import pathlib, quotad
path = pathlib.Path(quotad.__file__).resolve()
assert "site-packages" in str(path), f"quotad was imported from {path}, not the installed wheel"
PY
)
(cd "$WORK/py-tests" && timeout 900 "$WORK/wheel-venv/bin/python" -m pytest -p no:cacheprovider -q tests | tail -n 1)

# ---------- TypeScript ----------
echo "== typescript: npm pack"
(cd clients/typescript && npm ci --no-audit --no-fund --loglevel=error >/dev/null && npm pack --silent --pack-destination "$WORK" >/dev/null)
tarball=$(ls "$WORK"/quotad-*.tgz)
echo "   $(basename "$tarball")"
tar -tzf "$tarball" | grep "package/dist/index.d.ts" >/dev/null || { echo "publishable: the tarball has no type declarations" >&2; exit 1; }
tar -tzf "$tarball" | grep "package/LICENSE" >/dev/null || { echo "publishable: the tarball has no LICENSE" >&2; exit 1; }

echo "== typescript: the tarball installs, and the client tests pass against it"
mkdir -p "$WORK/ts-app"
(cd "$WORK/ts-app" && npm init -y >/dev/null && npm install --no-audit --no-fund --loglevel=error "$tarball" >/dev/null)
cp -r clients/typescript/test "$WORK/ts-app/test"
# The tests import the built tree (../dist/index.js); point them at the package.
sed -i 's#"\.\./dist/index\.js"#"quotad"#' "$WORK"/ts-app/test/*.mjs
if grep -q '\.\./dist' "$WORK"/ts-app/test/*.mjs; then
  echo "publishable: a test still imports the built tree" >&2
  exit 1
fi
if ! (cd "$WORK/ts-app" && timeout 900 node --test test/*.test.mjs >"$WORK/ts.log" 2>&1); then
  tail -n 40 "$WORK/ts.log" >&2
  echo "publishable: typescript tests failed against the package" >&2
  exit 1
fi
grep -E '^# (pass|fail)' "$WORK/ts.log"
echo "== both clients are publishable"
