"""The registered model: a pyfunc "model from code" that pickles nothing and samples in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tests.support import cli_json, register_tiny, save_tiny_checkpoint, tiny_config



@pytest.mark.timeout(120)
def test_logged_model_is_code_plus_safetensors_and_pickles_nothing(tmp_path):
    import mlflow
    import yaml

    run_id, version, _ = register_tiny(tmp_path)
    assert version == "1"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/tiny/1", dst_path=str(tmp_path / "dl")))
    files = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle", ".joblib"))], files
    assert "artifacts/ddpm_model/model.safetensors" in files and "artifacts/ddpm_model/config.json" in files
    assert "mlflow_model.py" in files and "code/ddpm/unet.py" in files
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert flavor["model_code_path"].endswith("mlflow_model.py")
    assert "python_model" not in flavor  # a pickled PythonModel would be named here
    doc = json.loads((local / "artifacts/ddpm_model/config.json").read_text())
    assert doc["config"]["diffusion"]["timesteps"] == 50 and doc["ddpm_version"]


@pytest.mark.timeout(180)
def test_pyfunc_loads_in_a_fresh_process_and_samples(tmp_path):
    register_tiny(tmp_path)
    from pipelines.settings import resolve

    script = textwrap.dedent("""
        import json, sys
        import mlflow
        m = mlflow.pyfunc.load_model("models:/tiny/1")
        a = m.predict({"num": 3, "seeds": [11, 12, 13], "sampler": "ddim", "steps": 4})
        b = m.predict({"num": 1, "seeds": [12], "sampler": "ddim", "steps": 4})
        c = m.predict({"num": 2, "sampler": "ddpm", "steps": 5})
        print(json.dumps({"shape": list(a.shape), "dtype": str(a.dtype), "same": bool((a[1] == b[0]).all()),
                          "max": int(a.max()), "ddpm_shape": list(c.shape),
                          "ddpm_in_sys_modules": "pipelines" in sys.modules}))
    """)
    env = {**os.environ, "MLFLOW_TRACKING_URI": resolve().tracking_uri, "PYTHONPATH": "",
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = cli_json(proc)
    assert out["shape"] == [3, 8, 8, 1] and out["dtype"] == "uint8"
    assert out["same"]  # sample i depends on its seed alone, not on its batch
    assert out["max"] <= 255 and out["ddpm_shape"] == [2, 8, 8, 1]
    assert not out["ddpm_in_sys_modules"]


@pytest.mark.timeout(120)
def test_runs_and_models_uris_load_the_checkpoints_ema_weights(tmp_path):
    from ddpm.checkpoint import load_model
    from pipelines.registry import models

    run_id, version, ckpt = register_tiny(tmp_path)
    _, reference, _ = load_model(str(ckpt), weights="ema")
    for uri in (f"runs:/{run_id}/model", f"models:/tiny/{version}", str(ckpt)):
        loaded = models.load(uri)
        sd = loaded.model.state_dict()
        assert all(torch.equal(sd[k], v) for k, v in reference.state_dict().items()), uri
    assert models.load(f"models:/tiny/{version}").run_id == run_id
    from pipelines.errors import UsageError

    with pytest.raises(UsageError):
        models.load("models:/tiny/99")


@pytest.mark.timeout(120)
def test_a_versions_weights_are_downloaded_once_and_a_damaged_copy_again(tmp_path, monkeypatch):
    """sample and evaluate load a registered version on every call; its weights come from
    $DDPM_HOME/cache/models after the first, checked against the sha256 written with them."""
    import mlflow.artifacts

    from ddpm.checkpoint import WEIGHTS_FILE, load_model
    from pipelines.registry import models

    run_id, version, ckpt = register_tiny(tmp_path, name="cached")
    _, reference, _ = load_model(str(ckpt), weights="ema")
    downloads = []
    real = mlflow.artifacts.download_artifacts
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts",
                        lambda **kw: downloads.append(kw.get("artifact_uri") or kw["artifact_path"]) or real(**kw))
    uri = f"models:/cached/{version}"
    for _ in range(2):
        assert models.read_config(uri).name == "digits"
        loaded = models.load(uri)
        assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in reference.state_dict().items())
    # the weights folder only, once, and the sha256 listing recorded at registration that it is checked against
    assert downloads == [f"{uri}/artifacts/ddpm_model", f"registry/cached-v{version}.sha256"]
    folder = models.weights_folder(uri, models.describe(uri))
    with open(f"{folder}/{WEIGHTS_FILE}", "r+b") as f:  # a damaged copy: downloaded again
        f.write(b"\0" * 16)
    loaded = models.load(uri)
    assert len(downloads) == 4
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in reference.state_dict().items())


@pytest.mark.timeout(240)
def test_logged_model_has_a_signature_an_example_and_predict_accepts_it(tmp_path, recwarn):
    import mlflow

    from pipelines.registry.register import input_example

    run_id, version, _ = register_tiny(tmp_path)
    assert not [w for w in recwarn.list if "type hints" in str(w.message)]  # MLflow's predict hint warning
    info = mlflow.models.get_model_info(f"models:/tiny/{version}")
    inputs = info.signature.inputs.to_dict()
    assert [c["name"] for c in inputs] == ["num", "seed", "seeds", "sampler", "steps", "eta", "batch_size",
                                           "class_labels", "guidance"]
    assert inputs[0]["required"] and not any(c["required"] for c in inputs[1:])
    (out,) = info.signature.outputs.to_dict()
    assert out["tensor-spec"]["dtype"] == "uint8" and list(out["tensor-spec"]["shape"]) == [-1, 8, 8, 1]
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/tiny/{version}", dst_path=str(tmp_path / "m")))
    example = json.loads((local / "input_example.json").read_text())
    assert example == {"num": 2, "seed": 0, "sampler": "ddim", "steps": 10}
    serving = json.loads((local / "serving_input_example.json").read_text())
    assert serving == {"inputs": example}  # the body a serving endpoint takes
    # What `mlflow models predict` and a serving endpoint do with the payload: schema check, then predict.
    result = tmp_path / "predictions.json"
    mlflow.models.predict(f"models:/tiny/{version}", input_data=input_example(tiny_config()),
                          env_manager="local", output_path=str(result))
    images = json.loads(result.read_text())["predictions"]
    assert len(images) == 2 and len(images[0]) == 8 and len(images[0][0]) == 8 and len(images[0][0][0]) == 1
    with pytest.raises(Exception, match="num"):  # the signature refuses a request without the required column
        mlflow.models.predict(f"models:/tiny/{version}", input_data={"seed": 3}, env_manager="local",
                              output_path=str(tmp_path / "bad.json"))


@pytest.mark.timeout(240)
def test_version_description_and_model_params_say_what_it_was_trained_on(tmp_path):
    from pipelines import tracking
    from pipelines.registry import models, register as registry
    from pipelines.storage.data import prepare_command
    from pipelines.settings import resolve

    settings = resolve()
    tracking.configure(settings)
    c = tracking.client()
    data = tmp_path / "digits" / "train"
    prepare_command(source="digits", out=str(data), split="train")
    run_id, _ = tracking.start_or_resume_run(tracking.experiment_id("described", settings), "described")
    tracking.log_params(run_id, {"model": {"ch": 32}, "run": {"nodes": 1}})  # as train logs them, before the model
    ds = tracking.log_dataset(run_id, str(data), "training")
    version = registry.log_and_register(run_id, str(save_tiny_checkpoint(tmp_path / "c.pt")), "described")
    mv = c.get_model_version("described", version)
    assert f"digits-train (1437 images, digest {ds.digest}, local {data})" in mv.description
    assert "trained to step 7" in mv.description and "T=50 linear" in mv.description
    assert "edm prediction; unconditional; trained" in mv.description
    assert f"in run described ({run_id})" in mv.description
    logged = c.get_logged_model(models.model_id_of(mv))
    assert logged.params["diffusion.timesteps"] == "50" and logged.params["model.ch"] == "32"
    assert logged.params["run.nodes"] == "1"  # MLflow's copy of the run's params, kept


@pytest.mark.timeout(240)
def test_evaluation_shows_as_short_tags_a_description_and_a_table(tmp_path):
    """What the registry shows of an evaluation (its metrics, linked to the logged model, are the
    evaluation run's: tests/pipelines/test_evaluate_mlflow.py)."""
    from pipelines import tracking
    from pipelines.registry import register as registry

    run_id, version, _ = register_tiny(tmp_path)
    c = tracking.client()
    trained = c.get_model_version("tiny", version).description
    # Any metric names: another evaluation may compute other metrics.
    primary = [{"key": "bpd/bound:full/data:abc/num:8", "metric": "bpd", "value": 4.25},
               {"key": "sharpness/data:abc/sampler:ddim/steps:5", "metric": "sharpness", "value": 0.125}]
    extra = [{"key": "sharpness/data:abc/sampler:ddim/steps:10", "metric": "sharpness", "value": 0.5}]
    for stamp, scale in (("20260101T000000Z", 1.0), ("20260102T000000Z", 2.0)):
        scaled = [{**r, "value": r["value"] * scale} for r in primary]
        registry.record_evaluation(c, run_id, [("tiny", version)], scaled, scaled + extra, stamp)

    mv = c.get_model_version("tiny", version)
    assert mv.tags["eval.bpd"] == "8.5" and mv.tags["eval.sharpness"] == "0.25"  # the latest evaluation
    assert mv.description.startswith(trained)  # the training paragraph stays
    assert mv.description.count("Latest evaluation") == 1
    assert "Latest evaluation (20260102T000000Z): bpd 8.5, sharpness 0.25." in mv.description
    assert "evaluation/results-20260102T000000Z.md" in mv.description
    table = Path(c.download_artifacts(run_id, "evaluation/results-20260102T000000Z.md", str(tmp_path)))
    lines = table.read_text().splitlines()
    assert "| sharpness | 0.5 | data:abc, sampler:ddim, steps:10 |" in lines
    assert "| bpd | 8.5 | bound:full, data:abc, num:8 |" in lines


@pytest.mark.timeout(240)
def test_every_model_uri_form_mlflow_accepts_loads(tmp_path):
    from ddpm.checkpoint import load_model
    from pipelines import tracking
    from pipelines.registry import models
    from pipelines.errors import UsageError

    run_1, _, _ = register_tiny(tmp_path, seed=0)
    run_2, _, ckpt_2 = register_tiny(tmp_path, seed=1)
    c = tracking.client()
    c.set_registered_model_alias("tiny", "champion", "1")
    model_id = models.model_id_of(c.get_model_version("tiny", "2"))
    assert model_id.startswith("m-")
    _, reference, _ = load_model(str(ckpt_2), weights="ema")
    expect = {"models:/tiny/latest": ("tiny", "2", run_2), "models:/tiny/LATEST": ("tiny", "2", run_2),
              "models:/tiny@champion": ("tiny", "1", run_1), f"models:/{model_id}": (None, None, run_2),
              f"runs:/{run_2}/model": (None, None, run_2), "models:/tiny/2": ("tiny", "2", run_2)}
    for uri, (name, version, run_id) in expect.items():
        meta = models.describe(uri)
        assert (meta["name"], meta["version"], meta["run_id"]) == (name, version, run_id), uri
        assert meta["model_id"] == models.model_id_of(c.get_model_version("tiny", version or "2")), uri
    for uri in ("models:/tiny/latest", f"models:/{model_id}", f"runs:/{run_2}/model"):
        sd = models.load(uri).model.state_dict()
        assert all(torch.equal(sd[k], v) for k, v in reference.state_dict().items()), uri
    assert models.load("models:/tiny@champion").version == "1"
    for bad in ("models:/tiny@nobody", "models:/m-0000", "models:/nobody/latest", "models:/tiny/1/2"):
        with pytest.raises(UsageError, match="does not exist"):
            models.describe(bad)


@pytest.mark.timeout(300)
def test_workers_load_the_version_the_driver_resolved_not_where_the_alias_points_later(tmp_path, monkeypatch):
    """Issue 25, item 4: `sample` resolves an alias once (``settle``) and hands every worker, and every
    actor Ray restarts, the pinned models:/NAME/VERSION; `evaluate --nodes 2` hands the sample job the
    version it loaded and scores. The alias is moved after the driver resolved it."""
    from pipelines import tracking
    from pipelines.registry import evaluate as E
    from pipelines.registry import models
    from pipelines.sample import command as S
    from pipelines.sample import pool
    from tests.support import TINY_NET, request

    register_tiny(tmp_path, name="pinned", seed=0, overrides=TINY_NET)
    register_tiny(tmp_path, name="pinned", seed=1, overrides=TINY_NET)
    c = tracking.client()
    c.set_registered_model_alias("pinned", "champion", "1")
    alias = "models:/pinned@champion"

    loads: list[str] = []
    real_load, real_settle = models.load, S.settle
    monkeypatch.setattr(models, "load", lambda uri: loads.append(uri) or real_load(uri))

    def settle_then_move(req):
        settled = real_settle(req)
        c.set_registered_model_alias("pinned", "champion", "2")  # a promotion lands mid-job
        return settled

    monkeypatch.setattr(S, "settle", settle_then_move)
    # The worker in this process, where the patched load sees it, even when the session's Ray cluster
    # is up (a Ray actor is built from the same `req.pinned or req.model`, WorkerPool._start_actors).
    monkeypatch.setattr(pool, "runs_in_process", lambda req: True)
    result = S.write_samples(request(alias, num=2), str(tmp_path / "out"), fmt="npz", progress=False)
    assert loads == ["models:/pinned/1"]  # the sample worker
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (manifest["model"], manifest["model_version"], result["written"]) == (alias, "1", 2)

    c.set_registered_model_alias("pinned", "champion", "1")
    loaded = real_load(alias)
    c.set_registered_model_alias("pinned", "champion", "2")
    asked: list[str] = []
    monkeypatch.setattr(E, "sample_to_tensor", lambda **kw: asked.append(kw["model"]) or torch.zeros(2, 1, 8, 8))
    E.generate_samples(loaded, "ddim", 4, 0.0, 2, nodes=2, address=None)
    assert (loaded.version, asked) == ("1", ["models:/pinned/1"])


@pytest.mark.timeout(240)
def test_a_sqlite_registry_is_read_as_mlflow_reads_it(tmp_path, monkeypatch):
    """sqlite_registry answers models:/NAME/VERSION and models:/NAME@ALIAS with the run, source and tags
    MLflow's store gives, and None (MLflow decides) for every form or state it does not read."""
    import sqlite3

    from pipelines import tracking
    from pipelines.registry import models, sqlite_registry
    from pipelines.settings import resolve

    run_1, _, _ = register_tiny(tmp_path, seed=0)
    run_2, _, _ = register_tiny(tmp_path, seed=1)
    c = tracking.client()
    c.set_registered_model_alias("tiny", "champion", "1")
    c.set_model_version_tag("tiny", "2", "note", "a tag")
    registry = resolve().registry_uri
    assert sqlite_registry.database_path(registry) == str(resolve().home / "mlflow.db")
    for uri, version in (("models:/tiny/1", "1"), ("models:/tiny/2", "2"), ("models:/tiny@champion", "1")):
        found, mv = sqlite_registry.find_version(registry, uri), c.get_model_version("tiny", version)
        assert (found.name, found.version, found.run_id, found.source, found.tags) == (
            "tiny", version, mv.run_id, mv.source, mv.tags), uri
        assert models.model_id_of(found) == models.model_id_of(mv) is not None
    assert sqlite_registry.find_version(registry, "models:/tiny/2").tags["note"] == "a tag"
    for other in ("models:/tiny/latest", "models:/tiny@latest", "models:/tiny/3", "models:/tiny@nobody",
                  "models:/nobody/1", f"runs:/{run_2}/model", f"models:/{models.model_id_of(mv)}", "models:/tiny/1/2"):
        assert sqlite_registry.find_version(registry, other) is None, other
    for store in ("http://127.0.0.1:5000", "postgresql://u@localhost/db", f"{registry}?timeout=5",
                  f"sqlite:///{tmp_path / 'absent.db'}"):
        assert sqlite_registry.find_version(store, "models:/tiny/1") is None, store
    sqlite3.connect(tmp_path / "other.db").execute("CREATE TABLE t (x)").connection.commit()
    assert sqlite_registry.find_version(f"sqlite:///{tmp_path / 'other.db'}", "models:/tiny/1") is None
    monkeypatch.setenv("MLFLOW_ENABLE_WORKSPACES", "true")
    assert sqlite_registry.find_version(registry, "models:/tiny/1") is None
    monkeypatch.delenv("MLFLOW_ENABLE_WORKSPACES")
    c.delete_model_version("tiny", "1")  # MLflow keeps the row, marked deleted: not there for either
    assert sqlite_registry.find_version(registry, "models:/tiny/1") is None
    assert sqlite_registry.find_version(registry, "models:/tiny@champion") is None
    assert models.describe("models:/tiny/2")["run_id"] == run_2


@pytest.mark.timeout(240)
def test_a_cached_version_loads_without_importing_mlflow_and_a_changed_tag_is_refused(tmp_path):
    """The second load of a registered version (its files in the cache) reads the sqlite registry
    without MLflow, in a fresh process; once the version's sha256 tag changes, the cached copy is not
    used and the load is refused as MLflow's path refuses it."""
    from pipelines import tracking
    from pipelines.errors import UsageError
    from pipelines.registry import digests, models

    run_id, version, _ = register_tiny(tmp_path, name="quick")
    uri = f"models:/quick/{version}"
    models.load(uri)  # downloads into the cache
    code = textwrap.dedent(f"""
        import sys
        from pipelines.registry import models
        loaded = models.load({uri!r})
        assert models.read_config({uri!r}).name == "digits"
        print(loaded.run_id, loaded.version, "mlflow" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    assert out.stdout.split() == [run_id, version, "False"], out.stderr
    tracking.client().set_model_version_tag("quick", version, digests.SHA256_TAG, "0" * 64)
    with pytest.raises(UsageError, match="differs from the digest"):
        models.load(uri)
