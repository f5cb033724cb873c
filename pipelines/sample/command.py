"""`ddpm-pipe sample`: N samples of a model URI on the Ray cluster, resumably, to any fsspec URL.

This file holds the request and the command; the workers are ``pipelines/sample/pool.py``, the output
folder (ownership, resume, encoders, manifest) ``pipelines/sample/output.py``.

How the work is spread: a pool of Ray actors, not tasks and not Ray Data.
- Each actor loads the model once (``pipelines.registry.models.load``: EMA weights) and then serves work
  units of sample indices; a task per unit would load the model again for every unit.
- The driver hands the next unit to whichever actor finishes first (``ray.wait``), so a slow node
  holds back nothing, and it knows exactly which indices are done: that is what makes resuming and
  the progress bar simple. Ray Data's actor-pool ``map_batches`` would load once too, but its
  datasinks name files themselves, so "which indices exist" could not decide what to redo.
- Actors are placed as training places its workers (``cluster.plan``: one per node, times
  ``--gpus-per-node``), in one placement group.
- Workers compute and return float arrays; the driver writes. Credentials and the storage endpoint
  never travel, one writer decides what is complete, and writing overlaps the next unit's compute.
  The cost, a few KB per sample through the object store, is small next to a sample's compute.

Determinism: sample i's noise (x_T and every step's) comes from its own generator seeded with
:func:`sample_seed` (seed, i) (``ddpm.noise``), so the images do not depend on the number of workers,
the batch size or the unit an index falls in (equal up to float rounding, below 1e-4).

Output layout (``{out}/``), every file written whole or not at all (``ddpm.data.storage.atomic_write``):
- ``png``: ``{i:08d}.png``, plus ``{i:08d}-progressive.png`` (written first) with ``--progressive K``;
- ``npz``: ``samples-{start:08d}-{end:08d}.npz`` holding ``indices``, ``x`` (float32 in [-1, 1],
  ``[n x C x H x W]``), ``images`` (uint8 ``[n x H x W x C]``) and ``progressive`` (uint8
  ``[n x K x H x W x C]``) with ``--progressive``;
- ``webdataset``: ``samples-{start:08d}-{end:08d}.tar`` with ``{i:08d}.png`` (and
  ``{i:08d}.progressive.png``) members;
- ``.ddpm-sample.json``: the settings, written before the first sample; ``manifest.json``: the
  settings, count, timings and samples/s, written last, once every index exists.

Resuming: an index is done when its PNG exists or a chunk file's name covers it; a re-run samples
the missing indices only, in new chunks, so chunk files never overlap whatever ``--batch-size`` is.
A folder holding other files, or samples of another model or other settings, is refused (exit 3).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, get_args, get_type_hints

import numpy as np

from ddpm.config import Sampler, SampleConfig
from ddpm.noise import SEED_STRIDE, sample_seed
from pipelines.errors import RefusedError, UsageError
from pipelines.sample.output import (JOB_FILE, MANIFEST, OutputFolder, check_same, inspect_folder, write_manifest,
                                     write_unit)
from pipelines.sample.pool import WorkerPool, unit_size, units_of, worker_env

SAMPLERS: tuple[str, ...] = get_args(Sampler)  # named once, in ddpm.config
PRECISIONS: tuple[str, ...] = get_args(get_type_hints(SampleConfig)["precision"])
FORMATS = ("png", "webdataset", "npz")
# -- the request ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleRequest:
    """What to sample. ``sampler``, ``steps`` and ``eta`` left None are the model's own (its config's
    ``sample`` section; for another sampler than the config's, that sampler's defaults: T for ddpm,
    50 ddim, 20 dpmpp, eta 0): the workers resolve them when they load the model
    (:func:`ddpm.pipeline.sampling_settings`)."""

    model: str
    num: int
    sampler: str | None = None
    steps: int | None = None
    eta: float | None = None
    batch_size: int = 256
    nodes: int = 1
    gpus_per_node: int = 0
    seed: int = 0
    precision: str = "fp32"
    progressive: int = 0
    address: str | None = None
    compile: bool = False  # torch.compile each worker's network (eager if it fails); speed only

    def validate(self) -> None:
        if self.sampler is not None:
            _choice("--sampler", self.sampler, SAMPLERS)
        _choice("--precision", self.precision, PRECISIONS)
        for name, value, low in (("--num", self.num, 1), ("--batch-size", self.batch_size, 1),
                                 ("--nodes", self.nodes, 1), ("--gpus-per-node", self.gpus_per_node, 0),
                                 ("--progressive", self.progressive, 0)):
            if value < low:
                raise UsageError(f"{name} must be >= {low}, got {value}")
        if self.steps is not None and self.steps < 1:
            raise UsageError(f"--steps must be >= 1, got {self.steps}")
        from ddpm.samplers import check_eta

        try:
            if self.eta is not None:  # without --sampler the range alone: the worker checks the model's
                check_eta(self.eta, self.sampler, name="--eta")
        except ValueError as e:
            raise UsageError(str(e)) from None
        if self.num >= SEED_STRIDE:
            raise UsageError(f"--num must be below {SEED_STRIDE} (one seed per sample)")


def _choice(option: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise UsageError(f"{option} {value!r} is not valid; valid: {', '.join(valid)}")


@dataclass
class SampleRun:
    """What :func:`sample_arrays` returns: x_0 ``[N x C x H x W]`` in [-1, 1] and the timings."""

    x: Any  # torch.Tensor
    progressive: Any  # torch.Tensor [N x K x C x H x W] or None
    info: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def check_model(model: str) -> dict[str, Any]:
    """Check the model URI exists (no download) after pointing MLflow at the resolved store."""
    from pipelines.registry import models

    if model.startswith(("runs:/", "models:/")):
        from pipelines import tracking
        from pipelines.settings import resolve

        tracking.configure(resolve())
    return models.describe(model)


def model_timesteps(uri: str) -> int | None:
    """The model's T, read on the driver without its weights (a registered model's ``config.json``;
    a local checkpoint memory-mapped), or None where that is not cheap: then the workers check."""
    import tempfile

    try:
        if uri.startswith(("runs:/", "models:/")):
            import mlflow

            from pipelines.registry.register import MODEL_ARTIFACT, WEIGHTS_ARTIFACT

            base = uri.rstrip("/")
            if uri.startswith("runs:/") and base.count("/") < 2:
                base = f"{base}/{MODEL_ARTIFACT}"
            with tempfile.TemporaryDirectory() as tmp:
                local = mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{base}/artifacts/{WEIGHTS_ARTIFACT}/config.json", dst_path=tmp)
                with open(local) as f:
                    config = json.load(f)["config"]
        else:
            from ddpm.data.storage import is_local, open_fs

            fs, path = open_fs(uri)
            if not is_local(fs):
                return None
            import torch

            config = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["config"]
            config = json.loads(config) if isinstance(config, str) else config
        return int(config["diffusion"]["timesteps"])
    except Exception:  # whatever goes wrong here, the workers load the model and report it
        return None


# -- in memory (for `evaluate`) --------------------------------------------------------------------
def sample_arrays(req: SampleRequest, progress: bool = True) -> SampleRun:
    """Sample ``req.num`` images on the cluster and return them to the driver (nothing written)."""
    import torch

    req.validate()
    meta = check_model(req.model)
    start = time.perf_counter()
    pool = WorkerPool(req, worker_env(req.model))
    try:
        ready = time.perf_counter()
        xs: dict[int, np.ndarray] = {}
        ps: dict[int, np.ndarray] = {}
        bar = _bar(req.num, progress)

        def keep(result: dict[str, Any]) -> None:
            for k, i in enumerate(result["indices"]):
                xs[i] = result["x"][k]
                if result["progressive"] is not None:
                    ps[i] = result["progressive"][k]
            bar.update(len(result["indices"]))

        pool.run(units_of(list(range(req.num)), unit_size(req.num, len(pool.actors), req.batch_size)),
                 req.seed, keep)
        bar.close()
        info = {**pool.info, **meta}
    finally:
        pool.close()
    done = time.perf_counter()
    x = torch.from_numpy(np.stack([xs[i] for i in range(req.num)]))
    preds = torch.from_numpy(np.stack([ps[i] for i in range(req.num)])) if ps else None
    return SampleRun(x=x, progressive=preds, info=info, timings=_timings(start, ready, done, req.num))


def sample_to_tensor(model: str, num: int, sampler: str | None = None, steps: int | None = None, eta: float | None = None,
                     batch_size: int = 256, nodes: int = 1, gpus_per_node: int = 0, seed: int = 0,
                     precision: str = "fp32", address: str | None = None, progress: bool = True):
    """``num`` samples ``[num x C x H x W]`` (float32 in [-1, 1]) through the same Ray job as ``sample``.

    Sample i is the same as ``ddpm-pipe sample --seed SEED`` writes as index i.
    """
    req = SampleRequest(model=model, num=num, sampler=sampler, steps=steps, eta=eta, batch_size=batch_size,
                        nodes=nodes, gpus_per_node=gpus_per_node, seed=seed, precision=precision,
                        address=address)
    return sample_arrays(req, progress=progress).x


def _timings(start: float, ready: float, done: float, count: int) -> dict[str, float]:
    sample_s = max(done - ready, 1e-9)
    return {"startup_s": round(ready - start, 3), "sample_s": round(sample_s, 3),
            "total_s": round(done - start, 3), "samples_per_s": round(count / sample_s, 3) if count else 0.0}


def _bar(total: int, enabled: bool):
    """The progress line ``evaluate`` prints too (rate and ETA; in place on a terminal, plain lines otherwise)."""
    from pipelines.console import Progress

    return Progress("sample", total, "sample", enabled=enabled)


def _identity(req: SampleRequest, fmt: str, meta: dict[str, Any], used: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a folder's samples depend on; ``used``: what the workers resolved (sampler, steps, eta),
    without it only what was asked (a setting left to the model is unknown until a worker read it)."""
    used = used or {}
    ident = {"model": req.model, "model_run_id": meta.get("run_id"), "model_name": meta.get("name"),
             "model_version": meta.get("version"), "sampler": used.get("sampler", req.sampler),
             "steps": used.get("steps", req.steps), "eta": used.get("eta", req.eta), "seed": int(req.seed),
             "format": fmt, "precision": req.precision, "progressive": int(req.progressive)}
    for key in ("sampler", "steps", "eta"):
        if ident[key] is None:
            del ident[key]
    if "eta" in ident:
        ident["eta"] = float(ident["eta"])
    return ident


