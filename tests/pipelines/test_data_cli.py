"""`ddpm-pipe data prepare` through the command line."""

from __future__ import annotations

import json
import os


from ddpm.data.reader import ShardLoader, load_split
from tests.support import cli_json, run_cli



def _json(result):
    assert result.exit_code == 0, result.output
    return cli_json(result)


def test_prepare_digits_json_and_rerun(tmp_path):
    out = str(tmp_path / "digits" / "train")
    r = _json(run_cli("data", "prepare", "--source", "digits", "--out", out, "--shard-size", "500", "--json"))
    assert r["num_samples"] == 1437 and r["num_shards"] == 3 and r["shape"] == [1, 8, 8] and r["levels"] == 17
    assert r["shards_written"] == 3 and r["skipped"] == 0 and r["manifest"] == f"{out}/manifest.json"
    again = _json(run_cli("data", "prepare", "--source", "digits", "--out", out, "--shard-size", "500", "--json"))
    assert (again["shards_written"], again["shards_unchanged"]) == (0, 3)
    loader = ShardLoader(out, 64)
    x = next(iter(loader))
    assert x.shape == (64, 1, 8, 8) and x.min() >= -1 and x.max() <= 1 and loader.levels == 17


def test_prepare_default_out_and_message(tmp_path):
    r = run_cli("data", "prepare", "--source", "digits", "--split", "test")
    assert r.exit_code == 0, r.output
    assert "360 test samples of digits" in r.stdout
    x, y, m = load_split(str(tmp_path / "ddpm-home" / "data" / "digits"), split="test")  # DDPM_HOME/data/<source>/<split>
    assert x.shape == (360, 1, 8, 8) and m["split"] == "test" and y is not None


def test_prepare_bad_source_is_usage_error(tmp_path):
    r = run_cli("data", "prepare", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "not found" in r.output
    r = run_cli("data", "prepare", "--source", "digits", "--split", "valid", "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "valid: train, test" in r.output


def test_prepare_to_s3_with_endpoint_option(s3_prefix, s3_endpoint, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the option alone must be enough
    out = f"{s3_prefix}/digits/test"
    r = _json(run_cli("data", "prepare", "--source", "digits", "--split", "test", "--out", out,
                                  "--shard-size", "200", "--endpoint-url", s3_endpoint, "--json"))
    assert r["num_samples"] == 360 and r["num_shards"] == 2
    x, _, m = load_split(out, {"endpoint_url": s3_endpoint})
    assert x.shape == (360, 1, 8, 8) and int(x.max()) == 16


def test_prepare_cifar_archive_from_s3(tmp_path, s3_prefix):
    from ddpm.data.storage import open_fs
    from tests.ddpm.helpers import make_cifar_archive

    batches = make_cifar_archive(tmp_path / "cifar-10-python.tar.gz", n_per_batch=3)
    fs, root = open_fs(s3_prefix)
    fs.put_file(str(tmp_path / "cifar-10-python.tar.gz"), f"{root}/cifar-10-python.tar.gz")
    r = _json(run_cli("data", "prepare", "--source", f"{s3_prefix}/cifar-10-python.tar.gz", "--json"))
    assert r["source"] == "cifar10" and r["num_samples"] == 15 and r["shape"] == [3, 32, 32] and r["levels"] == 256
    x, y, _ = load_split(r["url"])
    assert y.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert x[0].reshape(-1).tolist() == batches["data_batch_1"][0][0].tolist()


def _prepare(out, *extra):
    return run_cli("data", "prepare", "--source", "digits", "--out", str(out), "--json", *extra)


def test_prepare_into_a_folder_of_someone_elses_files_is_refused_untouched(tmp_path):
    """Their manifest.json and train-000000.tar used to be overwritten, exit 0."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "manifest.json").write_text('{"my": "index"}')
    (theirs / "train-000000.tar").write_bytes(b"my archive")
    r = _prepare(theirs)
    assert r.exit_code == 3, r.output
    assert "manifest.json that is not a ddpm-pipe/webdataset manifest" in r.output
    assert (theirs / "manifest.json").read_text() == '{"my": "index"}'
    assert (theirs / "train-000000.tar").read_bytes() == b"my archive"
    (theirs / "manifest.json").unlink()
    (theirs / "notes.txt").write_text("mine")
    r = _prepare(theirs)
    assert r.exit_code == 3, r.output
    assert "notes.txt" in r.output and "not shards of this split" in r.output
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt", "train-000000.tar"]
    (theirs / "notes.txt").unlink()
    (theirs / ".thesis.tex.tmp-4242-deadbeef").write_text("half")  # shaped like ours, but not ours
    r = _prepare(theirs)
    assert r.exit_code == 3 and ".thesis.tex.tmp-4242-deadbeef" in r.output, r.output
    assert (theirs / ".thesis.tex.tmp-4242-deadbeef").exists()


def test_prepare_removes_an_interrupted_runs_temporaries_and_an_earlier_larger_runs_shards(tmp_path):
    from tests.support import dead_pid

    out = tmp_path / "d"
    first = _json(_prepare(out, "--shard-size", "200"))
    assert first["num_shards"] == 8
    dead = f".train-000003.tar.tmp-{dead_pid()}-abcdef12"
    (out / dead).write_bytes(b"half a shard")  # what a killed `data prepare` leaves
    live = f".train-000004.tar.tmp-{os.getpid()}-abcdef13"  # this process: alive, never removed
    (out / live).write_bytes(b"in flight")
    second = _json(_prepare(out, "--shard-size", "500"))
    assert second["num_shards"] == 3
    assert sorted(second["removed"]) == sorted([dead, *(f"train-{i:06d}.tar" for i in range(3, 8))])
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", live, "train-000000.tar", "train-000001.tar", "train-000002.tar"])
    assert "removed 6 leftover file(s)" in second["message"]


def test_a_second_prepare_into_a_folder_being_written_is_refused(tmp_path):
    import socket
    import subprocess
    import sys

    out = tmp_path / "d"
    _json(_prepare(out))
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / ".ddpm-lock").write_text(json.dumps({"host": socket.gethostname(), "pid": proc.pid}))
        r = _prepare(out)
        assert r.exit_code == 3, r.output
        assert f"being written by another data prepare job (pid {proc.pid}" in r.output
    finally:
        proc.kill()
        proc.wait()
    assert _prepare(out).exit_code == 0  # its process gone: the lock is taken over
    assert not (out / ".ddpm-lock").exists()
