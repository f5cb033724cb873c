"""`ddpm-pipe evaluate` on a tiny random model: keyed results with directions and floors, logged to MLflow."""

from __future__ import annotations


import pytest

from tests.support import FAST, cli_json, picture_folder, register_tiny, run_cli, save_tiny_checkpoint



@pytest.mark.timeout(180)
def test_evaluate_logs_keyed_results_on_the_version_and_its_run(tmp_path, digits_home, capsys):
    from ddpm.features import FEATURE_NET_VERSION
    from ddpm.metrics import METRIC_DIRECTIONS, parse_result_key
    from pipelines import tracking
    from pipelines.registry.evaluate import EVAL_TAG, LAST_TAG, evaluate_command

    run_id, version, _ = register_tiny(tmp_path)
    out = evaluate_command(f"models:/tiny/{version}", **FAST)
    by_metric = {}
    for r in out["results"]:
        metric, deps = parse_result_key(r["key"])
        assert r["direction"] == METRIC_DIRECTIONS[metric.removesuffix("_floor")]
        by_metric[metric] = (r, deps)
    assert set(by_metric) >= {"bpd", "fd", "precision", "recall", "confidence", "copy_rate", "sec_per_sample",
                              "fd_floor", "precision_floor", "recall_floor", "confidence_floor", "copy_rate_floor",
                              "kid", "kid_floor", "classifier_score", "classifier_score_floor", "class_tv",
                              "class_tv_floor", "classes_covered", "classes_covered_floor"}
    fd, deps = by_metric["fd"]
    # Every key says what was compared with what: the samples vs the 360 held-out test images.
    # eta: the model's own for its own sampler; FAST asks for DDIM, not the digits preset's
    # SDE-DPM-Solver++, so DDIM's own default, eta 0
    assert deps == {"data": deps["data"], "eta": "0", "features": FEATURE_NET_VERSION, "num": "16",
                    "sampler": "ddim", "steps": "5", "vs": "test-360"}
    assert by_metric["bpd"][1]["num"] == "8" and by_metric["bpd"][1]["bound"] == "full"
    assert 0 < by_metric["bpd"][0]["value"] < 20
    assert by_metric["fd_floor"][1] == {"data": deps["data"], "features": FEATURE_NET_VERSION, "num": "16",
                                        "real": "train", "vs": "test-360"}
    assert by_metric["copy_rate"][1]["vs"] == "train-1437" and by_metric["copy_rate_floor"][1]["real"] == "test"
    assert "vs" not in by_metric["classifier_score"][1] and by_metric["classifier_score"][0]["direction"] == "higher"
    kid = by_metric["kid"][0]
    assert kid["se"] > 0 and kid["se_key"].startswith("kid_se/") and kid["se_key"].endswith("/vs:test-360")
    assert out["feature_net"]["test_accuracy"] >= 0.95
    assert "real data floor" in out["message"]
    assert "kid vs the test split (360)" in out["message"] and "16 training images vs the test split (360)" in out["message"]
    assert out["compared"]["copy_rate"] == "copy_rate vs the training split (1437)"
    # Issue 29: the bound and the sampling each report their progress (with an ETA while running) on stderr.
    err = capsys.readouterr().err.splitlines()
    bound = [x for x in err if x.startswith("[evaluate] bits/dim, full bound on 8 held-out images: ")]
    drawn = [x for x in err if x.startswith("[evaluate] sampling 16 images (ddim, 5 steps, 2 batches): ")]
    assert "ETA" in bound[0] and "(100%)" in bound[-1] and drawn[-1].split(": ")[1].startswith("10/10 calls (100%)")
    scoring = "[evaluate] scoring 16 samples against the test split (360 images)"
    assert f"{scoring} ..." in err and any(x.startswith(f"{scoring}: ") and x.endswith(" s") for x in err)
    assert "[evaluate] logging the results to MLflow ..." in err

    c = tracking.client()
    # The evaluation has a run of its own, beside the training run: short metric names, keys in tags.
    assert out["run_id"] != run_id
    run = c.get_run(out["run_id"])
    assert run.info.experiment_id == c.get_run(run_id).info.experiment_id and run.info.status == "FINISHED"
    assert run.data.tags["ddpm.kind"] == "evaluate" and run.data.tags["ddpm.model_version"] == f"tiny/{version}"
    assert run.data.tags["ddpm.model_run_id"] == run_id
    logged = run.data.metrics
    assert logged["fd"] == pytest.approx(fd["value"]) and run.data.tags["ddpm.key.fd"] == fd["key"]
    assert logged["kid_se"] == pytest.approx(kid["se"]) and run.data.tags["ddpm.key.kid_se"] == kid["se_key"]
    assert all(run.data.tags[f"ddpm.key.{name}"] for name in logged) and not [k for k in logged if ":" in k]
    assert not c.get_run(run_id).data.metrics  # the training run holds no evaluation results
    tags = c.get_model_version("tiny", version).tags
    assert float(tags[EVAL_TAG + fd["key"]]) == pytest.approx(fd["value"])
    assert tags[LAST_TAG + "fd"] == fd["key"]
    assert float(tags[EVAL_TAG + kid["se_key"]]) == pytest.approx(kid["se"])
    assert any(a.path.startswith("evaluation/evaluation-") for a in c.list_artifacts(out["run_id"], "evaluation"))


