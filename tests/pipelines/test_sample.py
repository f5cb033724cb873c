"""`ddpm-pipe sample`: validation before sampling, determinism across workers, resuming, s3 output."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest

from pipelines.sample import command as S
from pipelines.sample import output as O
from pipelines.sample import pool as P
from pipelines.registry.models import read_config
from tests.support import (N, TINY_NET, cli_json, dead_pid, read_npz_folder, request, run_cli, save_tiny_checkpoint,
                           start_lock_holder)

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("model") / "checkpoint.pt", overrides=TINY_NET))


def cli(*args: str):
    return run_cli(*list(args))


def png_array(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data))).astype(np.int16)


@pytest.fixture
def no_sampling(monkeypatch):
    """Fail the test if a worker pool is started: validation must come before any sampling."""

    def refuse(*args, **kwargs):
        raise AssertionError("sampling started")

    monkeypatch.setattr(S, "WorkerPool", refuse)


# -- no Ray needed ------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_sample_seed_is_a_function_of_seed_and_index():
    assert S.sample_seed(0, 7) == 7
    assert S.sample_seed(3, 5) == 3 * 1_000_003 + 5
    assert len({S.sample_seed(s, i) for s in range(3) for i in range(1000)}) == 3000


@pytest.mark.timeout(60)
def test_units_are_runs_of_consecutive_missing_indices():
    assert P.units_of([0, 1, 2, 3, 4], 2) == [[0, 1], [2, 3], [4]]
    assert P.units_of([0, 1, 4, 5, 6, 9], 4) == [[0, 1], [4, 5, 6], [9]]


@pytest.mark.timeout(60)
def test_bad_model_uri_fails_before_sampling_with_exit_2(tmp_path, no_sampling):
    result = cli("sample", "--model", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert "does not exist" in result.output
    result = cli("sample", "--model", "models:/nobody/1", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert "does not exist" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(60)
def test_unwritable_output_fails_before_sampling_with_exit_2(tmp_path, ckpt, no_sampling):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = cli("sample", "--model", ckpt, "--out", str(blocker / "out"))
    assert result.exit_code == 2, result.output
    assert "not writable" in result.output


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flag,expected", [([], False), (["--compile"], True)])
def test_compile_flag_reaches_the_worker_pool(tmp_path, ckpt, monkeypatch, flag, expected):
    seen = []

    def record(req, env):
        seen.append(req)
        raise RuntimeError("stop here")

    monkeypatch.setattr(S, "WorkerPool", record)
    result = cli("sample", "--model", ckpt, "--out", str(tmp_path / "out"), "--num", "2", *flag)
    assert result.exit_code != 0 and len(seen) == 1
    assert seen[0].compile is expected


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp"])
def test_eta_the_sampler_does_not_take_fails_naming_the_valid_range(tmp_path, ckpt, no_sampling, sampler):
    result = cli("sample", "--model", ckpt, "--out", str(tmp_path / "out"), "--sampler", sampler, "--eta", "0.5")
    assert result.exit_code == 2, result.output
    assert f"--eta = 0 for {sampler}, --eta >= 0 for ddim" in result.output and not (tmp_path / "out").exists()


@pytest.mark.timeout(60)
def test_a_negative_eta_fails_before_any_work_without_a_sampler(tmp_path, ckpt, no_sampling):
    result = cli("sample", "--model", ckpt, "--out", str(tmp_path / "out"), "--eta", "-1")
    assert result.exit_code == 2 and "--eta" in result.output and not (tmp_path / "out").exists()  # typer's bound
    from pipelines.errors import UsageError
    from pipelines.sample.command import SampleRequest

    config = read_config(ckpt)  # the driver settles the setting against the model's config, once
    with pytest.raises(UsageError, match=r"--eta must be in \[0, inf\).*got -1"):  # the API's own check
        SampleRequest(model=ckpt, num=2, eta=-1.0).resolved(config)
    assert SampleRequest(model=ckpt, num=2).resolved(config).sampler == "dpmpp-2m-sde"  # the model's own
    assert SampleRequest(model=ckpt, num=2, sampler="ddim", eta=1.0).resolved(config).eta == 1.0
    with pytest.raises(UsageError, match=r"--eta = 0 for dpmpp-2m-sde, --eta >= 0 for ddim"):
        SampleRequest(model=ckpt, num=2, eta=1.0).resolved(config)  # eta is DDIM's, not the model's own sampler's
    with pytest.raises(UsageError, match=r"--eta = 0 for ddpm, --eta >= 0 for ddim"):
        SampleRequest(model=ckpt, num=2, sampler="ddpm", eta=1.0).resolved(config)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("option,value,valid", [("--sampler", "euler", "ddpm, ddim, dpmpp"),
                                                ("--format", "jpg", "png, webdataset, npz"),
                                                ("--precision", "fp8", "fp32, bf16")])
def test_bad_choice_lists_the_valid_ones(tmp_path, ckpt, no_sampling, option, value, valid):
    result = cli("sample", "--model", ckpt, "--out", str(tmp_path / "out"), option, value)
    assert result.exit_code == 2, result.output
    assert valid in result.output


@pytest.mark.timeout(60)
def test_folder_that_is_not_ours_is_refused_with_exit_3(tmp_path, ckpt, no_sampling, monkeypatch):
    from pipelines.sample.output import OutputFolder

    def probe(self):  # the writability probe writes into the folder: never into a foreign one (issue 25)
        raise AssertionError(f"probed {self.url} before deciding it is ours")

    monkeypatch.setattr(OutputFolder, "check_writable", probe)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("precious")
    result = cli("sample", "--model", ckpt, "--out", str(tmp_path / "out"))
    assert result.exit_code == 3, result.output
    assert "thesis.tex" in result.output
    assert (tmp_path / "out" / "thesis.tex").read_text() == "precious"


@pytest.mark.timeout(60)
def test_a_foreign_temporary_is_refused_untouched(tmp_path, ckpt, no_sampling):
    """A name shaped like our temporaries is still someone else's file when its target is: it used
    to be deleted before the folder was refused."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".thesis.tex.tmp-4242-deadbeef").write_text("half a thesis")
    result = cli("sample", "--model", ckpt, "--num", "2", "--out", str(out))
    assert result.exit_code == 3, result.output
    assert ".thesis.tex.tmp-4242-deadbeef" in result.output
    assert sorted(p.name for p in out.iterdir()) == [".thesis.tex.tmp-4242-deadbeef"]


