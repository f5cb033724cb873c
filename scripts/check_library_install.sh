#!/usr/bin/env bash
# CI check of the library-alone install: a bare venv gets torch and `pip install .` (no extras), then
# imports ddpm, saves a tiny checkpoint, loads it and samples from it through ddpm.DDPMPipeline (the
# API the README shows), with Ray, MLflow and Typer absent; the ddpm-pipe entry point says which
# extra it needs. Usage: scripts/check_library_install.sh
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=$(mktemp -d)/venv
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv"
"$here/scripts/install.sh" "$venv/bin/python"
cd "$(dirname "$venv")"  # not the checkout: `import ddpm` must come from the installed package
"$venv/bin/python" - <<'PYEOF'
import importlib.util, tempfile

import torch

import ddpm
from ddpm.checkpoint import load_model, save_checkpoint
from ddpm.config import ExperimentConfig

absent = [m for m in ("ray", "mlflow", "typer") if importlib.util.find_spec(m) is not None]
assert not absent, f"the library install pulled in {absent}"
assert "site-packages" in ddpm.__file__, ddpm.__file__
cfg = ExperimentConfig.preset("digits").override(["model.ch=32", "model.ch_mult=[1,2]", "model.attn_resolutions=[4]",
                                                  "diffusion.timesteps=50"])
torch.manual_seed(0)
model = ddpm.UNet(cfg.model)
with tempfile.TemporaryDirectory() as tmp:
    save_checkpoint(f"{tmp}/c.pt", {"config": cfg, "model": model.state_dict(), "step": 0})
    cfg, model, diffusion = load_model(f"{tmp}/c.pt", weights="model")
pipe = ddpm.DDPMPipeline(ddpm.SamplingNet(model), diffusion, (1, 8, 8), sampler="ddim", steps=5, batch_size=2)
x = pipe(num=4, seed=0)  # sample i from (seed, i), whatever the batch size
assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all() and x.abs().max() <= 1
assert torch.equal(x[2:], pipe(num=2, seed=0, start=2))
print("library alone: ddpm", ddpm.__version__, "sampled", tuple(x.shape), "without ray/mlflow/typer")
PYEOF
set +e
out=$("$venv/bin/ddpm-pipe" --help 2>&1); rc=$?
set -e
[ "$rc" = 2 ] && [[ "$out" == *"ddpm-pipe[pipeline]"* ]] || { echo "ddpm-pipe without the extra: rc $rc: $out"; exit 1; }
echo "library alone: ddpm-pipe says: $out"