@pytest.mark.timeout(240)
def test_cli_evaluates_a_checkpoint_into_its_own_run_with_the_sampler_table(tmp_path, digits_home):
    from pipelines import tracking

    ckpt = save_tiny_checkpoint(tmp_path / "ckpt.pt")
    result = run_cli("evaluate", "--model", str(ckpt), "--num", "8", "--steps", "3",
                                      "--table", "--json")
    assert result.exit_code == 0, result.output
    out = cli_json(result)
    assert out["versions"] == []
    # T = 50: DDPM at 50 steps; DDIM at 10, 20, 50 (100 is capped at T) with eta 0 and 1.
    assert [(r["sampler"], r["steps"], r["eta"]) for r in out["table"]] == [
        ("ddpm", 50, 0.0), ("ddim", 10, 0.0), ("ddim", 20, 0.0), ("ddim", 50, 0.0),
        ("ddim", 10, 1.0), ("ddim", 20, 1.0), ("ddim", 50, 1.0)]
    assert out["bpd"] > 0 and all(r["sec_per_sample"] > 0 for r in out["table"])
    c = tracking.client()
    run = c.get_run(out["run_id"])
    assert run.data.tags["ddpm.kind"] == "evaluate" and run.data.tags["ddpm.model_uri"] == str(ckpt)
    assert run.info.status == "FINISHED"
    assert run.data.tags["ddpm.key.bpd"].startswith("bpd/bound:full/data:") and "bpd" in run.data.metrics
    assert "ddim-10-eta0/kid" in run.data.metrics and "ddpm-50-eta0/kid" in run.data.metrics  # the table rows
    assert run.data.tags["ddpm.key.ddim-10-eta0/kid"].startswith("kid/data:")
    names = {a.path for a in c.list_artifacts(out["run_id"], "evaluation")}
    assert {"evaluation/sampler_table.md", "evaluation/sampler_table.json"} <= names
    assert "| real data (floor) |" in out["message"]
    assert "| kid vs the test split (360) |" in out["message"] and "floor: the same comparison with 8 training" in out["message"]
    assert out["table"][0]["compared"]["kid"] == "kid vs the test split (360)"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_nodes_sample_through_the_batch_job_and_match_one_process(ray_cluster, tmp_path):
    from pipelines.registry import models
    from pipelines.registry.evaluate import generate_samples

    loaded = models.load(str(save_tiny_checkpoint(tmp_path / "tiny.pt")))
    one = generate_samples(loaded, "ddim", 5, 0.0, 6, nodes=1, address=None)
    two = generate_samples(loaded, "ddim", 5, 0.0, 6, nodes=2, address=None)
    assert one.shape == two.shape == (6, 1, 8, 8)
    assert (one - two).abs().max() < 1e-4


def test_bad_sampler_is_a_usage_error(tmp_path):
    result = run_cli("evaluate", "--model", str(tmp_path / "none.pt"), "--sampler", "euler")
    assert result.exit_code == 2 and "ddpm, ddim, dpmpp" in result.output


def test_default_steps_are_capped_at_a_small_T_and_explicit_ones_checked():
    """evaluate settles its setting once, with resolve_settings (the sample job's rule too)."""
    from ddpm.config import ExperimentConfig
    from pipelines.errors import UsageError
    from pipelines.sample.request import resolve_settings

    cfg = ExperimentConfig.preset("digits").with_values(  # e.g. a tuned T=30 model, the paper's own sampler
        {"diffusion.timesteps": 30, "sample.sampler": "ddpm", "sample.steps": None, "sample.eta": 0.0})
    assert resolve_settings(cfg, "ddim", None, None)[1] == 30  # not DDIM's default 50
    assert resolve_settings(cfg, "dpmpp", None, None)[1] == 20 and resolve_settings(cfg, "ddpm", None, None)[1] == 30
    assert resolve_settings(cfg, "ddim", 10, None)[1] == 10
    with pytest.raises(UsageError, match="T=30"):
        resolve_settings(cfg, "ddim", 31, None)


