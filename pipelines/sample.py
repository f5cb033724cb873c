"""`ddpm-pipe sample`: N samples of a model URI on the Ray cluster, resumably, to any fsspec URL.

How the work is spread: a pool of Ray actors, not tasks and not Ray Data.
- Each actor loads the model once (``pipelines.models.load``: EMA weights) and then serves work
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

import io
import json
import math
import os
import re
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ddpm.noise import SEED_STRIDE, sample_seed
from pipelines.errors import PipelineError, RefusedError, UsageError

SAMPLERS = ("ddpm", "ddim", "dpmpp")
FORMATS = ("png", "webdataset", "npz")
PRECISIONS = ("fp32", "bf16")
MANIFEST = "manifest.json"
JOB_FILE = ".ddpm-sample.json"
_PNG = re.compile(r"^(\d{8})\.png$")
_STRIP = re.compile(r"^(\d{8})-progressive\.png$")
_CHUNK = re.compile(r"^samples-(\d{8})-(\d{8})\.(npz|tar)$")
_PROBE = re.compile(r"^\.ddpm-probe-[0-9a-f]{8}$")  # OutputFolder.check_writable's probe
_CHUNK_EXT = {"npz": "npz", "webdataset": "tar"}
# Settings that must match for a folder to be resumed: a sample depends on all of them.
# -- the request ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleRequest:
    """What to sample; ``steps=None`` means the sampler's default (T for ddpm, 50 ddim, 20 dpmpp)."""

    model: str
    num: int
    sampler: str = "ddim"
    steps: int | None = None
    eta: float = 0.0
    batch_size: int = 256
    nodes: int = 1
    gpus_per_node: int = 0
    seed: int = 0
    precision: str = "fp32"
    progressive: int = 0
    address: str | None = None
    compile: bool = False  # torch.compile each worker's network (eager if it fails); speed only

    def validate(self) -> None:
        _choice("--sampler", self.sampler, SAMPLERS)
        _choice("--precision", self.precision, PRECISIONS)
        for name, value, low in (("--num", self.num, 1), ("--batch-size", self.batch_size, 1),
                                 ("--nodes", self.nodes, 1), ("--gpus-per-node", self.gpus_per_node, 0),
                                 ("--progressive", self.progressive, 0)):
            if value < low:
                raise UsageError(f"{name} must be >= {low}, got {value}")
        if self.steps is not None and self.steps < 1:
            raise UsageError(f"--steps must be >= 1, got {self.steps}")
        if self.eta < 0:
            raise UsageError(f"--eta must be >= 0, got {self.eta}")
        if self.eta != 0 and self.sampler != "ddim":
            raise UsageError(f"--eta {self.eta} only applies to --sampler ddim, not {self.sampler}")
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


