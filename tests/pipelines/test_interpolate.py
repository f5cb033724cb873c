"""`ddpm-pipe interpolate`: reading the images, the strip, the errors (the math: tests/ddpm/test_interpolate.py)."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.sample.interpolate import read_image
from tests.support import TINY_NET, cli_json, run_cli, save_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("model") / "checkpoint.pt", overrides=TINY_NET))


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(a)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(b)  # RGB and twice the size
    return str(a), str(b)


def cli(*args: str):
    return run_cli(*list(args))


@pytest.mark.timeout(60)
def test_read_image_converts_channels_size_and_levels(tmp_path):
    raw = tmp_path / "raw.png"  # a digits shard image: raw levels 0..16
    Image.fromarray(np.array([[0, 8, 16, 4]] * 4, dtype=np.uint8)).save(raw)
    x = read_image(str(raw), channels=1, size=4, levels=17)
    assert x.shape == (1, 1, 4, 4)
    assert x[0, 0, 0].tolist() == [-1.0, 0.0, 1.0, -0.5]
    full = tmp_path / "full.png"  # an ordinary 0..255 RGB image, resized and made grey
    Image.fromarray(np.full((8, 8, 3), 255, dtype=np.uint8)).save(full)
    y = read_image(str(full), channels=1, size=4, levels=17)
    assert y.shape == (1, 1, 4, 4) and torch.allclose(y, torch.ones_like(y))


@pytest.mark.timeout(120)
def test_command_writes_one_strip(tmp_path, ckpt, images):
    out = tmp_path / "strip.png"
    result = cli("interpolate", "--model", ckpt, "--a", images[0], "--b", images[1], "--t", "30",
                 "--lambdas", "4", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    summary = cli_json(result)
    assert summary["lambdas"] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    strip = np.asarray(Image.open(out))
    scale = 32 // 8  # 8-pixel images are scaled up to be readable
    assert strip.shape == (scale * (8 + 2), scale * (6 * (8 + 1) + 1))  # a, 4 mixes, b


@pytest.mark.timeout(60)
def test_missing_image_and_t_out_of_range_fail_with_exit_2(tmp_path, ckpt, images):
    result = cli("interpolate", "--model", ckpt, "--a", images[0], "--b", str(tmp_path / "nope.png"))
    assert result.exit_code == 2, result.output
    assert "nope.png" in result.output and "does not exist" in result.output
    result = cli("interpolate", "--model", ckpt, "--a", images[0], "--b", images[1], "--t", "50")
    assert result.exit_code == 2, result.output
    assert "T=50" in result.output and "[0, 49]" in result.output
    result = cli("interpolate", "--model", str(tmp_path / "missing.pt"), "--a", images[0], "--b", images[1])
    assert result.exit_code == 2, result.output


@pytest.mark.timeout(120)
def test_an_existing_file_that_is_not_our_strip_is_refused_untouched(tmp_path, ckpt, images):
    """A text file (or someone's PNG) at --out used to be replaced by the strip; our own strip may be."""
    args = ["interpolate", "--model", ckpt, "--a", images[0], "--b", images[1], "--t", "10", "--lambdas", "2",
            "--out"]
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    result = cli(*args, str(notes))
    assert result.exit_code == 3, result.output
    assert "exists and is not a strip this tool wrote" in result.output
    assert notes.read_text() == "mine"
    photo = tmp_path / "photo.png"
    Image.new("L", (4, 4)).save(photo)
    before = photo.read_bytes()
    assert cli(*args, str(photo)).exit_code == 3 and photo.read_bytes() == before
    strip = tmp_path / "strip.png"
    assert cli(*args, str(strip)).exit_code == 0
    again = cli(*args, str(strip))  # a strip of ours is replaced
    assert again.exit_code == 0, again.output
