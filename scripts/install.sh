#!/usr/bin/env bash
# The one install recipe: `make setup`, `.ci/run` and the Dockerfile all run it.
# Usage: scripts/install.sh PYTHON [EXTRAS]   e.g. scripts/install.sh .venv/bin/python test
# TORCH_SPEC picks the torch build (default the CPU wheel torch==2.13.0; the Dockerfile's CUDA
# build argument passes another).
set -euo pipefail
PY=${1:?python executable}
EXTRAS=${2:-}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
"$PY" -m pip install -q --upgrade pip
# torch first, pinned, so no dependency resolution pulls a multi-GB CUDA build.
"$PY" -m pip install -q "$TORCH_SPEC"
if [ -n "$EXTRAS" ]; then
  "$PY" -m pip install -q -e ".[$EXTRAS]"
else
  "$PY" -m pip install -q .
fi
"$PY" -c "import ddpm, pipelines.cli, torch; print('installed ddpm-pipe', ddpm.__version__, 'torch', torch.__version__)"
