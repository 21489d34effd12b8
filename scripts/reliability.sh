#!/usr/bin/env bash
# Run every fault with 10,000 messages (by default) and regenerate docs/RELIABILITY.md.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python -m tests.chaos.report "$@"
