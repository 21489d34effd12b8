"""What pyproject.toml cannot say: the sidecar's compiled modules. Everything else is there.

Two kinds, both optional (an install without a C compiler gets the same code, interpreted):

- ``sidecar.api._cframes``: the Subscribe frame encoder, hand-written C (sidecar/api/_cframes.c);
  sidecar/api/frames.py keeps the Python encoder it must match byte for byte.
- the record path compiled with mypyc from its own strictly typed sources: the engine
  (sidecar/engine/) and the ack tracker. The compiled modules sit beside their sources and are
  imported instead of them, so the build is rerun after changing one (scripts/bootstrap.sh
  does that, and tests/conftest.py refuses to run against a stale one).

``SIDECAR_NO_EXTENSIONS=1`` at build time builds neither. docs/ARCHITECTURE.md, "The hot path",
has what each one saves.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Any

from setuptools import Extension, setup

ROOT = Path(__file__).resolve().parent
#: The modules mypyc compiles: the engine and the ack tracker, the record path's Python.
ENGINE = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "sidecar" / "engine").glob("*.py"))
COMPILED = [*ENGINE, "sidecar/offsets/tracker.py"]


def can_compile() -> bool:
    """A C compiler and Python's headers are there (a Debian Python without python3-dev, or a
    slim image without gcc, has not both)."""
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"  # may carry flags: "gcc -pthread"
    headers = Path(sysconfig.get_paths()["include"], "Python.h")
    return shutil.which(cc.split()[0]) is not None and headers.exists()


def extensions() -> list[Any]:  # setuptools' and mypyc's (distutils') Extension types
    if os.environ.get("SIDECAR_NO_EXTENSIONS", "") not in ("", "0"):
        return []
    if not can_compile():
        print(
            "setup.py: no C compiler or no Python headers: installing the sidecar uncompiled", file=sys.stderr
        )
        return []
    # Optional: frames.py falls back to its Python encoder if this one fails to build.
    frames = Extension(
        "sidecar.api._cframes", ["sidecar/api/_cframes.c"], optional=True, extra_compile_args=["-O2"]
    )
    from mypyc.build import mypycify

    # mypyc type-checks what it compiles. Its own flags, not [tool.mypy]: an isolated build
    # environment has none of the runtime packages (they type as Any here, which mypyc compiles
    # as generic calls) and not the pydantic plugin the project's check loads.
    flags = ["--config-file=", "--ignore-missing-imports", "--follow-imports=silent", "--python-version=3.11"]
    # Not optional: each compiled module is a stub that loads the one shared library, so if that
    # failed to build while the stubs did, every import of the engine would fail. A compiler
    # that is there and fails stops the install instead.
    return [frames, *mypycify([*flags, *COMPILED], opt_level="3", group_name="sidecar_engine")]


setup(ext_modules=extensions())
