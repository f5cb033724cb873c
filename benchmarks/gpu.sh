#!/usr/bin/env bash
# GPU figures for the CIFAR-10 preset (at most ~5 minutes): training images/s in bf16 at the paper's
# batch 128 (eager, then torch.compile if it compiles within the budget) and sampling evaluations/s.
# Compare with Ho et al.'s TPU v3-8: 21 steps/s at batch 128, about 2,700 images/s.
#
# Runs with the GPU machine's own python3 and torch (no Ray, MLflow or diffusers there):
#     PYTHONPATH=. bash benchmarks/gpu.sh            # JSON to ${OUT:-bench-results}/gpu.json
set -euo pipefail
OUT_DIR="${OUT:-bench-results}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="${PYTHONPATH:-.}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
timeout 290 python3 - "$OUT_DIR/gpu.json" <<'PY'
import json, sys, time, datetime
import torch
from ddpm.config import DiffusionConfig, UNetConfig
from ddpm.diffusion import Diffusion
from ddpm.unet import UNet

assert torch.cuda.is_available(), "no CUDA device"
dev = torch.device("cuda")
torch.backends.cudnn.benchmark = True
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
diffusion = Diffusion.from_config(DiffusionConfig())
result = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
          "device": torch.cuda.get_device_name(), "train": [], "forward": []}

def sync_time(fn, n):
    fn(); torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n

def train_case(batch, precision, compile_):
    torch.manual_seed(0)
    model = UNet(UNetConfig.cifar10()).to(dev, memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, fused=True)
    net = torch.compile(model) if compile_ else model
    x = (torch.rand(batch, 3, 32, 32, device=dev) * 2 - 1).contiguous(memory_format=torch.channels_last)
    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = diffusion.training_loss(net, x).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    start = time.perf_counter()
    step(); step()  # warm-up (and compilation)
    warm = time.perf_counter() - start
    s = sync_time(step, 20)
    row = {"batch": batch, "precision": precision, "compile": compile_, "warmup_s": round(warm, 1),
           "steps_per_s": round(1 / s, 2), "images_per_s": round(batch / s, 1)}
    print(row, flush=True)
    return row

for prec in ("bf16", "fp32"):
    result["train"].append(train_case(128, prec, False))
try:
    result["train"].append(train_case(128, "bf16", True))
except Exception as e:  # compile is opt-in: record why it failed instead of failing the script
    result["train"].append({"precision": "bf16", "compile": True, "error": repr(e)[:300]})

model = UNet(UNetConfig.cifar10()).to(dev, memory_format=torch.channels_last).eval()
for batch in (64, 256):
    for dtype in (torch.float32, torch.bfloat16):
        m = model.to(dtype)
        x = torch.randn(batch, 3, 32, 32, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
        t = torch.randint(0, 1000, (batch,), device=dev)
        with torch.no_grad():
            s = sync_time(lambda: m(x, t), 20)
        row = {"batch": batch, "dtype": str(dtype), "evals_per_s": round(batch / s, 1),
               "ddpm_1000_steps_s_per_batch": round(1000 * s, 1)}
        print(row, flush=True)
        result["forward"].append(row)
json.dump(result, open(sys.argv[1], "w"), indent=1)
print(json.dumps(result, indent=1))
PY
