"""`ddpm-pipe serve` (issue 27): the request checks, the routes under plain uvicorn (no Ray), the alias
switch of the model holder, and on the shared Ray cluster the Serve deployment itself: the same
images as `sample`, the token, an alias moved under steady load, Ctrl-C."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path

import pytest

from pipelines.serve.api import ApiError, parse_samples
from pipelines.serve.app import VERSION_HEADER, build_app, direct_submit, token_digest
from pipelines.serve.model import ModelHolder, ServedModel, follows
from tests.support import (TINY_NET, free_port, mlflow_client, register_tiny, run_cli, save_tiny_checkpoint,
                           wait_until)

SETTING = {"sampler": "ddim", "steps": 4}  # the cheapest setting; `sample --sampler ddim --steps 4`
TOKEN = "s3cret-token-for-tests"


def http(url: str, body: object = None, token: str | None = None, raw: bytes | None = None,
         timeout: float = 120) -> tuple[int, Message, bytes]:
    """``(status, headers, body)`` of a GET (no body) or a POST of ``body`` as JSON (or ``raw`` bytes)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def sample_pngs(model: str, tmp_path: Path, num: int) -> list[bytes]:
    """The PNG files of ``ddpm-pipe sample --num NUM --seed 0`` with :data:`SETTING`, index order."""
    out = tmp_path / "sampled"
    result = run_cli("sample", "--model", model, "--num", str(num), "--seed", "0", "--sampler", SETTING["sampler"],
                     "--steps", str(SETTING["steps"]), "--out", str(out), "--json")
    assert result.exit_code == 0, result.stderr
    return [(out / f"{i:08d}.png").read_bytes() for i in range(num)]


# -- the request ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> ServedModel:
    ckpt = save_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "ckpt.pt", overrides=TINY_NET)
    return ServedModel.load(str(ckpt))


@pytest.mark.parametrize("body, field", [
    ({"num": 257}, "num"), ({"num": 0}, "num"), ({"num": "8"}, "num"), ({"num": True}, "num"),
    ({"sampler": "euler"}, "sampler"), ({"steps": 51}, "steps"), ({"steps": 0}, "steps"),
    ({"eta": -0.5}, "eta"), ({"sampler": "dpmpp", "eta": 1.0}, "eta"), ({"eta": "nan"}, "eta"),
    ({"seed": -1}, "seed"), ({"seed": 0, "seeds": [1]}, "seeds"), ({"seeds": []}, "seeds"),
    ({"seeds": [1, 2], "num": 3}, "num"), ({"class_labels": [0]}, "class_labels"), ({"guidance": 2.0}, "guidance"),
    ({"model": "models:/other/1"}, "model"), ({"out": "/etc/passwd"}, "out"), ([1, 2], None),
])
def test_every_bad_field_is_refused_by_name(tiny_model, body, field):
    with pytest.raises(ApiError) as e:
        parse_samples(body, tiny_model.config, tiny_model.num_timesteps, max_num=256)
    assert (e.value.status, e.value.field) == (400, field), e.value.message


def test_a_request_settles_to_the_models_defaults_and_sample_seeds(tiny_model):
    req = parse_samples({"num": 3, "seed": 2}, tiny_model.config, tiny_model.num_timesteps)
    assert (req.sampler, req.steps, req.eta) == ("dpmpp-2m-sde", 20, 0.0)  # the preset's own (config sample section)
    assert req.seeds == (2 * 1_000_003, 2 * 1_000_003 + 1, 2 * 1_000_003 + 2)
    assert parse_samples({"seeds": [2, 5]}, tiny_model.config, 50).seeds == (2 * 1_000_003, 5 * 1_000_003)


# -- the routes, under plain uvicorn ---------------------------------------------------------------------
@pytest.fixture
def plain_server(tmp_path):
    """The app over a tiny checkpoint, with a token, served by uvicorn in a thread: ``(url, ckpt)``."""
    import uvicorn

    ckpt = save_tiny_checkpoint(tmp_path / "ckpt.pt", overrides=TINY_NET)
    holder = ModelHolder(str(ckpt))
    app = build_app(holder, direct_submit(holder), max_num=16, token_sha256=token_digest(TOKEN))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: server.started, 30, "uvicorn started")
    yield url, str(ckpt)
    server.should_exit = True
    thread.join(10)


