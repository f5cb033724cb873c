"""What a person sees: quiet healthy runs with live progress, Ray's own lines with --verbose,
JSON errors, --version, choices listed in --help, the live sweep table.

The end-to-end tests run the real `ddpm-pipe` executable in a subprocess (as a user would) on a
local Ray instance, with a tiny model and a few steps; stdout and stderr are read apart: progress
and Ray's own lines belong on stderr, stdout holds the result alone.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.tune.sweep_table import SweepTable, ranked
from tests.support import cli_json, tiny_overrides, wait_until

CLI = str(Path(sys.executable).with_name("ddpm-pipe"))
TINY = [x for s in [*tiny_overrides(), "train.log_every=2", "train.eval_every=2", "train.checkpoint_every=2",
                    "train.sample_every=4", "sample.steps=2", "train.warmup_steps=1", "train.batch_size=16"]
        for x in ("--set", s)]
NOISE = ("Traceback", "WARNING", "Warning:", "(PlacementGroupCleaner", "(TrainController", "(RayTrainWorker",
         "(trial_single", "Checkpoint successfully created", "Reporting training result",
         "Created version", "Successfully registered")


def run(args: list[str], env: dict[str, str], timeout: int = 900) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``ddpm-pipe ARGS``."""
    proc = subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def assert_quiet(output: str) -> None:
    found = [n for n in NOISE if n in output]
    assert not found, f"{found} in:\n{output}"


