# Sourced by scripts/dev.sh and scripts/test.sh: create .venv with Python 3.11 if needed and
# (re)install the project with its test extras when pyproject.toml changed since the last install.
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.securebroker-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[test]'
  touch "$stamp"
fi
# SoftHSM2 for the PKCS#11 keyring tests (tests/integration/test_keyring_contract.py): install
# it when missing and we can (root on Debian/Ubuntu); refresh the package lists only if needed.
if ! command -v softhsm2-util >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && [ -f /etc/debian_version ]; then
  apt_softhsm() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends softhsm2 >/dev/null; }
  apt_softhsm 2>/dev/null \
    || { DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && apt_softhsm; } \
    || echo "warning: could not install softhsm2; the PKCS#11 keyring tests will fail" >&2
  unset -f apt_softhsm
fi
# The benchmark's Node drivers (bench/peers: securebroker.mjs is tested against a real broker in
# tests/integration/test_bench_node_driver.py): pinned npm packages, installed when missing.
if command -v npm >/dev/null 2>&1 && [ ! -d bench/peers/node_modules/msgpackr ]; then
  (cd bench/peers && npm ci --silent --no-audit --no-fund >/dev/null 2>&1) \
    || echo "warning: npm ci in bench/peers failed; the Node driver tests will be skipped" >&2
fi