def test_train_and_evaluate_warn_when_the_test_split_holds_training_images(tmp_path, capsys, monkeypatch):
    """One folder prepared twice, as train and as test: both commands say so in one line on stderr,
    before any work; carved splits give no warning."""
    from pipelines.registry.evaluate import load_eval_data
    from pipelines.settings import resolve
    from pipelines.storage.data import prepare_command
    from pipelines.train import command as train

    class Stop(Exception):
        pass

    folder = str(picture_folder(tmp_path / "pictures"))
    prepare_command(source=folder, out=str(tmp_path / "twice" / "train"))
    prepare_command(source=folder, out=str(tmp_path / "twice" / "test"), split="test")
    prepare_command(source=folder, out=str(tmp_path / "carved"), test_fraction=0.2)
    capsys.readouterr()
    rgb = ["model.in_channels=3", "data.levels=256", "model.attn_resolutions=[]"]
    cfg = train.resolve_config("digits", rgb)
    monkeypatch.setattr(train, "run_folder", lambda *a, **k: (_ for _ in ()).throw(Stop()))  # nothing is started
    for data, shared in ((tmp_path / "twice", True), (tmp_path / "carved", False)):
        load_eval_data(cfg, str(data), resolve())
        with pytest.raises(Stop):
            train.train_command(overrides=rgb, data=str(data / "train"), storage=str(tmp_path / "storage"))
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "warning" in line]
        if shared:
            assert [line.split(":")[0] for line in lines] == ["[evaluate] warning", "[train] warning"], err
            assert all("60 of 60 test images" in line for line in lines)
        else:
            assert not lines, err


