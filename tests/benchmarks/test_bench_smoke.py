"""Each benchmark's --quick mode runs and writes the JSON the suite's table reads."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("diffusers")


def _read(path) -> dict:
    with open(path) as f:
        return json.load(f)


def _machine_ok(m: dict) -> None:
    assert {"torch", "cpus", "threads", "loadavg"} <= set(m) and len(m["loadavg"]) == 3


@pytest.mark.timeout(600)
def test_train_quick(tmp_path):
    from benchmarks import bench_train

    bench_train.main(["--quick", "--json-out", str(tmp_path / "train.json")])
    r = _read(tmp_path / "train.json")
    _machine_ok(r["machine"])
    assert r["benchmark"] == "train_step" and r["gflop_per_image_fwd_bwd"] > 0
    assert {row["precision"] for row in r["results"]} == {"fp32", "bf16"}
    for row in r["results"]:
        assert row["ours"]["images_per_s"] > 0 and row["diffusers"]["images_per_s"] > 0
        assert row["ratio"] > 0 and row["ratio_cl"] > 0 and 0 < row["ours"]["share_of_matmul_peak"]
    assert r["matmul_peak"]["fp32"]["median_gflops"] > 0


@pytest.mark.timeout(600)
def test_forward_quick(tmp_path):
    from benchmarks import bench_forward

    bench_forward.main(["--quick", "--ddim-steps", "2", "--json-out", str(tmp_path / "forward.json")])
    r = _read(tmp_path / "forward.json")
    _machine_ok(r["machine"])
    fp32, bf16 = r["results"]
    assert fp32["ours"]["evals_per_s"] > 0 and fp32["ratio"] > 0 and fp32["ratio_cl"] > 0
    assert bf16["ours_bf16_weights"]["evals_per_s"] > 0 and bf16["ratio_bf16_weights"] > 0
    assert bf16["ratio_bf16_cl"] > 0 and bf16["diffusers_bf16_weights"]["evals_per_s"] > 0
    assert r["ddim"]["ours_s"] > 0 and r["ddim"]["ratio"] > 0


@pytest.mark.timeout(600)
def test_digits_quick(tmp_path):
    from benchmarks import bench_digits

    bench_digits.main(["--quick", "--time-to-quality", "--json-out", str(tmp_path / "digits.json")])
    r = _read(tmp_path / "digits.json")
    assert [row["precision"] for row in r["runs"]] == ["fp32", "bf16"]
    assert all(row["loss"] > 0 and row["pixel_frechet"] >= 0 for row in r["runs"])
    assert set(r["bf16_over_fp32"]) == {"loss", "images_per_s", "pixel_frechet"}
    for q in r["time_to_quality"]:  # scored every 2 steps; the clock stops at the first check at the floor
        steps, fds = [c["step"] for c in q["checks"]], [c["fd"] for c in q["checks"]]
        assert steps in ([2], [2, 4]) and q["floor_fd"] > 0
        assert all(fd > q["floor_fd"] for fd in fds[:-1])
        if q["seconds_to_floor"] is None:
            assert steps == [2, 4] and fds[-1] > q["floor_fd"]
        else:
            assert fds[-1] <= q["floor_fd"] and q["reached_at_step"] == steps[-1]
            assert q["seconds_to_floor"] == q["checks"][-1]["train_s"]


@pytest.mark.timeout(600)
def test_allreduce_quick(tmp_path):
    from benchmarks import bench_allreduce

    bench_allreduce.main(["--quick", "--json-out", str(tmp_path / "ar.json")])
    r = _read(tmp_path / "ar.json")
    assert [row["workers"] for row in r["results"]] == [1, 2]
    assert r["results"][1]["bus_gb_per_s"] > 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_serve_bench_runs_bounded_and_reports_batches(tmp_path):
    """bench_serve in a process of its own (it starts a local Ray instance): a few requests, the
    offline, bare and HTTP figures, and the batches the replica formed."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "benchmarks.bench_serve", "--requests", "2", "--concurrency", "4",
                    "--max-batch-size", "8", "--offline-num", "8", "--time-limit", "120", "--multi-num", "2",
                    "--out", str(tmp_path / "serve.json")], check=True, timeout=540, stdout=subprocess.DEVNULL)
    r = _read(tmp_path / "serve.json")
    _machine_ok(r["machine"])
    assert r["offline"]["images_per_s"] > 0 and r["bare_one_image"]["p50_ms"] > 0
    assert r["latency_one_image"]["requests"] == 2 and r["saturation"]["requests"] == 8
    assert r["saturation"]["errors"] == 0 and r["saturation_vs_offline"] > 0
    assert r["server"]["batches"] >= 1 and r["server"]["mean_batch_images"] >= 1
    assert r["saturation"]["keep_alive"] and r["latency_one_image"]["errors"] == 0
    # Serve's own cost per request (nothing sampled), and requests of 2 images from 4 // 2 clients
    assert r["http_only"]["requests"] == 8 and r["http_only"]["errors"] == 0 and r["http_only"]["requests_per_s"] > 0
    assert r["multi_image"]["requests"] == 4 and r["multi_image"]["num"] == 2 and r["multi_image"]["errors"] == 0
    assert 0 < r["one_image_bound_vs_offline"] < 1 and r["multi_image_vs_offline"] > 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ray_quick_and_table(tmp_path):
    """As a user runs it, in a process of its own: the benchmark starts its own local Ray instance,
    which this process may not do once the session's cluster is up (any order of the tests)."""
    import subprocess
    import sys

    from benchmarks import run

    subprocess.run([sys.executable, "-m", "benchmarks.bench_ray", "--quick", "--threads", "1",
                    "--json-out", str(tmp_path / "ray.json")], check=True, timeout=840,
                   stdout=subprocess.DEVNULL)
    r = _read(tmp_path / "ray.json")
    _machine_ok(r["machine"])
    assert r["plain"]["images_per_s"] > 0 and r["ray"]["images_per_s"] > 0 and r["ratio"] > 0
    text = run.main(["--table-only", "--out", str(tmp_path)])
    assert "Ray Train" in text and (tmp_path / "table.md").exists()


