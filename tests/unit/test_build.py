"""The compiled modules (setup.py): built where a C compiler is, and the same code as the source.

Python imports a mypyc-compiled module ahead of its source, so every other test here runs the
compiled record path. This file runs the record path's own tests once more on the source,
interpreted, which is what an install without a C compiler gets.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.process import build
from tests.conftest import ROOT

RECORD_PATH_TESTS = ["tests/unit/test_engine.py", "tests/unit/test_ordering.py", "tests/unit/test_tracker.py"]


def test_the_record_path_is_compiled_where_a_compiler_was() -> None:
    if os.environ.get("SIDECAR_NO_EXTENSIONS", "") not in ("", "0"):
        pytest.skip("SIDECAR_NO_EXTENSIONS is set")
    assert build.engine_compiled(), "setup.py did not compile the engine: see the install's output"
    assert build.describe() == "frame encoder c, engine compiled"


def test_the_record_path_tests_pass_on_the_interpreted_source(tmp_path: Path) -> None:
    # A copy of the package without its compiled modules, first on sys.path (python -m puts the
    # working directory there).
    shutil.copytree(
        ROOT / "sidecar", tmp_path / "sidecar", ignore=shutil.ignore_patterns("*.so", "__pycache__")
    )
    code = "from sidecar.process import build; print(build.describe())"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().endswith("engine interpreted")
    tests = [str(ROOT / t) for t in RECORD_PATH_TESTS]
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-W",
            "error",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(ROOT),
            *tests,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout
