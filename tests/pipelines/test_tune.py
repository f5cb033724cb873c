"""`ddpm-pipe tune`: search-space validation, a digits sweep on the simulated cluster, workers-per-trial 2."""

from __future__ import annotations

import time

import pytest

from ddpm.config import ConfigError, load_config
from pipelines.tune import search_space
from tests.support import cli_json, mlflow_client, run_cli, tiny_overrides, wait_until

# Sized for two cores: every report runs the held-out bpd estimate (256 images x 16 timesteps), so the
# model's width sets most of a trial's compute; ch=16 is 4x cheaper than the preset's 32 and still
# has every block type (two levels, a residual block each, attention at 4x4).
# sample.steps=10: the best config's training run ends with a DDIM grid; 10 steps keep it cheap.
TINY = [*tiny_overrides(16, attention=True), "train.batch_size=8", "train.log_every=1",
        "train.checkpoint_every=1", "train.warmup_steps=2", "sample.steps=10"]  # each trial's T: the space's
# T bounded so that the best trial's full bound (T model calls on 64 images, once per sweep run) stays
# quick on two cores; a log-randint over 10..40 still gives trials different Ts.
SMALL_T = "diffusion.timesteps: {type: randint, lower: 10, upper: 40, log: true}\n"


def tune_args(tmp_path, *extra: str, trials: int, steps: int, name: str) -> list[str]:
    space = tmp_path / "space.yaml"
    space.write_text(SMALL_T)
    sets = [x for s in TINY for x in ("--set", s)]
    return ["tune", "--trials", str(trials), "--max-steps", str(steps), "--name", name, "--space", str(space),
            "--storage", str(tmp_path / "storage"), "--json", *sets, *extra]


def children(parent_run_id: str):
    c = mlflow_client()
    parent = c.get_run(parent_run_id)
    return c.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


# -- search space (no cluster) --------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_default_space_keeps_beta_start_below_beta_end():
    base = load_config("digits")
    space = search_space.load_space(None, base)
    assert {"diffusion.timesteps", "diffusion.schedule", "diffusion.beta_end", "train.lr"} <= set(space)
    cfg = search_space.apply(base, {"diffusion.timesteps": 150, "diffusion.schedule": "quadratic",
                                    "diffusion.beta_end": 0.04, search_space.BETA_RATIO: 0.25, "train.lr": 1e-3})
    assert cfg.diffusion.timesteps == 150 and cfg.diffusion.beta_start == pytest.approx(0.01)
    assert cfg.diffusion.beta_end == 0.04  # used as given, not rescaled by T
    cosine = search_space.apply(base, {"diffusion.schedule": "cosine", "diffusion.beta_end": 0.04,
                                       search_space.BETA_RATIO: 0.25})
    assert cosine.diffusion.beta_start is None and cosine.diffusion.beta_end is None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("text, expected", [
    ("diffusion.T: {type: choice, values: [10]}\n", "valid: model.image_size"),
    ("train.lr: {type: normal, mean: 1}\n", "valid: loguniform, uniform, randint, choice"),
    ("train.lr: {type: loguniform, lower: 1.0e-4}\n", "missing upper"),
    ("train.lr: {type: loguniform, lower: 1.0e-4, upper: 1.0e-3, q: 2}\n", "unknown q"),
    ("diffusion.schedule: {type: choice, values: [linear, exponential]}\n", "valid: linear, cosine"),
    ("train.lr: {type: loguniform, lower: 0, upper: 1}\n", "lower > 0"),
    ("replace: true\ndiffusion.beta_start: {type: uniform, lower: 1.0e-4, upper: 0.05}\n"
     "diffusion.beta_end: {type: uniform, lower: 0.01, upper: 0.1}\n", "not guaranteed"),
])
def test_bad_space_files_fail_with_the_valid_options(tmp_path, text, expected):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        search_space.load_space(str(path), load_config("digits"))
    result = run_cli("tune", "--space", str(path), "--trials", "1")
    assert result.exit_code == 2, result.output
    assert expected in result.output