def test_quality_compare_calls_a_winner_only_beyond_two_standard_errors():
    from benchmarks.bench_quality import compare

    ours = {"scores": {"kid": 0.10, "classifier_score": 8.0, "classes_covered": 10.0}, "seconds": 2.0,
            "se": {"kid": 0.01, "classifier_score": 0.3, "classes_covered": None}}
    theirs = {"scores": {"kid": 0.20, "classifier_score": 8.5, "classes_covered": 9.0}, "seconds": 4.0,
              "se": {"kid": 0.02, "classifier_score": 0.4, "classes_covered": None}}
    c = compare(ours, theirs)
    assert c["kid"]["better"] == "ddpm-pipe" and abs(c["kid"]["z"] - -0.1 / math.hypot(0.01, 0.02)) < 1e-9
    # On the lower-is-better scale (ddpm.metrics.badness): ours 0.5 worse, one standard error of 0.5.
    assert c["classifier_score"] == {"diff": 0.5, "z": 1.0, "mdd": 1.0, "better": "within noise"}
    assert c["classes_covered"] == {"diff": -1.0, "z": None, "mdd": None, "better": "ddpm-pipe"}  # no s.e.: as is
    assert c["seconds_ratio"] == 0.5
    theirs["scores"]["kid"] = 0.05  # lower kid is better: now the baseline wins
    assert compare(ours, theirs)["kid"]["better"] == "diffusers"


def test_quality_compare_counts_a_copy_rate_only_above_the_real_datas_own():
    """Under the floor (held-out images' own copy rate) a lower copy rate is no better: blobs score 0."""
    from benchmarks.bench_quality import compare

    def row(copy_rate):
        return {"scores": {"copy_rate": copy_rate}, "se": {"copy_rate": 0.005}, "seconds": 1.0}

    floors = {"copy_rate": 0.05}
    assert compare(row(0.03), row(0.0))["copy_rate"]["better"] == "diffusers"  # without floors: as is
    c = compare(row(0.03), row(0.0), floors)["copy_rate"]
    assert c == {"diff": 0.0, "z": 0.0, "mdd": 2 * math.hypot(0.005, 0.005), "better": "within noise"}  # level
    c = compare(row(0.09), row(0.0), floors)["copy_rate"]  # ours copies: 0.04 above the floor
    assert c["better"] == "diffusers" and abs(c["diff"] - 0.04) < 1e-12
    c = compare(row(0.02), row(0.12), floors)["copy_rate"]
    assert c["better"] == "ddpm-pipe" and abs(c["diff"] - -0.07) < 1e-12
    assert compare(row(0.06), row(0.05), floors)["copy_rate"]["better"] == "within noise"  # 1.4 s.e.