def _default_out(req: SampleRequest, meta: dict[str, Any]) -> str:
    from pipelines.settings import resolve

    if meta.get("name"):
        base = f"{meta['name']}-v{meta['version']}"
    elif meta.get("run_id"):
        base = f"run-{meta['run_id']}"
    else:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", req.model.rstrip("/").rsplit("/", 1)[-1]).strip("-.") or "model"
    setting = f"{req.sampler or ''}{req.steps or ''}" + (f"-eta{req.eta:g}" if req.eta is not None else "")
    return resolve().samples_url(f"{base}-{setting + '-' if setting else ''}seed{req.seed}")


# -- the command ----------------------------------------------------------------------------------
def write_samples(req: SampleRequest, out: str | None, fmt: str = "png", progress: bool = True,
                  on_written: Callable[[list[str]], None] | None = None) -> dict[str, Any]:
    """Sample the indices of ``range(req.num)`` missing from ``out`` and write them; manifest last.

    Everything is checked before any sampling: the options, that the model exists, that ``out`` is
    writable and holds nothing but this job's samples. ``on_written(names)`` is called after each
    unit's files are written (a hook for progress reporting and tests).
    """
    start = time.perf_counter()
    req.validate()
    _choice("--format", fmt, FORMATS)
    meta = check_model(req.model)
    T = model_timesteps(req.model) if req.steps is not None else None
    if T is not None and req.steps > T:  # before any folder exists or worker starts
        raise UsageError(f"--steps {req.steps} exceeds the model's T={T}")
    out = out or _default_out(req, meta)
    folder = OutputFolder(out)
    folder.check_writable()
    inspect_folder(folder, fmt)  # refuses a folder that is not ours before the lock touches it
    with folder.lock():
        return _write_locked(req, folder, fmt, meta, start, progress, on_written)


