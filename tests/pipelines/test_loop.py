"""Pieces of the Ray-agnostic training loop that need no cluster."""

from __future__ import annotations

import pytest
import torch

from ddpm.config import ExperimentConfig
from ddpm.diffusion import Diffusion
from ddpm.unet import UNet
from pipelines.train.loop import sample_grid


@pytest.mark.timeout(120)
def test_sample_grid_caps_the_configs_steps_at_T(tmp_path):
    # A sweep over T can pick T=30 under a preset that samples with 50 DDIM steps; the run's
    # final grid must still be drawn (with 30 steps) instead of failing the trained run.
    cfg = ExperimentConfig.preset("digits").override([
        "diffusion.timesteps=30", "sample.sampler=ddim", "sample.steps=50", "model.ch=16",
        "model.ch_mult=[1]", "model.num_res_blocks=1", "model.attn_resolutions=[]"])
    torch.manual_seed(0)
    model = UNet(cfg.model)
    diffusion = Diffusion.from_config(cfg.diffusion)
    with pytest.raises(ValueError):  # what the grid used to do with the config's steps
        from ddpm.samplers import generate

        generate(model, diffusion, (1, 1, 8, 8), sampler="ddim", steps=50)
    path = sample_grid(model, diffusion, cfg, str(tmp_path / "grid.png"), n=4)
    assert (tmp_path / "grid.png").stat().st_size > 0 and path.endswith("grid.png")


class _CountingNet(torch.nn.Module):
    """The network, counting its calls (one per sampling step of a batch)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.net(*args, **kwargs)


@pytest.mark.timeout(120)
def test_cifar10_end_of_run_grid_is_few_step_with_progress_lines(tmp_path, monkeypatch):
    # Issue 29: the cifar10 preset's grid ran 1000 ancestral steps in silence for 6 minutes.
    import pipelines.train.loop as loop

    cfg = ExperimentConfig.preset("cifar10").override([
        "model.ch=32", "model.ch_mult=[1]", "model.num_res_blocks=1", "model.attn_resolutions=[]"])
    torch.manual_seed(0)
    model = _CountingNet(UNet(cfg.model))
    diffusion = Diffusion.from_config(cfg.diffusion)
    monkeypatch.setattr(loop, "QUIET_S", 0.0)  # the real grid is long enough to print; this tiny one is not
    lines: list[str] = []
    sample_grid(model, diffusion, cfg, str(tmp_path / "grid.png"), n=2, log=lines.append)
    assert diffusion.num_timesteps == 1000 and model.calls == 20  # dpmpp, 20 steps: not T = 1000
    assert lines[0].startswith("[train] sample grid of 2 (dpmpp, 20 steps): 1/20 calls") and "ETA" in lines[0]
    assert lines[-1].startswith("[train] sample grid of 2 (dpmpp, 20 steps): 20/20 calls (100%)")
    assert (tmp_path / "grid.png").stat().st_size > 0


@pytest.mark.timeout(120)
def test_a_grid_shorter_than_quiet_s_prints_nothing(tmp_path):
    cfg = ExperimentConfig.preset("digits").override([
        "diffusion.timesteps=30", "sample.steps=5", "model.ch=16", "model.ch_mult=[1]",
        "model.num_res_blocks=1", "model.attn_resolutions=[]"])
    lines: list[str] = []
    sample_grid(UNet(cfg.model), Diffusion.from_config(cfg.diffusion), cfg, str(tmp_path / "g.png"), n=2,
                log=lines.append)
    assert lines == [] and (tmp_path / "g.png").stat().st_size > 0


# -- train.max_time: a wall-clock budget ------------------------------------------------------------
TINY_LOOP = ["model.ch=16", "model.ch_mult=[1]", "model.num_res_blocks=1", "model.attn_resolutions=[]",
             "diffusion.timesteps=50", "train.batch_size=8", "train.log_every=1", "train.warmup_steps=1",
             "train.eval_every=1000", "train.sample_every=1000", "train.checkpoint_every=1000"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from pipelines.storage.data import prepare_command

    out = tmp_path_factory.mktemp("digits") / "train"
    prepare_command(source="digits", out=str(out), split="train", shard_size=600)
    return str(out)


class FakeTracker:
    def __init__(self):
        self.tags: dict[str, str] = {}

    def log_metrics(self, metrics, step):
        pass

    def set_tag(self, key, value):
        self.tags[key] = value


@pytest.fixture
def step_clock(monkeypatch):
    """The loop's clock advances one second per training step (per loss computed), nothing else."""
    import pipelines.train.loop as loop
    from ddpm.diffusion import Diffusion

    now = {"s": 0.0}
    real = Diffusion.training_loss

    def training_loss(self, *args, **kwargs):
        now["s"] += 1.0
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Diffusion, "training_loss", training_loss)
    monkeypatch.setattr(loop, "_clock", lambda: now["s"])
    return now