def test_quality_says_where_each_row_stands_against_the_real_datas_floor():
    from benchmarks.bench_quality import vs_floor

    floors = {"kid": 0.003, "classifier_score": 9.9, "copy_rate": 0.05, "classes_covered": 10.0}
    floor_se = {"kid": 0.015, "classifier_score": 0.05, "copy_rate": 0.01, "classes_covered": None}
    row = {"scores": {"kid": 0.02, "classifier_score": 9.3, "copy_rate": 0.0, "classes_covered": 10.0},
           "se": {"kid": 0.02, "classifier_score": 0.09, "copy_rate": 0.001, "classes_covered": None}}
    assert vs_floor(row, floors, floor_se) == {"kid": "at the floor", "classifier_score": "worse",
                                               "classes_covered": "at the floor", "copy_rate": "at the floor"}
    row["scores"].update(kid=0.2, copy_rate=0.2, classes_covered=3.0, classifier_score=10.5)
    assert vs_floor(row, floors, floor_se) == {"kid": "worse", "classifier_score": "better",
                                               "classes_covered": "worse", "copy_rate": "worse"}


def test_quality_adds_the_models_own_sampler_setting_once():
    from benchmarks.bench_quality import SAMPLERS, setting_name, with_default
    from ddpm.config import ExperimentConfig

    digits = ExperimentConfig.preset("digits")
    assert with_default(SAMPLERS, digits) == (*SAMPLERS, ("dpmpp-2m-sde", 20, 0.0))  # the preset's default
    assert with_default(SAMPLERS, digits, quick=True)[-1] == ("dpmpp-2m-sde", 3, 0.0)
    plain = digits.with_values({"sample.sampler": "dpmpp", "sample.steps": None, "sample.eta": 0.0})
    assert with_default(SAMPLERS, plain) == SAMPLERS  # dpmpp-20 is among them already
    assert setting_name({"sampler": "ddim", "steps": 25, "eta": 1.0}) == "ddim-25-eta1"
    assert setting_name({"sampler": "ddim", "steps": 50, "eta": 0.0}) == "ddim-50"
    assert setting_name({"sampler": "unipc", "steps": 20, "eta": 0.0, "spacing": "logsnr"}) == "unipc-20"  # its own
    assert setting_name({"sampler": "dpmpp", "steps": 20, "eta": 0.0, "spacing": "logsnr"}) == "dpmpp-20@logsnr"


