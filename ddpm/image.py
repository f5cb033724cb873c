"""Turning model outputs in [-1, 1] into pixels, grids and PNG files.

The one place that maps [-1, 1] to integers (:func:`to_levels`, :func:`to_uint8`) and encodes PNG
(:func:`png_bytes`); ``ddpm/data/reader.py``'s :func:`~ddpm.data.reader.to_float` is the way back.
torch is imported by the functions that take tensors, so the shard writer (``ddpm/data/shards.py``,
numpy only) encodes its PNGs here without loading torch.
"""

from __future__ import annotations

import io
import math

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

PNG_COMPRESS_LEVEL = 6  # zlib's default, named so the bytes (and any checksum of them) stay the same


def to_levels(x: torch.Tensor, levels: int) -> torch.Tensor:
    """x in [-1, 1], any shape -> the index of the nearest of ``levels`` grey levels, uint8 in 0..levels-1.

    The inverse of :func:`ddpm.data.reader.to_float` (``v / (levels - 1) * 2 - 1``); values outside
    [-1, 1] are clamped first; halves round to even (``torch.round``).
    """
    import torch

    x = x.detach().float().clamp(-1, 1)
    return torch.round((x + 1) / 2 * (levels - 1)).to(torch.uint8)


def to_uint8(x: torch.Tensor, levels: int = 256) -> np.ndarray:
    """Map x in [-1, 1], shape (N, C, H, W), to the nearest of ``levels`` grey levels, then to 0..255.

    Returns uint8 (N, H, W, C). Quantising to the data's own levels (17 for digits) first shows what
    the model would write, not sub-level noise.
    """
    import torch

    q = to_levels(x, levels).float() / (levels - 1)
    return (q * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid(x: torch.Tensor, levels: int = 256, nrow: int | None = None, pad: int = 1, scale: int = 1) -> np.ndarray:
    """Tile N images (N, C, H, W) in [-1, 1] into one uint8 image (rows x cols), scaled up ``scale``x."""
    imgs = to_uint8(x, levels)
    n, h, w, c = imgs.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    out = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        out[y0:y0 + h, x0:x0 + w] = imgs[i]
    if scale > 1:
        out = out.repeat(scale, axis=0).repeat(scale, axis=1)
    return out


def png_bytes(array: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """Encode a uint8 (H, W) or (H, W, C) array (C = 1 or 3) as PNG, values unchanged.

    ``text``: tEXt chunks to add (``{"Software": ...}`` marks a file as written by a command).
    The compression level is fixed, so the same array always gives the same bytes.
    """
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    info = None
    if text:
        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL, pnginfo=info)
    return buf.getvalue()


def save_grid(x: torch.Tensor, path: str, levels: int = 256, nrow: int | None = None) -> str:
    """Save a sample grid as PNG; small images (< 32 px) are scaled up to be readable."""
    h = x.shape[-1]
    scale = max(1, 32 // h)
    with open(path, "wb") as f:
        f.write(png_bytes(grid(x, levels=levels, nrow=nrow, scale=scale)))
    return path
