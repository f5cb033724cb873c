"""Class-conditional models through the commands (issue 26): labels checked before any run, `sample
--class/--classes/--guidance` and each sample's class written beside it, the same (seed, class)
giving the same image on any number of workers, `interpolate`, the registered pyfunc, `evaluate`'s
per-class scores and guidance sweep, `promote` on conditional accuracy. The library's side is
tests/ddpm/test_guidance.py."""

from __future__ import annotations

import json
import os
import tarfile

import numpy as np
import pytest
import torch

from pipelines.sample import command as S
from pipelines.sample.request import labels_of
from tests.support import TINY, TINY_NET, cli_json, read_npz_folder, request, run_cli, save_tiny_checkpoint

COND = [*TINY_NET, "model.num_classes=10"]  # the tiny network, class-conditional on 10 classes


@pytest.fixture(scope="module")
def cond_ckpt(tmp_path_factory):
    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("cond") / "checkpoint.pt", overrides=COND))


@pytest.fixture(scope="module")
def uncond_ckpt(tmp_path_factory):
    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("uncond") / "checkpoint.pt", overrides=TINY_NET))


@pytest.fixture
def no_sampling(monkeypatch):
    """Fail the test if a worker pool is started: the checks come before any sampling."""

    def refuse(*args, **kwargs):
        raise AssertionError("sampling started")

    monkeypatch.setattr(S, "WorkerPool", refuse)


def direct(ckpt: str, seeds: list[int], labels: list[int], guidance: float, steps: int = 4) -> torch.Tensor:
    """What DDPMPipeline makes of (seed, label) pairs, as the sample workers run the model."""
    from ddpm.inference import SamplingNet
    from ddpm.pipeline import DDPMPipeline
    from pipelines.registry import models

    loaded = models.load(ckpt)
    pipe = DDPMPipeline.from_config(SamplingNet(loaded.model), loaded.config, loaded.diffusion, sampler="ddim",
                                    steps=steps, guidance=guidance)
    return pipe.from_seeds(seeds, class_labels=labels)


# -- train and tune: labels checked on the driver ---------------------------------------------------
@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory):
    """The digits training images as shards without labels (an .npz of images alone)."""
    from sklearn.datasets import load_digits

    from pipelines.storage.data import prepare_command

    root = tmp_path_factory.mktemp("unlabelled")
    np.savez(root / "digits.npz", images=load_digits().images.astype(np.uint8)[:200], levels=17)
    prepare_command(source=str(root / "digits.npz"), out=str(root / "train"), split="train")
    return root / "train"


@pytest.mark.timeout(120)
def test_train_and_tune_refuse_unlabelled_data_for_a_conditional_model_before_any_run(tmp_path, unlabelled,
                                                                                     monkeypatch):
    from pipelines import cluster

    monkeypatch.setattr(cluster, "connect", lambda *a, **k: pytest.fail("Ray was started for bad input"))
    sets = [x for s in [*TINY, "model.num_classes=10"] for x in ("--set", s)]
    for command in (["train", "--max-steps", "1"], ["tune", "--trials", "1", "--max-steps", "1"]):
        result = run_cli(*command, "--data", str(unlabelled), "--storage", str(tmp_path / "storage"), *sets)
        assert result.exit_code == 2, result.output
        assert f"{unlabelled}: the 'train' split has no labels" in result.output
        assert "model.num_classes=10" in result.output
    assert not (tmp_path / "ddpm-home" / "mlflow.db").exists() and not (tmp_path / "storage").exists()


@pytest.mark.timeout(120)
def test_train_refuses_labelled_data_with_more_classes_than_the_model(tmp_path, digits_home, monkeypatch):
    from pipelines import cluster

    monkeypatch.setattr(cluster, "connect", lambda *a, **k: pytest.fail("Ray was started for bad input"))
    sets = [x for s in [*TINY, "model.num_classes=5"] for x in ("--set", s)]
    result = run_cli("train", "--max-steps", "1", "--storage", str(tmp_path / "storage"), *sets)
    assert result.exit_code == 2, result.output
    assert "the 'train' split has 10 classes but model.num_classes=5" in result.output
    assert not (tmp_path / "storage").exists()


# -- sample: the options, checked before any folder or worker ---------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("model,options,expected", [
    ("cond", ["--class", "10"], "--class must lie in [0, 10) (the model's 10 classes), got [10]"),
    ("cond", ["--class", "-1"], "--class must lie in [0, 10)"),
    ("cond", ["--class", "1", "--classes", "balanced"], "give --class or --classes balanced, not both"),
    ("cond", ["--guidance", "2"], "--guidance needs --class or --classes balanced"),
    ("cond", ["--class", "1", "--guidance", "-0.5"], "--guidance"),  # Typer's bound
    ("cond", ["--classes", "even"], "'even'; valid: balanced"),
    ("uncond", ["--class", "3"], "--class given to an unconditional model (model.num_classes=0)"),
    ("uncond", ["--classes", "balanced"], "--classes balanced needs a class-conditional model"),
    ("uncond", ["--guidance", "2"], "--guidance=2.0 needs a class-conditional model"),
])
def test_bad_class_options_fail_with_exit_2_before_any_folder_or_worker(tmp_path, cond_ckpt, uncond_ckpt,
                                                                       no_sampling, model, options, expected):
    ckpt = cond_ckpt if model == "cond" else uncond_ckpt
    result = run_cli("sample", "--model", ckpt, "--num", "2", "--out", str(tmp_path / "out"), *options)
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(60)
def test_a_negative_guidance_through_the_api_is_a_usage_error_naming_the_range(cond_ckpt):
    from pipelines.errors import UsageError
    from pipelines.registry.models import read_config

    config = read_config(cond_ckpt)
    with pytest.raises(UsageError, match=r"--guidance must be in \[0, inf\).*got -1"):
        S.SampleRequest(model=cond_ckpt, num=2, classes=(1,), guidance=-1.0).resolved(config)
    settled = S.SampleRequest(model=cond_ckpt, num=2, balanced=True).resolved(config)
    assert settled.classes == tuple(range(10)) and settled.guidance == 1.0  # the model's sample.guidance
    assert S.SampleRequest(model=cond_ckpt, num=2).resolved(config).guidance is None  # no class: unguided


