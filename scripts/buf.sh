#!/usr/bin/env bash
# Run the pinned buf CLI (installed from npm into tools/buf/node_modules) against protos/.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x tools/buf/node_modules/.bin/buf ]; then
  (cd tools/buf && npm install --no-audit --no-fund --silent)
fi
exec tools/buf/node_modules/.bin/buf "$@"
