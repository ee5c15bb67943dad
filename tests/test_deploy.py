"""kdkit export --format openvino [--int8]: the cases are in deploy_cases.py, run here in a process of their own.

Why a process of their own: with OpenVINO's runtime loaded (its TBB worker threads stay for the life of the
process) a later test in the same pytest process segfaulted, intermittently, in the main thread while it
read a child process's output (the native-operator build tests spawn the compiler); three full runs of the
suite crashed there, none without the OpenVINO tests. A `kdkit export` is a process of its own as well.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("openvino")
pytest.importorskip("nncf")


@pytest.mark.timeout(900)
@pytest.mark.slow
def test_openvino_export_cases_in_their_own_process():
    here = Path(__file__).resolve().parent
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here / "deploy_cases.py")],
                       cwd=here.parent, capture_output=True, text=True, timeout=880,
                       env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    print(r.stdout[-2000:])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], r.stdout[-500:]
