#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py says what it runs): one command that proves kdkit's GPU path on
# any CUDA machine in a few minutes and prints one table; gpu_check.json goes to $OUT (or --out DIR,
# default: the current folder). It installs nothing: it runs with .venv/bin/python where the project's
# venv exists, else with python3 and whatever PYTHONPATH provides (e.g. unpacked wheels). Without CUDA
# it says so on one line and exits 0.
#
#   bash scripts/gpu_check.sh                      # everything (~5-8 min on one H100-class GPU)
#   bash scripts/gpu_check.sh --only loader,train  # some steps
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
PY="${PY:-python3}"
if [ -z "${PYTHONPATH:-}" ] && [ -x "$here/../.venv/bin/python" ]; then
    PY="$here/../.venv/bin/python"
fi
out="${OUT:-$PWD}"
exec "$PY" "$here/gpu_check.py" --out "$out" "$@"
