"""kdkit's own DALI CPU operator (pipelines/native/*.cc), built on first use and loaded as a DALI
plugin: `fn.kdkit_resize_normalize`, the CPU backend's resize + normalize (why it exists: the
comment at the top of resize_normalize.cc).

The plugin is compiled once per DALI version and architecture with the C++ compiler on PATH (g++,
or $CXX) against the headers DALI ships, into a cache folder ($KDKIT_CACHE, default
~/.cache/kdkit/native/<hash of source, DALI version, architecture and flags>/). DALI's headers
include CUDA's runtime headers, which pip installs with torch (nvidia-cuda-runtime) and kdkit's
dependency nvidia-cuda-crt. The build is portable: no -march=native, so one build (scripts/setup.sh
makes it) serves every CPU of the architecture, e.g. from a cache folder shared by the nodes of a
cluster; on x86 the hot loops carry an AVX2/FMA copy picked when the plugin loads, and the float16
conversion uses F16C where the CPU has it. Where building is impossible (no compiler),
`available()` is False, the CPU pipelines fall back to fn.resize + fn.crop_mirror_normalize (same
pixels, slower) and one warning says why and what to install. KDKIT_NATIVE=0 turns the plugin off.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

from kdkit import cache_root

SOURCES = [Path(__file__).with_name("resize_normalize.cc")]
# no -march: the binary runs on any CPU of this architecture; the source itself dispatches its
# vector loops at run time (target_clones for x86-64-v3, an F16C check), see resize_normalize.cc
CXXFLAGS = ["-std=c++17", "-O3", "-fPIC", "-shared", "-fvisibility=hidden"]

_lock = threading.Lock()
_state: dict = {}  # "ok": bool, "why": str, "path": Path


def _include_dirs() -> list[str]:
    """DALI's headers, plus the CUDA runtime headers they include, from pip's CUDA packages: the cu13
    extra's nvidia/cu13 tree, or the cu12 extra's nvidia/cuda_runtime and nvidia/cuda_nvcc (crt/)."""
    import nvidia
    import nvidia.dali.sysconfig as sysconfig

    dirs = [sysconfig.get_include_dir()]
    # nvidia-cuda-runtime and nvidia-cuda-crt (CUDA 13) unpack their headers into nvidia/cu13/include
    dirs += [str(Path(p) / sub / "include") for p in nvidia.__path__ for sub in ("cu13", "cuda_runtime", "cuda_nvcc")]
    if os.environ.get("CUDA_HOME"):
        dirs.append(str(Path(os.environ["CUDA_HOME"]) / "include"))
    return [d for d in dirs if Path(d).is_dir()]


def compiler() -> str | None:
    """$CXX, else g++ or c++ on PATH."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _command(out: Path) -> list[str]:
    import nvidia.dali.sysconfig as sysconfig

    cxx = compiler()
    if not cxx:
        raise RuntimeError("no C++ compiler on PATH (install g++, e.g. `apt-get install g++`, or set CXX)")
    defines = [f for f in sysconfig.get_compile_flags() if not f.startswith("-I")]
    return ([cxx, *CXXFLAGS, *defines, *(f"-I{d}" for d in _include_dirs()), *map(str, SOURCES), "-o", str(out),
             *sysconfig.get_link_flags()])


def library_path() -> Path:
    """Where the built plugin lives: keyed by the sources, the DALI version, the architecture and
    the flags, not by the CPU model (the build is portable, see CXXFLAGS)."""
    import nvidia.dali as dali

    digest = hashlib.sha256()
    for src in SOURCES:
        digest.update(src.read_bytes())
    digest.update(" ".join([dali.__version__, sys.platform, platform.machine(), *CXXFLAGS]).encode())
    return cache_root("native") / digest.hexdigest()[:16] / "libkdkit_dali.so"


def build(path: Path) -> Path:
    """Compile the plugin to `path` (atomically: concurrent ranks never load a half-written file).
    A failed build leaves the compiler's whole output in build.log beside it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RuntimeError(f"cannot create the build folder {path.parent} ({e.strerror}): "
                           "set KDKIT_CACHE to a writable folder") from e
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        partial = Path(tmp) / path.name
        command = _command(partial)
        try:
            done = subprocess.run(command, capture_output=True, text=True)
        except OSError as e:
            raise RuntimeError(f"cannot run the C++ compiler {command[0]} ({e.strerror}): "
                               "install g++ or set CXX") from e
        if done.returncode != 0:
            log = path.with_name("build.log")
            log.write_text(" ".join(command) + "\n\n" + done.stdout + done.stderr)
            lines = done.stderr.strip().splitlines() or ["(no output)"]
            first = next((line for line in lines if "error" in line), lines[-1])
            raise RuntimeError(f"compiling {SOURCES[0].name} failed: {first.strip()} (full output: {log})")
        os.replace(partial, path)
    return path


def available() -> bool:
    """Build (first time) and load the plugin; False, with one warning, where that cannot be done."""
    with _lock:
        if "ok" not in _state:
            _state.update(_load())
            if not _state["ok"] and _state["why"]:
                warnings.warn(f"kdkit: the fast CPU resize operator is unavailable ({_state['why']}); "
                              "CPU pipelines use fn.resize instead: same pixels, about half the speed",
                              RuntimeWarning, stacklevel=3)
        return _state["ok"]


def _load() -> dict:
    if os.environ.get("KDKIT_NATIVE", "1") == "0":
        return {"ok": False, "why": ""}
    try:
        import nvidia.dali.plugin_manager as plugin_manager

        path = library_path()
        if not path.is_file():
            build(path)
        try:
            plugin_manager.load_library(str(path))
        except Exception:  # noqa: BLE001 - a cached build this system cannot load (damaged, other toolchain)
            build(path)
            plugin_manager.load_library(str(path))
        return {"ok": True, "why": "", "path": path}
    except Exception as e:  # noqa: BLE001 - any failure means: use DALI's own operators
        return {"ok": False, "why": str(e).splitlines()[0] if str(e) else type(e).__name__}


def main() -> int:
    """`python -m kdkit.pipelines.native`: build (or find) the plugin now and say which resize the CPU
    pipelines will use; scripts/setup.sh runs it so the first pipeline does not pay the build."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ok = available()
    if ok:
        print(f"kdkit CPU resize operator: {_state['path']}")
    else:
        why = _state["why"] or "turned off by KDKIT_NATIVE=0"
        print(f"kdkit CPU resize operator not available ({why}); CPU pipelines will use fn.resize "
              "(same pixels, about half the speed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
