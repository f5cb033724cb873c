"""Issue 25, item 11: the scaled-out configuration, without Docker.

What ``infra/local/compose.yaml`` runs in containers, here as separate processes on 127.0.0.1: a
PostgreSQL server (Debian's ``postgresql``; ``.ci/run`` installs it), an MLflow server whose store is
on it and whose artifacts are on S3 (moto's S3 server, a process of its own), and a Ray cluster of
``ray start --head`` and two ``ray start`` worker nodes, each node with its own ``DDPM_HOME`` and
working folder, all with Ray's token authentication on (``RAY_AUTH_MODE=token``, the token in
``RAY_AUTH_TOKEN``). ``ddpm-pipe run --submit`` sends the workflow to the head's Jobs API from an
environment holding only that token; data, checkpoints and samples go to ``--storage s3://...``.

Without PostgreSQL this test fails, it does not skip (as the browser test without chromium).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.s3 import S3_CREDENTIALS
from tests.support import TINY_NET, free_port, start_mlflow_server, stop_process_group, wait_until

BIN = Path(sys.executable).parent  # ray, ddpm-pipe and moto_server of this environment
BUCKET = "ddpm-scaled"
STORAGE = f"s3://{BUCKET}/ddpm"
MODEL = "ddpm-scaled"
# The cheapest network that samples (a 50-step chain), two training steps on the two worker nodes
# (the head has no CPUs for tasks), a few samples on both.
OVERRIDES = [*TINY_NET, "train.batch_size=16", "train.log_every=1", "train.eval_every=2", "train.sample_every=4",
             "train.checkpoint_every=2", "train.warmup_steps=2", "train.quality_num=0", "train.max_steps=2",
             "sample.batch_size=8", f"train.registered_model={MODEL}"]
WORKFLOW = """\
train: {nodes: 2}
evaluate: {num: 32, steps: 5}
sample: {num: 8, steps: 5, nodes: 2}
"""
START_TIMEOUT = 180.0  # seconds for one server or node to answer on a loaded 2-core machine


@dataclass(frozen=True)
class Stack:
    token: str
    jobs_api: str  # the head's dashboard: http://127.0.0.1:PORT
    tracking_uri: str
    s3_endpoint: str
    homes: dict[str, Path]  # DDPM_HOME of "head", "worker1", "worker2"


def _clean_env() -> dict[str, str]:
    """This process's environment less every setting a process of the stack gets from the stack
    itself (``DDPM_*``, ``MLFLOW_*``, ``AWS_*``, ``RAY_*``), with this environment's commands first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DDPM_", "MLFLOW_", "AWS_", "RAY_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    assert found, "PostgreSQL is not installed: apt-get install -y postgresql (.ci/run does)"
    return found[-1].parent