def _write_locked(req: SampleRequest, folder: OutputFolder, fmt: str, meta: dict[str, Any], start: float,
                  progress: bool, on_written: Callable[[list[str]], None] | None) -> dict[str, Any]:
    """:func:`write_samples` once this job holds the folder's lock."""
    from pipelines.storage.outputs import remove_stale_temporaries

    state = inspect_folder(folder, fmt)
    remove_stale_temporaries(folder.fs, folder.root, state.temporaries)
    check_same(folder, state.record, _identity(req, fmt, meta))
    beyond = sorted(i for i in state.done if i >= req.num)
    if beyond:
        raise RefusedError(f"output {folder.url!r} already holds samples up to index {beyond[-1]}, beyond "
                           f"--num {req.num}; use --num {beyond[-1] + 1} or another --out")
    missing = [i for i in range(req.num) if i not in state.done]
    where = folder.url

    if not missing and state.record is not None and "steps" in state.record:
        if state.manifest is None or state.manifest.get("count") != req.num:
            write_manifest(folder, {**state.record, "count": req.num}, {"samples_written": 0})
        return {"out": where, "count": req.num, "written": 0, "format": fmt, "resumed": True,
                "manifest": f"{where}/{MANIFEST}",
                "message": f"{req.num} samples already complete in {where} (nothing to do)"}

    pool = WorkerPool(req, worker_env(req.model))
    try:
        ready = time.perf_counter()
        info = pool.info
        record = {"kind": "ddpm-samples", **_identity(req, fmt, meta, info),
                  "seed_rule": f"sample i uses seed * {SEED_STRIDE} + i", "shape": info["shape"],
                  "levels": info["levels"], "T": info["T"]}
        check_same(folder, state.record, _identity(req, fmt, meta, info))
        if state.record is None or "steps" not in state.record:
            folder.write(JOB_FILE, json.dumps(record, indent=2).encode())
        if state.manifest is not None:  # it says "complete"; it comes back once that is true again
            folder.remove(MANIFEST)
        bar = _bar(len(missing), progress)
        bar.suffix = f" on {info['workers']} worker(s) -> {where}"

        def write(result: dict[str, Any]) -> None:
            names = write_unit(folder, fmt, result, info["levels"])
            bar.update(len(result["indices"]))
            if on_written is not None:
                on_written(names)

        units = units_of(missing, unit_size(len(missing), info["workers"], req.batch_size))
        pool.run(units, req.seed, write)
        bar.close()
    finally:
        pool.close()
    done = time.perf_counter()
    timings = {**_timings(start, ready, done, len(missing)), "load_s": round(info["load_s"], 3),
               "samples_written": len(missing)}
    manifest = write_manifest(folder, {**record, "count": req.num, "workers": info["workers"],
                                        "nodes_used": info["nodes_used"], "batch_size": req.batch_size}, timings)
    return {"out": where, "count": req.num, "written": len(missing), "format": fmt,
            "resumed": bool(state.done), "manifest": f"{where}/{MANIFEST}", "timings": timings,
            "workers": info["workers"], "steps": info["steps"], "model_version": manifest.get("model_version"),
            "message": (f"wrote {len(missing)} sample(s) ({req.num} in all, {fmt}) at "
                        f"{timings['samples_per_s']:.2f} samples/s on {info['workers']} worker(s); "
                        f"samples in {where}")}


def sample_command(model: str, num: int, out: str | None, sampler: str | None, steps: int | None, eta: float | None,
                   batch_size: int, nodes: int, gpus_per_node: int, seed: int, format: str, precision: str,
                   progressive: int, address: str | None, compile: bool = False) -> dict[str, Any]:
    """`ddpm-pipe sample`: see the module docstring."""
    req = SampleRequest(model=model, num=num, sampler=sampler, steps=steps, eta=eta, batch_size=batch_size,
                        nodes=nodes, gpus_per_node=gpus_per_node, seed=seed, precision=precision,
                        progressive=progressive, address=address, compile=compile)
    return write_samples(req, out, fmt=format)


__all__ = ["FORMATS", "PRECISIONS", "SAMPLERS", "SampleRequest", "SampleRun", "sample_arrays", "sample_command",
           "sample_seed", "sample_to_tensor", "write_samples"]
