"""What `pip install .` puts into site-packages: kdkit alone, the DALI pipelines under kdkit's namespace
(no generic top-level `pipelines` module to collide with other packages), and every module and data
file of the source tree."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_the_wheel_holds_kdkit_alone_with_the_pipelines_inside(tmp_path):
    import setuptools

    # the project's build backend needs setuptools >= 77: use this environment's when it has one (fast,
    # offline), else let pip fetch it for an isolated build
    isolation = ["--no-build-isolation"] if int(setuptools.__version__.split(".")[0]) >= 77 else []
    # a clean copy of the sources: a build/ folder left in the checkout would be packed as it is
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                             ".pytest_cache", "runs", "bench-out", "kdkit-demo*"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", *isolation, "-w", str(tmp_path),
                        str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    # setup's output stays readable: no 40-line "package would be ignored" warning (kdkit.train.recipes)
    assert "is absent from the `packages` configuration" not in r.stdout + r.stderr
    names = zipfile.ZipFile(next(tmp_path.glob("kdkit-*.whl"))).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"kdkit"}, top  # no top-level `pipelines`
    wanted = {f"kdkit/{p.relative_to(ROOT / 'kdkit')}" for p in (ROOT / "kdkit").rglob("*.py")}
    wanted |= {f"kdkit/pipelines/{p.relative_to(ROOT / 'pipelines')}" for p in (ROOT / "pipelines").rglob("*.py")}
    wanted |= {"kdkit/pipelines/native/resize_normalize.cc", "kdkit/evaluate/EXPORT.md",
               *(f"kdkit/train/recipes/{p.name}" for p in (ROOT / "kdkit" / "train" / "recipes").glob("*.yaml"))}
    assert wanted <= set(names), sorted(wanted - set(names))
