#!/usr/bin/env bash
# The one install recipe: `make setup`, `.ci/run` and the Dockerfile all run it.
# Usage: scripts/install.sh PYTHON [EXTRAS]   e.g. scripts/install.sh .venv/bin/python test,bench
# TORCH_SPEC picks the torch build (default the CPU wheel torch==2.13.0; the Dockerfile's CUDA
# build argument passes another index through PIP_EXTRA_INDEX_URL).
set -euo pipefail
PY=${1:?python executable}
EXTRAS=${2:-}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
quiet_pip() { "$PY" -m pip "$@" 2> >(grep -v "^WARNING: Location" >&2); }
quiet_pip install -q --upgrade pip uv
# torch first, pinned, with pip (it finds the local CPU wheel), so nothing pulls a multi-GB CUDA build.
quiet_pip install -q "$TORCH_SPEC"
if [ -n "$EXTRAS" ]; then target=(-e ".[$EXTRAS]"); else target=(.); fi
# The rest with uv: the same packages as pip resolves (torch is already satisfied and kept), in
# seconds instead of minutes. pip stays the fallback.
uv=("$PY" -m uv pip install -q --python "$PY")
if [ "$("$PY" -c 'import sys; print(int(sys.prefix != sys.base_prefix))')" = 0 ]; then uv+=(--system); fi
"${uv[@]}" "${target[@]}" || quiet_pip install -q "${target[@]}"
"$PY" -c "import ddpm, pipelines.cli, torch; print('installed ddpm-pipe', ddpm.__version__, 'torch', torch.__version__)"