@pytest.mark.timeout(120)
def test_bound_estimate_is_16_calls_with_a_standard_error_and_agrees_with_the_full_bound(tmp_path, capsys):
    """Issue 29: the full bound (T calls per batch) took minutes on RGB data; ``--bound estimate``
    is its stratified unbiased estimate from 16 calls, keyed apart from it."""
    from types import SimpleNamespace

    import torch

    from ddpm.diffusion import Diffusion
    from ddpm.schedules import make_betas
    from pipelines.registry.evaluate import BPD_CALLS, EvalData, held_out_bpd, held_out_bpd_values
    from tests.ddpm.helpers import GaussianOracle

    diffusion = Diffusion(make_betas("linear", 200), variance="fixed_large")
    oracle = GaussianOracle(diffusion.alphas_cumprod, 0.3, 0.5)
    loaded = SimpleNamespace(diffusion=diffusion, model=oracle)
    test = (0.3 + 0.5 * torch.randn(96, 1, 2, 2, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    test = (test * 8).round() / 8  # on 17 levels
    ev = EvalData(test=test, train=None, levels=17, source="gauss", test_hash="abc", hash="abc",
                  test_url="x", train_url=None)
    full = held_out_bpd(loaded, ev, 96, batch_size=64)
    values, errors = held_out_bpd_values(loaded, ev, 96, batch_size=64)  # per image: bench_bpd pairs them
    assert values.shape == (96,) and errors is None and values.double().mean().item() == pytest.approx(full["value"])
    oracle.calls.clear()
    est = held_out_bpd(loaded, ev, 96, batch_size=64, bound="estimate")
    assert len(oracle.calls) == 2 * BPD_CALLS  # two batches of 16 calls, not 2 x 200
    assert full["key"].startswith("bpd/bound:full/") and "se" not in full
    assert est["key"].startswith(f"bpd/bound:estimate-{BPD_CALLS}/") and est["se"] > 0
    assert est["se_key"].startswith(f"bpd_se/bound:estimate-{BPD_CALLS}/")
    assert abs(est["value"] - full["value"]) < 4 * est["se"]
    err = capsys.readouterr().err
    assert f"[evaluate] bits/dim, stratified estimate of the bound, {BPD_CALLS} calls on 96 held-out images: " \
           f"{2 * BPD_CALLS}/{2 * BPD_CALLS} calls (100%)" in err


def test_bad_bound_is_a_usage_error(tmp_path):
    result = run_cli("evaluate", "--model", str(tmp_path / "none.pt"), "--bound", "half")
    assert result.exit_code == 2 and "full, estimate" in result.output


@pytest.mark.timeout(240)
def test_evaluate_refuses_a_checkpoint_whose_config_name_leaves_ddpm_home(tmp_path, digits_home):
    """evaluate names its experiment (and, on the local store, ``mlartifacts/<name>``) after the
    model's own config: a name like ``../../escape`` is refused (exit 2) before anything is created
    (issue 25, item 9)."""
    from ddpm.checkpoint import save_checkpoint
    from ddpm.ema import EMA
    from ddpm.unet import UNet
    from tests.support import mlflow_client, tiny_config

    cfg = tiny_config()
    text = cfg.to_json().replace('"name": "digits"', '"name": "../../escape"')
    assert '"../../escape"' in text
    model = UNet(cfg.model)
    save_checkpoint(str(tmp_path / "bad.pt"), {"config": text, "model": model.state_dict(),
                                               "ema": EMA(model).state_dict(), "step": 1})
    result = run_cli("evaluate", "--model", str(tmp_path / "bad.pt"), "--num", "8", "--steps", "3")
    assert result.exit_code == 2, result.output
    assert "not a valid experiment name" in result.output
    assert not (digits_home.parent / "escape").exists() and not (tmp_path / "escape").exists()
    assert mlflow_client().get_experiment_by_name("../../escape") is None


@pytest.mark.timeout(300)
def test_rgb_data_gets_feature_scores_offline_from_a_network_trained_on_its_training_split(capsys):
    """Issue 29, item 4: on a user's own RGB images, offline, evaluate gives KID, FD, precision,
    recall and the copy rate in the space of a network trained on the training split (with their
    standard errors and floors, keyed by that network), beside the pixel scores; the network is
    trained once per split and then read from the cache."""
    import torch

    from pipelines.registry.evaluate import EvalData, score_samples
    from pipelines.settings import resolve

    g = torch.Generator().manual_seed(0)
    # pictures with structure (a bright square somewhere on a dark background), on 256 levels
    def pictures(n: int) -> torch.Tensor:
        x = -torch.ones(n, 3, 8, 8)
        for i in range(n):
            r, c = torch.randint(0, 5, (2,), generator=g).tolist()
            x[i, :, r:r + 3, c:c + 3] = torch.rand(3, 1, 1, generator=g) * 2 - 1
        return ((x + 1) * 127.5).round() / 127.5 - 1

    ev = EvalData(test=pictures(120), train=pictures(300), levels=256, source="pictures", test_hash="t",
                  hash="h" * 12, test_url="x", train_url="y")
    out = score_samples(pictures(150), 1.0, ev, "ddim", 10, 0.0, resolve())
    err = capsys.readouterr().err
    assert "[evaluate] training the feature network on 300 training images (quarter-turns; cached after)" in err
    for name in ("kid", "fd", "precision", "recall", "copy_rate", "pixel_fd", "fine_spread"):
        assert name in out["scores"] and name in out["floors"], name
        assert out["se"][name] is not None and out["se"][name] > 0, name
    keys = {r["key"].split("/")[0]: r["key"] for r in out["results"]}
    assert "features:data-cnn-v1-turns" in keys["kid"] and "vs:test-120" in keys["kid"]
    assert "features:data-cnn-v1-turns" in keys["kid_floor"]
    assert "features:pixel-pca-v1-" in keys["pixel_fd"]
    assert out["feature_net"]["task"] == "turns" and out["feature_net"]["chance"] == 0.25
    assert any("Inception FID skipped" in n for n in out["notes"])
    # real pictures of the same kind sit at the floor; the network is read from the cache the second time
    again = score_samples(pictures(150), 1.0, ev, "ddim", 10, 0.0, resolve(), spacing="trailing")
    assert "training the feature network" not in capsys.readouterr().err
    # the grid is in the key when it is not the sampler's own (a distilled student's DDIM 10 is not its
    # teacher's), and only then: keys of the default grid stay as they were
    sampled = [r["key"] for r in again["results"] if "sampler:" in r["key"]]  # floors do not depend on it
    assert sampled and all("/spacing:trailing" in key for key in sampled)
    assert not any("spacing" in r["key"] for r in out["results"])
    assert "spacing" not in score_samples(pictures(150), 1.0, ev, "ddim", 10, 0.0, resolve(),
                                          spacing="linspace")["results"][0]["key"]
    assert again["scores"]["kid"] - again["floors"]["kid"] < 3 * (again["se"]["kid"] + again["floor_se"]["kid"])
    # a labelled split (class subfolders): the task is classes and turns, and its name is a valid key part
    from ddpm.metrics import parse_result_key

    labelled = EvalData(test=ev.test, train=ev.train, levels=256, source="pictures", test_hash="t", hash="l" * 12,
                        test_url="x", train_url="y", test_labels=torch.arange(120) % 2,
                        train_labels=torch.arange(300) % 2)
    got = score_samples(pictures(150), 1.0, labelled, "ddim", 10, 0.0, resolve())
    assert got["feature_net"]["task"] == "classes-turns" and got["feature_net"]["chance"] == 0.125
    kid = next(r["key"] for r in got["results"] if r["metric"] == "kid")
    assert "features:data-cnn-v1-classes-turns" in kid and parse_result_key(kid)
