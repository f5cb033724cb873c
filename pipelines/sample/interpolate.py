"""`ddpm-pipe interpolate`: reads two images, runs :func:`ddpm.interpolate.interpolate` (Ho et al. 2020,
section 4.3) and writes the strip; the math lives in the library.

One strip is written: source a, the ``lambdas`` decoded mixes, source b. A class-conditional model
decodes mix j asking for the class ``--class``/``--classes`` give it (``classes[j mod n]``, as
`sample` numbers its samples; one ``--class`` for every mix), guided with ``--guidance``; with no
class, its null class. Runs in the driver process:
``lambdas`` images are one small batch, not worth a cluster. The PNG carries the text chunk
``Software: ddpm-pipe interpolate``; an existing ``--out`` is replaced only when it carries it too
(anything else is someone's file: exit 3, untouched; ``pipelines/storage/outputs.py``).
"""

from __future__ import annotations

import io
import time
from typing import Any

import fsspec
import numpy as np
import torch
from PIL import Image

from ddpm.data.storage import atomic_write, open_fs, storage_options_for
from ddpm.guidance import ClassifierFreeGuidance
from ddpm.image import grid, png_bytes
from ddpm.interpolate import interpolate
from pipelines.errors import UsageError
from pipelines.registry import models
from pipelines.sample.request import labels_of, resolve_classes
from pipelines.storage.outputs import refuse_foreign_file

SOFTWARE = "ddpm-pipe interpolate"  # the PNG text chunk that marks a strip as ours


def strip_png(array: np.ndarray) -> bytes:
    """A uint8 ``[H x W (x C)]`` strip as PNG bytes, marked as written by this command."""
    return png_bytes(array, text={"Software": SOFTWARE})


def is_our_strip(data: bytes) -> bool:
    """Whether ``data`` is a PNG this command wrote (its text chunk says so)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format == "PNG" and img.info.get("Software") == SOFTWARE
    except Exception:
        return False


def read_image(url: str, channels: int, size: int, levels: int) -> torch.Tensor:
    """A PNG/JPEG file -> float32 ``[1 x C x H x W]`` in [-1, 1] with the model's channels and size.

    Pixels are read as 0..255 and quantised to the data's ``levels``, except for an image whose
    values all lie in 0..levels-1 when ``levels < 256``: that is a shard image stored as raw levels
    (the digits set stores 0..16), and is used as is.
    """
    try:
        with fsspec.open(url, "rb", **storage_options_for(url)) as f:
            data = f.read()
    except FileNotFoundError:
        raise UsageError(f"image {url!r} does not exist") from None
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:
        raise UsageError(f"image {url!r} is not a readable image: {e}") from None
    img = img.convert("L" if channels == 1 else "RGB")
    arr = np.asarray(img, dtype=np.uint8)
    if levels < 256 and int(arr.max()) <= levels - 1 and img.size == (size, size):
        v = arr.astype(np.float32)  # raw levels, as the shards store them
    else:
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.LANCZOS)
            arr = np.asarray(img, dtype=np.uint8)
        v = np.round(arr.astype(np.float32) / 255.0 * (levels - 1))
    x = torch.from_numpy(v / (levels - 1) * 2.0 - 1.0)
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    return x[None].float()


def interpolate_command(model: str, a: str, b: str, t: int, lambdas: int, out: str, seed: int,
                        classes: tuple[int, ...] = (), balanced: bool = False,
                        guidance: float | None = None) -> dict[str, Any]:
    """`ddpm-pipe interpolate`: see the module docstring."""
    if lambdas < 2:
        raise UsageError(f"--lambdas must be >= 2, got {lambdas}")
    if t < 0:
        raise UsageError(f"--t must be >= 0, got {t}")
    for name, url in (("--a", a), ("--b", b)):
        fs, path = fsspec.core.url_to_fs(url, **storage_options_for(url))
        if not fs.isfile(path):
            raise UsageError(f"{name} image {url!r} does not exist")
    fs, path = open_fs(out, storage_options_for(out))
    refuse_foreign_file(fs, path, out, is_our_strip, "a strip this tool wrote")
    pinned = models.pinned(model, models.describe(model))  # it exists; an alias resolved once
    classes, guidance = resolve_classes(models.read_config(pinned), classes, balanced, guidance)
    start = time.perf_counter()
    loaded = models.load(pinned)
    cfg, diffusion = loaded.config, loaded.diffusion
    if not t < diffusion.num_timesteps:
        raise UsageError(f"--t {t} is out of range: the model has T={diffusion.num_timesteps}, "
                         f"so t must be in [0, {diffusion.num_timesteps - 1}]")
    C, size, levels = cfg.model.in_channels, cfg.model.image_size, cfg.data.levels
    x_a, x_b = read_image(a, C, size, levels), read_image(b, C, size, levels)
    labels = labels_of(list(range(lambdas)), classes)
    net = loaded.model if labels is None else ClassifierFreeGuidance(loaded.model, torch.tensor(labels), guidance,
                                                                      cfg.model.num_classes)
    mixes = interpolate(net, diffusion, x_a, x_b, t, lambdas, seed)
    strip = torch.cat([x_a, mixes, x_b])
    try:
        atomic_write(fs, path, strip_png(grid(strip, levels=levels, nrow=len(strip), scale=max(1, 32 // size))))
    except OSError as e:
        raise UsageError(f"cannot write {out!r}: {e}") from e
    seconds = time.perf_counter() - start
    asked = f", classes {labels} with guidance {guidance:g}" if labels is not None else ""
    return {"out": out, "t": t, "lambdas": torch.linspace(0, 1, lambdas).tolist(), "seed": seed,
            "seconds": round(seconds, 3), "labels": labels, "guidance": guidance,
            "message": f"wrote {out}: a, {lambdas} interpolations at t={t} (lambda 0..1){asked}, b"}


__all__ = ["interpolate_command", "read_image"]