def _run(shards, *sets, restore=None):
    from ddpm.config import load_config
    from pipelines.train.loop import LoopContext, LoopData, train_loop

    reports, logs, tracker = [], [], FakeTracker()
    ctx = LoopContext(log=logs.append, report=lambda m, s: reports.append((m, s)), restore=lambda: restore)
    final = train_loop(load_config("digits", [*TINY_LOOP, *sets]), LoopData(url=shards), ctx, tracker=tracker)
    return final, reports, logs, tracker.tags


@pytest.mark.timeout(120)
def test_max_time_stops_at_the_first_step_past_the_budget_with_a_final_checkpoint(shards, step_clock):
    final, reports, logs, tags = _run(shards, "train.max_steps=50", "train.max_time=3.5")
    assert final["step"] == 4 and final["max_time_reached"] == 1.0  # steps end at 1, 2, 3, 4 s
    (metrics, ckpt), = reports  # checkpoint_every=1000: the only checkpoint is the final one
    assert metrics["step"] == 4 and metrics["max_time_reached"] == 1.0 and metrics["ranks_in_sync"] == 1.0
    assert ckpt["step"] == 4 and ckpt["train_s"] == 4.0
    assert tags == {"ddpm.stop_reason": "max_time", "ddpm.stop_step": "4"}
    assert "[train] stopped at step 4: train.max_time=3.5s reached" in logs
    assert any(line.startswith("[train] step 4/50 ") for line in logs)  # the final log line too

    # Resumed with a larger budget, the checkpoint's 4 s count: 3 more steps reach 7 s.
    final, reports, _, tags = _run(shards, "train.max_steps=50", "train.max_time=6.5", restore=ckpt)
    assert final["step"] == 7 and [s["step"] for _, s in reports] == [7] and reports[0][1]["train_s"] == 7.0
    # Resumed with the budget it already spent: no step, nothing reported, still stopped for time.
    final, reports, _, tags = _run(shards, "train.max_steps=50", "train.max_time=3.5", restore=ckpt)
    assert final["step"] == 4 and reports == [] and tags["ddpm.stop_reason"] == "max_time"


@pytest.mark.timeout(120)
def test_a_new_run_whose_budget_is_spent_before_its_first_step_still_takes_one(shards, monkeypatch):
    # Every run ends with a checkpoint: a distillation round's share of a budget --in-all can be this.
    import pipelines.train.loop as loop

    ticks = iter(range(10**6))
    monkeypatch.setattr(loop, "_clock", lambda: float(next(ticks)))  # a second passes at every look
    final, reports, _, tags = _run(shards, "train.max_steps=50", "train.max_time=0.001")
    assert final["step"] == 1 and [m["step"] for m, _ in reports] == [1] and tags["ddpm.stop_reason"] == "max_time"


@pytest.mark.timeout(120)
def test_max_steps_first_wins_over_max_time(shards, step_clock):
    final, reports, logs, tags = _run(shards, "train.max_steps=3", "train.max_time=3.5")
    assert final["step"] == 3 and final["max_time_reached"] == 0.0
    assert [m["step"] for m, _ in reports] == [3] and reports[0][0]["max_time_reached"] == 0.0
    assert tags == {"ddpm.stop_reason": "max_steps", "ddpm.stop_step": "3"}
    assert "[train] stopped at step 3: train.max_steps=3 reached" in logs


