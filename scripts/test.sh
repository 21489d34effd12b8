#!/usr/bin/env bash
# The README's test command: set everything up, then run every gate and the whole test suite.
# Integration tests start their own Kafka broker and Redis on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
PY=.venv/bin/python
echo "== generated stubs match protos/" >&2
$PY scripts/gen_protos.py --check
if command -v npx >/dev/null 2>&1 && [ "${SKIP_BUF:-0}" != 1 ]; then
  echo "== buf lint" >&2
  scripts/buf.sh lint
fi
echo "== ruff" >&2
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy --strict" >&2
.venv/bin/mypy
if command -v go >/dev/null 2>&1; then
  echo "== Go client: gofmt, go vet, go test -race" >&2
  (
    cd clients/go
    unformatted=$(gofmt -l .)
    if [ -n "$unformatted" ]; then echo "gofmt would change: $unformatted" >&2; exit 1; fi
    go vet ./...
    go test -race -count=1 ./...
  )
fi
if command -v node >/dev/null 2>&1; then
  echo "== Node.js client: node --test" >&2
  (cd clients/node && node --test test/)
fi
echo "== pytest" >&2
exec .venv/bin/pytest "$@"