@pytest.mark.timeout(120)
def test_routes_answer_as_sample_writes_and_refuse_bad_requests(plain_server, tmp_path):
    url, ckpt = plain_server
    status, headers, body = http(f"{url}/v1/samples", {"num": 4, "seed": 0, **SETTING}, token=TOKEN)
    assert status == 200, body
    got = json.loads(body)
    assert [base64.b64decode(s) for s in got["images"]] == sample_pngs(ckpt, tmp_path, 4)
    assert headers[VERSION_HEADER] == "unversioned" and (got["sampler"], got["steps"]) == ("ddim", 4)
    for bad, field in (({"num": 17}, "num"), ({"sampler": "nope"}, "sampler"), ({"steps": 51}, "steps"),
                       ({"eta": -1}, "eta"), ({"model": "x"}, "model")):
        status, headers, body = http(f"{url}/v1/samples", bad, token=TOKEN)
        assert (status, json.loads(body)["field"]) == (400, field), body
        assert headers.get(VERSION_HEADER)
    status, _, body = http(f"{url}/v1/samples", raw=b"{not json", token=TOKEN)
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]
    status, headers, png = http(f"{url}/v1/samples.png?num=4&seed=0&sampler=ddim&steps=4", token=TOKEN)
    assert status == 200 and headers["content-type"] == "image/png" and png[:4] == b"\x89PNG"
    status, _, body = http(f"{url}/v1/samples.png?num=4&steps=x", token=TOKEN)
    assert (status, json.loads(body)["field"]) == (400, "steps")
    status, _, body = http(f"{url}/v1/model", token=TOKEN)
    info = json.loads(body)
    assert status == 200 and info["T"] == 50 and info["max_num"] == 16 and info["defaults"]["sampler"] == "dpmpp-2m-sde"
    # the token: every route but the health checks, compared to its digest
    for path in ("/v1/model", "/v1/samples.png?num=1"):
        for token in (None, "wrong"):
            status, headers, body = http(f"{url}{path}", token=token)
            assert status == 401 and json.loads(body)["field"] == "authorization" and "Bearer" in headers["www-authenticate"]
    assert http(f"{url}/v1/samples", {"num": 1})[0] == 401
    assert http(f"{url}/healthz")[0] == 200 and http(f"{url}/readyz")[0] == 200


# -- the alias switch ------------------------------------------------------------------------------------
def test_the_summary_counts_batches_and_the_time_spent_sampling():
    from pipelines.serve.app import RequestStats, summarise

    a, b = RequestStats(started=100.0), RequestStats(started=100.0)
    a.add("POST /v1/samples", 200, 0.5, images=5)
    a.add_batch(3, 5, 0.4)
    a.add_batch(1, 1, 0.2)
    b.add_batch(2, 3, 0.4)
    snaps = [{**x.snapshot(), "now": 110.0} for x in (a, b)]
    got = summarise(snaps)
    assert got["batches"] == 3 and got["mean_batch_requests"] == 2.0 and got["mean_batch_images"] == 3.0
    assert got["sampling_share"] == pytest.approx(1.0 / 10.0)  # 1 s of sampling in a 10 s life
    assert got["one_image_sampling_p50_ms"] == pytest.approx(200.0)  # the one batch of one image
    assert "batches" not in summarise([RequestStats().snapshot()])


