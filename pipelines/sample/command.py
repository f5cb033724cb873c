"""`ddpm-pipe sample`: N samples of a model URI on the Ray cluster, resumably, to any fsspec URL.

This file holds the command; the request is ``pipelines/sample/request.py``, the workers
``pipelines/sample/pool.py``, the output folder (ownership, resume, encoders, manifest)
``pipelines/sample/output.py``.

The driver reads the model's config (not its weights, :func:`pipelines.registry.models.read_config`)
and settles the sampler, steps and eta once (:meth:`SampleRequest.resolved`); the workers get
those values and build their :class:`ddpm.pipeline.DDPMPipeline` from them.

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
- ``png``: ``{i:08d}.png`` (``{i:08d}-class{c}.png`` when sample i asked for class c), plus
  ``{i:08d}-progressive.png`` (written first) with ``--progressive K``;
- ``npz``: ``samples-{start:08d}-{end:08d}.npz`` holding ``indices``, ``x`` (float32 in [-1, 1],
  ``[n x C x H x W]``), ``images`` (uint8 ``[n x H x W x C]``), ``labels`` (int64, the class each
  asked for) with classes, and ``progressive`` (uint8 ``[n x K x H x W x C]``) with ``--progressive``;
- ``webdataset``: ``samples-{start:08d}-{end:08d}.tar`` with ``{i:08d}.png`` (and ``{i:08d}.cls``,
  the class asked for, and ``{i:08d}.progressive.png``) members;
- ``.ddpm-sample.json``: the settings, written before the first sample; ``manifest.json``: the
  settings (``classes`` and ``guidance`` among them), count, timings and samples/s, and with
  classes every sample's class (``labels``), written last, once every index exists.

Resuming: an index is done when its PNG exists or a chunk file's name covers it; a re-run samples
the missing indices only, in new chunks, so chunk files never overlap whatever ``--batch-size`` is.
A folder holding other files, or samples of another model or other settings, is refused (exit 3).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ddpm.config import ExperimentConfig
from ddpm.noise import SEED_STRIDE, sample_seed
from pipelines.console import Progress
from pipelines.errors import RefusedError
from pipelines.registry import models
from pipelines.sample.output import (JOB_FILE, MANIFEST, FolderState, OutputFolder, check_same, inspect_folder,
                                     write_manifest, write_unit)
from pipelines.sample.pool import WorkerPool, unit_size, units_of, worker_env
from pipelines.sample.request import SampleRequest, check_format
from pipelines.settings import redact, resolve
from pipelines.storage.outputs import remove_stale_temporaries


@dataclass
class SampleRun:
    """What :func:`sample_arrays` returns: x_0 ``[N x C x H x W]`` in [-1, 1] and the timings."""

    x: torch.Tensor
    progressive: torch.Tensor | None  # [N x K x C x H x W] with req.progressive = K
    info: dict[str, Any]
    labels: list[int] | None = None  # the class sample i asked for (None: no class asked)
    timings: dict[str, float] = field(default_factory=dict)


def settle(req: SampleRequest) -> tuple[SampleRequest, ExperimentConfig, dict[str, str | None]]:
    """Check ``req`` and the model, then fill in the model's own settings: ``(resolved request, the
    model's config, what the model URI names)``; nothing is sampled or written. The model URI is
    resolved here once: the request's ``pinned`` (``models:/NAME/VERSION`` for an alias) is what
    every worker loads, and what the manifest's ``model_version`` names."""
    req.validate()
    meta = models.describe(req.model)
    pinned = models.pinned(req.model, meta)
    config = models.read_config(pinned)
    return replace(req.resolved(config), pinned=pinned), config, meta


# -- in memory (for `evaluate`) --------------------------------------------------------------------
def sample_arrays(req: SampleRequest, progress: bool = True) -> SampleRun:
    """Sample ``req.num`` images on the cluster and return them to the driver (nothing written)."""
    req, _config, meta = settle(req)
    start = time.perf_counter()
    pool = WorkerPool(req, worker_env(req.model))
    try:
        ready = time.perf_counter()
        xs: dict[int, np.ndarray] = {}
        ps: dict[int, np.ndarray] = {}
        bar = Progress("sample", req.num, "sample", enabled=progress)

        def keep(result: dict[str, Any]) -> None:
            for k, i in enumerate(result["indices"]):
                xs[i] = result["x"][k]
                if result["progressive"] is not None:
                    ps[i] = result["progressive"][k]
            bar.at(len(xs))

        pool.run(units_of(list(range(req.num)), unit_size(req.num, len(pool.actors), req.batch_size)),
                 req.seed, keep, on_partial=lambda k: bar.at(len(xs) + k))
        bar.close()
        info = {**pool.info, **meta}
    finally:
        pool.close()
    done = time.perf_counter()
    x = torch.from_numpy(np.stack([xs[i] for i in range(req.num)]))
    preds = torch.from_numpy(np.stack([ps[i] for i in range(req.num)])) if ps else None
    return SampleRun(x=x, progressive=preds, info=info, timings=_timings(start, ready, done, req.num),
                     labels=req.labels(list(range(req.num))))


