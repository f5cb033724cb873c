"""Bad input fails at once with an error naming the problem (exit 2, or 3 when refused), before any
MLflow run, Ray worker or output exists. No Ray needed: every check runs before the cluster is used."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.support import TINY, run_cli, start_lock_holder


def cli(*args: str):
    return run_cli(*list(args))


def train(tmp_path: Path, *extra: str):
    sets = [x for s in TINY for x in ("--set", s)]
    return cli("train", "--max-steps", "1", "--storage", str(tmp_path / "storage"), *sets, *extra)


def assert_nothing_started(tmp_path: Path) -> None:
    home = tmp_path / "ddpm-home"
    assert not (home / "mlflow.db").exists(), "an MLflow run was created for bad input"
    assert not (tmp_path / "storage").exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("override,expected", [
    ("train.nope=1", "unknown config key 'train.nope'"),
    ("diffusion.schedule=cosin", "diffusion.schedule='cosin' is not a valid choice; valid: linear, cosine"),
    ("train.precision=fp8", "valid: fp32, bf16, fp16"),
    ("diffusion.timesteps=0", "diffusion.timesteps (T) must be >= 1, got 0"),
    ("diffusion.beta_start=0", "diffusion.beta_start must be in (0, 1), got 0"),
    ("diffusion.beta_end=1.5", "diffusion.beta_end must be in (0, 1), got 1.5"),
    ("model.image_size=9", "model.image_size=9 is not divisible by 2**(len(ch_mult)-1)=2"),
    # Configs that used to pass the driver and fail in every worker, three times over (issue 17).
    ("diffusion.timesteps=10", "schedule 'linear' with T=10 gives betas outside (0, 1) (min 0.01, max 2)"),
    ("diffusion.schedule=cosine diffusion.beta_start=0.001", "the cosine schedule has no beta range"),
    ("model.num_heads=3", "model.num_heads=3 does not divide the attention channels [64]"),
    ("model.attn_resolutions=[3]", "model.attn_resolutions has [3], which no level has"),
])
def test_bad_config_is_a_usage_error_naming_the_key(tmp_path, override, expected):
    result = train(tmp_path, *[x for o in override.split() for x in ("--set", o)])
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert_nothing_started(tmp_path)


@pytest.mark.timeout(120)
def test_batch_that_does_not_divide_over_the_nodes_fails_before_any_run(tmp_path, monkeypatch):
    """16 images over 3 workers: refused on the driver, before Ray is even connected."""
    from pipelines import cluster

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a batch that cannot be split")

    monkeypatch.setattr(cluster, "connect", no_ray)
    result = train(tmp_path, "--nodes", "3")
    assert result.exit_code == 2, result.output
    assert "train.batch_size=16 does not divide over 3 worker(s)" in result.output
    assert_nothing_started(tmp_path)


@pytest.mark.timeout(120)
def test_a_run_name_being_trained_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path, digits_shards,
                                                                                   monkeypatch):
    """Two `train --run-name same` at once made two MLflow runs sharing storage/<run-name>; the second
    is now refused (exit 3) before any run exists. A crashed holder (its flock gone with it) does
    not block."""

    from pipelines import cluster

    lock = tmp_path / "storage" / "same" / ".ddpm-lock"
    lock.parent.mkdir(parents=True)
    holder = start_lock_holder(lock.parent, "train")
    try:
        result = train(tmp_path, "--data", str(digits_shards), "--run-name", "same")
        assert result.exit_code == 3, result.output
        assert f"being written by another train job (" in result.output and str(holder.pid) in result.output
        assert not (tmp_path / "ddpm-home" / "mlflow.db").exists()
    finally:
        holder.kill()  # a crash: no release, the lock file stays with its record
        holder.wait()
    assert lock.exists()

    def stop(*args, **kwargs):  # past the lock: the run exists; stop before Ray
        raise RuntimeError("stop here")

    monkeypatch.setattr(cluster, "connect", stop)
    result = train(tmp_path, "--data", str(digits_shards), "--run-name", "same")
    assert result.exit_code == 1 and "stop here" in result.output, result.output
    assert not lock.exists()  # taken over, then released


def _copy(shards: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(shards, tmp_path / "data"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("damage,expected", [
    ("missing", "no manifest.json"),
    ("empty", "no manifest.json"),
    ("no-shards", "lists no shards"),
    ("shard-gone", "shard train-000001.tar is listed in the manifest but missing"),
    ("truncated", "shard train-000000.tar has 100 bytes, the manifest says"),
    ("corrupt-manifest", "manifest.json is not valid JSON"),
    ("same-size-other-bytes", "shard train-000001.tar does not match its sha256 in the manifest"),
])
def test_missing_empty_corrupt_shards_fail_before_training(tmp_path, digits_shards, damage, expected):
    data = _copy(digits_shards, tmp_path)
    manifest = data / "manifest.json"
    if damage == "missing":
        shutil.rmtree(data)
    elif damage == "empty":
        shutil.rmtree(data)
        data.mkdir()
    elif damage == "no-shards":
        m = json.loads(manifest.read_text())
        manifest.write_text(json.dumps({**m, "shards": [], "num_samples": 0}))
    elif damage == "shard-gone":
        (data / "train-000001.tar").unlink()
    elif damage == "truncated":
        shard = data / "train-000000.tar"
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "corrupt-manifest":
        manifest.write_text("{not json")
    elif damage == "same-size-other-bytes":  # passes the size check; only the hash tells
        shard = data / "train-000001.tar"
        raw = bytearray(shard.read_bytes())
        raw[600] ^= 0xFF
        shard.write_bytes(bytes(raw))
    result = train(tmp_path, "--data", str(data))
    assert result.exit_code == 2, result.output
    assert expected in result.output and str(data) in result.output
    assert_nothing_started(tmp_path)


@pytest.mark.timeout(120)
def test_shards_that_do_not_fit_the_model_fail_before_training(tmp_path, digits_shards):
    """8x8 grey digits with a 16x16 model, or another number of pixel levels."""
    # attn_resolutions=[8]: TINY's [4] is no level of a 16-pixel, two-level U-Net (a config error of its own)
    result = train(tmp_path, "--data", str(digits_shards), "--set", "model.image_size=16",
                   "--set", "model.attn_resolutions=[8]")
    assert result.exit_code == 2, result.output
    assert "images are [C, H, W] = [1, 8, 8] but the model takes [1, 16, 16]" in result.output
    result = train(tmp_path, "--data", str(digits_shards), "--set", "data.levels=256")
    assert result.exit_code == 2, result.output
    assert "17 pixel levels but data.levels=256" in result.output
    assert_nothing_started(tmp_path)


# -- models and checkpoints ---------------------------------------------------------------------------
def _checkpoint(path: Path, **changes) -> str:
    from tests.support import TINY_NET, save_tiny_checkpoint

    save_tiny_checkpoint(path, overrides=TINY_NET)
    if changes:  # rewrite the saved dict as a future or foreign version would have written it
        state = torch.load(path, weights_only=True)
        state.update(changes)
        torch.save(state, path)
    return str(path)


def _interpolate(tmp_path: Path, model: str):
    from PIL import Image

    for name in ("a.png", "b.png"):
        Image.new("L", (8, 8)).save(tmp_path / name)
    return cli("interpolate", "--model", model, "--a", str(tmp_path / "a.png"), "--b", str(tmp_path / "b.png"),
               "--t", "10", "--out", str(tmp_path / "mix.png"))


@pytest.mark.timeout(120)
def test_model_uri_that_does_not_exist_is_a_usage_error(tmp_path):
    for uri in (str(tmp_path / "nowhere.pt"), "models:/nobody/1", "runs:/0123456789abcdef/model"):
        result = _interpolate(tmp_path, uri)
        assert result.exit_code == 2, result.output
        assert "does not exist" in result.output and uri in result.output
    result = _interpolate(tmp_path, "foo://bucket/model.pt")  # a protocol fsspec does not know: exit 2, not 1
    assert result.exit_code == 2 and "cannot open (Protocol not known: foo)" in result.output, result.output
    assert not (tmp_path / "mix.png").exists()


@pytest.mark.timeout(120)
def test_checkpoint_of_another_format_version_is_a_usage_error(tmp_path):
    ckpt = _checkpoint(tmp_path / "future.pt", format_version=99, ddpm_version="9.0.0")
    result = _interpolate(tmp_path, ckpt)
    assert result.exit_code == 2, result.output
    assert "format version 99 (ddpm 9.0.0)" in result.output and "reads format 1" in result.output
    assert not (tmp_path / "mix.png").exists()


@pytest.mark.timeout(120)
def test_checkpoint_whose_config_does_not_build_is_a_usage_error(tmp_path):
    cfg = json.loads(json.dumps({"name": "x", "model": {"image_size": 8, "attention": "flash"}}))
    ckpt = _checkpoint(tmp_path / "foreign.pt", config=json.dumps(cfg))
    result = _interpolate(tmp_path, ckpt)
    assert result.exit_code == 2, result.output
    assert "its config does not build" in result.output and "attention" in result.output


@pytest.mark.timeout(120)
def test_checkpoint_whose_weights_do_not_fit_its_config_is_a_usage_error(tmp_path):
    from ddpm.config import ExperimentConfig

    other = ExperimentConfig.preset("digits")  # ch=64: the saved ch=8 weights do not fit
    ckpt = _checkpoint(tmp_path / "mismatch.pt", config=other.to_json())
    result = _interpolate(tmp_path, ckpt)
    assert result.exit_code == 2, result.output
    assert "weights do not fit the config's model" in result.output


@pytest.mark.timeout(120)
def test_output_that_exists_and_is_not_ours_is_refused(tmp_path):
    """Sampling into a folder of someone else's files is refused with exit 3, the files untouched
    (more cases in tests/pipelines/test_sample.py); an output that is a file is not writable."""
    ckpt = _checkpoint(tmp_path / "c.pt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = cli("sample", "--model", ckpt, "--num", "2", "--out", str(out))
    assert result.exit_code == 3, result.output
    assert "notes.txt" in result.output and "not samples of this tool" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    (tmp_path / "a-file").write_text("x")
    result = cli("sample", "--model", ckpt, "--num", "2", "--out", str(tmp_path / "a-file"))
    assert result.exit_code == 2, result.output
    assert "is a file, not a folder" in result.output or "not writable" in result.output


# -- data sources -------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind,expected", [
    ("npz-levels-array", "levels.npz: 'levels' must be one integer"),
    ("cifar-list", "cifar-10-python.tar.gz:test_batch: not a CIFAR-10 batch (it unpickles to a list"),
    ("corrupt-pngs", "gave no usable samples (2 skipped; first skip: a.png: unreadable image (not a PNG or JPEG file))"),
])
def test_bad_data_sources_are_usage_errors_naming_the_file(tmp_path, kind, expected):
    """These used to exit 1 with a bare TypeError/AttributeError, or a file object's repr."""
    import io
    import pickle
    import tarfile

    import numpy as np

    if kind == "npz-levels-array":
        source = tmp_path / "levels.npz"
        np.savez(source, x=np.zeros((2, 4, 4), np.uint8), levels=np.array([17, 17]))
    elif kind == "cifar-list":
        source = tmp_path / "cifar-10-python.tar.gz"
        with tarfile.open(source, "w:gz") as tar:
            raw = pickle.dumps([1, 2, 3], protocol=2)
            info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    else:
        source = tmp_path / "pngs"
        source.mkdir()
        for name in ("a.png", "b.png"):
            (source / name).write_bytes(b"\x89PNG but not really")
    out = tmp_path / "out"
    result = cli("data", "prepare", "--source", str(source), "--split", "test", "--out", str(out))
    assert result.exit_code == 2, result.output
    assert expected in result.output and "object at 0x" not in result.output
    assert not out.exists()