@pytest.mark.slow  # two trainings of seconds, 300 samples and their scores: minutes on 2 loaded cores
@pytest.mark.timeout(900)
def test_quality_quick(tmp_path):
    from benchmarks import bench_quality

    bench_quality.main(["--quick", "--json-out", str(tmp_path / "quality.json"), "--save", str(tmp_path / "models")])
    r = _read(tmp_path / "quality.json")
    from ddpm.checkpoint import load_model

    cfg, model, _ = load_model(str(tmp_path / "models" / "ddpm-pipe.pt"))  # what `evaluate --model` loads
    assert cfg.name == "digits" and sum(p.numel() for p in model.parameters()) == r["models"]["ddpm-pipe"]["params"]
    assert (tmp_path / "models" / "diffusers" / "config.json").exists()
    _machine_ok(r["machine"])
    assert r["benchmark"] == "quality" and r["quick"] and r["samples"] == 50 and r["budget_s"] == 3.0
    ours, theirs = r["models"]["ddpm-pipe"], r["models"]["diffusers"]
    assert ours["steps"] >= 1 and ours["stopped_by_time"] and ours["config"]["model"]["ch"] == 32  # the preset
    assert theirs["steps"] >= 1 and theirs["params"] == 3_990_017  # issue 15's baseline: about 4.0M
    assert [(row["model"], row["sampler"], row["steps"], row["eta"]) for row in r["results"]] == [
        (m, s, n, e) for s, n, e in (("ddpm", 5, 0), ("ddim", 3, 0), ("dpmpp", 3, 0), ("dpmpp-2m-sde", 3, 0))
        for m in ("ddpm-pipe", "diffusers")]  # issue 15's three, then the preset's own (SDE-DPM-Solver++)
    for row in r["results"]:
        assert row["num"] == 50 and row["seconds"] > 0
        assert {"kid", "fd", "classifier_score", "classes_covered", "copy_rate"} <= set(row["scores"])
        assert row["se"]["kid"] > 0
    assert {"kid", "fd", "classifier_score"} <= set(r["floors"])
    assert "test split (360 held-out digits)" in r["compared"] and "50 training images" in r["compared"]
    assert set(r["vs_diffusers"]) == {"ddpm-5", "ddim-3", "dpmpp-3", "dpmpp-2m-sde-3"}
    for row in r["results"]:
        assert set(row["vs_floor"]) >= {"kid", "fd", "classifier_score", "copy_rate"}
        assert set(row["vs_floor"].values()) <= {"at the floor", "worse", "better"}
    for c in r["vs_diffusers"].values():
        for name in ("kid", "fd", "classifier_score"):
            assert (c[name]["better"] == "within noise") == (abs(c[name]["z"]) < 2)


@pytest.mark.timeout(600)
def test_samplers_table_rows_compare_with_the_first(tmp_path):
    """A tiny random checkpoint, four rows of few steps: each row scored, compared with the first,
    and the table in the form scripts/plots.py --sampler-table reads."""
    from benchmarks import bench_samplers
    from tests.support import save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tmp_path / "tiny.pt")
    r = bench_samplers.main(["--model", str(ckpt), "--num", "40", "--rows", "ddpm:4", "ddim:3", "ddim:3:1",
                             "dpmpp:3", "unipc:3@trailing", "ddpm-analytic:3", "--json-out",
                             str(tmp_path / "samplers.json")])
    assert r == _read(tmp_path / "samplers.json")
    assert [(row["sampler"], row["steps"], row["eta"], row["spacing"]) for row in r["table"]] == [
        ("ddpm", 4, 0.0, "linspace"), ("ddim", 3, 0.0, "linspace"), ("ddim", 3, 1.0, "linspace"),
        ("dpmpp", 3, 0.0, "linspace"), ("unipc", 3, 0.0, "trailing"), ("ddpm-analytic", 3, 0.0, "linspace")]
    assert r["reference"] == "ddpm-4" and r["table"][0]["vs_reference"] == {}
    for row in r["table"]:  # the variance ratio along each of the digits' 21 pixel-PCA components
        assert len(row["component_ratios"]) == 21 and all(v > 0 for v in row["component_ratios"])
        assert {"kid", "pixel_fd", "fine_spread"} <= set(row["vs_floor"])
    for row in r["table"][1:]:
        assert row["num"] == 40 and row["seconds"] > 0 and {"kid", "classifier_score"} <= set(row["vs_reference"])
        assert row["vs_reference"]["fine_spread"]["mdd"] > 0  # the paired comparison's smallest detectable gap
        for c in row["vs_reference"].values():
            assert c["verdict"] in ("better", "worse", "within noise")
            if c["z"] is not None:
                assert (c["verdict"] == "within noise") == (abs(c["z"]) < 2 or c["diff"] == 0)
    with pytest.raises(SystemExit):
        bench_samplers.main(["--model", str(ckpt), "--rows", "ddim"])
    # a student row (issue 28): another model, sampled with its own config's sampler, steps and grid
    student = save_tiny_checkpoint(tmp_path / "student.pt", seed=1, overrides=[
        "sample.sampler=ddim", "sample.steps=2", "sample.spacing=trailing", "sample.eta=0"])
    r = bench_samplers.main(["--model", str(ckpt), "--num", "40", "--rows", "ddim:2@trailing",
                             "--students", str(student), "--json-out", str(tmp_path / "distill.json")])
    assert [(row["model"], row["sampler"], row["steps"], row["spacing"]) for row in r["table"]] == [
        (str(ckpt), "ddim", 2, "trailing"), (str(student), "ddim", 2, "trailing")]
    assert r["table"][1]["scores"]["kid"] != r["table"][0]["scores"]["kid"]  # another network
    assert "kid" in r["table"][1]["vs_reference"] and bench_samplers.table(r).count(str(student)) == 1
    # URI#ROW: another model with a row of its own; the reference model itself with the reference's row
    # gives the reference's samples again (a paired gap of exactly 0)
    r = bench_samplers.main(["--model", str(ckpt), "--num", "40", "--rows", "ddim:2@trailing", "--students",
                             f"{student}#ddim:3:1", f"{ckpt}#ddim:2@trailing",
                             "--json-out", str(tmp_path / "cross.json")])
    assert [(row["model"], row["sampler"], row["steps"], row["eta"]) for row in r["table"]] == [
        (str(ckpt), "ddim", 2, 0.0), (str(student), "ddim", 3, 1.0), (str(ckpt), "ddim", 2, 0.0)]
    assert r["table"][2]["scores"] == r["table"][0]["scores"]
    assert r["table"][2]["vs_reference"]["kid"]["diff"] == 0
    with pytest.raises(SystemExit):
        bench_samplers.main(["--model", str(ckpt), "--students", f"{student}#ddim"])