@pytest.fixture
def live_pid():
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _started_folder(out, ckpt: str) -> None:
    """A folder a `sample --model ckpt` job (default settings) has started: its job file and one sample."""
    out.mkdir()
    ident = S._identity(S.SampleRequest(model=ckpt, num=1).resolved(read_config(ckpt)), "png", {})
    (out / O.JOB_FILE).write_text(json.dumps({"kind": "ddpm-samples", **ident}))
    (out / "00000000.png").write_bytes(b"png")


@pytest.mark.timeout(60)
def test_second_job_into_a_folder_being_written_is_refused_and_touches_nothing(tmp_path, ckpt, no_sampling):

    out = tmp_path / "out"
    _started_folder(out, ckpt)
    holder = start_lock_holder(out, "sample")
    try:
        in_flight = out / f".00000001.png.tmp-{holder.pid}-abcdef12"
        in_flight.write_bytes(b"being written")
        before = sorted(p.name for p in out.iterdir())
        result = cli("sample", "--model", ckpt, "--num", "2", "--out", str(out))
        assert result.exit_code == 3, result.output
        assert "being written by another sample job (" in result.output and str(holder.pid) in result.output
        assert sorted(p.name for p in out.iterdir()) == before  # the first job's temporary is still there
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.timeout(60)
def test_stale_lock_and_temporaries_of_a_dead_job_are_cleaned_live_ones_kept(tmp_path, ckpt, monkeypatch,
                                                                           live_pid):
    import socket

    out = tmp_path / "out"
    _started_folder(out, ckpt)
    gone = dead_pid()
    (out / ".ddpm-lock").write_text(json.dumps({"host": socket.gethostname(), "pid": gone}))
    dead_tmp, live_tmp = f".00000001.png.tmp-{gone}-abcdef12", f".00000002.png.tmp-{live_pid}-abcdef12"
    for name in (dead_tmp, live_tmp):
        (out / name).write_bytes(b"half")
    seen = []

    def pool(req, env):  # the job got past the lock: look at the folder, then stop
        seen.append(sorted(p.name for p in out.iterdir()))
        raise RuntimeError("stop here")

    monkeypatch.setattr(S, "WorkerPool", pool)
    result = cli("sample", "--model", ckpt, "--num", "3", "--out", str(out))
    assert result.exit_code == 1 and "stop here" in result.output, result.output
    assert ".ddpm-lock" in seen[0] and dead_tmp not in seen[0] and live_tmp in seen[0]
    assert sorted(p.name for p in out.iterdir()) == sorted([O.JOB_FILE, "00000000.png", live_tmp])  # lock released