# -- the Ray side ----------------------------------------------------------------------------------
class SampleWorker:
    """One Ray actor: loads the model once, then samples units of indices (see the module docstring)."""

    def __init__(self, uri: str, sampler: str, steps: int | None, eta: float, precision: str,
                 progressive: int, threads: int, env: dict[str, str], compile: bool = False) -> None:
        self._error: Exception | None = None
        try:
            self._setup(uri, sampler, steps, eta, precision, progressive, threads, env, compile)
        except Exception as e:  # raised from info(): an actor that dies in __init__ loses the cause
            self._error = e

    def _setup(self, uri: str, sampler: str, steps: int | None, eta: float, precision: str,
               progressive: int, threads: int, env: dict[str, str], compile: bool) -> None:
        import torch

        from ddpm.inference import SamplingNet
        from ddpm.pipeline import DDPMPipeline
        from ddpm.samplers import default_steps
        from pipelines.models import load

        os.environ.update(env)  # the tracking store; never credentials (workers read their own)
        torch.set_num_threads(int(os.environ.get("DDPM_TORCH_THREADS") or 0) or max(1, threads))
        start = time.perf_counter()
        loaded = load(uri)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # Weights cast once and channels-last (ddpm/inference.py): faster than autocast per call.
        self.model = SamplingNet(loaded.model.to(self.device), precision=precision, compile=compile,
                                 log=lambda m: print(f"[sample] {m}", file=sys.stderr, flush=True))
        self.diffusion = loaded.diffusion
        cfg = loaded.config
        T = self.diffusion.num_timesteps
        self.progressive = progressive
        steps = steps if steps is not None else default_steps(sampler, T)
        if steps > T:
            raise UsageError(f"--steps {steps} exceeds the model's T={T}")
        # The driver sizes units to --batch-size, and a unit is sampled as one batch.
        self.pipe = DDPMPipeline.from_config(self.model, cfg, self.diffusion, sampler=sampler, steps=steps,
                                             eta=eta, batch_size=sys.maxsize)
        self.shape = self.pipe.image_shape
        self._info = {"steps": self.pipe.steps, "T": T, "shape": list(self.shape), "levels": cfg.data.levels,
                      "clip_denoised": cfg.sample.clip_denoised, "load_s": time.perf_counter() - start,
                      "device": str(self.device)}

    def info(self) -> dict[str, Any]:
        if self._error is not None:
            raise self._error
        return {**self._info, "node_id": _node_id()}

    def sample(self, indices: list[int], seed: int) -> dict[str, Any]:
        """x_0 for ``indices`` as float32 ``[n x C x H x W]`` (and the progressive predictions)."""
        start = time.perf_counter()
        out = self.pipe.from_seeds([sample_seed(seed, i) for i in indices], progressive=self.progressive)
        x, preds = out if self.progressive else (out, None)
        return {"indices": list(indices), "seconds": time.perf_counter() - start,
                "x": x.float().cpu().numpy(),
                "progressive": None if preds is None else preds.float().cpu().numpy().swapaxes(0, 1)}


def _node_id() -> str:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return ray.get_runtime_context().get_node_id()
    return "local"


def runs_in_process(req: SampleRequest) -> bool:
    """A one-worker CPU job with no cluster to use runs in this process: no Ray instance to start and
    no actor to launch, which were most of a small local job's time (seconds, not tens of seconds).
    With ``--nodes`` above 1, ``--address``, ``RAY_ADDRESS`` or Ray already running here, the job
    goes to Ray as before; ``DDPM_SAMPLE_IN_PROCESS=0`` sends every job there (to compare)."""
    ray = sys.modules.get("ray")
    if os.environ.get("DDPM_SAMPLE_IN_PROCESS", "1") == "0":
        return False
    return (req.nodes == 1 and req.gpus_per_node == 0 and not req.address and not os.environ.get("RAY_ADDRESS")
            and not (ray is not None and ray.is_initialized()))


