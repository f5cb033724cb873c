#!/usr/bin/env bash
# The one install recipe: `make setup`, `.ci/run` and the Dockerfile all run it.
# Usage: scripts/install.sh PYTHON [EXTRAS]   e.g. scripts/install.sh .venv/bin/python pipeline,test,bench
#   EXTRAS empty: the library alone (ddpm/, no Ray, MLflow or CLI), installed non-editable.
#   EXTRAS set: the project editable with those extras (`pipeline` for the ddpm-pipe command line).
#
# torch is installed first, pinned (TORCH_SPEC, default torch==2.13.0), so the resolver keeps it:
#   - TORCH_INDEX_URL unset: the package index pip is configured with. On PyPI, torch for Linux
#     x86_64 is the CUDA build (several GB with its nvidia-* wheels); a machine with a local CPU
#     wheel in pip's find-links gets that one.
#   - TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu: PyTorch's CPU-only build (~200 MB);
#     .../whl/cu128 etc. pick a CUDA version. The Dockerfile's cpu and cuda targets set it.
# CONSTRAINTS=constraints.txt pins every package to the versions CI was green with (optional).
# DEPS_ONLY=1 installs the dependencies of the extras but not the project (a Docker layer that a
# source edit does not invalidate).
set -euo pipefail
PY=${1:?python executable}
EXTRAS=${2:-}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
here=$(cd "$(dirname "$0")/.." && pwd)
quiet_pip() { "$PY" -m pip "$@" 2> >(grep -v "^WARNING: Location" >&2); }
constraint=()
if [ -n "${CONSTRAINTS:-}" ]; then constraint=(-c "$CONSTRAINTS"); fi
quiet_pip install -q --upgrade pip uv
torch_index=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then torch_index=(--index-url "$TORCH_INDEX_URL"); fi
quiet_pip install -q "${torch_index[@]}" "$TORCH_SPEC"
if [ "${DEPS_ONLY:-0}" = 1 ]; then
  # The requirements of the project and its extras, read from pyproject.toml (self-references expanded).
  mapfile -t target < <("$PY" - "$here/pyproject.toml" "$EXTRAS" <<'PYEOF'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
extras, want, reqs = project.get("optional-dependencies", {}), [e for e in sys.argv[2].split(",") if e], []
while want:
    for req in extras[want.pop()]:
        self_ref = re.fullmatch(rf"{project['name']}\[(.+)\]", req)
        want.extend(self_ref.group(1).split(",")) if self_ref else reqs.append(req)
print("\n".join(dict.fromkeys([*project["dependencies"], *reqs])))
PYEOF
  )
elif [ -n "$EXTRAS" ]; then target=(-e "$here[$EXTRAS]"); else target=("$here"); fi
# The rest with uv: the same packages as pip resolves (torch is already satisfied and kept), in
# seconds instead of minutes. pip stays the fallback. --compile-bytecode: as pip does by default, so
# that a command's start does not compile its imports (about 4 s for `sample --model models:/...`
# where Python may not write .pyc files, e.g. with PYTHONDONTWRITEBYTECODE or a read-only image).
uv=("$PY" -m uv pip install -q --compile-bytecode --python "$PY")
if [ "$("$PY" -c 'import sys; print(int(sys.prefix != sys.base_prefix))')" = 0 ]; then uv+=(--system); fi
"${uv[@]}" "${constraint[@]}" "${target[@]}" || quiet_pip install -q "${constraint[@]}" "${target[@]}"
if [ "${DEPS_ONLY:-0}" = 1 ]; then exit 0; fi
if [[ ",$EXTRAS," == *",pipeline,"* || ",$EXTRAS," == *",test,"* ]]; then
  "$PY" -c "import ddpm, pipelines.cli, torch; print('installed ddpm-pipe', ddpm.__version__, 'torch', torch.__version__)"
else
  "$PY" -c "import ddpm, torch; print('installed the ddpm library', ddpm.__version__, 'torch', torch.__version__)"
fi
