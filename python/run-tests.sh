#!/usr/bin/env bash
# Builds the Python package the way a user installs it (pip, through maturin) into a virtual
# environment under target/, then runs its tests (python/tests) with pytest. Called by .ci/run.
#
#   bash python/run-tests.sh [PYTEST ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/python-venv
python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  echo "python: creating $venv with $($python --version 2>&1)"
  "$python" -m venv "$venv" || {
    echo "python: '$python -m venv' failed: install python3-venv (bash .ci/install-deps.sh)" >&2
    exit 1
  }
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
echo "python: pip install ./python[test] (maturin builds the Rust extension in release, ~2 min the first time)"
"$venv/bin/pip" install -q "./python[test]"
echo "python: pytest python/tests"
hang_log=$(mktemp)
trap 'rm -f "$hang_log"' EXIT
status=0
# From the repository's root, not python/: `python -m` puts the working directory first on the
# path, and python/hetsync there (the source, without the built extension) would shadow the
# installed package.
HETSYNC_HANG_LOG="$hang_log" "$venv/bin/python" -m pytest -v -p no:cacheprovider "$@" python/tests || status=$?
if grep -q "most recent call first" "$hang_log"; then
  echo "python: a test hung and the watchdog ended pytest:" >&2
  cat "$hang_log" >&2
fi
exit "$status"
