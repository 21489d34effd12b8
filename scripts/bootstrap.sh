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
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ clients/python/pyproject.toml -nt "$stamp" ] \
  || [ deploy/requirements.lock -nt "$stamp" ]; then
  echo "bootstrap: installing Python packages" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  # The runtime dependencies exactly as locked, each file checked against its hash; then the
  # sidecar itself (compiling its modules in place: setup.py), the client and the dev tools
  # (which leave the locked packages as they are).
  .venv/bin/python -m pip install -q --require-hashes -r deploy/requirements.lock
  .venv/bin/python -m pip install -q -e ".[dev,uvloop]" -e clients/python
  touch "$stamp"
elif [ -n "$(find setup.py sidecar -newer "$stamp" \( -name '*.py' -o -name '*.c' \) -print -quit)" ]; then
  # Compiled modules are imported ahead of their sources: rebuild them after a change.
  echo "bootstrap: sources changed: rebuilding the compiled modules (setup.py)" >&2
  .venv/bin/python setup.py -q build_ext --inplace
  # mypyc leaves a module's file alone when its code did not change: mark every one as built
  # from the sources as they are now (tests/conftest.py compares the times).
  find sidecar -name '*.so' -exec touch {} +
  touch "$stamp"
fi
echo "bootstrap: fetching the Kafka broker and redis-server (cached after the first run)" >&2
.venv/bin/python deploy/local/services install
if command -v go >/dev/null 2>&1; then
  echo "bootstrap: Go client: protoc plugins and modules (cached after the first run)" >&2
  for tool in $(.venv/bin/python -c 'import sys; sys.path.insert(0, "scripts"); import gen_protos; print(*gen_protos.GO_PLUGINS.values())'); do
    name=${tool%@*}; name=${name##*/}
    if [ "$(cat ".tools/$name.version" 2>/dev/null)" != "$tool" ]; then  # pinned: reinstall on a change
      GOBIN="$PWD/.tools/bin" go install "$tool"
      echo "$tool" > ".tools/$name.version"
    fi
  done
  (cd clients/go && go mod download)
  # kustomize renders deploy/kubernetes in tests/unit/test_deploy_files.py (pinned).
  kustomize=sigs.k8s.io/kustomize/kustomize/v5@v5.8.0
  if [ "$(cat .tools/kustomize.version 2>/dev/null)" != "$kustomize" ]; then
    echo "bootstrap: kustomize (first run only)" >&2
    GOBIN="$PWD/.tools/bin" go install "$kustomize"
    echo "$kustomize" > .tools/kustomize.version
  fi
else
  echo "bootstrap: Go not found: the Go client's tests and stub check are skipped" >&2
fi
if command -v npm >/dev/null 2>&1; then
  if [ ! -d clients/node/node_modules ] || [ clients/node/package.json -nt clients/node/node_modules ]; then
    echo "bootstrap: Node.js client packages" >&2
    (cd clients/node && npm install --no-audit --no-fund --silent && touch node_modules)
  fi
else
  echo "bootstrap: npm not found: the Node.js client's tests are skipped" >&2
fi