@pytest.mark.timeout(60)
def test_sample_i_asks_for_the_i_th_class_in_turn():
    assert labels_of([0, 1, 2, 3, 4], (3, 7)) == [3, 7, 3, 7, 3]
    assert labels_of([10, 11], tuple(range(10))) == [0, 1]
    assert labels_of([0, 1], ()) is None
    from ddpm.guidance import balanced_labels

    assert labels_of(list(range(23)), tuple(range(10))) == balanced_labels(23, 10).tolist()


# -- sample: each sample's class beside it (in this process: no Ray) ----------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", ["png", "npz", "webdataset"])
def test_each_samples_class_is_written_beside_it(tmp_path, cond_ckpt, fmt):
    out = tmp_path / "out"
    result = run_cli("sample", "--model", cond_ckpt, "--num", "5", "--class", "3", "--class", "7", "--guidance",
                     "2", "--sampler", "ddim", "--steps", "4", "--format", fmt, "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    summary = cli_json(result)
    assert summary["classes"] == [3, 7] and summary["guidance"] == 2.0
    labels = [3, 7, 3, 7, 3]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["labels"] == labels and manifest["classes"] == [3, 7] and manifest["guidance"] == 2.0
    names = sorted(os.listdir(out))
    if fmt == "png":
        assert [n for n in names if n.endswith(".png")] == [f"{i:08d}-class{c}.png" for i, c in enumerate(labels)]
        assert manifest["files"] == "{i:08d}-class{label}.png"
    elif fmt == "npz":
        (chunk,) = [n for n in names if n.endswith(".npz")]
        with np.load(out / chunk) as z:
            assert z["labels"].tolist() == labels and z["indices"].tolist() == list(range(5))
        want = direct(cond_ckpt, [S.sample_seed(0, i) for i in range(5)], labels, 2.0).numpy()
        got = read_npz_folder(out)
        assert np.abs(np.stack([got[i] for i in range(5)]) - want).max() < 1e-4  # (seed, class, w) decide
    else:
        (chunk,) = [n for n in names if n.endswith(".tar")]
        with tarfile.open(out / chunk) as tar:
            cls = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".cls")}
        assert cls == {f"{i:08d}.cls": str(c) for i, c in enumerate(labels)}


@pytest.mark.timeout(120)
def test_a_folder_of_other_classes_or_guidance_is_refused_and_the_same_resumes(tmp_path, cond_ckpt):
    out = str(tmp_path / "out")
    base = ["sample", "--model", cond_ckpt, "--num", "3", "--steps", "3", "--out", out]
    assert run_cli(*base, "--class", "3").exit_code == 0
    for other, said in ((["--class", "4"], "classes=[3] (asked [4])"), (["--class", "3", "--guidance", "2"],
                        "guidance=1.0 (asked 2.0)"), ([], "classes=[3] (asked None)")):
        result = run_cli(*base, *other)
        assert result.exit_code == 3 and said in result.output, result.output
    again = run_cli(*base, "--class", "3", "--json")
    assert again.exit_code == 0 and cli_json(again)["written"] == 0


# -- on the shared Ray cluster ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_same_seed_and_class_give_the_same_image_on_one_and_two_workers(ray_cluster, tmp_path, cond_ckpt):
    """Balanced classes with guidance 2: 1 worker in batches of 4, 2 workers in batches of 1, and the
    in-memory job `evaluate` uses, all equal; and equal to sampling one (seed, class) alone."""
    kw = {"balanced": True, "guidance": 2.0, "num": 6}
    one = S.write_samples(request(cond_ckpt, nodes=1, batch_size=4, **kw), str(tmp_path / "one"), fmt="npz",
                          progress=False)
    two = S.write_samples(request(cond_ckpt, nodes=2, batch_size=1, **kw), str(tmp_path / "two"), fmt="npz",
                          progress=False)
    assert (one["workers"], two["workers"]) == (1, 2)
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["nodes_used"] == 2
    a, b = read_npz_folder(tmp_path / "one"), read_npz_folder(tmp_path / "two")
    x1, x2 = np.stack([a[i] for i in range(6)]), np.stack([b[i] for i in range(6)])
    assert np.abs(x1 - x2).max() < 1e-4
    run = S.sample_arrays(request(cond_ckpt, nodes=2, batch_size=3, **kw), progress=False)
    assert run.labels == [0, 1, 2, 3, 4, 5] and np.abs(run.x.numpy() - x1).max() < 1e-4
    alone = direct(cond_ckpt, [S.sample_seed(0, 4)], [4], 2.0).numpy()  # index 4 asked for class 4
    assert np.abs(alone[0] - x1[4]).max() < 1e-4
    other = direct(cond_ckpt, [S.sample_seed(0, 4)], [5], 2.0).numpy()  # the class changes the image
    assert np.abs(other[0] - x1[4]).max() > 1e-3
