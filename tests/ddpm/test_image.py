"""ddpm.image: the one [-1, 1] -> integer rule (golden values) and the one PNG encoder."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.data.reader import to_float
from ddpm.image import grid, png_bytes, to_levels, to_uint8


def test_to_uint8_golden_values():
    # -1 -> 0, 1 -> 255, 0 -> 127.5 rounds half to even (128), clamped outside [-1, 1]
    step = 2 / 255  # one grey level
    x = torch.tensor([-1.0, 1.0, 0.0, -3.0, 2.5, step - 1, 0.6 * step - 1, 0.4 * step - 1]).view(1, 1, 1, 8)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 255, 128, 0, 255, 1, 1, 0]


def test_to_uint8_layout_and_dtype():
    x = torch.linspace(-1, 1, 2 * 3 * 4 * 5).view(2, 3, 4, 5)
    out = to_uint8(x)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == (2, 4, 5, 3)
    assert np.array_equal(out, to_levels(x, 256).permute(0, 2, 3, 1).numpy())


def test_to_uint8_snaps_to_the_data_levels():
    # 17 levels (digits): level k is shown as round(k * 255 / 16); in-between values go to the nearest level
    k = torch.arange(17, dtype=torch.uint8)
    x = to_float(k, 17).view(1, 1, 1, 17)
    assert to_uint8(x, 17)[0, 0, :, 0].tolist() == [round(v * 255 / 16 + 1e-9) for v in range(17)]
    nudged = x + 0.4 * (2 / 16)  # less than half a level up: still the same level
    assert torch.equal(to_levels(nudged, 17).flatten()[:-1], k[:-1])
    assert to_uint8(torch.full((1, 1, 1, 1), 0.9), 17).item() == 239  # nearest level 15 of 0..16


def test_to_levels_golden_values_and_round_trip():
    assert to_levels(torch.tensor([-1.0, 1.0, -2.0, 2.0, 0.0]), 17).tolist() == [0, 16, 0, 16, 8]
    for levels in (2, 17, 256):
        v = torch.arange(levels, dtype=torch.uint8)
        assert torch.equal(to_levels(to_float(v, levels), levels), v)


@pytest.mark.parametrize("shape", [(5, 4, 1), (5, 4, 3), (5, 4)])
def test_png_bytes_round_trip_and_reproducible(shape):
    a = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    data = png_bytes(a)
    assert data == png_bytes(a.copy())
    with Image.open(io.BytesIO(data)) as img:
        back = np.asarray(img)
    assert np.array_equal(back, a[:, :, 0] if a.ndim == 3 and a.shape[2] == 1 else a)


def test_shard_writer_stores_png_bytes_and_needs_no_torch(tmp_path):
    """The shards hold exactly ``png_bytes`` of each image (one encoder: sample webdataset = shards),
    and writing them does not import torch (``ddpm.image`` loads it only for tensors)."""
    import subprocess
    import sys
    import tarfile

    from ddpm.data.shards import write_shards
    from ddpm.data.sources import Sample

    images = [np.random.default_rng(c).integers(0, 17, (6, 7, 1), dtype=np.uint8) for c in range(3)]
    write_shards([Sample(f"{i:07d}", a, i) for i, a in enumerate(images)], str(tmp_path / "d"),
                 source="synthetic", split="train", levels=17)
    with tarfile.open(tmp_path / "d" / "train-000000.tar") as tar:
        stored = [tar.extractfile(f"{i:07d}.png").read() for i in range(3)]
    assert stored == [png_bytes(a) for a in images]
    code = "import sys, ddpm.data.shards, ddpm.image; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_png_bytes_text_chunk():
    a = np.zeros((2, 3), np.uint8)
    with Image.open(io.BytesIO(png_bytes(a, text={"Software": "ddpm-pipe x"}))) as img:
        assert img.text == {"Software": "ddpm-pipe x"}
    with Image.open(io.BytesIO(png_bytes(a))) as img:
        assert img.text == {}


def test_grid_tiles_with_white_padding():
    x = -torch.ones(3, 1, 2, 2)  # three black images
    g = grid(x, nrow=2, pad=1)
    assert g.shape == (2 * 3 + 1, 2 * 3 + 1, 1)
    assert (g[1:3, 1:3] == 0).all() and (g[0] == 255).all() and (g[4:6, 4:6] == 255).all()