@pytest.mark.timeout(60)
def test_space_file_extends_or_replaces_the_default(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("train.ema_decay: 0.99\n" + SMALL_T)
    space = search_space.load_space(str(path), load_config("digits"))
    assert space["train.ema_decay"] == 0.99 and "train.lr" in space and space["diffusion.timesteps"]["upper"] == 40
    # Replaced, T is the only key: trials use the schedule's T-scaled default betas, which leave (0, 1)
    # for T <= 20, so such a range is refused up front rather than failing in the trials.
    path.write_text("replace: true\n" + SMALL_T)
    with pytest.raises(ConfigError, match="T=10 gives betas outside"):
        search_space.load_space(str(path), load_config("digits"))
    path.write_text("replace: true\n" + SMALL_T.replace("lower: 10", "lower: 21"))
    assert list(search_space.load_space(str(path), load_config("digits"))) == ["diffusion.timesteps"]


def test_batch_that_does_not_divide_over_the_workers_per_trial_fails_before_any_run(tmp_path):
    result = run_cli(*tune_args(tmp_path, "--workers-per-trial", "3", trials=2, steps=2, name="odd"))
    assert result.exit_code == 2, result.output
    assert "train.batch_size=8 does not divide over 3 worker(s)" in result.output  # TINY's batch 8
    assert not (tmp_path / "ddpm-home" / "mlflow.db").exists()


class _Marker:
    """A picklable Tune callback stand-in (Tune pickles the run config's callbacks into tuner.pkl)."""

    def __init__(self, name: str):
        self.name = name


def _noop_trainable(config):
    pass


def test_restored_tuner_gets_this_runs_callbacks_not_the_pickled_ones(tmp_path):
    """The one use of Ray's private Tuner._local_tuner works on the installed Ray: a real tuner.pkl
    (written by Tuner() without running) is restored and its pickled callback replaced."""
    from ray import tune

    from pipelines.tune.command import replace_restored_callbacks

    tune.Tuner(_noop_trainable, run_config=tune.RunConfig(name="s", storage_path=str(tmp_path),
                                                          callbacks=[_Marker("first run")]))
    restored = tune.Tuner.restore(str(tmp_path / "s"), _noop_trainable)
    replace_restored_callbacks(restored, [_Marker("this run")])
    assert [c.name for c in restored._local_tuner.get_run_config().callbacks] == ["this run"]


def test_restored_callbacks_fail_loudly_if_ray_hides_the_run_config():
    from pipelines.tune.command import replace_restored_callbacks

    with pytest.raises(RuntimeError, match="checked on Ray 2.60.0"):
        replace_restored_callbacks(object(), [])


# -- sweeps on the simulated 4-node cluster -------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_tune_sweep_nested_runs_best_config_trains_and_resumes(ray_cluster, tmp_path):
    # 4 trials of 2 steps: all run at once on the 8 CPUs, and ASHA's rung at step 1 (grace period =
    # checkpoint_every = 1) lets it stop the later, worse ones, so both endings can occur.
    t0 = time.perf_counter()
    result = run_cli(*tune_args(tmp_path, trials=4, steps=2, name="sweep4"))
    assert result.exit_code == 0, result.output
    out = cli_json(result)
    assert len(out["trials"]) == 4
    assert all(t["ending"] in ("completed", "stopped early") for t in out["trials"]), out["trials"]
    assert out["endings"]["completed"] >= 1
    assert out["best_bpd"] > 0 and out["best_bpd_full"] > 0
    runs = children(out["parent_run_id"])
    assert len(runs) == 4
    assert all(r.info.status == "FINISHED" for r in runs)
    best = [r for r in runs if r.data.params.get("tune.trial_id") == out["best_trial"]]
    assert len(best) == 1 and "training/bpd" in best[0].data.metrics
    assert "training details/bpd_stderr" in best[0].data.metrics
    print(f"4-trial sweep: endings {out['endings']}, {time.perf_counter() - t0:.0f}s")

    best_path = out["best_config_path"]
    cfg = load_config(best_path)
    assert cfg.diffusion.timesteps == out["best_params"]["diffusion.timesteps"]
    trained = run_cli("train", "--config", best_path, "--max-steps", "2", "--nodes", "1", "--run-name", "best",
                      "--storage", str(tmp_path / "storage"), "--json")
    assert trained.exit_code == 0, trained.output
    assert cli_json(trained)["metrics"]["step"] == 2

    # A finished sweep is restored only when asked (issue 25, item 8); its state digest, recorded
    # when the job left it, matches what is there.
    finished = run_cli(*tune_args(tmp_path, trials=4, steps=2, name="sweep4"))
    assert finished.exit_code == 3 and "has finished" in finished.output, finished.output
    again = run_cli(*tune_args(tmp_path, trials=4, steps=2, name="sweep4"), "--resume-finished")
    assert again.exit_code == 0, again.output
    out2 = cli_json(again)
    assert out2["resumed"] and out2["parent_run_id"] == out["parent_run_id"]
    assert len(children(out["parent_run_id"])) == 4  # resuming adds no runs


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_sweep_ranked_on_a_sample_quality_score(ray_cluster, tmp_path):
    """tune --metric kid: every report measures the score with its error; the best trial is the one
    with the lowest KID, and each trial's run charts it next to bits/dim."""
    result = run_cli(*tune_args(tmp_path, "--metric", "kid", "--set", "train.quality_num=20", trials=2, steps=2,
                                name="sweep-kid"))
    assert result.exit_code == 0, result.output
    out = cli_json(result)
    assert out["metric"] == "kid" and out["best_value_se"] > 0
    finished = [t for t in out["trials"] if t["kid"] is not None]
    assert out["best_value"] == min(t["kid"] for t in finished)
    assert "ranked on kid" in result.output or "on kid:" in out["message"]
    runs = children(out["parent_run_id"])
    assert all({"training/kid", "training details/kid_se", "training/pixel_fd"} <= set(r.data.metrics) for r in runs)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_workers_per_trial_with_asha_does_not_stall(ray_cluster, tmp_path):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    # A trial takes 3 CPUs (its own + 2 workers), so 2 run at once on the 8 CPUs. Holding one node's
    # 2 CPUs leaves 6: the third trial then needs every CPU the first trial to end gives back, so a
    # single stopped trial whose worker group is not reaped stalls the sweep (without the hold it
    # would take two leaks and a fourth trial).
    total = ray.cluster_resources()["CPU"]
    hold = placement_group([{"CPU": 2}], strategy="STRICT_PACK")
    ray.get(hold.ready(), timeout=60)
    try:
        result = run_cli(*tune_args(tmp_path, "--workers-per-trial", "2", "--scheduler", "asha",
                                    trials=3, steps=2, name="sweepw2"))
    finally:
        remove_placement_group(hold)
    assert result.exit_code == 0, result.output
    out = cli_json(result)
    assert len(out["trials"]) == 3
    assert all(t["ending"] in ("completed", "stopped early") for t in out["trials"]), out["trials"]
    assert len(children(out["parent_run_id"])) == 3
    print(f"workers-per-trial 2: endings {out['endings']}, placement groups reaped {out['placement_groups_reaped']}, "
          f"{out['wall_s']:.0f}s")
    # Every worker CPU comes back: no stopped trial keeps its placement group (ray issue 54305).
    wait_until(lambda: ray.available_resources().get("CPU", 0) >= total, 60, "every worker CPU back", interval=1)
    assert ray.available_resources().get("CPU", 0) == total


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_stopped_trial_with_a_leaked_worker_group_gets_its_cpus_back(ray_cluster):
    """Ray issue 54305 on the path ASHA takes: a trial stopped early whose TorchTrainer's worker
    placement group outlived it. The sweep callback must remove that group and free its CPUs."""
    from types import SimpleNamespace

    import ray
    from ray.util.placement_group import placement_group, placement_group_table

    from ddpm.config import load_config
    from pipelines import tracking
    from pipelines.tune import command as tune
    from pipelines.settings import resolve

    settings = resolve()
    tracking.configure(settings)
    exp_id = tracking.experiment_id("tune-reaper", settings)
    parent, _ = tracking.start_or_resume_run(exp_id, "sweep-reaper")
    name = tune.REGISTRY_PREFIX + "reaper"
    registry = tune._placement_registry(name)
    total = ray.cluster_resources()["CPU"]
    leaked = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="SPREAD")  # the trial's 2 workers
    ray.get(leaked.ready(), timeout=60)
    # The resource view lags the reservation by a report interval.
    wait_until(lambda: ray.available_resources().get("CPU", 0) <= total - 2, 30, "the leaked group's CPUs held")
    assert ray.available_resources().get("CPU", 0) <= total - 2
    ray.get(registry.put.remote("trial_0001", leaked.id.hex()))

    callback = tune.SweepCallback(exp_id, parent, "reaper", load_config("digits"), max_steps=8, registry=name)
    stopped = SimpleNamespace(trial_id="trial_0001", config={}, last_result={"step": 2})  # stopped at a rung
    callback.on_trial_complete(0, [], stopped)

    assert callback.reaped == 1
    assert placement_group_table(leaked)["state"] == "REMOVED"
    wait_until(lambda: ray.available_resources().get("CPU", 0) >= total, 30, "the reaped group's CPUs back",
               interval=0.5)
    assert ray.available_resources().get("CPU", 0) == total
    run = tracking.client().get_run(callback.runs["trial_0001"])
    assert run.data.tags["ddpm.tune.ending"] == "stopped early"
    ray.kill(registry)