@pytest.fixture
def cli_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "DDPM_VERBOSE"))}
    env.update(DDPM_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1")
    return env


# -- end to end -----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_train_sample_tune_are_quiet_and_show_progress_and_verbose_shows_rays_lines(cli_env, tmp_path):
    code, out, err = run(["train", "--max-steps", "4", *TINY, "--run-name", "quiet", "--json"], cli_env)
    assert code == 0, out + err
    assert_quiet(out + err)
    assert "[ray] local instance" in err and "dashboard http://" in err
    assert "[train] step 2/4 loss" in err and "img/s held-out" in err and "[train] step 4/4" in err
    result = cli_json(out)  # --json: stdout is the result, one line, and nothing else
    assert result["metrics"]["step"] == 4

    checkpoint = f"{result['checkpoint']}/checkpoint.pt"
    code, out, err = run(["sample", "--model", checkpoint, "--num", "6", "--steps", "2", "--out",
                          str(tmp_path / "samples")], cli_env)
    assert code == 0, out + err
    assert_quiet(out + err)
    assert "6/6" in err and out.startswith("wrote 6 sample(s)") and len(out.splitlines()) == 1

    code, out, err = run(["tune", "--trials", "2", "--max-steps", "4", "--scheduler", "none", *TINY,
                          "--name", "quiet-sweep"], cli_env)
    assert code == 0, out + err
    assert_quiet(out + err)
    assert "[tune] trial" in err and "best so far: trial" in err  # the live table
    assert "1. " in out and "2. " in out and "[tune]" not in out  # the final ranked table, in the result

    code, out, err = run(["--verbose", "train", "--max-steps", "2", *TINY, "--run-name", "loud"], cli_env)
    assert code == 0, out + err
    assert "(RayTrainWorker" in out + err or "(TrainController" in out + err, out + err


@pytest.mark.timeout(120)
def test_json_errors_version_and_choices(cli_env, tmp_path):
    code, out, err = run(["sample", "--model", str(tmp_path / "missing.pt"), "--json"], cli_env)
    assert code == 2
    error = cli_json(out)  # the error object alone on stdout; the readable line on stderr
    assert error["exit_code"] == 2 and "does not exist" in error["error"] and "error: " in err

    code, out, err = run(["sample", "--model", "x", "--format", "jpg", "--json"], cli_env)
    assert code == 2
    error = cli_json(out)
    assert error["exit_code"] == 2 and "png, webdataset, npz" in error["error"]

    code, out, _ = run(["--version"], cli_env)
    assert code == 0 and out.startswith("ddpm-pipe ") and len(out.splitlines()) == 1

    code, out, _ = run(["sample", "--help"], {**cli_env, "COLUMNS": "200"})
    from ddpm.samplers import SAMPLERS

    assert f"[{'|'.join(SAMPLERS)}]" in out and "[png|webdataset|npz]" in out and "0 samples on CPU" in out
    code, out, _ = run(["interpolate", "--help"], {**cli_env, "COLUMNS": "200"})
    assert "Noise seed" in out


def test_what_a_library_prints_while_a_command_runs_goes_to_stderr(monkeypatch):
    """Ray's driver prints the raylet's warnings ("(raylet) A worker died ...") to stdout; stdout is
    the result's alone, so a command's own run has stdout sent to stderr."""
    import pipelines.train.command as train
    from tests.support import run_cli

    def noisy(**kwargs):
        print("(raylet) A worker died or was killed while executing a task")
        return {"message": "trained", "step": 3}

    monkeypatch.setattr(train, "train_command", noisy)
    result = run_cli("train", "--json")
    assert result.exit_code == 0, result.output
    assert cli_json(result) == {"message": "trained", "step": 3}
    assert "(raylet) A worker died" in result.stderr
    plain = run_cli("train")
    assert plain.stdout == "trained\n" and "(raylet)" in plain.stderr


# -- the sweep table ----------------------------------------------------------------------------------
class FakeDiffusion:
    def __init__(self, T, schedule, beta_start, beta_end):
        self.timesteps, self.schedule, self.beta_start, self.beta_end = T, schedule, beta_start, beta_end


class FakeTrain:
    lr = 1e-3


def config_of(params):
    class Cfg:
        diffusion = FakeDiffusion(params["T"], params.get("schedule", "linear"), 1e-4, 0.02)
        train = FakeTrain()

    return Cfg()


@pytest.mark.timeout(60)
def test_sweep_table_tracks_trials_and_the_best_and_prints_plain_lines_off_a_terminal():
    stream = io.StringIO()
    table = SweepTable(config_of, max_steps=10, stream=stream, every_s=0)
    table.update("a", "RUNNING", {"T": 100})
    table.update("b", "RUNNING", {"T": 200, "schedule": "cosine"})
    table.update("a", "RUNNING", result={"step": 5, "bpd": 3.5})
    table.update("b", "RUNNING", result={"step": 5, "bpd": 2.5})
    table.update("a", "DONE", result={"step": 10, "bpd": 3.0})
    table.show()
    text = stream.getvalue()
    assert "\r" not in text and "\033" not in text
    lines = [x for x in text.splitlines() if x.startswith("[tune]")]
    assert lines[0].split()[1:4] == ["trial", "state", "T"]
    assert any("a" in x and "DONE" in x and "100" in x and "3.000" in x for x in lines)
    assert lines[-1] == "[tune] best so far: trial b, held-out 2.500 bits/dim"

    final = ranked([{"trial_id": "a", "ending": "completed", "step": 10, "bpd": 3.0, "params": {"T": 100}},
                    {"trial_id": "c", "ending": "failed", "step": 1, "bpd": None, "params": {"T": 50}},
                    {"trial_id": "b", "ending": "completed", "step": 10, "bpd": 2.5, "params": {"T": 200}}],
                   config_of)
    assert [x.split()[1] for x in final[1:]] == ["b", "a", "c"]


@pytest.mark.timeout(60)
def test_progress_prints_rate_and_eta_as_plain_lines_off_a_terminal_at_most_every_interval():
    from pipelines.console import Progress

    stream = io.StringIO()
    bar = Progress("evaluate", 10, "sample", stream=stream, every_s=3600)
    for _ in range(10):
        bar.update(1)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # the first update, then the end (the interval holds back the rest)
    assert lines[0].startswith("[evaluate] 1/10 samples (10%)") and "samples/s ETA" in lines[0]
    assert lines[1].startswith("[evaluate] 10/10 samples (100%)") and "\r" not in stream.getvalue()


@pytest.mark.timeout(60)
def test_progress_at_sets_the_count_names_its_phase_and_holds_back_a_phase_shorter_than_after_s(monkeypatch):
    import pipelines.console as console

    clock = [0.0]
    monkeypatch.setattr(console.time, "perf_counter", lambda: clock[0])
    lines: list[str] = []
    bar = console.Progress("evaluate", 100, "call", write=lines.append, what="bits/dim", after_s=2.0, every_s=5.0)
    for done in (1, 2, 3):  # within the first second: silent
        clock[0] += 0.3
        bar.at(done, 100)
    assert lines == []
    clock[0] = 3.0  # past after_s: the first line, with its ETA from 40 calls in 3 s
    bar.at(40, 100)
    clock[0] = 4.0
    bar.at(50, 100)  # within every_s of the last line: held back
    clock[0] = 6.0
    bar.at(100, 100)
    assert lines == ["[evaluate] bits/dim: 40/100 calls (40%) 13.3 calls/s ETA 4s",
                     "[evaluate] bits/dim: 100/100 calls (100%) 16.7 calls/s 6.0s"]


@pytest.mark.timeout(60)
def test_phase_names_a_phase_when_it_starts_and_its_seconds_when_it_ends():
    from pipelines.console import phase

    lines: list[str] = []
    with phase("train", "registering the model", write=lines.append):
        lines.append("work")
    assert lines[:2] == ["[train] registering the model ...", "work"]
    assert lines[2].startswith("[train] registering the model: ") and lines[2].endswith(" s")


@pytest.mark.timeout(120)
def test_progress_channel_prints_worker_lines_and_stops_its_thread_and_actor_when_the_block_fails(ray_cluster):
    """Lines a remote task puts arrive at the printer; leaving the block, even by an exception, ends
    the pump thread and kills the queue actor (a thread left pumping raised once Ray shut down)."""

    import ray

    from pipelines.train.progress import ProgressChannel, remote_log

    @ray.remote(num_cpus=0)
    def report(queue):
        log = remote_log(queue)
        for i in range(3):
            log(f"line {i}")

    printed: list[str] = []
    with pytest.raises(RuntimeError, match="setting up failed"):
        with ProgressChannel(printer=printed.append) as channel:
            ray.get(report.remote(channel.queue))
            wait_until(lambda: len(printed) >= 3, 30, "three printed lines", interval=0.05)
            raise RuntimeError("setting up failed")
    assert printed == ["line 0", "line 1", "line 2"]
    assert not channel._thread.is_alive()
    # ray.kill is asynchronous: a call sent just after it may still be served, so wait for the death
    with pytest.raises(ray.exceptions.RayActorError):
        wait_until(lambda: ray.get(channel.queue.actor.qsize.remote(), timeout=30) < 0, 30, "the queue actor's death")
