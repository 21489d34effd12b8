#!/usr/bin/env bash
# Set up everything on a fresh machine: the virtual environment with the sidecar, its Python
# client and the dev tools; the Kafka broker jars (Maven); redis-server (Debian's package).
# Idempotent and cached: a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "bootstrap: Python 3.11 or newer is required (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv" >&2
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ clients/python/pyproject.toml -nt "$stamp" ]; then
  echo "bootstrap: installing Python packages" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[dev,uvloop]" -e clients/python
  touch "$stamp"
fi
echo "bootstrap: fetching the Kafka broker and redis-server (cached after the first run)" >&2
.venv/bin/python deploy/local/services.py install