def test_the_holder_follows_the_alias_and_keeps_serving_through_a_failed_load():
    points = {"to": "models:/m/1"}
    loads: list[str] = []

    def loader(uri: str, pinned: str | None) -> ServedModel:
        loads.append(pinned)
        if pinned == "models:/m/3":
            raise RuntimeError("corrupt")
        return ServedModel(uri=uri, pinned=pinned, config=None, net=None, diffusion=None, name="m",
                           version=pinned.rsplit("/", 1)[1], run_id=None, loaded_at=0.0)

    def resolve(uri: str) -> str:
        if points["to"] is None:
            raise ConnectionError("store down")
        return points["to"]

    holder = ModelHolder("models:/m@champion", loader=loader, resolve=resolve, log=lambda m: None)
    assert follows(holder.uri) and not follows("models:/m/1") and holder.current.version == "1"
    assert not holder.poll()
    points["to"] = "models:/m/2"
    assert holder.poll() and holder.current.version == "2"
    points["to"] = None
    assert not holder.poll() and holder.current.version == "2"
    points["to"] = "models:/m/3"
    assert not holder.poll() and holder.current.version == "2"
    assert loads == ["models:/m/1", "models:/m/2", "models:/m/3"]
    assert [v for _, v in holder.switches] == ["1", "2"]


# -- on Ray Serve ----------------------------------------------------------------------------------------
def _app_gone() -> bool:
    from ray import serve

    from pipelines.serve.deployment import APP_NAME

    try:
        return APP_NAME not in serve.status().applications
    except Exception:  # Serve itself is gone
        return True


@pytest.fixture
def registered(tmp_path):
    """Two versions of ``tiny``, the alias ``champion`` on version 1: ``(client, alias URI)``."""
    register_tiny(tmp_path, "tiny", seed=0, overrides=TINY_NET)
    register_tiny(tmp_path, "tiny", seed=1, overrides=TINY_NET)
    client = mlflow_client()
    client.set_registered_model_alias("tiny", "champion", "1")
    return client, "models:/tiny@champion"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_serve_answers_as_sample_refuses_without_the_token_and_stops_clean(ray_cluster, registered, tmp_path):
    from pipelines.serve.command import start_service
    from pipelines.serve.deployment import ServeOptions

    _client, alias = registered
    options = ServeOptions(model=alias, token_sha256=token_digest(TOKEN), reload_every=0)
    service = start_service(options, port=free_port())
    try:
        status, headers, body = http(f"{service.url}/v1/samples", {"num": 8, "seed": 0, **SETTING}, token=TOKEN)
        assert status == 200, body
        got = json.loads(body)
        assert (got["model"], got["version"], headers[VERSION_HEADER]) == ("tiny", "1", "1")
        assert [base64.b64decode(s) for s in got["images"]] == sample_pngs(alias, tmp_path, 8)
        assert http(f"{service.url}/v1/samples", {"num": 1, **SETTING})[0] == 401
        status, _, body = http(f"{service.url}/v1/samples", {"num": 1, "steps": 999}, token=TOKEN)
        assert (status, json.loads(body)["field"]) == (400, "steps")
        info = json.loads(http(f"{service.url}/v1/model", token=TOKEN)[2])
        assert (info["name"], info["version"], info["alias"]) == ("tiny", "1", "champion")
    finally:
        summary = service.stop()
    assert _app_gone()
    assert summary["requests_2xx"] >= 2 and summary["requests_4xx"] >= 2 and summary["images"] == 8
    assert summary["batches"] >= 1 and summary["mean_batch_images"] >= 1  # the replica counted its batches
    run = mlflow_client().get_run(service.run_id)
    assert run.info.status == "FINISHED" and run.data.params["model_version"] == "1"
    assert run.data.metrics["serve.images"] == 8 and "serve.latency_p50_ms" in run.data.metrics


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_moving_the_alias_under_steady_load_fails_no_request(ray_cluster, registered):
    from pipelines.serve.command import start_service
    from pipelines.serve.deployment import ServeOptions

    client, alias = registered
    service = start_service(ServeOptions(model=alias, reload_every=1.0), port=free_port(), track=False)
    answers: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def steady() -> None:
        while not stop.is_set():
            status, headers, _ = http(f"{service.url}/v1/samples", {"num": 2, "seed": 0, **SETTING})
            answers.append((status, headers.get(VERSION_HEADER)))
            time.sleep(0.2)

    sender = threading.Thread(target=steady, daemon=True)
    sender.start()
    try:
        wait_until(lambda: len(answers) >= 3, 60, "answers from version 1")
        client.set_registered_model_alias("tiny", "champion", "2")
        wait_until(lambda: any(v == "2" for _, v in answers), 120, "an answer from version 2")
        seen = len(answers)
        wait_until(lambda: len(answers) >= seen + 3, 60, "more answers after the switch")
    finally:
        stop.set()
        sender.join(60)
        service.stop()
    assert [s for s, _ in answers if s != 200] == [], answers
    versions = [v for _, v in answers]
    switch = versions.index("2")
    assert set(versions[:switch]) == {"1"} and set(versions[switch:]) == {"2"}, versions


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_deletes_the_application_and_exits_130_quietly(ray_cluster, tmp_path, stop):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt.pt", overrides=TINY_NET)
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("ddpm-pipe")), "serve", "--model", str(ckpt), "--port",
                             str(port), "--address", ray_cluster.address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: any("ready at" in line for line in lines), 240, "the command's ready line",
                   interval=1.0, alive=lambda: proc.poll() is None)
        assert _ready(url) and http(f"{url}/v1/samples", {"num": 1, **SETTING})[0] == 200
        proc.send_signal(stop)
        proc.wait(timeout=120)  # not communicate(): it would read stderr too, taking lines from the reader
        reader.join(10)
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = "".join(lines)
    assert proc.returncode == 130, err[-3000:]
    said = "Ctrl-C" if stop == signal.SIGINT else "SIGTERM"
    assert out == "" and re.search(rf"serve stopped \({said}\) after \d+ request\(s\), 1 image\(s\); application deleted",
                                    err), err[-4000:]
    # a healthy start and stop: our lines only, no Serve INFO lines, no Ray task warnings, no "error:"
    assert not re.search(r"^(INFO|WARNING|error:|\*\*\*)|\(raylet\)|graceful_shutdown", err, re.M), err[-4000:]
    assert _app_gone()
    wait_until(lambda: not _listening(port), 30, "the proxy's port closed")  # Serve's shutdown ends the proxy


