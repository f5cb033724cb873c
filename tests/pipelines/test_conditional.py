"""Class-conditional models through the commands (issue 26): labels checked before any run, `sample
--class/--classes/--guidance` and each sample's class written beside it, the same (seed, class)
giving the same image on any number of workers, `interpolate`, the registered pyfunc, `evaluate`'s
per-class scores and guidance sweep, `promote` on conditional accuracy. The library's side is
tests/ddpm/test_guidance.py."""

from __future__ import annotations

import json
import os
import re
import tarfile

import numpy as np
import pytest
import torch

from pipelines.sample import command as S
from pipelines.sample.request import labels_of
from tests.support import (TINY, TINY_NET, cli_json, read_npz_folder, register_tiny, request, run_cli,
                           save_tiny_checkpoint,
                           tiny_overrides)

# A tiny network class-conditional on 10 classes, 32 channels wide: narrower, its GroupNorm has one
# channel per group, which erases the timestep and class embeddings' per-channel shift, so the
# class would not change the image.
COND = [*tiny_overrides(32), "model.num_classes=10"]


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


# -- interpolate -----------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_interpolate_decodes_the_mixes_asking_for_the_class_with_guidance(tmp_path, cond_ckpt, uncond_ckpt):
    from PIL import Image

    from ddpm.guidance import ClassifierFreeGuidance
    from ddpm.image import grid
    from ddpm.interpolate import interpolate
    from pipelines.registry import models
    from pipelines.sample.interpolate import read_image

    rng = np.random.default_rng(0)
    a, b = str(tmp_path / "a.png"), str(tmp_path / "b.png")
    for path in (a, b):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(path)
    args = ["interpolate", "--model", cond_ckpt, "--a", a, "--b", b, "--t", "30", "--lambdas", "3"]
    strips = {}
    for name, options in (("3", ["--class", "3", "--guidance", "2"]), ("5", ["--class", "5", "--guidance", "2"]),
                          ("none", [])):
        result = run_cli(*args, "--out", str(tmp_path / f"{name}.png"), *options, "--json")
        assert result.exit_code == 0, result.output
        summary = cli_json(result)
        assert summary["labels"] == (None if name == "none" else [int(name)] * 3)
        strips[name] = np.asarray(Image.open(tmp_path / f"{name}.png")).astype(int)
    assert (strips["3"] != strips["5"]).any() and (strips["3"] != strips["none"]).any()
    loaded = models.load(cond_ckpt)  # the library's interpolation of the guided network, drawn the same way
    x_a, x_b = read_image(a, 1, 8, 17), read_image(b, 1, 8, 17)
    net = ClassifierFreeGuidance(loaded.model, torch.tensor([3, 3, 3]), 2.0, 10)
    mixes = interpolate(net, loaded.diffusion, x_a, x_b, 30, 3, 0)
    drawn = grid(torch.cat([x_a, mixes, x_b]), levels=17, nrow=5, scale=4)[..., 0]
    assert (drawn.astype(int) == strips["3"]).all()
    for model, options, expected in ((uncond_ckpt, ["--class", "3"], "--class given to an unconditional model"),
                                     (cond_ckpt, ["--class", "11"], "--class must lie in [0, 10)"),
                                     (cond_ckpt, ["--guidance", "3"], "--guidance needs --class")):
        out = tmp_path / "bad.png"
        result = run_cli("interpolate", "--model", model, "--a", a, "--b", b, "--t", "30", "--out", str(out), *options)
        assert result.exit_code == 2 and expected in result.output, result.output
        assert not out.exists()


