"""What a serving replica holds: the model it samples (:class:`ServedModel`) and, for an alias, the
registry poll that swaps in the version the alias moves to (:class:`ModelHolder`). No Ray here.

Sampling is ``sample``'s: a :class:`ddpm.pipeline.DDPMPipeline` over the EMA network
(:class:`ddpm.inference.SamplingNet`), one noise seed per image, so image i of ``{"seed": s}`` is
``sample --seed s``'s sample i. Requests batched together (:mod:`pipelines.serve.batcher`) that share a setting
(:attr:`pipelines.serve.api.SamplesRequest.setting`) run as one network batch; an image does not
depend on its batch-mates beyond float rounding (below 1e-4, ``docs/PERFORMANCE.md``), and a request
sampled alone runs as ``sample`` runs it, in one batch of at most 256.

The alias moves, the service follows: :meth:`ModelHolder.poll` asks the registry where the alias
points; a new version is loaded beside the one serving (in the poll's thread), then
:attr:`ModelHolder.current` is replaced by one assignment. A batch takes ``current`` once, when it
starts, and samples its requests with that model whatever happens meanwhile: no request sees a
half-loaded model, and every answer names the version that sampled it. A registry that cannot be
reached, or a version that fails to load, leaves the serving model in place (one line on stderr).
"""

from __future__ import annotations

import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ddpm.config import ExperimentConfig
from ddpm.inference import SamplingNet
from ddpm.pipeline import DDPMPipeline, sampling_settings
from pipelines.registry import models
from pipelines.serve.api import SamplesRequest

BATCH_SIZE = 256  # images per network call: sample's default --batch-size, so a lone request is one batch
PIPELINES_KEPT = 8  # pipelines (one per sampling setting) a model keeps built


def follows(uri: str) -> bool:
    """Whether ``uri`` can move to another version: ``models:/NAME@ALIAS`` or ``models:/NAME/latest``."""
    if not uri.startswith("models:/"):
        return False
    rest = uri[len("models:/"):]
    return "@" in rest or rest.rstrip("/").endswith("/latest")


@dataclass
class ServedModel:
    """One loaded model version and the pipelines built for it (one per sampling setting)."""

    uri: str  # as the service was asked (an alias stays an alias)
    pinned: str  # exactly what was loaded: models:/NAME/VERSION for an alias
    config: ExperimentConfig
    net: SamplingNet
    diffusion: object  # ddpm.diffusion.Diffusion
    name: str | None
    version: str | None
    run_id: str | None
    loaded_at: float
    _pipes: OrderedDict = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, uri: str, pinned: str | None = None) -> ServedModel:
        """The EMA model behind ``pinned`` (default ``uri``), on the GPU when there is one."""
        loaded = models.load(pinned or uri)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        net = SamplingNet(loaded.model.to(device), precision="fp32")
        return cls(uri=uri, pinned=loaded.pinned, config=loaded.config, net=net, diffusion=loaded.diffusion,
                   name=loaded.name, version=loaded.version, run_id=loaded.run_id, loaded_at=time.time())

    @property
    def num_timesteps(self) -> int:
        return self.diffusion.num_timesteps

    @property
    def levels(self) -> int:
        return self.config.data.levels

    def describe(self) -> dict[str, object]:
        """What ``GET /v1/model`` says: the model, the version that answers, and the sampling defaults."""
        sampler, steps, eta = sampling_settings(self.config.sample, self.num_timesteps)
        m = self.config.model
        return {"uri": self.uri, "pinned": self.pinned, "name": self.name, "version": self.version,
                "alias": self.uri.partition("@")[2] or None, "run": self.run_id,
                "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
                "defaults": {"sampler": sampler, "steps": steps, "eta": eta,
                             "guidance": self.config.sample.guidance if m.num_classes else None},
                "T": self.num_timesteps, "num_classes": m.num_classes,
                "image_shape": [m.in_channels, m.image_size, m.image_size]}

    def _pipe(self, req: SamplesRequest) -> DDPMPipeline:
        with self._lock:
            key = req.setting
            if key not in self._pipes:
                self._pipes[key] = DDPMPipeline.from_config(
                    self.net, self.config, self.diffusion, sampler=req.sampler, steps=req.steps, eta=req.eta,
                    batch_size=BATCH_SIZE, guidance=req.guidance)
                while len(self._pipes) > PIPELINES_KEPT:
                    self._pipes.popitem(last=False)
            self._pipes.move_to_end(key)
            return self._pipes[key]

    def sample(self, requests: list[SamplesRequest]) -> list[np.ndarray]:
        """x_0 ``[n x C x H x W]`` (float32 in [-1, 1]) for each request; those of one setting run as
        one :meth:`ddpm.pipeline.DDPMPipeline.from_seeds` call."""
        out: list[np.ndarray | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for k, req in enumerate(requests):
            groups.setdefault(req.setting, []).append(k)
        for members in groups.values():
            first = requests[members[0]]
            seeds = [s for k in members for s in requests[k].seeds]
            labels = None if first.labels is None else [c for k in members for c in requests[k].labels]
            x = self._pipe(first).from_seeds(seeds, class_labels=labels).cpu().numpy()
            start = 0
            for k in members:
                out[k] = x[start:start + requests[k].num]
                start += requests[k].num
        return out  # type: ignore[return-value]


class ModelHolder:
    """The model a replica serves now (:attr:`current`), and for an alias URI its poll (module docstring).

    :param loader: ``(uri, pinned) -> ServedModel``; tests pass their own.
    :param resolve: ``uri -> pinned URI`` (the registry's answer now), by default
        :func:`pipelines.registry.models.describe` then :func:`~pipelines.registry.models.pinned`.
    """

    def __init__(self, uri: str, loader: Callable[[str, str | None], ServedModel] = ServedModel.load,
                 resolve: Callable[[str], str] | None = None,
                 log: Callable[[str], None] = lambda m: print(f"[serve] {m}", file=sys.stderr, flush=True)) -> None:
        self.uri, self._loader, self._log = uri, loader, log
        self._resolve = resolve or (lambda u: models.pinned(u, models.describe(u)))
        self.current: ServedModel = loader(uri, self._resolve(uri) if follows(uri) else None)
        self.switches: list[tuple[float, str | None]] = [(time.time(), self.current.version)]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> bool:
        """Ask the registry where the alias points; load and switch to a new version. True if it switched."""
        try:
            pinned = self._resolve(self.uri)
        except Exception as e:  # the store is down or the alias was deleted: keep serving
            self._log(f"cannot ask the registry where {self.uri} points ({type(e).__name__}: {e}); "
                      f"still serving {self.current.pinned}")
            return False
        if pinned == self.current.pinned:
            return False
        try:
            fresh = self._loader(self.uri, pinned)
        except Exception as e:
            self._log(f"{self.uri} moved to {pinned}, which failed to load ({type(e).__name__}: {e}); "
                      f"still serving {self.current.pinned}")
            return False
        old, self.current = self.current, fresh  # the switch: one assignment, read once per batch
        self.switches.append((time.time(), fresh.version))
        self._log(f"{self.uri} moved: now serving {fresh.pinned} (was {old.pinned})")
        return True

    def follow(self, every: float) -> None:
        """Poll every ``every`` seconds in a daemon thread (nothing for a URI that cannot move)."""
        if not follows(self.uri) or every <= 0 or self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(every):
                self.poll()

        self._thread = threading.Thread(target=loop, name="ddpm-serve-reload", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()


__all__ = ["BATCH_SIZE", "ModelHolder", "ServedModel", "follows"]
