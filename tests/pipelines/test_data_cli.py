"""`ddpm-pipe data prepare` through the command line."""

from __future__ import annotations

import os


from ddpm.data.reader import ShardLoader, load_split
from tests.support import cli_json, picture_folder, run_cli, start_lock_holder



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

    out = tmp_path / "d"
    _json(_prepare(out))
    proc = start_lock_holder(out, "data prepare")
    try:
        r = _prepare(out)
        assert r.exit_code == 3, r.output
        assert "being written by another data prepare job (" in r.output and str(proc.pid) in r.output
    finally:
        proc.kill()
        proc.wait()
    assert _prepare(out).exit_code == 0  # its process gone: the lock is taken over
    assert not (out / ".ddpm-lock").exists()


# -- a held-out split carved from one folder, and one folder prepared twice ------------------------
def test_prepare_with_test_fraction_writes_disjoint_splits_recorded_in_the_manifests(tmp_path):
    from ddpm.data.manifest import read_manifest, shared_images

    folder = picture_folder(tmp_path / "pictures")
    r = run_cli("data", "prepare", "--source", str(folder), "--out", str(tmp_path / "shards"),
                "--test-fraction", "0.25", "--split-seed", "3", "--json")
    out = _json(r)
    train, test = (read_manifest(str(tmp_path / "shards" / s)) for s in ("train", "test"))
    assert out["splits"]["train"]["num_samples"] + out["splits"]["test"]["num_samples"] == 60
    assert train["num_samples"] + test["num_samples"] == 60 and 5 <= test["num_samples"] <= 25
    assert len(train["image_hashes"]) == train["num_samples"] and len(test["image_hashes"]) == test["num_samples"]
    assert shared_images(train, test) == 0 and not set(train["image_hashes"]) & set(test["image_hashes"])
    for m in (train, test):
        assert m["split_rule"]["test_fraction"] == 0.25 and m["split_rule"]["seed"] == 3
    assert "warning" not in r.stderr
    x_train, _, _ = load_split(str(tmp_path / "shards"), split="train")  # the dataset folder resolves
    assert x_train.shape == (train["num_samples"], 3, 8, 8)
    again = _json(run_cli("data", "prepare", "--source", str(folder), "--out", str(tmp_path / "shards"),
                          "--test-fraction", "0.25", "--split-seed", "3", "--json"))
    assert again["splits"]["test"]["shards_unchanged"] == 1 and again["splits"]["train"]["shards_written"] == 0
    bad = run_cli("data", "prepare", "--source", str(folder), "--test-fraction", "1.5")
    assert bad.exit_code == 2 and "--test-fraction must be in (0, 1)" in bad.output
    both = run_cli("data", "prepare", "--source", str(folder), "--test-fraction", "0.1", "--split", "test")
    assert both.exit_code == 2 and "leave out --split" in both.output


def test_one_folder_prepared_twice_as_train_and_test_is_warned_about(tmp_path):
    folder = picture_folder(tmp_path / "pictures")
    first = run_cli("data", "prepare", "--source", str(folder), "--out", str(tmp_path / "d" / "train"))
    assert first.exit_code == 0 and "warning" not in first.stderr
    second = run_cli("data", "prepare", "--source", str(folder), "--out", str(tmp_path / "d" / "test"),
                     "--split", "test")
    assert second.exit_code == 0, second.output
    warning = [line for line in second.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and "60 of 60 test images" in warning[0] and "--test-fraction" in warning[0]
    assert "warning" not in second.stdout  # stdout holds the result alone
