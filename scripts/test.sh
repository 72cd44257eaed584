#!/usr/bin/env bash
# The one command that sets up and runs the tests (and the quality gates CI enforces):
# ruff, mypy --strict and pytest (warnings are errors). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
. .venv/bin/activate
echo "== ruff check";          ruff check .
echo "== ruff format --check"; ruff format --check .
echo "== mypy --strict";       mypy
echo "== pytest";              python -m pytest "$@"
