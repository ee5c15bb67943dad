#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py says what each step runs and proves; docs/gpu.md has the table):
# one command that proves kdkit's GPU path on any CUDA machine, planned at 470 s on one H100 (no step
# starts after 540 s), and prints one table; gpu_check.json and gpu_check.log go to $OUT (or --out DIR,
# default: the current folder), rewritten after every step. It installs nothing: with PYTHONPATH set
# (kdkit installed from wheels, docs/gpu.md) it runs python3 from it, else the project's venv, and
# never puts this checkout on sys.path. Without CUDA it says so on one line and exits 0.
#
#   bash scripts/gpu_check.sh                      # everything
#   bash scripts/gpu_check.sh --only pixels,ddp    # some steps (and those they read from)
#   bash scripts/gpu_check.sh --device cpu         # every step on the CPU at the GPU run's sizes (slow)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
PY="${PY:-python3}"
if [ -z "${PYTHONPATH:-}" ] && [ -x "$here/../.venv/bin/python" ]; then
    PY="$here/../.venv/bin/python"
fi
out="${OUT:-$PWD}"
exec "$PY" "$here/gpu_check.py" --out "$out" "$@"