@pytest.mark.timeout(60)
def test_steps_beyond_T_fail_before_any_folder_or_worker(tmp_path, ckpt, no_sampling):
    result = cli("sample", "--model", ckpt, "--num", "2", "--steps", "51", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert "--steps must be in [1, T=50], got 51" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(60)
def test_a_job_that_fails_after_its_checks_leaves_no_empty_folder(tmp_path, ckpt, monkeypatch):
    from pipelines.errors import UsageError

    def pool(req, env):
        raise UsageError("a worker could not load the model")

    monkeypatch.setattr(S, "WorkerPool", pool)
    result = cli("sample", "--model", ckpt, "--num", "2", "--out", str(tmp_path / "new" / "out"))
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "new").exists()  # nor the parent it had to make


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", ["npz", "webdataset"])
def test_chunk_files_hold_samples_and_progressive_strips(tmp_path, fmt):
    rng = np.random.default_rng(0)
    result = {"indices": [4, 5, 6], "x": rng.uniform(-1, 1, (3, 1, 8, 8)).astype(np.float32),
              "progressive": rng.uniform(-1, 1, (3, 2, 1, 8, 8)).astype(np.float32)}
    names = O.write_unit(O.OutputFolder(str(tmp_path)), fmt, result, levels=17)
    ext = {"npz": "npz", "webdataset": "tar"}[fmt]
    assert names == [f"samples-00000004-00000007.{ext}"]
    with pytest.raises(S.RefusedError, match="no record of their settings"):
        O.inspect_folder(O.OutputFolder(str(tmp_path)), fmt)
    (tmp_path / O.JOB_FILE).write_text(json.dumps({"kind": "ddpm-samples"}))
    state = O.inspect_folder(O.OutputFolder(str(tmp_path)), fmt)
    assert state.done == {4, 5, 6}
    if fmt == "npz":
        with np.load(tmp_path / names[0]) as z:
            assert z["indices"].tolist() == [4, 5, 6]
            assert np.array_equal(z["x"], result["x"])
            assert z["images"].shape == (3, 8, 8, 1) and z["progressive"].shape == (3, 2, 8, 8, 1)
    else:
        with tarfile.open(tmp_path / names[0]) as tar:
            assert tar.getnames() == ["00000004.png", "00000004.progressive.png", "00000005.png",
                                      "00000005.progressive.png", "00000006.png", "00000006.progressive.png"]


# -- on the shared Ray cluster ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_and_two_workers_and_any_batch_size_give_the_same_samples(ray_cluster, tmp_path, ckpt):
    one = S.write_samples(request(ckpt, nodes=1, batch_size=4), str(tmp_path / "one"), fmt="npz", progress=False)
    two = S.write_samples(request(ckpt, nodes=2, batch_size=1), str(tmp_path / "two"), fmt="npz", progress=False)
    assert (one["workers"], two["workers"]) == (1, 2)
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["nodes_used"] == 2 and manifest["count"] == N and manifest["steps"] == 4
    a, b = read_npz_folder(tmp_path / "one"), read_npz_folder(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(N))
    x1, x2 = np.stack([a[i] for i in range(N)]), np.stack([b[i] for i in range(N)])
    assert np.abs(x1 - x2).max() < 1e-4
    assert np.abs(x1[0] - x1[1]).max() > 0.1  # distinct samples, not one image repeated
    # The in-memory API (what `evaluate` uses) gives the same samples through the same job.
    x3 = S.sample_to_tensor(ckpt, N, sampler="ddim", steps=4, batch_size=3, nodes=2, progress=False).numpy()
    assert np.abs(x1 - x3).max() < 1e-4


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("fmt", ["png", "webdataset"])
def test_interrupted_run_resumes_with_nothing_missing_and_no_duplicates(ray_cluster, tmp_path, ckpt, fmt,
                                                                         monkeypatch):
    out = tmp_path / "out"
    written: list[str] = []

    def stop_after_first_unit(names):
        written.extend(names)
        raise KeyboardInterrupt  # as if the driver were killed midway

    with pytest.raises(KeyboardInterrupt):
        S.write_samples(request(ckpt, nodes=2, batch_size=2), str(out), fmt=fmt, progress=False,
                        on_written=stop_after_first_unit)
    names = sorted(os.listdir(out))
    assert "manifest.json" not in names  # only a finished set gets a manifest
    assert 0 < len(written) and set(written) <= set(names)
    (out / f".00000005.png.tmp-{dead_pid()}-abcdef12").write_bytes(b"half")  # what a kill -9 mid-write leaves
    if fmt == "png":
        assert len([n for n in names if n.endswith(".png")]) < N

    # Resume through the command line, with another batch size and number of workers.
    result = cli("sample", "--model", ckpt, "--num", str(N), "--out", str(out), "--sampler", "ddim",
                 "--steps", "4", "--batch-size", "3", "--nodes", "1", "--format", fmt, "--json")
    assert result.exit_code == 0, result.output
    summary = cli_json(result)
    assert summary["resumed"] and 0 < summary["written"] < N
    assert str(out) in summary["message"]

    names = sorted(os.listdir(out))
    assert not [n for n in names if ".tmp-" in n]
    if fmt == "png":
        images = sorted(n for n in names if n.endswith(".png"))
        assert images == [f"{i:08d}.png" for i in range(N)]
        got = {i: png_array((out / f"{i:08d}.png").read_bytes()) for i in range(N)}
    else:
        got = {}
        for name in (n for n in names if n.endswith(".tar")):
            with tarfile.open(out / name) as tar:
                for member in tar.getmembers():
                    i = int(member.name.split(".")[0])
                    assert i not in got, f"sample {i} twice"
                    got[i] = png_array(tar.extractfile(member).read())
        assert sorted(got) == list(range(N))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == N and manifest["format"] == fmt

    # The same images as an uninterrupted run (one level of 17 is 16 grey values).
    x = S.sample_to_tensor(ckpt, N, sampler="ddim", steps=4, progress=False)
    from ddpm.image import to_uint8

    ref = to_uint8(x, 17)[..., 0].astype(np.int16)
    assert max(np.abs(got[i] - ref[i]).max() for i in range(N)) <= 16

    # A complete set is left alone, without starting any worker.
    def refuse(*args, **kwargs):
        raise AssertionError("sampling started")

    monkeypatch.setattr(S, "WorkerPool", refuse)
    again = S.write_samples(request(ckpt, nodes=1, batch_size=3), str(out), fmt=fmt, progress=False)
    assert again["written"] == 0
    # Other settings in the same folder are refused.
    result = cli("sample", "--model", ckpt, "--num", str(N), "--out", str(out), "--steps", "4",
                 "--seed", "1", "--format", fmt)
    assert result.exit_code == 3, result.output
    assert "seed=0" in result.output


