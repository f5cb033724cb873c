"""Helpers shared by every test tier: waiting, ports, an MLflow server, the CLI and its JSON result,
tiny configs and checkpoints. Plain functions and constants (fixtures live in conftest.py files and
tests/fixtures/); imported as ``from tests.support import ...``.

The library tests (tests/ddpm) use the tiny model builder too, so this module imports nothing of
``pipelines``, Typer or MLflow at the top: the functions that talk to them import them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch

from ddpm.checkpoint import save_checkpoint
from ddpm.config import ExperimentConfig, UNetConfig
from ddpm.ema import EMA
from ddpm.unet import UNet
# scripts/screenshots.py starts the same kind of server: one port picker and health probe for both
from scripts.screenshots import free_port, healthy

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient
    from typer.testing import Result

    from pipelines.sample.request import SampleRequest

T = TypeVar("T")

N = 6  # samples per sample test: enough for several units on two workers, cheap on two cores
MLFLOW_START_TIMEOUT = 180.0  # seconds; the server imports all of MLflow and migrates its sqlite schema
# (140 s seen on a loaded 2-core machine)


# -- waiting, ports, processes -------------------------------------------------------------------------
def wait_until(predicate: Callable[[], T], timeout: float, what: str = "the condition", interval: float = 0.2,
               alive: Callable[[], bool] = lambda: True) -> T:
    """Poll ``predicate`` until it returns something truthy and return that; an ``AssertionError``
    naming ``what`` after ``timeout`` seconds, or as soon as ``alive()`` says the thing waited on is gone."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert alive(), f"gone before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
        time.sleep(interval)


