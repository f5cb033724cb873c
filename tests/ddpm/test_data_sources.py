"""Data sources: digits split, image folders, arrays, the CIFAR-10 archive format."""

from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from ddpm.data.shards import write_shards
from ddpm.data.reader import load_split
from ddpm.data.manifest import image_hash
from ddpm.data.sources import (SAMPLE_IMAGES_TEST_FRACTION, Sample, Skip, carve, cifar10, digits, image_folder,
                               open_source, sample_images)
from ddpm.data.storage import SourceError
from tests.ddpm.helpers import make_cifar_archive


def _samples(src):
    return [s for s in src if isinstance(s, Sample)]


def test_digits_fixed_disjoint_split():
    train, test = _samples(digits("train")), _samples(digits("test"))
    assert (len(train), len(test)) == (1437, 360)
    assert not {s.key for s in train} & {s.key for s in test}
    assert [s.key for s in test[:3]] == ["0000000", "0000005", "0000010"]  # index % 5 == 0
    assert all(s.image.dtype == np.uint8 and s.image.shape == (8, 8, 1) for s in train[:10])
    assert max(int(s.image.max()) for s in train) == 16 and digits("train").levels == 17
    assert [s.key for s in _samples(digits("train"))] == [s.key for s in train]  # deterministic


def test_image_folder_with_classes_and_skips(tmp_path):
    rng = np.random.default_rng(0)
    for cls, n in (("cat", 2), ("dog", 3)):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(tmp_path / "img" / cls / f"{i}.png")
    Image.fromarray(np.zeros((7, 7, 3), np.uint8)).save(tmp_path / "img" / "dog" / "big.png")  # other size
    (tmp_path / "img" / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    src = open_source(str(tmp_path / "img"), "train")
    items = list(src)
    samples = [s for s in items if isinstance(s, Sample)]
    skips = [s for s in items if isinstance(s, Skip)]
    assert src.classes == ["cat", "dog"] and [s.label for s in samples] == [0, 0, 1, 1, 1]
    assert len(skips) == 2 and any("differs" in s.reason for s in skips) and any("unreadable" in s.reason for s in skips)
    result = write_shards(src, str(tmp_path / "out"), shard_size=2)
    assert result.manifest["skipped"]["count"] == 2 and result.manifest["shape"] == [3, 6, 5]
    x, y, _ = load_split(str(tmp_path / "out"))
    assert x.shape == (5, 3, 6, 5) and y.tolist() == [0, 0, 1, 1, 1]
    assert np.array_equal(x[0].permute(1, 2, 0).numpy(), np.asarray(Image.open(tmp_path / "img" / "cat" / "0.png")))


def test_image_folder_split_subfolders_and_mixing_error(tmp_path):
    for split in ("train", "test"):
        (tmp_path / "a" / split).mkdir(parents=True)
        Image.fromarray(np.full((4, 4), 3, np.uint8)).save(tmp_path / "a" / split / "x.png")
    src = open_source(str(tmp_path / "a"), "test")
    assert [s.image.shape for s in _samples(src)] == [(4, 4, 1)] and src.classes is None
    (tmp_path / "a" / "test" / "sub").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a" / "test" / "sub" / "y.png")
    with pytest.raises(SourceError, match="mixes images"):
        open_source(str(tmp_path / "a"), "test")


@pytest.mark.parametrize("layout", ["nhw", "nhwc", "nchw"])
def test_npz_layouts(tmp_path, layout):
    rng = np.random.default_rng(1)
    hwc = rng.integers(0, 256, (7, 4, 6, 3 if layout != "nhw" else 1), dtype=np.uint8)
    arr = {"nhw": hwc[..., 0], "nhwc": hwc, "nchw": hwc.transpose(0, 3, 1, 2)}[layout]
    np.savez(tmp_path / "d.npz", images=arr, labels=np.arange(7))
    src = open_source(str(tmp_path / "d.npz"), "train")
    samples = _samples(src)
    assert src.name == "d" and len(samples) == 7 and samples[3].label == 3
    assert np.array_equal(np.stack([s.image for s in samples]), hwc)


def test_npy_and_npz_levels_and_bad_dtype(tmp_path):
    np.save(tmp_path / "g.npy", np.zeros((3, 5, 5), np.uint8))
    assert len(_samples(open_source(str(tmp_path / "g.npy")))) == 3
    np.savez(tmp_path / "l.npz", x_test=np.full((2, 4, 4), 16, np.uint8), levels=np.array(17))
    src = open_source(str(tmp_path / "l.npz"), "test")
    assert src.levels == 17 and len(_samples(src)) == 2
    np.save(tmp_path / "f.npy", np.zeros((3, 5, 5), np.float32) + 0.5)
    with pytest.raises(SourceError, match="uint8"):
        open_source(str(tmp_path / "f.npy"))


def test_cifar10_archive_round_trip(tmp_path):
    batches = make_cifar_archive(tmp_path / "cifar-10-python.tar.gz")
    src = open_source(str(tmp_path / "cifar-10-python.tar.gz"), "train")
    samples = _samples(src)
    assert src.name == "cifar10" and src.levels == 256 and len(samples) == 20
    first = batches["data_batch_1"][0][0].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(samples[0].image, first) and samples[0].label == batches["data_batch_1"][1][0]
    test = _samples(cifar10(f"file://{tmp_path}/cifar-10-python.tar.gz", "test"))
    assert [s.label for s in test] == batches["test_batch"][1]


def test_cifar10_refuses_foreign_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with tarfile.open(tmp_path / "evil.tar.gz", "w:gz") as tar:
        raw = pickle.dumps({b"data": Evil(), b"labels": []})
        info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    with pytest.raises(SourceError, match="refusing to load"):
        cifar10(str(tmp_path / "evil.tar.gz"), "test")
    with pytest.raises(SourceError, match="lacks data_batch_1"):
        cifar10(str(tmp_path / "evil.tar.gz"), "train")


def test_unknown_sources():
    with pytest.raises(SourceError, match="not found"):
        open_source("/no/such/folder")
    with pytest.raises(SourceError, match="needs your copy"):
        open_source("cifar10")
    with pytest.raises(SourceError, match="split"):
        open_source("digits", "valid")


def test_npz_whose_levels_is_an_array_is_a_source_error_naming_the_file(tmp_path):
    """It used to end in a bare TypeError (exit 1)."""
    path = tmp_path / "l.npz"
    np.savez(path, x=np.zeros((2, 4, 4), np.uint8), levels=np.array([17, 17]))
    with pytest.raises(SourceError, match=r"l\.npz: 'levels' must be one integer, got an array of shape \[2\]"):
        open_source(str(path))
    np.savez(path, x=np.zeros((2, 4, 4), np.uint8), levels=np.array(17.5))
    with pytest.raises(SourceError, match="'levels' must be one integer"):
        open_source(str(path))


@pytest.mark.parametrize("payload", [[1, 2, 3], {b"data": np.zeros((2, 3072), np.uint8), b"labels": 7},
                                     {b"data": np.zeros((1, 3072), np.uint8), b"labels": [b"cat"]}])
def test_cifar_batch_of_another_shape_is_a_source_error_naming_the_member(tmp_path, payload):
    """A batch that unpickles to a list (or holds odd labels) used to end in a bare AttributeError."""
    with tarfile.open(tmp_path / "odd.tar.gz", "w:gz") as tar:
        raw = pickle.dumps(payload, protocol=2)
        info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    with pytest.raises(SourceError, match=r"odd\.tar\.gz:test_batch: "):
        cifar10(str(tmp_path / "odd.tar.gz"), "test")


def test_unreadable_images_are_skipped_with_their_file_name_not_a_file_object(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png at all")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "img" / "ok.png")
    skips = [s for s in image_folder(str(tmp_path / "img")) if not isinstance(s, Sample)]
    assert [s.reason for s in skips] == ["broken.png: unreadable image (not a PNG or JPEG file)"]
    assert "object at 0x" not in skips[0].reason


# -- a held-out split carved from one source -------------------------------------------------------
def _array_source(tmp_path, n=400, copies=0):
    """An .npz of ``n`` random 6x6 RGB images, the first ``copies`` of them repeated at the end."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (n, 6, 6, 3), dtype=np.uint8)
    x = np.concatenate([x, x[:copies]])
    np.savez(tmp_path / "a.npz", images=x, labels=np.arange(len(x)) % 4)
    return open_source(str(tmp_path / "a.npz"))


def test_carve_splits_by_content_disjointly_with_about_the_fraction(tmp_path):
    src = _array_source(tmp_path, copies=50)  # 450 images, 50 of them twice
    parts = carve(src, 0.1, seed=0)
    train, test = _samples(parts["train"]), _samples(parts["test"])
    assert len(train) + len(test) == 450 and 25 <= len(test) <= 65  # binomial(450, 0.1): 45 +- 6.4
    hashes = {split: {image_hash(s.image) for s in samples} for split, samples in (("train", train), ("test", test))}
    assert not hashes["train"] & hashes["test"]  # exact copies land in the same split
    assert not {s.key for s in train} & {s.key for s in test}
    assert [s.label for s in test] == [int(s.key) % 4 for s in test]  # keys and labels kept
    assert [s.key for s in _samples(carve(src, 0.1, seed=0)["test"])] == [s.key for s in test]  # deterministic
    assert [s.key for s in _samples(carve(src, 0.1, seed=1)["test"])] != [s.key for s in test]  # seeded
    rule = parts["test"].split_rule
    assert rule["test_fraction"] == 0.1 and rule["seed"] == 0 and "sha256" in rule["rule"]
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(SourceError, match=r"test fraction must be in \(0, 1\)"):
            carve(src, bad)


def test_carving_is_stable_when_images_are_added(tmp_path):
    """Each image is decided by its own pixels: adding images never moves one between the splits."""
    (tmp_path / "small").mkdir()
    (tmp_path / "large").mkdir()
    small = _samples(carve(_array_source(tmp_path / "small", n=200), 0.2)["test"])
    large = _samples(carve(_array_source(tmp_path / "large", n=400), 0.2)["test"])  # the same 200, then 200 more
    assert {image_hash(s.image) for s in small} <= {image_hash(s.image) for s in large}


def test_image_hash_is_of_the_pixels_and_their_shape():
    x = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    assert image_hash(x) == image_hash(x.copy()) and len(image_hash(x)) == 16
    assert image_hash(x) != image_hash(x.reshape(4, 12, 1)) and image_hash(x[:, :, 0]) == image_hash(x[:, :, :1])
    y = x.copy()
    y[0, 0, 0] += 1
    assert image_hash(y) != image_hash(x)


def test_sample_images_are_32x32_crops_of_the_sklearn_photos_split_by_content():
    train, test = _samples(sample_images("train")), _samples(sample_images("test"))
    assert len(train) + len(test) == 520 and (len(train), len(test)) == (418, 102)  # 2 x 13 x 20 crops
    assert all(s.image.shape == (32, 32, 3) and s.image.dtype == np.uint8 for s in train[:5])
    assert {s.label for s in test} == {0, 1} and sample_images("test").classes == ["china", "flower"]
    assert not {image_hash(s.image) for s in train} & {image_hash(s.image) for s in test}
    assert open_source("sample-images", "test").split_rule["test_fraction"] == SAMPLE_IMAGES_TEST_FRACTION