@pytest.mark.timeout(300)
def test_bpd_compares_models_per_image(tmp_path):
    """A model against itself differs by exactly 0 per image; another network by a non-zero amount,
    with the paired standard error and the smallest detectable difference (two of them)."""
    from benchmarks import bench_bpd
    from tests.support import TINY_NET, save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tmp_path / "tiny.pt", overrides=TINY_NET)
    other = save_tiny_checkpoint(tmp_path / "other.pt", seed=1, overrides=TINY_NET)
    r = bench_bpd.main(["--models", str(ckpt), str(ckpt), str(other), "--images", "8",
                        "--json-out", str(tmp_path / "bpd.json")])
    assert r == _read(tmp_path / "bpd.json") and [row["images"] for row in r["rows"]] == [8, 8, 8]
    assert r["rows"][0]["bpd"] > 0 and "vs_first" not in r["rows"][0]
    assert r["rows"][1]["vs_first"] == {"diff": 0.0, "se": 0.0, "z": None, "mdd": 0.0}
    third = r["rows"][2]["vs_first"]
    assert third["diff"] != 0 and third["se"] > 0 and third["mdd"] == pytest.approx(2 * third["se"], abs=2e-4)
    with pytest.raises(SystemExit):
        bench_bpd.main(["--models", str(ckpt)])


@pytest.mark.timeout(300)
def test_samplers_cache_reuses_a_checkpoints_rows_and_nothing_else(tmp_path, monkeypatch):
    """--cache: the second run reads each row's samples back (the same scores, no sampling); another
    checkpoint file, another row or another count is sampled afresh; a model URI is never cached."""
    from benchmarks import bench_samplers
    from tests.support import save_tiny_checkpoint

    ckpt, cache = save_tiny_checkpoint(tmp_path / "tiny.pt"), tmp_path / "cache"
    args = ["--model", str(ckpt), "--num", "20", "--rows", "ddpm:3", "ddim:2@trailing", "--cache", str(cache)]
    first = bench_samplers.main([*args, "--json-out", str(tmp_path / "a.json")])
    assert len(list(cache.glob("*/*.pt"))) == 2
    sampled = []
    monkeypatch.setattr("ddpm.pipeline.DDPMPipeline.__call__", lambda *a, **k: sampled.append(a) or 1 / 0)
    again = bench_samplers.main([*args, "--json-out", str(tmp_path / "b.json")])
    assert sampled == [] and [r["scores"] for r in again["table"]] == [r["scores"] for r in first["table"]]
    row = bench_samplers.Row("ddpm", 3)
    other = save_tiny_checkpoint(tmp_path / "other.pt", seed=1)
    assert bench_samplers.cache_path(str(cache), str(other), row, 20) != bench_samplers.cache_path(
        str(cache), str(ckpt), row, 20)
    assert bench_samplers.cache_path(str(cache), str(ckpt), row, 40) != bench_samplers.cache_path(
        str(cache), str(ckpt), row, 20)
    assert bench_samplers.cache_path(str(cache), "models:/ddpm-digits/1", row, 20) is None
    assert bench_samplers.cache_path(None, str(ckpt), row, 20) is None


