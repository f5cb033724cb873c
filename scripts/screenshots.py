#!/usr/bin/env python
"""Screenshots of MLflow's UI over a tracking store, taken by headless Chromium (Debian's ``chromium``).

    .venv/bin/python scripts/screenshots.py --out docs/img          # the demo's store under DDPM_HOME

Starts ``mlflow server`` on 127.0.0.1 and a free port over the store (an ``http(s)`` tracking URI
is a server already and is used as it is), waits for it, opens these pages and saves them as PNGs:

    mlflow-run.png                the training run: metrics, params, dataset, source, registered model
    mlflow-run-charts.png         the run's model-metrics tab: the loss and bits/dim curves, the sample grid
    mlflow-model-version.png      the registered model version: description, schema, tags
    mlflow-experiment-charts.png  the experiment's chart view, its runs compared

then stops the server. The run is the one that made the newest registered model version, else the
newest training run (``--run`` and ``--model NAME --version V`` choose). ``--dom`` also writes each
page's DOM after rendering (``<name>.html``), which tests read. Exit 2: no store, no run, or no
``chromium``; exit 1: the server or the browser failed (its log's tail is printed).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

START_TIMEOUT = 240.0  # seconds for `mlflow server` to answer /health (140 s seen on a loaded 2-core machine)
WINDOW = (1600, 1000)  # pixels
RENDER_MS = 60_000  # Chromium's virtual time budget per page (it stands still while requests are in flight)
BROWSER_TIMEOUT = 240.0  # seconds of real time per page
# What a page's DOM holds once its lazy parts have rendered. Under load chromium can end a page's
# virtual-time budget before the charts page fetches the run's sample grid: such a page is rendered
# again (at most RENDER_ATTEMPTS times) before its screenshot is taken.
READY = {"mlflow-run-charts": r"<img[^>]+src=\"[^\"]*images(%2F|/)"}
RENDER_ATTEMPTS = 3
UI_HOST = "mlflow-ui"  # the name Chromium uses for 127.0.0.1: on a loopback name the UI opens its LLM assistant panel


class ScreenshotError(Exception):
    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextmanager
def server(tracking_uri: str, registry_uri: str) -> Iterator[tuple[str, str]]:
    """``(API URL, browser URL)``: ``tracking_uri`` if it is a server, else a local ``mlflow server`` over it.

    The local server answers the browser as ``http://mlflow-ui:<port>`` (allowed host and CORS origin)
    and runs no background jobs (its job runner starts minutes late on a loaded machine and
    stalls the first pages).
    """
    if tracking_uri.startswith(("http://", "https://")):
        yield tracking_uri.rstrip("/"), tracking_uri.rstrip("/")
        return
    port = free_port()
    url, ui = f"http://127.0.0.1:{port}", f"http://{UI_HOST}:{port}"
    with tempfile.TemporaryDirectory(prefix="mlflow-ui-") as cwd:  # its default ./mlartifacts lands here
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--backend-store-uri", tracking_uri, "--registry-store-uri", registry_uri,
               "--allowed-hosts", f"{UI_HOST}:{port},127.0.0.1:{port},localhost:{port}",
               "--cors-allowed-origins", ui]
        log_path = Path(cwd) / "server.log"
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                    start_new_session=True)  # its own process group: its workers stop with it
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not healthy(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    why = f"exited with {proc.returncode}" if proc.poll() is not None else \
                        f"not healthy after {START_TIMEOUT:.0f} s"
                    raise ScreenshotError(f"mlflow server over {tracking_uri} {why}:\n{log_path.read_text()[-2000:]}")
                time.sleep(0.5)
            yield url, ui
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)


def pick(url: str, run_id: str | None, model: str | None, version: str | None) -> dict[str, str | None]:
    """The run, its experiment and the model version to show (asked of the server at ``url``)."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=url, registry_uri=url)
    mv = None
    if model:
        mv = c.get_model_version(model, version) if version else \
            max(c.search_model_versions(f"name = '{model}'"), key=lambda v: int(v.version), default=None)
    elif not run_id:
        found = c.search_model_versions(order_by=["creation_timestamp DESC"], max_results=1)
        mv = found[0] if found else None
    if run_id is None and mv is not None:
        run_id = mv.run_id
    if run_id is None:
        experiments = [e.experiment_id for e in c.search_experiments()]
        runs = c.search_runs(experiments, "tags.`ddpm.kind` = 'train'", order_by=["attributes.start_time DESC"],
                             max_results=1) if experiments else []
        if not runs:
            raise ScreenshotError(f"no training run and no registered model in the store at {url} "
                                  "(run `make demo` or `ddpm-pipe train` first)", 2)
        run_id = runs[0].info.run_id
    run = c.get_run(run_id)
    return {"experiment": run.info.experiment_id, "run": run_id,
            "model": mv.name if mv is not None else None, "version": str(mv.version) if mv is not None else None}