@pytest.mark.timeout(120)
def test_a_log_interval_longer_than_the_run_still_prints_step_lines_with_an_eta(shards, monkeypatch):
    # Issue 29: a 30-step run under a preset logging every 50 steps printed nothing until its end.
    import pipelines.train.loop as loop

    monkeypatch.setattr(loop, "LINE_EVERY_S", 0.0)  # every step is "long" here
    _, _, logs, _ = _run(shards, "train.max_steps=3", "train.log_every=1000")
    steps = [line for line in logs if line.startswith("[train] step ")]
    assert [line.split()[2] for line in steps] == ["1/3", "2/3", "3/3"]
    assert all(" img/s ETA " in line for line in steps)
    assert "loss" not in steps[0] and "loss" in steps[2]  # the final step is a log interval's line


@pytest.mark.timeout(120)
def test_a_rank_follows_rank_zeros_decision_not_its_own_clock(shards, step_clock):
    # This rank's clock says the budget is spent after step 1; rank 0 says go on until step 3.
    from ddpm.config import load_config
    from pipelines.train.loop import LoopContext, LoopData, train_loop

    asked: list[bool] = []

    def agree(flag: bool) -> bool:
        asked.append(flag)
        return len(asked) == 3  # one after each step (a new run does not check before its first)

    ctx = LoopContext(rank=1, world_size=2, log=lambda s: None, agree=agree)
    final = train_loop(load_config("digits", [*TINY_LOOP, "train.max_steps=50", "train.max_time=0.5"]),
                       LoopData(url=shards), ctx)
    assert final["step"] == 3 and final["max_time_reached"] == 1.0
    assert asked == [True, True, True]  # after steps 1, 2, 3


def _ddp_worker(rank: int, shards: str, init_file: str, out_dir: str) -> None:
    """One of two gloo ranks training with DDP; rank 0's clock jumps a day after step 1 (its budget is spent)."""
    import datetime

    import torch.distributed as dist

    import pipelines.train.loop as loop
    from ddpm.config import load_config
    from pipelines.train.loop import LoopContext, LoopData, rank0_decides, train_loop

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))  # a disagreement fails, not hangs forever
    if rank == 0:  # the loop's start reads 0 s; every later read (the check after step 1 first) a day
        reads = iter([0.0])
        loop._clock = lambda: next(reads, 86_400.0)
    device = torch.device("cpu")

    def all_gather(obj):
        out = [None, None]
        dist.all_gather_object(out, obj)
        return out

    ctx = LoopContext(rank=rank, world_size=2, log=lambda s: None, all_gather=all_gather,
                      wrap_model=lambda m: torch.nn.parallel.DistributedDataParallel(m),
                      agree=lambda flag: rank0_decides(flag, device))
    cfg = load_config("digits", [*TINY_LOOP, "train.max_steps=3", "train.max_time=60"])
    final = train_loop(cfg, LoopData(url=shards), ctx)
    with open(f"{out_dir}/rank{rank}.txt", "w") as f:
        f.write(f"{final['step']} {final['max_time_reached']} {final['ranks_in_sync']}")
    dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_ddp_ranks_stop_together_at_rank_zeros_budget(shards, tmp_path):
    # Rank 1's own clock would train to max_steps=3; rank 0's budget is spent. Both must stop
    # after step 1 (the first check), in sync; without the broadcast rank 1 would wait in DDP.
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(shards, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["1 1.0 1.0"] * 2


def test_the_learning_rate_warms_up_then_stays_or_falls_linearly_to_zero_at_max_steps():
    import torch

    from ddpm.config import load_config
    from pipelines.train.loop import build, lr_factor

    cfg = load_config("digits", [*TINY_LOOP, "train.lr=1e-3", "train.warmup_steps=2", "train.max_steps=8"])
    assert [lr_factor(cfg.train, s) for s in range(8)] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    linear = cfg.with_values({"train.lr_decay": "linear"})
    expected = [0.5 * 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8]  # warm-up times 1 - s / 8
    assert [lr_factor(linear.train, s) for s in range(8)] == pytest.approx(expected)
    assert lr_factor(linear.train, 8) == 0.0 and lr_factor(linear.train, 9) == 0.0

    _model, _ema, opt, sched, _diffusion = build(linear, torch.device("cpu"))  # what the loop steps by
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([1e-3 * f for f in expected])
    with pytest.raises(Exception, match="lr_decay.*none.*linear"):
        cfg.with_values({"train.lr_decay": "cosine"})
