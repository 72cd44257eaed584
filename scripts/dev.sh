#!/usr/bin/env bash
# The one command that sets up and runs the broker for development: `securebroker dev`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
exec .venv/bin/securebroker dev "$@"