def start_mlflow_server(root: Path, port: int | None = None, backend_store_uri: str | None = None,
                        artifacts_destination: str | None = None,
                        env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` on 127.0.0.1 (by default a sqlite store and proxied artifacts under ``root``),
    its log in ``root/server.log``, in its own process group; ``(process, URI)`` once it is healthy.
    ``env``: the server's whole environment (default: this process's, less ``MLFLOW_TRACKING_URI``)."""
    port = port or free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", backend_store_uri or f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", artifacts_destination or (root / "artifacts").as_uri(), "--serve-artifacts"]
    env = dict(env) if env is not None else {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONUNBUFFERED"] = "1"
    with open(root / "server.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env,
                                start_new_session=True)  # its own group: its workers stop with it
    try:
        wait_until(lambda: healthy(uri), MLFLOW_START_TIMEOUT, f"healthy mlflow server at {uri}", interval=0.3,
                   alive=lambda: proc.poll() is None)
    except AssertionError as e:
        stop_process_group(proc)
        raise AssertionError(f"{e}: {(root / 'server.log').read_text()[-2000:]}") from None
    return proc, uri


def stop_process_group(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal ``proc``'s process group (started with ``start_new_session``), SIGKILL if it lingers."""
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=5)  # uvicorn drains connections; no need to wait longer
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def start_lock_holder(folder: Path | str, what: str) -> subprocess.Popen:
    """A process holding ``folder``'s ``.ddpm-lock`` as a live ``what`` job does (``FolderLock``, a
    flock), returned once it holds it; the caller kills it (a crash: the lock file stays)."""
    code = ("import sys, time, fsspec\n"
            "from pipelines.storage.lock import FolderLock\n"
            "with FolderLock(fsspec.filesystem('file'), sys.argv[1], sys.argv[1], sys.argv[2]):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder), what], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped): provably gone."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- the command line ----------------------------------------------------------------------------------
def run_cli(*args: str) -> Result:
    """``ddpm-pipe ARGS`` in this process (Typer's runner; stdout and stderr kept apart)."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    return CliRunner().invoke(app, list(args))


def cli_json(result: Result | subprocess.CompletedProcess | str) -> dict:
    """The result of a ``--json`` command: stdout (of a runner result, a finished process, or given)
    must be exactly one line holding one JSON object, nothing before or after it."""
    stdout = result if isinstance(result, str) else result.stdout
    lines = stdout.splitlines()
    assert len(lines) == 1 and stdout == lines[0] + "\n", f"stdout is not exactly one JSON line: {stdout[-3000:]!r}"
    value = json.loads(lines[0])
    assert isinstance(value, dict), lines[0]
    return value


def mlflow_client() -> MlflowClient:
    """A client of the tracking store the settings resolve to now (DDPM_HOME or MLFLOW_TRACKING_URI)."""
    from pipelines import tracking
    from pipelines.settings import resolve

    tracking.configure(resolve())
    return tracking.client()


# -- tiny configs and models ---------------------------------------------------------------------------
def tiny_overrides(ch: int = 8, attention: bool = False, timesteps: int = 50) -> list[str]:
    """``--set`` overrides of the digits preset for a tiny U-Net (8x8 grey, two levels of one residual
    block each, attention at 4x4 with ``attention``, no dropout) on a short chain: the point of the
    tests that use it is the plumbing, not the model."""
    return [f"model.ch={ch}", "model.ch_mult=[1,2]", "model.num_res_blocks=1",
            f"model.attn_resolutions={[4] if attention else []}", "model.dropout=0.0",
            f"diffusion.timesteps={timesteps}"]


TINY_NET = tiny_overrides()  # the cheapest network that samples: 8 channels, no attention
REGISTRY_TINY = [*tiny_overrides(32, attention=True), "sample.batch_size=8"]  # every block type
# Training runs: a few steps that log, evaluate, sample and checkpoint.
TINY = [*tiny_overrides(32, attention=True, timesteps=100), "train.batch_size=16", "train.log_every=1",
        "train.eval_every=2", "train.sample_every=4", "train.checkpoint_every=2", "train.warmup_steps=2",
        "train.quality_num=0"]


def tiny_config(overrides: list[str] | None = None) -> ExperimentConfig:
    """The digits preset with ``overrides`` (default :data:`REGISTRY_TINY`)."""
    return ExperimentConfig.preset("digits").override(REGISTRY_TINY if overrides is None else overrides)


def tiny_unet_config(ch: int = 8, attention: bool = False) -> UNetConfig:
    """The :func:`tiny_overrides` U-Net alone (for the library tests)."""
    return tiny_config(tiny_overrides(ch, attention)).model


def perturbed(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """``model`` with ``scale`` x N(0, 1) added to every weight (from torch's global generator): a
    random network that matters everywhere (the U-Net zero-initialises some outputs)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def save_tiny_checkpoint(path: Path | str, seed: int = 0, overrides: list[str] | None = None,
                         step: int = 7) -> Path:
    """A random tiny digits model (:func:`perturbed`, from ``seed``) saved as a training checkpoint at
    ``step``, EMA = model; no training. ``overrides``: :data:`REGISTRY_TINY`, :data:`TINY_NET`, ..."""
    cfg = tiny_config(overrides)
    torch.manual_seed(seed)
    model = perturbed(UNet(cfg.model))
    save_checkpoint(str(path), {"config": cfg, "model": model.state_dict(), "ema": EMA(model).state_dict(),
                                "step": step})
    return Path(path)


def picture_folder(root: Path, n: int = 60, size: int = 8) -> Path:
    """A folder of ``n`` random ``size`` x ``size`` RGB PNGs with no class subfolders: a user's own pictures."""
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"img{i:03d}.png")
    return root


def read_npz_folder(folder: Path | str) -> dict[int, np.ndarray]:
    """``{index: x}`` of every sample in a folder of ``sample --format npz`` chunks (each index once)."""
    out: dict[int, np.ndarray] = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".npz"):
            with np.load(os.path.join(folder, name)) as z:
                for k, i in enumerate(z["indices"].tolist()):
                    assert i not in out, f"index {i} twice"
                    out[i] = z["x"][k]
    return out


# -- commands on tiny models ---------------------------------------------------------------------------
def train_args(tmp_path: Path, *extra: str, nodes: int = 4, steps: int = 4, name: str = "t1",
               storage: str | None = None) -> list[str]:
    sets = [x for s in TINY for x in ("--set", s)]
    return ["train", "--nodes", str(nodes), "--max-steps", str(steps), "--run-name", name,
            "--storage", storage or str(tmp_path / "storage"), "--json", *sets, *extra]


def register_tiny(tmp_path: Path, name: str = "tiny", seed: int = 0,
                  overrides: list[str] | None = None) -> tuple[str, str, Path]:
    """Log a tiny checkpoint (:func:`save_tiny_checkpoint`'s ``overrides``) into a new run of the
    current tracking store; returns (run_id, version, ckpt)."""
    from pipelines import tracking
    from pipelines.registry import register
    from pipelines.settings import resolve

    settings = resolve()
    tracking.configure(settings)
    ckpt = save_tiny_checkpoint(tmp_path / f"ckpt-{seed}.pt", seed, overrides)
    exp_id = tracking.experiment_id("tests", settings)
    run_id, _ = tracking.start_or_resume_run(exp_id, f"{name}-{seed}")
    version = register.log_and_register(run_id, str(ckpt), name)
    tracking.end_run(run_id)
    return run_id, version, ckpt


FAST = {"num": 16, "sampler": "ddim", "steps": 5, "bpd_images": 8}  # evaluate_command's cheapest setting


def request(ckpt: str, **kw) -> SampleRequest:
    """A small DDIM sampling request for ``ckpt``."""
    from pipelines.sample.request import SampleRequest

    return SampleRequest(**{"model": ckpt, "num": N, "sampler": "ddim", "steps": 4, "batch_size": 4, **kw})