def _as_postgres(folder: Path) -> dict:
    """Popen arguments that run PostgreSQL's programs as the ``postgres`` user when this process is
    root (they refuse to run as root), ``folder`` handed to that user."""
    if os.geteuid() != 0:
        return {}
    user = pwd.getpwnam("postgres")
    for path in [folder, *folder.rglob("*")]:
        os.chown(path, user.pw_uid, user.pw_gid)
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _start_postgres(pg: Path, folder: Path, port: int, password: str) -> subprocess.Popen:
    """initdb (a superuser ``mlflow`` with ``password``, scram-sha-256 as on a network), the server on
    127.0.0.1:``port`` in its own process group, and the database ``mlflow``; the server once it has
    the database. Its log is in ``folder/server.log``."""
    as_postgres = _as_postgres(folder)
    env = {**_clean_env(), "PGPASSWORD": password}
    proc = None
    try:
        subprocess.run([str(pg / "initdb"), "-D", str(folder / "data"), "-U", "mlflow", "--pwfile",
                        str(folder / "pwfile"), "--auth=scram-sha-256", "--no-sync", "-E", "UTF8", "--locale=C"],
                       cwd=folder, check=True, capture_output=True, timeout=120, **as_postgres)
        with open(folder / "server.log", "ab") as log:
            proc = subprocess.Popen([str(pg / "postgres"), "-D", str(folder / "data"), "-p", str(port), "-k",
                                     str(folder), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
                                    cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    **as_postgres)
        ready = [str(pg / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "-d", "postgres"]
        wait_until(lambda: subprocess.run(ready, capture_output=True, env=env).returncode == 0, START_TIMEOUT,
                   "PostgreSQL answering", interval=0.5, alive=lambda: proc.poll() is None)
        subprocess.run([str(pg / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow"],
                       env=env, check=True, capture_output=True, timeout=60)
        return proc
    except (AssertionError, subprocess.CalledProcessError) as e:
        if proc is not None:
            stop_process_group(proc, signal.SIGINT)
        log = (folder / "server.log").read_text()[-2000:] if (folder / "server.log").exists() else ""
        raise AssertionError(f"PostgreSQL: {e} {getattr(e, 'stderr', '')!r} {log}") from None


@contextlib.contextmanager
def _postgres() -> Iterator[tuple[str, str]]:
    """A throwaway PostgreSQL server on 127.0.0.1 and a free port; yields the URL of its database
    ``mlflow`` (no password in it) and the password of its user ``mlflow``."""
    folder = Path(tempfile.mkdtemp(prefix="ddpm-pg-"))  # not under pytest's tmp: the postgres user reads it
    password = secrets.token_hex(16)
    (folder / "pwfile").write_text(password)
    port = free_port()
    try:
        proc = _start_postgres(_postgres_bin(), folder, port, password)
        try:
            yield f"postgresql+psycopg://mlflow@127.0.0.1:{port}/mlflow", password
        finally:
            stop_process_group(proc, signal.SIGINT)  # "fast" shutdown: SIGTERM waits for clients to leave
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _moto_s3(folder: Path) -> Iterator[str]:
    """moto's S3 server as a process of its own on 127.0.0.1, with the bucket; yields its URL."""
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with open(folder / "moto.log", "ab") as log:
        proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, env=_clean_env())
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")

    def bucket() -> bool:
        try:
            s3.create_bucket(Bucket=BUCKET)
        except Exception:
            return False
        return True

    try:
        wait_until(bucket, START_TIMEOUT, "moto's S3 server", interval=0.5, alive=lambda: proc.poll() is None)
        yield endpoint
    finally:
        stop_process_group(proc)


def _ray_node(folder: Path, temp: str, env: dict[str, str], *args: str) -> subprocess.Popen:
    """``ray start --block ARGS`` in its own process group (stopping the group stops this node's
    processes and no other's), working in ``folder``, its session files under ``temp``; every port of
    a node that has a fixed default (the dashboard agent's 52365, ...) is a free one, since all nodes
    share the loopback address."""
    ports = {name: free_port() for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                             "metrics-export-port", "runtime-env-agent-port")}
    cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
           f"--temp-dir={temp}", "--object-store-memory=100000000", *args,
           *(f"--{name}={port}" for name, port in ports.items())]
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "ray-start.log", "ab") as log:
        return subprocess.Popen(cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _get(url: str, token: str | None = None) -> tuple[int, str]:
    """``(status, body)`` of a GET, with the token as a bearer token when given."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _alive_nodes(api: str, token: str) -> int:
    try:
        status, body = _get(f"{api}/api/v0/nodes?limit=10", token)
    except OSError:
        return 0
    if status != 200:
        return 0
    nodes = json.loads(body)["data"]["result"]["result"]
    return sum(n["state"] == "ALIVE" for n in nodes)


def _start_node(stop: contextlib.ExitStack, api: str, token: str, nodes: int,
                start: Callable[[], subprocess.Popen]) -> None:
    """``start()`` a node (stopped with ``stop``) until the cluster has ``nodes`` alive ones. ``ray
    start`` gives its raylet 30 s to register (fixed in ray/_private/node.py), which a loaded 2-core
    machine may miss; it then exits, and is started again (3 tries)."""
    for attempt in range(3):
        proc = start()
        stop.callback(stop_process_group, proc)
        try:
            wait_until(lambda: _alive_nodes(api, token) == nodes, START_TIMEOUT, f"{nodes} alive Ray node(s)",
                       interval=1, alive=lambda: proc.poll() is None)
            return
        except AssertionError:
            if proc.poll() is None or attempt == 2:
                raise


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("scaled-out")
    token = secrets.token_hex(32)
    s3_env = {**S3_CREDENTIALS}
    with contextlib.ExitStack() as stop:
        database, password = stop.enter_context(_postgres())
        endpoint = stop.enter_context(_moto_s3(root))
        s3_env["AWS_ENDPOINT_URL"] = endpoint
        mlflow_root = root / "mlflow"
        mlflow_root.mkdir()
        server, tracking_uri = start_mlflow_server(
            mlflow_root, backend_store_uri=database, artifacts_destination=f"s3://{BUCKET}/mlartifacts",
            # The password reaches libpq through PGPASSWORD (as in the compose stack): in no URL.
            env={**_clean_env(), **s3_env, "MLFLOW_S3_ENDPOINT_URL": endpoint, "PGPASSWORD": password})
        stop.callback(stop_process_group, server)

        temp = tempfile.mkdtemp(prefix="rt-")  # short: Ray's socket paths live under it
        stop.callback(shutil.rmtree, temp, ignore_errors=True)
        homes = {name: root / name / "ddpm-home" for name in ("head", "worker1", "worker2")}
        node_env = {**_clean_env(), **s3_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
                    "MLFLOW_TRACKING_URI": tracking_uri, "OMP_NUM_THREADS": "1"}
        gcs, dash = free_port(), free_port()
        api = f"http://127.0.0.1:{dash}"
        _start_node(stop, api, token, 1, lambda: _ray_node(
            root / "head", f"{temp}/head", {**node_env, "DDPM_HOME": str(homes["head"])}, "--head", f"--port={gcs}",
            "--num-cpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            f"--ray-client-server-port={free_port()}"))
        for n, name in enumerate(("worker1", "worker2"), start=2):  # one at a time: each within its 30 s
            _start_node(stop, api, token, n, lambda name=name: _ray_node(
                root / name, f"{temp}/{name}", {**node_env, "DDPM_HOME": str(homes[name])},
                f"--address=127.0.0.1:{gcs}", "--num-cpus=2"))
        yield Stack(token=token, jobs_api=api, tracking_uri=tracking_uri, s3_endpoint=endpoint, homes=homes)


def _s3_keys(stack: Stack, prefix: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=stack.s3_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_workflow_submitted_to_a_token_authenticated_cluster_of_three_nodes_keeps_everything_on_s3(
        stack, tmp_path):
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    # Token authentication is on: the Jobs API refuses a request without the token, or with another.
    assert _get(f"{stack.jobs_api}/api/jobs/")[0] == 401
    assert _get(f"{stack.jobs_api}/api/jobs/", "not-the-token")[0] == 403

    # The submitter holds the token and nothing else of the cluster's (no S3 key, no tracking URI).
    spec = tmp_path / "workflow.yaml"
    spec.write_text(WORKFLOW)
    submitter = {**_clean_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": stack.token}
    sets = [x for s in OVERRIDES for x in ("--set", s)]
    submitted = subprocess.run([str(BIN / "ddpm-pipe"), "run", "--submit", "--address", stack.jobs_api, "--name",
                                "scaled", "--workflow", str(spec), "--storage", STORAGE, "--json", *sets],
                               cwd=tmp_path, env=submitter, capture_output=True, text=True, timeout=300)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job_id = json.loads(submitted.stdout)["job_id"]

    client = JobSubmissionClient(stack.jobs_api, headers={"Authorization": f"Bearer {stack.token}"})
    assert not (client.get_job_info(job_id).runtime_env or {}).get("env_vars")  # no --env: nothing travels
    done = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)
    wait_until(lambda: client.get_job_status(job_id) in done, 1200, "the end of the submitted workflow", interval=5)
    logs = client.get_job_logs(job_id)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-5000:]
    assert "workflow 'scaled': ran prepare, train, evaluate, promote, sample" in logs, logs[-3000:]

    # The registered model: version 1, promoted, its files in the artifact store on S3.
    c = MlflowClient(tracking_uri=stack.tracking_uri, registry_uri=stack.tracking_uri)
    champion = c.get_model_version_by_alias(MODEL, "champion")
    assert champion.version == "1" and champion.tags.get("ddpm.artifacts.sha256"), champion.tags
    artifacts = _s3_keys(stack, "mlartifacts/")
    assert any(k.endswith("/model.safetensors") for k in artifacts), artifacts

    # The MLflow runs: the workflow's, finished, with a finished nested run for every step.
    (experiment,) = [e for e in c.search_experiments() if e.name == "digits"]
    (parent,) = c.search_runs([experiment.experiment_id], filter_string="tags.`ddpm.kind` = 'workflow'")
    assert parent.info.status == "FINISHED"
    children = c.search_runs([experiment.experiment_id],
                             filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    kinds = {r.data.tags.get("ddpm.kind"): r for r in children}
    assert {"train", "evaluate", "workflow.prepare", "workflow.promote", "workflow.sample"} <= set(kinds), kinds
    assert all(r.info.status == "FINISHED" for r in children)
    assert kinds["train"].data.metrics.get("training/loss") is not None
    assert "kid" in kinds["evaluate"].data.metrics

    # Data, checkpoints and samples on S3, under the storage given.
    prefix = STORAGE[len(f"s3://{BUCKET}/"):]
    assert f"{prefix}/data/digits/train/manifest.json" in _s3_keys(stack, f"{prefix}/data/")
    assert any(k.endswith("checkpoint.pt") for k in _s3_keys(stack, f"{prefix}/scaled-train/"))
    samples = _s3_keys(stack, f"{prefix}/samples/")
    assert len([k for k in samples if k.startswith(f"{prefix}/samples/scaled-v1/") and k.endswith(".png")]) == 8
    assert f"{prefix}/samples/scaled-grid.png" in samples

    # Nothing the other nodes need stayed on the head's disk; each worker node used its own
    # DDPM_HOME (the sampling workers' copies of the model), never the head's.
    assert not (stack.homes["head"] / "data").exists() and not (stack.homes["head"] / "samples").exists()
    for worker in ("worker1", "worker2"):
        assert (stack.homes[worker] / "cache" / "models").is_dir(), worker