@pytest.mark.timeout(600)
def test_recipes_quick_compares_each_recipe_with_the_first(tmp_path):
    from benchmarks import bench_recipes

    r = bench_recipes.main(["--quick", "--recipes", "preset", "min-snr-5", "--samplers", "ddim:25:1", "dpmpp:20",
                            "--json-out", str(tmp_path / "recipes.json"), "--save", str(tmp_path / "models")])
    assert r == _read(tmp_path / "recipes.json") and r["baseline"] == "preset"
    from ddpm.checkpoint import load_model

    cfg, _, _ = load_model(str(tmp_path / "models" / "min-snr-5.pt"))  # what `evaluate --model` loads
    assert cfg.diffusion.snr_gamma == 5.0 and (tmp_path / "models" / "preset.pt").exists()
    assert r["models"]["min-snr-5"]["changes"] == {**bench_recipes.EPS, "diffusion.snr_gamma": 5.0}
    assert all(m["steps"] >= 1 and m["stopped_by_time"] for m in r["models"].values())
    assert [(row["recipe"], row["sampler"], row["steps"], row["eta"]) for row in r["rows"]] == [
        ("preset", "ddim", 3, 1.0), ("preset", "dpmpp", 3, 0.0), ("min-snr-5", "ddim", 3, 1.0),
        ("min-snr-5", "dpmpp", 3, 0.0)]  # --quick: 3 steps
    assert r["rows"][0]["vs_first"] == {} and r["rows"][1]["vs_first"] == {}
    for row in r["rows"]:  # every row against the real data's floor, the pixel scores included
        assert {"kid", "pixel_fd", "fine_spread"} <= set(row["vs_floor"])
    for row in r["rows"][2:]:
        assert row["num"] == 50 and {"kid", "classifier_score", "copy_rate", "fine_spread"} <= set(row["vs_first"])
        for c in row["vs_first"].values():
            if c["z"] is not None:
                assert (c["verdict"] == "within noise") == (abs(c["z"]) < 2 or c["diff"] == 0)
    lines = bench_recipes.table(r).splitlines()
    assert [line.rsplit("|", 2)[1].strip() for line in lines[2:4]] == ["baseline", "baseline"]
    assert all(line.rsplit("|", 2)[1].strip() == bench_recipes.summary(row) != "baseline"
               for line, row in zip(lines[4:6], r["rows"][2:]))
    within = dict(r["rows"][2], vs_first={"kid": {"diff": 0.1, "z": 0.5, "verdict": "within noise"}})
    worse = dict(r["rows"][2], vs_first={"kid": {"diff": 0.1, "z": 3.0, "verdict": "worse"},
                                         "fd": {"diff": 5.0, "z": 2.5, "verdict": "worse"}})
    assert bench_recipes.summary(within) == "within noise" and bench_recipes.summary(worse) == "worse on kid, fd"
    with pytest.raises(SystemExit):
        bench_recipes.main(["--recipes", "no-such-recipe"])
    # --reuse: the kept models are read back, not trained again: the same samples, the same scores
    again = bench_recipes.main(["--quick", "--recipes", "preset", "min-snr-5", "--samplers", "ddim:25:1",
                                "--json-out", str(tmp_path / "again.json"), "--save", str(tmp_path / "models"),
                                "--reuse"])
    assert all(m["reused"].endswith(f"{name}.pt") for name, m in again["models"].items())
    assert [row["scores"] for row in again["rows"]] == [row["scores"] for row in r["rows"] if row["sampler"] == "ddim"]
    with pytest.raises(SystemExit, match="not recipe 'min-snr-5'"):  # another recipe's file under its name
        (tmp_path / "models" / "min-snr-5.pt").write_bytes((tmp_path / "models" / "preset.pt").read_bytes())
        bench_recipes.main(["--quick", "--recipes", "min-snr-5", "--save", str(tmp_path / "models"), "--reuse",
                            "--json-out", str(tmp_path / "x.json")])


