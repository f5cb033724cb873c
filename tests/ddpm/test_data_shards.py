"""Shard writer: round trip, determinism, atomicity, idempotence, manifest last, bad input."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pytest

from ddpm.data import shards as shards_mod
from ddpm.data.manifest import read_manifest, resolve_split
from ddpm.data.reader import ShardLoader, load_split
from ddpm.data.shards import build_tar, write_shards
from ddpm.data.sources import Sample, Skip
from ddpm.data.storage import DataError
from ddpm.image import png_bytes


def make_samples(n, shape=(4, 4, 1), labels=True, seed=0):
    rng = np.random.default_rng(seed)
    return [Sample(f"{i:07d}", rng.integers(0, 256, shape, dtype=np.uint8), i % 10 if labels else None)
            for i in range(n)]


def write(samples, url, shard_size=4, **kw):
    kw.setdefault("source", "synthetic")
    kw.setdefault("split", "train")
    kw.setdefault("levels", 256)
    return write_shards(samples, str(url), shard_size=shard_size, **kw)


def test_round_trip_and_manifest(tmp_path):
    samples = make_samples(10, (5, 3, 3))
    result = write(samples, tmp_path / "d", shard_size=4)
    m = read_manifest(str(tmp_path / "d"))
    assert [s["name"] for s in m["shards"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [s["num_samples"] for s in m["shards"]] == [4, 4, 2] and m["num_samples"] == 10
    assert m["shape"] == [3, 5, 3] and m["levels"] == 256 and m["labels"] and m["skipped"]["count"] == 0
    for s in m["shards"]:
        assert hashlib.sha256((tmp_path / "d" / s["name"]).read_bytes()).hexdigest() == s["sha256"]
    x, y, m2 = load_split(str(tmp_path / "d"))
    assert m2 == result.manifest and x.dtype.is_floating_point is False
    assert np.array_equal(x.permute(0, 2, 3, 1).numpy(), np.stack([s.image for s in samples]))
    assert y.tolist() == [s.label for s in samples]


def test_webdataset_can_read_the_shards(tmp_path):
    import webdataset as wds

    write(make_samples(5), tmp_path / "d", shard_size=5)
    keys = [s["__key__"] for s in wds.WebDataset(str(tmp_path / "d" / "train-000000.tar"), shardshuffle=False)]
    assert keys == [f"{i:07d}" for i in range(5)]


def test_shards_are_what_webdataset_tarwriter_writes(tmp_path):
    import webdataset as wds

    samples = make_samples(3)
    write(samples, tmp_path / "d", shard_size=3)
    buf = io.BytesIO()
    with wds.TarWriter(buf, user="", group="", mtime=0, encoder=False) as sink:
        for s in samples:
            sink.write({"__key__": s.key, "png": png_bytes(s.image), "cls": str(s.label).encode()})
    assert (tmp_path / "d" / "train-000000.tar").read_bytes() == buf.getvalue()
    with tarfile.open(tmp_path / "d" / "train-000000.tar") as tar:
        assert tar.getnames()[:2] == ["0000000.cls", "0000000.png"]  # TarWriter's order: extensions sorted
    with pytest.raises(ValueError, match="no extension"):
        build_tar([("0000000", b"x")])


def test_idempotent_rerun_skips_identical_shards(tmp_path):
    first = write(make_samples(9), tmp_path / "d")
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "d").iterdir()}
    second = write(make_samples(9), tmp_path / "d")
    assert (first.shards_written, second.shards_written, second.shards_unchanged) == (3, 0, 3)
    assert second.manifest == first.manifest
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "d").iterdir()} == mtimes
    assert not [p for p in (tmp_path / "d").iterdir() if ".tmp-" in p.name]


def test_changed_data_removes_old_manifest_before_overwriting(tmp_path, monkeypatch):
    write(make_samples(8), tmp_path / "d")
    events = []
    real = shards_mod.atomic_write

    def spy(fs, path, data):
        events.append((os.path.basename(path), (tmp_path / "d" / "manifest.json").exists()))
        real(fs, path, data)

    monkeypatch.setattr(shards_mod, "atomic_write", spy)
    write(make_samples(8, seed=1), tmp_path / "d")
    assert [e[0] for e in events] == ["train-000000.tar", "train-000001.tar", "manifest.json"]  # manifest last
    assert [e[1] for e in events] == [False, False, False]  # no stale manifest while shards change


def test_failed_shard_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write(make_samples(3), tmp_path / "d")
    assert list((tmp_path / "d").iterdir()) == []  # no partial shard, no temp file, no manifest


def test_skipped_samples_are_counted(tmp_path):
    samples = make_samples(4) + [Skip("0000099", "unreadable"), Sample("0000100", np.zeros((5, 5, 1), np.uint8), 1)]
    result = write(samples, tmp_path / "d")
    assert result.manifest["skipped"]["count"] == 2 and result.manifest["num_samples"] == 4
    assert [k for k, _ in result.skipped] == ["0000099", "0000100"]
    with pytest.raises(DataError, match="no usable samples"):
        write([Skip("0000001", "bad")], tmp_path / "e")


def test_unlabelled_and_bad_prefix(tmp_path):
    assert write(make_samples(3, labels=False), tmp_path / "d").manifest["labels"] is False
    _, y, _ = load_split(str(tmp_path / "d"))
    assert y is None
    with pytest.raises(DataError, match="traversal"):
        write(make_samples(3), tmp_path / "e", prefix="../evil")


def test_resolve_split(tmp_path):
    write(make_samples(3), tmp_path / "ds" / "train")
    write(make_samples(2), tmp_path / "ds" / "test", split="test")
    assert resolve_split(str(tmp_path / "ds"), "test") == f"{tmp_path}/ds/test"
    assert resolve_split(str(tmp_path / "ds" / "train"), "test") == f"{tmp_path}/ds/test"
    assert resolve_split(str(tmp_path / "ds" / "train"), "train") == f"{tmp_path}/ds/train"
    with pytest.raises(DataError, match="no manifest.json"):
        resolve_split(str(tmp_path / "nothing"), "train")


# -- bad input on the reading side ----------------------------------------------------------------
def _edit_manifest(folder, edit):
    path = folder / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


def _replace_shard(folder, name, data):
    (folder / name).write_bytes(data)
    _edit_manifest(folder, lambda m: [s.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
                                      for s in m["shards"] if s["name"] == name])


def _first_batch(url):
    return next(iter(ShardLoader(str(url), 2)))


def test_missing_or_empty_prefix(tmp_path):
    with pytest.raises(DataError, match="no manifest.json at .*missing or empty prefix"):
        ShardLoader(str(tmp_path / "empty"), 2)
    write(make_samples(3), tmp_path / "d")
    _edit_manifest(tmp_path / "d", lambda m: m.update(shards=[], num_samples=0))
    with pytest.raises(DataError, match="lists no shards"):
        load_split(str(tmp_path / "d"))


def test_missing_shard_named(tmp_path):
    write(make_samples(8), tmp_path / "d")
    (tmp_path / "d" / "train-000001.tar").unlink()
    with pytest.raises(DataError, match="train-000001.tar.*missing"):
        ShardLoader(str(tmp_path / "d"), 2)
    with pytest.raises(DataError, match="train-000001.tar.*missing"):
        load_split(str(tmp_path / "d"))


def test_checksum_mismatch_named(tmp_path):
    write(make_samples(8), tmp_path / "d")
    p = tmp_path / "d" / "train-000000.tar"
    p.write_bytes(p.read_bytes()[:-1024])  # truncated
    with pytest.raises(DataError, match="train-000000.tar: sha256 does not match"):
        load_split(str(tmp_path / "d"))


def test_corrupt_tar_named(tmp_path):
    write(make_samples(4), tmp_path / "d")
    _replace_shard(tmp_path / "d", "train-000000.tar", b"\x01" * 2048)
    with pytest.raises(DataError, match="train-000000.tar: corrupt tar"):
        _first_batch(tmp_path / "d")


def test_count_mismatch_named(tmp_path):
    write(make_samples(8), tmp_path / "d")
    data = (tmp_path / "d" / "train-000001.tar").read_bytes()
    _replace_shard(tmp_path / "d", "train-000000.tar", data)  # fine tar, but then edit its count
    _edit_manifest(tmp_path / "d", lambda m: (m["shards"][0].update(num_samples=3), m.update(num_samples=7)))
    with pytest.raises(DataError, match="train-000000.tar: holds 4 samples, the manifest says 3"):
        load_split(str(tmp_path / "d"))
    _edit_manifest(tmp_path / "d", lambda m: m.update(num_samples=99))
    with pytest.raises(DataError, match="num_samples=99"):
        read_manifest(str(tmp_path / "d"))


def test_wrong_sample_shape_named(tmp_path):
    write(make_samples(4), tmp_path / "d")
    other = build_tar([("0000000.png", png_bytes(np.zeros((5, 4, 1), np.uint8)))] +
                      [(f"000000{i}.png", png_bytes(np.zeros((4, 4, 1), np.uint8))) for i in (1, 2, 3)])
    _replace_shard(tmp_path / "d", "train-000000.tar", other)
    with pytest.raises(DataError, match=r"train-000000.tar: sample '0000000' is uint8 \(5, 4, 1\)"):
        load_split(str(tmp_path / "d"))


def test_path_traversal_refused(tmp_path):
    write(make_samples(4), tmp_path / "d")
    (tmp_path / "outside.tar").write_bytes((tmp_path / "d" / "train-000000.tar").read_bytes())
    _edit_manifest(tmp_path / "d", lambda m: m["shards"][0].update(name="../outside.tar"))
    with pytest.raises(DataError, match="traversal"):
        read_manifest(str(tmp_path / "d"))
    write(make_samples(4), tmp_path / "e")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = png_bytes(np.zeros((4, 4, 1), np.uint8))
        info = tarfile.TarInfo("../../etc/0000000.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    _replace_shard(tmp_path / "e", "train-000000.tar", buf.getvalue())
    with pytest.raises(DataError, match="train-000000.tar: member '../../etc/0000000.png'.*traversal"):
        load_split(str(tmp_path / "e"))


def test_manifest_records_each_images_content_hash_in_order(tmp_path):
    from ddpm.data.manifest import identity, image_hash, shared_images

    samples = make_samples(6, (4, 4, 3))
    m = write(samples + [samples[2]._replace(key="0000099")], tmp_path / "d").manifest  # one exact copy
    assert m["image_hashes"] == [image_hash(s.image) for s in samples] + [image_hash(samples[2].image)]
    other = write([samples[2], samples[4]], tmp_path / "t", split="test").manifest
    assert shared_images(m, other) == 2 and shared_images(other, m) == 3  # m holds image 2 twice
    assert shared_images(identity(m), other) is None  # a manifest written before hashes: nothing to compare
    assert "image_hashes" not in identity(m) and identity(m)["shards"] == m["shards"]