def sample_to_tensor(model: str, num: int, sampler: str | None = None, steps: int | None = None,
                     eta: float | None = None, batch_size: int = 256, nodes: int = 1, gpus_per_node: int = 0,
                     seed: int = 0, precision: str = "fp32", address: str | None = None,
                     progress: bool = True, classes: tuple[int, ...] = (),
                     guidance: float | None = None) -> torch.Tensor:
    """``num`` samples ``[num x C x H x W]`` (float32 in [-1, 1]) through the same Ray job as ``sample``.

    Sample i is the same as ``ddpm-pipe sample --seed SEED`` writes as index i (with ``classes``,
    asking for ``classes[i mod len(classes)]`` with ``guidance``).
    """
    req = SampleRequest(model=model, num=num, sampler=sampler, steps=steps, eta=eta, batch_size=batch_size,
                        nodes=nodes, gpus_per_node=gpus_per_node, seed=seed, precision=precision,
                        address=address, classes=tuple(classes), guidance=guidance)
    return sample_arrays(req, progress=progress).x


def _timings(start: float, ready: float, done: float, count: int) -> dict[str, float]:
    sample_s = max(done - ready, 1e-9)
    return {"startup_s": round(ready - start, 3), "sample_s": round(sample_s, 3),
            "total_s": round(done - start, 3), "samples_per_s": round(count / sample_s, 3) if count else 0.0}


def _identity(req: SampleRequest, fmt: str, meta: dict[str, Any]) -> dict[str, Any]:
    """What a folder's samples depend on (``req`` resolved: its sampler, steps and eta are the used ones)."""
    return {"model": redact(req.model), "model_run_id": meta.get("run_id"), "model_name": meta.get("name"),
            "model_version": meta.get("version"), "sampler": req.sampler, "steps": req.steps,
            "eta": float(req.eta), "seed": int(req.seed), "format": fmt, "precision": req.precision,
            "progressive": int(req.progressive),
            # None for an unconditional job, as in the records of before classes existed
            "classes": list(req.classes) or None, "guidance": req.guidance}


def _default_out(req: SampleRequest, meta: dict[str, Any]) -> str:
    """``<samples>/<model>-<what was asked>-seed<seed>`` (``req`` as asked, not resolved; ``<samples>``: :meth:`~pipelines.settings.Settings.samples_url`)."""
    if meta.get("name"):
        base = f"{meta['name']}-v{meta['version']}"
    elif meta.get("run_id"):
        base = f"run-{meta['run_id']}"
    else:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", req.model.rstrip("/").rsplit("/", 1)[-1]).strip("-.") or "model"
    setting = f"{req.sampler or ''}{req.steps or ''}" + (f"-eta{req.eta:g}" if req.eta is not None else "")
    classes = "balanced" if req.balanced else "-".join(map(str, req.classes))
    setting += (f"-class{classes}" if classes else "") + (f"-w{req.guidance:g}" if req.guidance is not None else "")
    return resolve().samples_url(f"{base}-{setting.lstrip('-') + '-' if setting else ''}seed{req.seed}")


# -- the command ----------------------------------------------------------------------------------
def write_samples(req: SampleRequest, out: str | None, fmt: str = "png", progress: bool = True,
                  on_written: Callable[[list[str]], None] | None = None) -> dict[str, Any]:
    """Sample the indices of ``range(req.num)`` missing from ``out`` and write them; manifest last.

    Everything is checked before any sampling: the options, that the model exists and the sampling
    setting fits it, that ``out`` is writable and holds nothing but this job's samples.
    ``on_written(names)`` is called after each unit's files are written (a hook for progress
    reporting and tests).
    """
    start = time.perf_counter()
    check_format(fmt)
    asked = req
    req, config, meta = settle(req)
    folder = OutputFolder(out or _default_out(asked, meta))
    try:
        inspect_folder(folder, fmt)  # refuses a folder that is not ours before anything touches it
    except OSError:  # not even readable as a folder (a path under a file): the probe says why, exit 2
        folder.check_writable()
        raise
    folder.check_writable()  # then a probe write, so a bad URL fails before any sampling
    with folder.lock():
        state = inspect_folder(folder, fmt)
        remove_stale_temporaries(folder.fs, folder.root, state.temporaries)
        record = {"kind": "ddpm-samples", **_identity(req, fmt, meta),
                  "seed_rule": f"sample i uses seed * {SEED_STRIDE} + i",
                  "shape": [config.model.in_channels, config.model.image_size, config.model.image_size],
                  "levels": config.data.levels, "T": config.diffusion.timesteps}
        check_same(folder, state.record, _identity(req, fmt, meta))
        missing = _missing(folder, state, req.num)
        if not missing and state.record is not None and "steps" in state.record:
            return _complete(folder, state, req.num, fmt)
        return _write_missing(req, folder, fmt, state, record, missing, start, progress, on_written)


