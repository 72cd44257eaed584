#!/usr/bin/env bash
# The one command that sets up and runs the tests (and the quality gates CI enforces).
# Creates .venv with Python 3.11 if needed, installs the project with its test extras,
# then runs ruff, mypy --strict and pytest (warnings are errors). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# Reinstall when the project metadata changed since the last install.
stamp=.venv/.securebroker-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[test]'
  touch "$stamp"
fi
. .venv/bin/activate
echo "== ruff check";          ruff check .
echo "== ruff format --check"; ruff format --check .
echo "== mypy --strict";       mypy
echo "== pytest";              python -m pytest "$@"
