"""Gaussian noise with optional per-sample seeds.

With ``seeds`` (one integer per batch row), row i's draws come from its own CPU ``torch.Generator``
seeded with ``seeds[i]``, so sample i is the same whatever batch it is in, at whatever position,
and on whatever device (noise is drawn on the CPU and then moved).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _seed_list(seeds: torch.Tensor | Sequence[int]) -> list[int]:
    if isinstance(seeds, torch.Tensor):
        if seeds.dim() != 1 or seeds.is_floating_point():
            raise ValueError(f"seeds must be a 1-D integer tensor, got shape {tuple(seeds.shape)} {seeds.dtype}")
        return [int(s) for s in seeds.tolist()]
    return [int(s) for s in seeds]


class NoiseSource:
    """Successive standard-normal tensors of one ``shape`` ``(B, ...)``; ``.next()`` gives the next.

    Exactly one of: ``seeds`` (per-sample generators), ``generator`` (one shared generator), or
    neither (torch's global generator).
    """

    def __init__(
        self,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        seeds: torch.Tensor | Sequence[int] | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype or torch.get_default_dtype()
        self.generator = generator
        self._generators: list[torch.Generator] | None = None
        if seeds is not None:
            if generator is not None:
                raise ValueError("pass either generator or seeds, not both")
            seed_list = _seed_list(seeds)
            if len(seed_list) != self.shape[0]:
                raise ValueError(f"got {len(seed_list)} seeds for a batch of {self.shape[0]}")
            self._generators = [torch.Generator().manual_seed(s) for s in seed_list]

    def next(self) -> torch.Tensor:
        # Draw in float32 (float64 if asked) so that bf16/fp16 runs see the same noise as fp32 runs.
        draw_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        if self._generators is not None:
            x = torch.stack([torch.randn(self.shape[1:], generator=g, dtype=draw_dtype) for g in self._generators])
        elif self.generator is not None:
            x = torch.randn(self.shape, generator=self.generator, device=self.generator.device, dtype=draw_dtype)
        else:
            x = torch.randn(self.shape, device=self.device, dtype=draw_dtype)
        return x.to(device=self.device or x.device, dtype=self.dtype)


def randn(
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    seeds: torch.Tensor | Sequence[int] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One standard-normal tensor of ``shape``; see :class:`NoiseSource` for the seeding rules."""
    return NoiseSource(shape, generator=generator, seeds=seeds, device=device, dtype=dtype).next()


SEED_STRIDE = 1_000_003  # a prime above any sample count: (seed, i) pairs do not collide for i < stride


def sample_seed(seed: int, i: int) -> int:
    """The noise seed of sample ``i`` of a job seeded ``seed``: ``seed * SEED_STRIDE + i`` (mod 2^63).

    Batch sampling, evaluation, training's sample grids and the registered model all use this rule,
    so sample i of a seed is the same image wherever it is drawn.
    """
    return (int(seed) * SEED_STRIDE + int(i)) % (1 << 63)


def sample_seeds(seed: int, start: int, count: int) -> torch.Tensor:
    """``sample_seed(seed, i)`` for i in ``start .. start+count-1``, as an int64 tensor (count,)."""
    return torch.tensor([sample_seed(seed, i) for i in range(start, start + count)], dtype=torch.int64)


__all__ = ["NoiseSource", "SEED_STRIDE", "randn", "sample_seed", "sample_seeds"]