class WorkerPool:
    """``nodes * max(gpus_per_node, 1)`` :class:`SampleWorker` actors in one placement group, or one
    :class:`SampleWorker` in this process (:func:`runs_in_process`)."""

    def __init__(self, req: SampleRequest, env: dict[str, str]) -> None:
        self.actors: list[Any] = []
        self.pg = None
        self.started = False
        self._local: SampleWorker | None = None
        if runs_in_process(req):
            self._local = SampleWorker(req.model, req.sampler, req.steps, req.eta, req.precision, req.progressive,
                                       os.cpu_count() or 1, {}, req.compile)
            self.info = {k: v for k, v in self._local.info().items() if k != "node_id"}
            self.info.update(workers=1, nodes_used=1)
            return
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from pipelines import cluster

        self._ray = ray
        self.started = cluster.connect(req.address, min_cpus=req.nodes * max(req.gpus_per_node, 1))
        try:
            placement = cluster.plan(req.nodes, req.gpus_per_node, started_locally=self.started)
            bundle = {"CPU": placement.cpus_per_worker, **({"GPU": 1} if placement.use_gpu else {})}
            self.pg = ray.util.placement_group([bundle] * placement.workers, strategy=placement.strategy)
            try:
                ray.get(self.pg.ready(), timeout=120)
            except ray.exceptions.GetTimeoutError:
                raise PipelineError(f"the cluster could not place {placement.workers} sampling worker(s) "
                                    f"({placement.strategy}) within 120 s") from None
            remote = ray.remote(SampleWorker)
            for k in range(placement.workers):
                self.actors.append(remote.options(
                    max_restarts=2, max_task_retries=2,  # a killed worker is restarted, its unit redone
                    num_cpus=placement.cpus_per_worker, num_gpus=1 if placement.use_gpu else 0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=k),
                ).remote(req.model, req.sampler, req.steps, req.eta, req.precision, req.progressive,
                         placement.threads_per_worker, env, req.compile))
            infos = self._get([a.info.remote() for a in self.actors])
        except BaseException:
            self.close()
            raise
        self.info = {k: v for k, v in infos[0].items() if k not in ("load_s", "node_id")}
        self.info["workers"] = len(self.actors)
        self.info["nodes_used"] = len({i["node_id"] for i in infos})
        self.info["load_s"] = max(i["load_s"] for i in infos)

    def _get(self, refs: Any) -> Any:
        try:
            return self._ray.get(refs)
        except self._ray.exceptions.RayError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, PipelineError):
                raise cause from None
            raise PipelineError(f"a sampling worker failed: {_first_line(e)}") from e

    def run(self, units: Iterable[list[int]], seed: int, on_result: Callable[[dict[str, Any]], None]) -> None:
        """Sample every unit; ``on_result`` gets each unit's result on the driver as it arrives."""
        if self._local is not None:
            for unit in units:
                on_result(self._local.sample(unit, seed))
            return
        queue = deque(units)
        pending: dict[Any, Any] = {}
        for actor in self.actors:
            if queue:
                pending[actor.sample.remote(queue.popleft(), seed)] = actor
        while pending:
            ready, _ = self._ray.wait(list(pending), num_returns=1)
            actor = pending.pop(ready[0])
            if queue:  # keep the actor busy while the driver writes
                pending[actor.sample.remote(queue.popleft(), seed)] = actor
            on_result(self._get(ready[0]))

    def close(self) -> None:
        if self._local is not None:
            return
        for actor in self.actors:
            try:
                self._ray.kill(actor)
            except Exception:
                pass
        if self.pg is not None:
            try:
                self._ray.util.remove_placement_group(self.pg)
            except Exception:
                pass
        if self.started:
            self._ray.shutdown()


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:400]