# -- the registered model --------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_the_pyfunc_takes_class_labels_and_guidance_as_a_serving_endpoint_does(tmp_path):
    """`mlflow models predict` checks the payload against the signature, then predicts, as `mlflow
    models serve` does; the images are the pipeline's for the same (seed, class, w)."""
    import mlflow

    from ddpm.image import to_uint8
    from pipelines import tracking

    run_id, version, ckpt = register_tiny(tmp_path, "cond", overrides=COND)
    info = mlflow.models.get_model_info(f"models:/cond/{version}")
    columns = {c["name"]: c for c in info.signature.inputs.to_dict()}
    assert not columns["class_labels"]["required"] and not columns["guidance"]["required"]
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/cond/{version}", dst_path=str(tmp_path / "m"))
    assert json.loads(open(os.path.join(local, "input_example.json")).read())["class_labels"] == [0, 1]

    def predict(payload: dict, name: str) -> np.ndarray:
        out = tmp_path / f"{name}.json"
        mlflow.models.predict(f"models:/cond/{version}", input_data=payload, env_manager="local", output_path=str(out))
        return np.asarray(json.loads(out.read_text())["predictions"])

    seeds = [S.sample_seed(0, i) for i in range(3)]
    got = predict({"num": 3, "seed": 0, "sampler": "ddim", "steps": 4, "class_labels": [2, 5, 9], "guidance": 2.0}, "a")
    assert (got == to_uint8(direct(str(ckpt), seeds, [2, 5, 9], 2.0), 17)).all()
    one = predict({"num": 2, "seed": 0, "sampler": "ddim", "steps": 4, "class_labels": [4]}, "b")  # one for all
    assert (one == to_uint8(direct(str(ckpt), seeds[:2], [4, 4], 1.0), 17)).all()
    for bad, said in (({"class_labels": [10, 0]}, "must lie in [0, 10)"), ({"class_labels": [1, 2, 3]}, "3 class labels"),
                      ({"class_labels": [1, 2], "guidance": -1.0}, "guidance must be in [0, inf)")):
        with pytest.raises(Exception, match=re.escape(said)):
            predict({"num": 2, "seed": 0, "sampler": "ddim", "steps": 4, **bad}, "bad")
    description = tracking.client().get_model_version("cond", version).description
    assert ("class-conditional on 10 classes, labels 0..9, label 10 the null class (unconditional), trained with "
            "label dropout 0.1, sampled with classifier-free guidance w=1 by default") in description


# -- evaluate and promote --------------------------------------------------------------------------
@pytest.mark.timeout(600)
def test_evaluate_adds_conditional_accuracy_per_class_scores_and_the_guidance_sweep(tmp_path, digits_home):
    from ddpm.metrics import parse_result_key
    from pipelines import tracking
    from pipelines.registry import EVAL_TAG, LAST_TAG
    from pipelines.registry.evaluate import evaluate_command
    from pipelines.registry.evaluate_classes import SWEEP

    _, version, _ = register_tiny(tmp_path, "cond", overrides=COND)
    out = evaluate_command(f"models:/cond/{version}", num=60, sampler="ddim", steps=3, bpd_images=8)
    keyed = {r["key"]: r for r in out["results"]}
    by = {}
    for key in keyed:
        metric, deps = parse_result_key(key)
        by.setdefault(metric, []).append(deps)
    (kid,) = [d for d in by["kid"] if "class" not in d and "guidance" not in d]  # the null class: no classes
    assert "classes" not in kid and kid["vs"] == "test-360"
    (acc,) = [d for d in by["cond_accuracy"] if "class" not in d and d["guidance"] == "1"]
    assert acc["classes"] == "balanced" and acc["num"] == "60" and "vs" not in acc
    assert {d["guidance"] for d in by["cond_accuracy"]} == {f"{w:g}" for w in SWEEP}  # 1 and the sweep's
    assert sorted(int(d["class"]) for d in by["cond_accuracy"] if "class" in d) == list(range(10))
    assert sorted(d["vs"] for d in by["kid"] if "class" in d)[0].startswith("test-class0-")
    cond = out["conditional"]
    assert [r["guidance"] for r in cond["sweep"]] == list(SWEEP) and cond["per_class"]["3"]["num"] == 6
    assert 0 <= cond["scores"]["cond_accuracy"] <= 1 and cond["se"]["cond_accuracy"] > 0
    assert "conditional accuracy" in out["message"] and "| w | conditional accuracy |" in out["message"]

    c = tracking.client()
    run = c.get_run(out["run_id"])
    metrics = run.data.metrics
    assert {"cond_accuracy", "cond_accuracy_se", "class_spread", "class3/cond_accuracy", "class3/kid",
            "guidance-1.5/cond_accuracy", "guidance-5/recall", "guidance-0/class_spread", "kid"} <= set(metrics)
    assert "guidance-1/cond_accuracy" not in metrics  # the w = 1 row is the setting asked for: cond_accuracy
    assert run.data.tags["ddpm.key.class3/cond_accuracy"].startswith("cond_accuracy/class:3/")
    names = {a.path for a in c.list_artifacts(out["run_id"], "evaluation")}
    assert {"evaluation/guidance_sweep.json", "evaluation/guidance_sweep.md"} <= names
    assert any(n.startswith("evaluation/samples-classes-w1-") for n in names)
    tags = c.get_model_version("cond", version).tags
    assert tags[LAST_TAG + "cond_accuracy"].startswith("cond_accuracy/classes:balanced/")
    assert float(tags[EVAL_TAG + tags[LAST_TAG + "cond_accuracy"]]) == pytest.approx(cond["scores"]["cond_accuracy"])

    # Asking for the classes makes them the main setting's: its keys say which, and the sweep is off.
    asked = run_cli("evaluate", "--model", f"models:/cond/{version}", "--num", "20", "--sampler", "ddim", "--steps",
                    "3", "--classes", "balanced", "--guidance", "2", "--no-guidance-sweep", "--json")
    assert asked.exit_code == 0, asked.output
    result = cli_json(asked)
    main_kid = [r for r in result["results"] if r["metric"] == "kid"][0]
    assert "/classes:balanced/" in main_kid["key"] and "/guidance:2/" in main_kid["key"]
    assert result["conditional"]["sweep"] == [] and result["conditional"]["guidance"] == 2.0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("model,options,expected", [
    ("uncond", ["--class", "3"], "--class given to an unconditional model"),
    ("uncond", ["--guidance-sweep"], "--guidance-sweep needs a class-conditional model"),
    ("cond", ["--class", "12"], "--class must lie in [0, 10)"),
    ("cond", ["--guidance", "2"], "--guidance needs --class or --classes balanced"),
    ("cond", ["--class", "2", "--guidance", "-3"], "--guidance"),
])
def test_evaluate_refuses_bad_class_options_before_any_run(tmp_path, cond_ckpt, uncond_ckpt, model, options,
                                                          expected):
    result = run_cli("evaluate", "--model", cond_ckpt if model == "cond" else uncond_ckpt, "--num", "8", *options)
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert not (tmp_path / "ddpm-home" / "mlflow.db").exists()


