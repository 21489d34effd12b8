"""``python -m bench``: the full benchmark (bench/runner.py); scripts/bench.sh runs it."""

import sys

from bench.runner import main

sys.exit(main())
