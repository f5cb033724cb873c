"""Exponential moving average of model parameters (the paper samples from an EMA with decay 0.9999).

Update n (n = 0, 1, 2, ...) does ``ema <- d_n * ema + (1 - d_n) * param`` with
``d_n = min(decay, (1 + n) / (10 + n))`` when ``warmup`` is on (so early averages are not dominated
by the random initialisation), else ``d_n = decay``. The average starts as a copy of the model;
buffers are copied, not averaged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


class EMA:
    """EMA of a model's parameters, built on :class:`torch.optim.swa_utils.AveragedModel`.

    :param model: the model being trained (pass the plain module, not a DDP or compiled wrapper).
    :param decay: the decay once warm-up is over.
    :param warmup: use ``min(decay, (1 + n) / (10 + n))`` at update n.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        self._num_updates = 0  # kept on the host so that update() never waits on the device
        self._current = decay
        self.averaged = AveragedModel(model, multi_avg_fn=self._lerp, use_buffers=False)
        # The deep copy made above is the first "averaged model": start averaging at the first
        # update instead of letting AveragedModel overwrite the copy with the model.
        self.averaged.n_averaged.fill_(1)
        self.averaged.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        """The averaged network, for sampling and evaluation."""
        return self.averaged.module

    @property
    def num_updates(self) -> int:
        return self._num_updates

    def decay_at(self, n: int) -> float:
        """d_n, the decay used by update number n (0-based)."""
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def _lerp(self, ema_params: list[torch.Tensor], params: list[torch.Tensor], _n_averaged: Any) -> None:
        if ema_params and ema_params[0].is_floating_point():
            torch._foreach_lerp_(ema_params, params, 1.0 - self._current)
        else:  # pragma: no cover - integer parameters do not occur in this package
            for e, p in zip(ema_params, params, strict=True):
                e.copy_(e * self._current + p * (1.0 - self._current))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current parameters into the average and copy its buffers."""
        self._current = self.decay_at(self._num_updates)
        self.averaged.update_parameters(model)
        for ema_buf, buf in zip(self.module.buffers(), model.buffers(), strict=True):
            ema_buf.copy_(buf)
        self._num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        """``{"module": averaged weights, "num_updates": int, "decay": float, "warmup": bool}``."""
        return {"module": self.module.state_dict(), "num_updates": self._num_updates,
                "decay": self.decay, "warmup": self.warmup}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore weights and the update count; ``decay`` and ``warmup`` stay as constructed."""
        missing = {"module", "num_updates"} - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)}")
        self.module.load_state_dict(state["module"])
        self._num_updates = int(state["num_updates"])
        self.averaged.n_averaged.fill_(self._num_updates + 1)