@pytest.mark.timeout(300)
def test_s3_output_with_progressive_strips(ray_cluster, s3_prefix, ckpt):
    import s3fs

    result = S.write_samples(request(ckpt, num=3, nodes=1, progressive=3), s3_prefix, fmt="png", progress=False)
    assert result["written"] == 3 and result["out"] == s3_prefix
    fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"], skip_instance_cache=True)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(s3_prefix[len("s3://"):]))
    assert names == [".ddpm-sample.json", "00000000-progressive.png", "00000000.png",
                     "00000001-progressive.png", "00000001.png", "00000002-progressive.png", "00000002.png",
                     "manifest.json"]
    strip = png_array(fs.cat_file(f"{s3_prefix}/00000001-progressive.png"))
    assert strip.shape[:2] == (8 + 2, 3 * (8 + 1) + 1)  # K = 3 predictions of x_0 in a row, 1 px gaps
    manifest = json.loads(fs.cat_file(f"{s3_prefix}/manifest.json"))
    assert manifest["progressive"] == 3 and manifest["model"] == ckpt


@pytest.mark.timeout(300)
def test_bf16_is_close_to_fp32_and_steps_beyond_T_fail_clearly(ray_cluster, ckpt):
    fp32 = S.sample_to_tensor(ckpt, 2, steps=4, progress=False)
    bf16 = S.sample_to_tensor(ckpt, 2, steps=4, precision="bf16", progress=False)
    assert fp32.shape == bf16.shape == (2, 1, 8, 8)
    diff = (fp32 - bf16).abs()
    assert 0 < diff.max() and diff.mean() < 0.05  # bf16 really ran, and stays close
    from pipelines.errors import UsageError

    with pytest.raises(UsageError, match="T=50"):
        S.sample_to_tensor(ckpt, 2, steps=51, progress=False)


@pytest.mark.timeout(60)
def test_s3_bucket_that_does_not_exist_is_unwritable(s3_endpoint, ckpt, no_sampling):
    result = cli("sample", "--model", ckpt, "--out", "s3://no-such-bucket/samples")
    assert result.exit_code == 2, result.output
    assert "not writable" in result.output


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_registered_model_is_sampled_by_workers_and_its_version_recorded(ray_cluster, tmp_path, ckpt):
    from ddpm.checkpoint import load_model
    from pipelines import tracking
    from pipelines.registry import register as registry
    from pipelines.settings import resolve

    settings = resolve()
    tracking.configure(settings)
    run_id, _ = tracking.start_or_resume_run(tracking.experiment_id("sample-test", settings), "tiny")
    config, model, _ = load_model(ckpt)
    version = registry.log_model(run_id, config, model, "tiny-sampler")
    tracking.end_run(run_id)

    uri = f"models:/tiny-sampler/{version}"
    result = S.write_samples(request(uri, num=2, nodes=1), str(tmp_path / "out"), fmt="npz", progress=False)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (manifest["model"], manifest["model_version"], manifest["model_run_id"]) == (uri, version, run_id)
    # The registered weights are the checkpoint's EMA weights: the same samples as from the file.
    x = S.sample_to_tensor(ckpt, 2, sampler="ddim", steps=4, progress=False).numpy()  # as request() asks
    got = read_npz_folder(tmp_path / "out")
    assert np.abs(np.stack([got[0], got[1]]) - x).max() < 1e-4
    assert result["written"] == 2