def _ready(url: str) -> bool:
    try:
        return http(f"{url}/readyz", timeout=5)[0] == 200
    except OSError:  # not listening yet, or the proxy waits for the application
        return False


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_bad_options_fail_with_exit_2_before_anything_starts(tmp_path, monkeypatch):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt.pt", overrides=TINY_NET)
    monkeypatch.delenv("DDPM_TEST_NO_TOKEN", raising=False)
    result = run_cli("serve", "--model", str(ckpt), "--token-env", "DDPM_TEST_NO_TOKEN")
    assert result.exit_code == 2 and "DDPM_TEST_NO_TOKEN" in result.stderr
    result = run_cli("serve", "--model", str(tmp_path / "missing.pt"))
    assert result.exit_code == 2 and "does not exist" in result.stderr
    result = run_cli("serve", "--model", str(ckpt), "--min-replicas", "3", "--max-replicas", "2")
    assert result.exit_code == 2 and "--min-replicas 3" in result.stderr
    assert run_cli("serve", "--model", str(ckpt), "--reload-every", "soon").exit_code == 2


def test_cpus_per_replica_reaches_the_replicas_resources_and_torch_threads(tmp_path, monkeypatch):
    from pipelines.errors import UsageError
    from pipelines.serve import command

    ckpt = save_tiny_checkpoint(tmp_path / "ckpt.pt", overrides=TINY_NET)
    seen = []

    def start_service(options, *args, **kwargs):
        seen.append(options)
        raise UsageError("stopped here by the test")

    monkeypatch.setattr(command, "start_service", start_service)
    assert run_cli("serve", "--model", str(ckpt), "--replicas", "2", "--cpus-per-replica", "2").exit_code == 2
    actor = seen[0].deployment_options()["ray_actor_options"]
    assert actor["num_cpus"] == 2 and actor["runtime_env"]["env_vars"]["DDPM_TORCH_THREADS"] == "2"
    assert run_cli("serve", "--model", str(ckpt)).exit_code == 2
    assert seen[1].cpus_per_replica == 1.0  # Ray's own default for an actor
    assert run_cli("serve", "--model", str(ckpt), "--cpus-per-replica", "0").exit_code == 2
    assert len(seen) == 2  # refused by the CLI, before the command