def _worker_env(model: str) -> dict[str, str]:
    """What workers need to resolve a model URI: the tracking store (no secrets: a URI holding
    credentials is left out, the workers read their own, see :func:`pipelines.settings.shareable_uri`)."""
    env: dict[str, str] = {}
    if model.startswith(("runs:/", "models:/")):
        import mlflow

        from pipelines.settings import shareable_uri

        uris = {"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "MLFLOW_REGISTRY_URI": mlflow.get_registry_uri()}
        env = {k: v for k, v in uris.items() if shareable_uri(v)}
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "DDPM_HOME", "DDPM_TORCH_THREADS"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


def check_model(model: str) -> dict[str, Any]:
    """Check the model URI exists (no download) after pointing MLflow at the resolved store."""
    from pipelines import models

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

            from pipelines.registry import MODEL_ARTIFACT, WEIGHTS_ARTIFACT

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


def units_of(indices: list[int], size: int) -> list[list[int]]:
    """Split sorted ``indices`` into runs of consecutive indices of at most ``size`` each."""
    units: list[list[int]] = []
    for i in indices:
        if units and units[-1][-1] == i - 1 and len(units[-1]) < size:
            units[-1].append(i)
        else:
            units.append([i])
    return units


def _unit_size(missing: int, workers: int, batch_size: int) -> int:
    """At most ``batch_size``, and small enough that every worker gets a unit."""
    return max(1, min(batch_size, math.ceil(missing / max(workers, 1))))


# -- in memory (for `evaluate`) --------------------------------------------------------------------
def sample_arrays(req: SampleRequest, progress: bool = True) -> SampleRun:
    """Sample ``req.num`` images on the cluster and return them to the driver (nothing written)."""
    import torch

    req.validate()
    meta = check_model(req.model)
    start = time.perf_counter()
    pool = WorkerPool(req, _worker_env(req.model))
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

        pool.run(units_of(list(range(req.num)), _unit_size(req.num, len(pool.actors), req.batch_size)),
                 req.seed, keep)
        bar.close()
        info = {**pool.info, **meta}
    finally:
        pool.close()
    done = time.perf_counter()
    x = torch.from_numpy(np.stack([xs[i] for i in range(req.num)]))
    preds = torch.from_numpy(np.stack([ps[i] for i in range(req.num)])) if ps else None
    return SampleRun(x=x, progressive=preds, info=info, timings=_timings(start, ready, done, req.num))


def sample_to_tensor(model: str, num: int, sampler: str = "ddim", steps: int | None = None, eta: float = 0.0,
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
    from tqdm import tqdm

    return tqdm(total=total, unit="sample", desc="sample", disable=not enabled, dynamic_ncols=True,
                smoothing=0.1)


# -- the output folder ------------------------------------------------------------------------------
class OutputFolder:
    """The output URL: what it holds, whether it is ours, and atomic writes into it."""

    def __init__(self, url: str) -> None:
        from ddpm.data.storage import open_fs, storage_options_for

        self.url = url.rstrip("/") or url
        try:
            self.fs, self.root = open_fs(self.url, storage_options_for(self.url))
        except Exception as e:
            raise UsageError(f"output {url!r} cannot be opened: {_first_line(e)}") from e

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def names(self) -> list[str]:
        from pipelines.outputs import listing

        return listing(self.fs, self.root, self.url)

    def check_writable(self) -> None:
        """Write and delete a probe object, so a bad URL fails before any sampling; a local folder
        made for the probe is removed again (nothing is left until the job has checked everything)."""
        from ddpm.data.storage import is_local
        from pipelines.outputs import missing_folders, remove_if_empty

        probe = self.path(f".ddpm-probe-{uuid.uuid4().hex[:8]}")
        made = missing_folders(self.root) if is_local(self.fs) else []
        try:
            if is_local(self.fs):
                self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"")
            self.fs.rm(probe)
        except Exception as e:
            raise UsageError(f"output {self.url!r} is not writable: {_first_line(e)}") from e
        finally:
            remove_if_empty(made)

    def lock(self):
        """The folder's one-writer lock (``with folder.lock():``; :class:`pipelines.outputs.FolderLock`)."""
        from pipelines.outputs import FolderLock

        return FolderLock(self.fs, self.root, self.url, "sample")

    def read_json(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.fs.cat_file(self.path(name)))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RefusedError(f"{self.url}/{name} is not a sampling record; refusing to write there") from None

    def write(self, name: str, data: bytes) -> None:
        from ddpm.data.storage import atomic_write

        atomic_write(self.fs, self.path(name), data)

    def remove(self, name: str) -> None:
        self.fs.rm(self.path(name))


@dataclass
class FolderState:
    done: set[int]
    record: dict[str, Any] | None  # the job file, else the manifest
    manifest: dict[str, Any] | None
    temporaries: list[str] = field(default_factory=list)  # ours, half-written (atomic_write's)


def _is_ours(name: str) -> bool:
    return bool(name in (MANIFEST, JOB_FILE) or _PROBE.match(name) or _PNG.match(name) or _STRIP.match(name)
                or _CHUNK.match(name))


def inspect_folder(folder: OutputFolder, fmt: str) -> FolderState:
    """Indices present, and the settings record; refuse a folder holding anything that is not ours.

    Reads only: ownership is decided before anything is touched (``pipelines.outputs``); the caller
    removes dead jobs' temporaries once it holds the folder's lock.
    """
    from pipelines.outputs import TEMP, refuse_foreign

    names = folder.names()
    temporaries = refuse_foreign(folder.url, names, _is_ours, "samples of this tool")
    done: set[int] = set()
    ours = 0
    for name in names:
        if name in (MANIFEST, JOB_FILE) or TEMP.match(name) or _PROBE.match(name):
            continue
        if m := _PNG.match(name):
            ours += 1
            if fmt == "png":
                done.add(int(m.group(1)))
        elif _STRIP.match(name):
            ours += 1
        elif m := _CHUNK.match(name):
            ours += 1
            if fmt != "png" and m.group(3) == _CHUNK_EXT[fmt]:
                done.update(range(int(m.group(1)), int(m.group(2))))
    manifest = folder.read_json(MANIFEST)
    job = folder.read_json(JOB_FILE)
    record = job if job is not None else manifest
    if ours and record is None:
        raise RefusedError(f"output {folder.url!r} holds samples with no record of their settings "
                           f"({JOB_FILE} or {MANIFEST}); choose an empty or new folder")
    return FolderState(done=done, record=record, manifest=manifest, temporaries=temporaries)


def _check_same(folder: OutputFolder, record: dict[str, Any] | None, wanted: dict[str, Any]) -> None:
    if record is None:
        return
    diff = [f"{k}={record.get(k)!r} (asked {wanted[k]!r})" for k in wanted if record.get(k) != wanted[k]]
    if diff:
        raise RefusedError(f"output {folder.url!r} holds samples made with other settings: {'; '.join(diff)}. "
                           "Use another --out, or the same settings to resume")


def _identity(req: SampleRequest, fmt: str, meta: dict[str, Any], steps: int | None) -> dict[str, Any]:
    ident = {"model": req.model, "model_run_id": meta.get("run_id"), "model_name": meta.get("name"),
             "model_version": meta.get("version"), "sampler": req.sampler, "steps": steps,
             "eta": float(req.eta), "seed": int(req.seed), "format": fmt, "precision": req.precision,
             "progressive": int(req.progressive)}
    if steps is None:
        del ident["steps"]  # unknown until a worker has read the model's T
    return ident


def _default_out(req: SampleRequest, meta: dict[str, Any]) -> str:
    from pipelines.settings import resolve

    if meta.get("name"):
        base = f"{meta['name']}-v{meta['version']}"
    elif meta.get("run_id"):
        base = f"run-{meta['run_id']}"
    else:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", req.model.rstrip("/").rsplit("/", 1)[-1]).strip("-.") or "model"
    return resolve().samples_url(f"{base}-{req.sampler}{req.steps or ''}-seed{req.seed}")


# -- encoding -------------------------------------------------------------------------------------
def _png(x: np.ndarray, levels: int) -> bytes:
    """One image ``[C x H x W]`` in [-1, 1] -> PNG bytes (quantised to the data's levels, 0..255)."""
    import torch

    from ddpm.data.shards import encode_png
    from ddpm.image import to_uint8

    return encode_png(to_uint8(torch.tensor(x[None]), levels)[0])


def _strip_png(preds: np.ndarray, levels: int) -> bytes:
    """The K predictions ``[K x C x H x W]`` of one sample as a row (the paper's figure 6)."""
    import torch

    from ddpm.image import grid, png_bytes

    return png_bytes(grid(torch.tensor(preds), levels=levels, nrow=len(preds), pad=1))


def _uint8(x: np.ndarray, levels: int) -> np.ndarray:
    import torch

    from ddpm.image import to_uint8

    return to_uint8(torch.tensor(x), levels)


def write_unit(folder: OutputFolder, fmt: str, result: dict[str, Any], levels: int) -> list[str]:
    """Write one unit's samples atomically; return the file names written."""
    indices, x, preds = result["indices"], result["x"], result["progressive"]
    if fmt == "png":
        names = []
        for k, i in enumerate(indices):
            if preds is not None:  # the strip first: the sample's PNG marks the index done
                folder.write(f"{i:08d}-progressive.png", _strip_png(preds[k], levels))
            folder.write(f"{i:08d}.png", _png(x[k], levels))
            names.append(f"{i:08d}.png")
        return names
    name = f"samples-{indices[0]:08d}-{indices[-1] + 1:08d}.{_CHUNK_EXT[fmt]}"
    if fmt == "npz":
        arrays = {"indices": np.asarray(indices, dtype=np.int64), "x": x.astype(np.float32),
                  "images": _uint8(x, levels)}
        if preds is not None:
            n, k = preds.shape[:2]
            arrays["progressive"] = _uint8(preds.reshape(n * k, *preds.shape[2:]), levels).reshape(
                n, k, *preds.shape[3:], preds.shape[2])
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        folder.write(name, buf.getvalue())
    else:
        from ddpm.data.shards import build_tar

        members = []
        for k, i in enumerate(indices):
            members.append((f"{i:08d}.png", _png(x[k], levels)))
            if preds is not None:
                members.append((f"{i:08d}.progressive.png", _strip_png(preds[k], levels)))
        folder.write(name, build_tar(members))
    return [name]


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
    from pipelines.outputs import remove_stale_temporaries

    state = inspect_folder(folder, fmt)
    remove_stale_temporaries(folder.fs, folder.root, state.temporaries)
    _check_same(folder, state.record, _identity(req, fmt, meta, req.steps))
    beyond = sorted(i for i in state.done if i >= req.num)
    if beyond:
        raise RefusedError(f"output {folder.url!r} already holds samples up to index {beyond[-1]}, beyond "
                           f"--num {req.num}; use --num {beyond[-1] + 1} or another --out")
    missing = [i for i in range(req.num) if i not in state.done]
    where = folder.url

    if not missing and state.record is not None and "steps" in state.record:
        if state.manifest is None or state.manifest.get("count") != req.num:
            _write_manifest(folder, {**state.record, "count": req.num}, {"samples_written": 0})
        return {"out": where, "count": req.num, "written": 0, "format": fmt, "resumed": True,
                "manifest": f"{where}/{MANIFEST}",
                "message": f"{req.num} samples already complete in {where} (nothing to do)"}

    pool = WorkerPool(req, _worker_env(req.model))
    try:
        ready = time.perf_counter()
        info = pool.info
        record = {"kind": "ddpm-samples", **_identity(req, fmt, meta, info["steps"]),
                  "seed_rule": f"sample i uses seed * {SEED_STRIDE} + i", "shape": info["shape"],
                  "levels": info["levels"], "T": info["T"]}
        _check_same(folder, state.record, _identity(req, fmt, meta, info["steps"]))
        if state.record is None or "steps" not in state.record:
            folder.write(JOB_FILE, json.dumps(record, indent=2).encode())
        if state.manifest is not None:  # it says "complete"; it comes back once that is true again
            folder.remove(MANIFEST)
        bar = _bar(len(missing), progress)
        bar.set_postfix_str(f"{info['workers']} worker(s) -> {where}", refresh=False)

        def write(result: dict[str, Any]) -> None:
            names = write_unit(folder, fmt, result, info["levels"])
            bar.update(len(result["indices"]))
            if on_written is not None:
                on_written(names)

        units = units_of(missing, _unit_size(len(missing), info["workers"], req.batch_size))
        pool.run(units, req.seed, write)
        bar.close()
    finally:
        pool.close()
    done = time.perf_counter()
    timings = {**_timings(start, ready, done, len(missing)), "load_s": round(info["load_s"], 3),
               "samples_written": len(missing)}
    manifest = _write_manifest(folder, {**record, "count": req.num, "workers": info["workers"],
                                        "nodes_used": info["nodes_used"], "batch_size": req.batch_size}, timings)
    return {"out": where, "count": req.num, "written": len(missing), "format": fmt,
            "resumed": bool(state.done), "manifest": f"{where}/{MANIFEST}", "timings": timings,
            "workers": info["workers"], "steps": info["steps"], "model_version": manifest.get("model_version"),
            "message": (f"wrote {len(missing)} sample(s) ({req.num} in all, {fmt}) at "
                        f"{timings['samples_per_s']:.2f} samples/s on {info['workers']} worker(s); "
                        f"samples in {where}")}


def _write_manifest(folder: OutputFolder, record: dict[str, Any], timings: dict[str, Any]) -> dict[str, Any]:
    import ddpm

    fmt = record["format"]
    manifest = {**record, "ddpm_version": ddpm.__version__, "timings": timings,
                "files": ("{i:08d}.png" if fmt == "png" else f"samples-{{start:08d}}-{{end:08d}}.{_CHUNK_EXT[fmt]}"),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    folder.write(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
    return manifest


def sample_command(model: str, num: int, out: str | None, sampler: str, steps: int | None, eta: float,
                   batch_size: int, nodes: int, gpus_per_node: int, seed: int, format: str, precision: str,
                   progressive: int, address: str | None, compile: bool = False) -> dict[str, Any]:
    """`ddpm-pipe sample`: see the module docstring."""
    req = SampleRequest(model=model, num=num, sampler=sampler, steps=steps, eta=eta, batch_size=batch_size,
                        nodes=nodes, gpus_per_node=gpus_per_node, seed=seed, precision=precision,
                        progressive=progressive, address=address, compile=compile)
    return write_samples(req, out, fmt=format)


__all__ = ["FORMATS", "PRECISIONS", "SAMPLERS", "SampleRequest", "SampleRun", "sample_arrays", "sample_command",
           "sample_seed", "sample_to_tensor", "write_samples"]