def pages(ids: dict[str, str | None]) -> dict[str, str]:
    """File stem -> the UI's hash route (MLflow 3's routes), in the UI's "Model training" mode."""
    exp, run, mode = ids["experiment"], ids["run"], "workflowType=machine_learning"
    out = {"mlflow-run": f"#/experiments/{exp}/runs/{run}?{mode}",
           "mlflow-run-charts": f"#/experiments/{exp}/runs/{run}/model-metrics?{mode}"}
    if ids["model"]:
        out["mlflow-model-version"] = f"#/models/{ids['model']}/versions/{ids['version']}?{mode}"
    out["mlflow-experiment-charts"] = f"#/experiments/{exp}/runs?compareRunsMode=CHART&{mode}"
    return out


def chromium() -> str:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise ScreenshotError("chromium not found: apt-get install -y chromium (or set CHROMIUM to its path)", 2)
    return found


def browse(browser: str, url: str, *, screenshot: Path | None = None, dom: bool = False) -> str:
    """Render ``url`` headless; save a screenshot and/or return the DOM after rendering."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--hide-scrollbars", "--no-first-run", f"--user-data-dir={profile}",
               f"--host-resolver-rules=MAP {UI_HOST} 127.0.0.1",
               "--run-all-compositor-stages-before-draw",  # else lazy charts stay spinners in the screenshot
               f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--virtual-time-budget={RENDER_MS}"]
        cmd += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
        try:
            done = subprocess.run([*cmd, url], capture_output=True, timeout=BROWSER_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise ScreenshotError(f"chromium did not finish {url} in {BROWSER_TIMEOUT:.0f} s") from None
    if done.returncode != 0 or (screenshot and not screenshot.exists()):
        raise ScreenshotError(f"chromium failed on {url} (exit {done.returncode}):\n"
                              f"{done.stderr.decode(errors='replace')[-2000:]}")
    return done.stdout.decode(errors="replace")


def rendered(browser: str, url: str, ready: str | None = None) -> str:
    """The page's DOM, rendered again while it lacks ``ready`` (a regex; at most RENDER_ATTEMPTS tries)."""
    for attempt in range(1, RENDER_ATTEMPTS + 1):
        html = browse(browser, url, dom=True)
        if ready is None or re.search(ready, html):
            return html
        print(f"{url}: not fully rendered (try {attempt} of {RENDER_ATTEMPTS})", file=sys.stderr, flush=True)
    return html


def take(tracking_uri: str, registry_uri: str, out: Path, *, run_id: str | None = None, model: str | None = None,
         version: str | None = None, dom: bool = False) -> dict[str, str]:
    """Start the UI, save each page's screenshot (and DOM) under ``out``; return stem -> URL."""
    browser = chromium()
    out.mkdir(parents=True, exist_ok=True)
    with server(tracking_uri, registry_uri) as (url, ui):
        ids = pick(url, run_id, model, version)
        urls = {stem: f"{ui}/{route}" for stem, route in pages(ids).items()}
        for stem, page in urls.items():
            html = rendered(browser, page, READY.get(stem)) if stem in READY or dom else None
            browse(browser, page, screenshot=out / f"{stem}.png")
            if dom:
                (out / f"{stem}.html").write_text(html)
            print(f"{out / stem}.png  <- {page}", flush=True)
    return urls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/img", help="folder for the PNGs (default: docs/img)")
    parser.add_argument("--tracking-uri", help="the store (default: MLFLOW_TRACKING_URI, else DDPM_HOME's mlflow.db)")
    parser.add_argument("--registry-uri", help="the model registry (default: the tracking store)")
    parser.add_argument("--run", help="the run to show (default: the newest model version's, else the newest train run)")
    parser.add_argument("--model", help="the registered model to show (default: the newest version's)")
    parser.add_argument("--version", help="its version (default: its newest)")
    parser.add_argument("--dom", action="store_true", help="also write each page's rendered DOM as <name>.html")
    args = parser.parse_args(argv)
    tracking_uri, registry_uri = args.tracking_uri, args.registry_uri
    if tracking_uri is None:
        from pipelines.settings import resolve

        settings = resolve()
        tracking_uri, registry_uri = settings.tracking_uri, registry_uri or settings.registry_uri
        if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).exists():
            print(f"error: no MLflow store at {tracking_uri} (DDPM_HOME={settings.home}); run `make demo` first",
                  file=sys.stderr)
            return 2
    try:
        take(tracking_uri, registry_uri or tracking_uri, Path(args.out), run_id=args.run, model=args.model,
             version=args.version, dom=args.dom)
    except ScreenshotError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