@pytest.mark.timeout(600)
def test_promote_gates_on_conditional_accuracy(tmp_path, digits_home):
    from pipelines.registry.evaluate import evaluate_command

    for seed in (0, 1):
        _, version, _ = register_tiny(tmp_path, "gated", seed=seed, overrides=COND)
        evaluate_command(f"models:/gated/{version}", num=20, sampler="ddim", steps=2, bpd_images=4,
                         guidance_sweep=False)
    first = run_cli("promote", "--name", "gated", "--version", "1", "--metric", "cond_accuracy", "--json")
    assert first.exit_code == 0, first.output
    assert cli_json(first)["key"].startswith("cond_accuracy/classes:balanced/")
    refused = run_cli("promote", "--name", "gated", "--version", "2", "--metric", "cond_accuracy",
                      "--min-delta", "1", "--json")
    assert refused.exit_code == 3, refused.output  # no accuracy gains more than 1
    assert "cond_accuracy" in cli_json(refused)["error"] and "higher is better" in cli_json(refused)["error"]


# -- tune ------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_tune_refuses_to_sweep_guidance_and_names_evaluates_sweep(tmp_path):
    """Guidance is chosen at sampling time: trials rank on held-out bits/dim, which it does not change,
    so a sweep over it is evaluate's table of one trained model, not a trial per w."""
    from ddpm.config import ConfigError, load_config
    from pipelines.tune import search_space

    space = tmp_path / "space.yaml"
    space.write_text("sample.guidance: {type: choice, values: [1.0, 2.0, 3.0]}\n")
    cond = load_config("digits", ["model.num_classes=10"])
    with pytest.raises(ConfigError, match="sample.guidance' is a sampling-time setting"):
        search_space.load_space(str(space), cond)
    result = run_cli("tune", "--space", str(space), "--trials", "1", "--set", "model.num_classes=10")
    assert result.exit_code == 2, result.output
    assert "needs no retraining; sweep it with ddpm-pipe evaluate --model MODEL" in result.output
    assert not (tmp_path / "ddpm-home" / "mlflow.db").exists()
    space.write_text("sample.guidance: 2.0\n")  # a fixed value is a config value, as with --set
    assert search_space.load_space(str(space), cond)["sample.guidance"] == 2.0