def _missing(folder: OutputFolder, state: FolderState, num: int) -> list[int]:
    """The indices below ``num`` not in the folder; refuse one that holds samples beyond ``num``."""
    beyond = sorted(i for i in state.done if i >= num)
    if beyond:
        raise RefusedError(f"output {folder.url!r} already holds samples up to index {beyond[-1]}, beyond "
                           f"--num {num}; use --num {beyond[-1] + 1} or another --out")
    return [i for i in range(num) if i not in state.done]


def _complete(folder: OutputFolder, state: FolderState, num: int, fmt: str) -> dict[str, Any]:
    """Nothing is missing: (re)write the manifest if it does not say so, sample nothing."""
    if state.manifest is None or state.manifest.get("count") != num:
        write_manifest(folder, {**state.record, "count": num}, {"samples_written": 0})
    return {"out": folder.url, "count": num, "written": 0, "format": fmt, "resumed": True,
            "manifest": f"{folder.url}/{MANIFEST}",
            "message": f"{num} samples already complete in {folder.url} (nothing to do)"}


def _write_missing(req: SampleRequest, folder: OutputFolder, fmt: str, state: FolderState, record: dict[str, Any],
                   missing: list[int], start: float, progress: bool,
                   on_written: Callable[[list[str]], None] | None) -> dict[str, Any]:
    """Start the workers, record the job's settings, write the ``missing`` indices, manifest last."""
    pool = WorkerPool(req, worker_env(req.model))
    try:
        ready = time.perf_counter()
        info = pool.info
        if state.record is None or "steps" not in state.record:
            folder.write(JOB_FILE, json.dumps(record, indent=2).encode())
        if state.manifest is not None:  # it says "complete"; it comes back once that is true again
            folder.remove(MANIFEST)
        bar = Progress("sample", len(missing), "sample", enabled=progress)
        bar.suffix = f" on {info['workers']} worker(s) -> {folder.url}"

        written = [0]

        def write(result: dict[str, Any]) -> None:
            names = write_unit(folder, fmt, result, record["levels"])
            written[0] += len(result["indices"])
            bar.at(written[0])
            if on_written is not None:
                on_written(names)

        # In this process, the bar also moves within a unit, by its share of the network calls.
        pool.run(units_of(missing, unit_size(len(missing), info["workers"], req.batch_size)), req.seed, write,
                 on_partial=lambda k: bar.at(written[0] + k))
        bar.close()
    finally:
        pool.close()
    timings = {**_timings(start, ready, time.perf_counter(), len(missing)), "load_s": round(info["load_s"], 3),
               "samples_written": len(missing)}
    manifest = write_manifest(folder, {**record, "count": req.num, "workers": info["workers"],
                                        "nodes_used": info["nodes_used"], "batch_size": req.batch_size}, timings)
    asked = f"; classes {', '.join(map(str, req.classes))} in turn, guidance {req.guidance:g}" if req.classes else ""
    return {"out": folder.url, "count": req.num, "written": len(missing), "format": fmt,
            "resumed": bool(state.done), "manifest": f"{folder.url}/{MANIFEST}", "timings": timings,
            "workers": info["workers"], "steps": req.steps, "model_version": manifest.get("model_version"),
            "classes": list(req.classes) or None, "guidance": req.guidance,
            "message": (f"wrote {len(missing)} sample(s) ({req.num} in all, {fmt}) at "
                        f"{timings['samples_per_s']:.2f} samples/s on {info['workers']} worker(s){asked}; "
                        f"samples in {folder.url}")}


def sample_command(model: str, num: int, out: str | None, sampler: str | None, steps: int | None, eta: float | None,
                   batch_size: int, nodes: int, gpus_per_node: int, seed: int, format: str, precision: str,
                   progressive: int, address: str | None, compile: bool = False, classes: tuple[int, ...] = (),
                   balanced: bool = False, guidance: float | None = None) -> dict[str, Any]:
    """`ddpm-pipe sample`: see the module docstring."""
    req = SampleRequest(model=model, num=num, sampler=sampler, steps=steps, eta=eta, batch_size=batch_size,
                        nodes=nodes, gpus_per_node=gpus_per_node, seed=seed, precision=precision,
                        progressive=progressive, address=address, compile=compile, classes=tuple(classes),
                        balanced=balanced, guidance=guidance)
    return write_samples(req, out, fmt=format)


__all__ = ["SampleRequest", "SampleRun", "sample_arrays", "sample_command", "sample_seed", "sample_to_tensor",
           "settle", "write_samples"]