def test_train_ours_takes_a_step_count_instead_of_a_budget(tmp_path):
    from benchmarks.bench_quality import train_ours
    from pipelines.storage.data import prepare_command

    prepare_command(source="digits", out=str(tmp_path / "train"), split="train")
    _, info = train_ours(str(tmp_path / "train"), budget=0.001, steps=3,
                         changes={"diffusion.prediction": "edm", "diffusion.timestep_sampling": "lognormal"})
    assert info["steps"] == 3 and not info["stopped_by_time"]  # the budget of 1 ms did not stop it
    assert info["config"]["diffusion"]["prediction"] == "edm"


def test_oracle_quick(tmp_path):
    from benchmarks import bench_oracle

    r = bench_oracle.main(["--quick", "--json-out", str(tmp_path / "oracle.json")])
    assert r == _read(tmp_path / "oracle.json")
    assert len(r["results"]) == 4 * len(bench_oracle.ROWS) * 2  # spacings x rows x calls (3, 5)
    assert all(row["calls"] in (3, 5) and row["num"] == 200 for row in r["results"])
    analytic = [row for row in r["results"] if row["row"] == "ddpm analytic" and row["spacing"] == "linspace"]
    assert all(abs(row["exact_std"] - 0.3) < 0.001 for row in analytic)  # exact for Gaussian data


def test_oracle_sde_variants_golden(tmp_path):
    """The stochastic variants issue 23 tried (none ships): each keeps the mean; golden stds at 20 log-SNR
    calls (bench-results/oracle_sde_variants.json), none within 1% of the data's 0.3."""
    from benchmarks import bench_oracle

    r = bench_oracle.main(["--sde-variants", "--calls", "20", "--json-out", str(tmp_path / "v.json")])
    assert r == _read(tmp_path / "v.json")
    std = {row["row"]: row["exact_std"] for row in r["results"] if row["spacing"] == "logsnr"}
    golden = {"2m-sde, first order into the last step": 0.3097, "2m-sde heun": 0.3294, "3m-sde eta 1": 0.3126,
              "3m-sde eta 0.5": 0.3061}
    assert std == pytest.approx(golden, abs=2e-4)
    assert all(abs(row["exact_mean"] - 0.1) < 1e-3 for row in r["results"])


def test_calibration_summary_tells_a_right_error_from_too_small_and_too_large():
    """Known answers: differences drawn with spread 1 against standard errors of 1 are consistent;
    against 1/3 too small; against 3 too large; and the interval is the chi-square one."""
    import random

    from benchmarks.bench_calibration import ratio_interval, summarize

    rng = random.Random(0)
    diffs = [rng.gauss(0.5, 1.0) for _ in range(40)]
    out = summarize([{"right": (d, 1.0), "small": (d, 1 / 3), "large": (d, 3.0), "none": (d, float("nan"))}
                     for d in diffs])
    assert set(out) == {"right", "small", "large"}
    assert [out[k]["verdict"] for k in ("right", "small", "large")] == ["consistent", "too small", "too large"]
    assert out["right"]["ratio"] == pytest.approx(1.0, abs=0.25) and out["right"]["draws"] == 40
    low, high = ratio_interval(10)
    assert low == pytest.approx(0.548, abs=1e-3) and high == pytest.approx(1.454, abs=1e-3)  # sqrt(chi2_9 / 9)


@pytest.mark.timeout(300)
def test_calibration_draws_two_rows_from_fresh_seeds(tmp_path):
    from benchmarks import bench_calibration
    from tests.support import save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tmp_path / "tiny.pt")
    r = bench_calibration.main(["--model", str(ckpt), "--num", "40", "--rows", "ddim:2", "ddim:3", "--draws", "3",
                                "--json-out", str(tmp_path / "calibration.json")])
    assert r == _read(tmp_path / "calibration.json") and r["draws"] == 3
    kid = r["scores"]["kid"]
    assert kid["draws"] == 3 and len(set(kid["z"])) == 3 and kid["sd_diff"] > 0 and kid["rms_se"] > 0
    assert kid["verdict"] in ("consistent", "too small", "too large")
    with pytest.raises(SystemExit):
        bench_calibration.main(["--model", str(ckpt), "--rows", "ddim:2", "ddim:3", "--draws", "2"])


@pytest.mark.timeout(300)
def test_groups_gives_each_scores_error_under_several_groupings_and_the_cost(tmp_path):
    from benchmarks import bench_groups

    r = bench_groups.main(["--num", "60", "--seeds", "3", "--groups", "3", "6",
                           "--json-out", str(tmp_path / "groups.json")])
    assert r == _read(tmp_path / "groups.json")
    assert {"kid", "precision", "classifier_score", "pixel_fd"} <= set(r["scores"]) and "classes_covered" not in r["scores"]
    for by_count in r["scores"].values():
        assert set(by_count) == {"3", "6"}
        for t in by_count.values():
            assert 0 < t["min_se"] <= t["max_se"] and t["max_over_min"] >= 1 and t["cv"] >= 0
    assert r["scores"]["kid"]["3"]["max_over_min"] > 1  # another grouping, another error
    assert set(r["score_values_s"]) == {"3", "6"} and all(s > 0 for s in r["score_values_s"].values())
    with pytest.raises(SystemExit):
        bench_groups.main(["--groups", "1"])


@pytest.mark.timeout(300)
def test_distill_probe_paths_and_pair_know_a_model_from_itself(tmp_path):
    """``paths``: the reference's own DDIM at its own steps follows its path exactly (RMS 0 at every
    timestep), a 2-step student visits every 4th of the reference's 8; ``pair``: a model against
    itself differs by exactly 0 on every score, two rows of one model do not; ``grids``: a PNG, each panel titled with its settings."""
    from benchmarks import bench_distill_probe
    from tests.support import REGISTRY_TINY, save_tiny_checkpoint

    ckpt = str(save_tiny_checkpoint(tmp_path / "tiny.pt"))
    student = str(save_tiny_checkpoint(tmp_path / "student.pt", seed=1, overrides=[
        *REGISTRY_TINY, "sample.sampler=ddim", "sample.steps=2", "sample.spacing=cosine", "sample.eta=0"]))
    r = bench_distill_probe.main(["paths", "--reference", ckpt, "--reference-steps", "8", "--spacing", "cosine",
                                  "--models", f"{ckpt}#8", student, "--num", "16",
                                  "--json-out", str(tmp_path / "paths.json")])
    assert r == _read(tmp_path / "paths.json") and r["benchmark"] == "distill_probe.paths"
    same, other = r["rows"]
    assert len(same["rms"]) == 9 and set(same["rms"].values()) == {0.0}  # 8 timesteps and the end
    assert len(other["rms"]) == 3 and other["rms"]["-1"] > 0  # 2 of the 8, and the end
    r = bench_distill_probe.main(["pair", ckpt, ckpt, "--num", "24", "--seeds", "0", "1"])
    assert [d["seed"] for d in r["draws"]] == [0, 1]
    for d in r["draws"]:
        assert "kid" in d["a_minus_b"] and all(v["diff"] == 0 for v in d["a_minus_b"].values())
    r = bench_distill_probe.main(["pair", f"{ckpt}#ddim:4@cosine", f"{ckpt}#ddim:8@cosine", "--num", "24"])
    assert any(v["diff"] != 0 for v in r["draws"][0]["a_minus_b"].values())  # the rows, not the config's sampler
    out = tmp_path / "grids.png"
    r = bench_distill_probe.main(["grids", "--models", student, f"{ckpt}#ddim:4@cosine", "--num", "4", "--out", str(out)])
    assert out.stat().st_size > 0 and [(p["sampler"], p["steps"], p["spacing"]) for p in r["panels"]] == [
        ("ddim", 2, "cosine"), ("ddim", 4, "cosine")]  # the student's own settings, then the row's
