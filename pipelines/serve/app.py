"""The HTTP routes of ``ddpm-pipe serve`` as a FastAPI app (Ray Serve mounts it as the deployment's
ingress, ``pipelines/serve/deployment.py``; a test can run it under plain uvicorn).

- ``POST /v1/samples``: a JSON body (:mod:`pipelines.serve.api`) -> ``{"images": [base64 PNG, ...],
  "model", "version", "sampler", "steps", "eta", "labels"}``;
- ``GET /v1/samples.png?num=16&seed=0``: the same fields as query parameters -> one PNG grid;
- ``GET /v1/model``: the model, the version answering now, its sampling defaults, the service limits;
- ``GET /healthz`` (the process answers) and ``GET /readyz`` (a model is loaded), never behind the token.

Every response carries ``X-Model-Version``: for samples, the version that sampled them. A bad request
is a 4xx whose JSON body names the field (``{"error", "field"}``). With a token
(``--token-env``), every route but the health checks asks for ``Authorization: Bearer TOKEN`` (401
otherwise); the app holds only the token's sha256, compared in constant time.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from pipelines.serve.api import ApiError, SamplesRequest, encode_images, grid_png, parse_samples, query_body
from pipelines.serve.model import ModelHolder, ServedModel

VERSION_HEADER = "X-Model-Version"
OPEN_ROUTES = ("/healthz", "/readyz")  # never behind the token: what a load balancer probes
Submit = Callable[[SamplesRequest], Awaitable[tuple[np.ndarray, ServedModel]]]


def token_digest(token: str) -> str:
    """The sha256 (hex) of a bearer token: what the app keeps and compares, never the token."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class RequestStats:
    """What one replica has answered: requests by route and status, sample latencies, images."""

    counts: dict[str, int] = field(default_factory=dict)  # "POST /v1/samples 200" -> n
    latencies: list[float] = field(default_factory=list)  # seconds, sampling requests answered 200
    images: int = 0
    batches: list[tuple[int, int, float]] = field(default_factory=list)  # (requests, images, sampling seconds)
    started: float = field(default_factory=time.time)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, route: str, status: int, seconds: float, images: int = 0) -> None:
        with self._lock:
            key = f"{route} {status}"
            self.counts[key] = self.counts.get(key, 0) + 1
            if images and status == 200:
                self.latencies.append(seconds)
                self.images += images

    def add_batch(self, requests: int, images: int, seconds: float) -> None:
        """One network batch: how many requests the batcher merged, their images, its sampling time."""
        with self._lock:
            self.batches.append((requests, images, seconds))

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"counts": dict(self.counts), "latencies": list(self.latencies), "images": self.images,
                    "batches": list(self.batches), "started": self.started, "now": time.time()}


def summarise(snapshots: list[dict[str, Any]]) -> dict[str, float]:
    """Replicas' :meth:`RequestStats.snapshot` merged: request counts (all, 2xx, 4xx, 5xx), latency
    percentiles (ms) of the sampling requests, images/s over the service's life, and the batches:
    their number, mean requests and images per batch, the share of the life spent sampling
    (summed over replicas: up to their number) and the median sampling time of one-image batches."""
    counts: dict[str, int] = {}
    latencies: list[float] = []
    images = 0
    batches: list[tuple[int, int, float]] = []
    for snap in snapshots:
        for key, n in snap["counts"].items():
            counts[key] = counts.get(key, 0) + n
        latencies += snap["latencies"]
        images += snap["images"]
        batches += [tuple(b) for b in snap.get("batches", [])]
    span = max((s["now"] for s in snapshots), default=0) - min((s["started"] for s in snapshots), default=0)
    by_class = {c: sum(n for k, n in counts.items() if k.rsplit(" ", 1)[1].startswith(c)) for c in "245"}
    out = {"requests": float(sum(counts.values())), "requests_2xx": float(by_class["2"]),
           "requests_4xx": float(by_class["4"]), "requests_5xx": float(by_class["5"]), "images": float(images),
           "images_per_s": images / span if span > 0 else 0.0}
    if batches:
        out.update(batches=float(len(batches)), mean_batch_requests=float(np.mean([b[0] for b in batches])),
                   mean_batch_images=float(np.mean([b[1] for b in batches])),
                   sampling_share=sum(b[2] for b in batches) / span if span > 0 else 0.0)
        ones = [b[2] for b in batches if b[1] == 1]
        if ones:  # the replica's own time for a lone image: a request's latency less this is the path to it
            out["one_image_sampling_p50_ms"] = float(np.percentile(ones, 50) * 1000)
    if latencies:
        for q in (50, 95, 99):
            out[f"latency_p{q}_ms"] = float(np.percentile(latencies, q) * 1000)
    return out


def _version(model: ServedModel) -> str:
    return str(model.version) if model.version is not None else "unversioned"


def build_app(holder: ModelHolder, submit: Submit, max_num: int, token_sha256: str | None = None,
              stats: RequestStats | None = None, limits: dict[str, Any] | None = None) -> FastAPI:
    """The routes (module docstring) over ``holder``'s model. ``submit(request)`` samples one checked
    request and returns ``(x_0 [n x C x H x W], the model that sampled it)``: the deployment's
    batcher (``pipelines/serve/deployment.py``), or :func:`direct_submit`."""
    app = FastAPI(title="ddpm-pipe serve", docs_url=None, redoc_url=None, openapi_url=None)
    stats = stats if stats is not None else RequestStats()

    def error(e: ApiError, **headers: str) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=headers or None)

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable) -> Response:
        start = time.perf_counter()
        path = request.url.path
        if token_sha256 is not None and path not in OPEN_ROUTES:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token_digest(given.strip()), token_sha256):
                response: Response = error(ApiError(401, "this service needs Authorization: Bearer <token>",
                                                    "authorization"), **{"WWW-Authenticate": "Bearer"})
                response.headers[VERSION_HEADER] = _version(holder.current)
                stats.add(f"{request.method} {path}", 401, time.perf_counter() - start)
                return response
        try:
            response = await call_next(request)
        except Exception as e:  # one JSON line, not a traceback page
            response = JSONResponse({"error": f"internal error: {type(e).__name__}: {e}", "field": None},
                                    status_code=500)
        response.headers.setdefault(VERSION_HEADER, _version(holder.current))
        images = int(response.headers.get("x-images", "0"))
        stats.add(f"{request.method} {path}", response.status_code, time.perf_counter() - start, images)
        return response

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        model = getattr(holder, "current", None)
        if model is None:
            return JSONResponse({"ready": False}, status_code=503)
        return JSONResponse({"ready": True, "version": model.version, "pinned": model.pinned})

    @app.get("/v1/model")
    async def model_info() -> dict[str, Any]:
        return {**holder.current.describe(), "max_num": max_num, **(limits or {})}

    async def sample(body: Any) -> tuple[SamplesRequest, np.ndarray, ServedModel]:
        model = holder.current
        req = parse_samples(body, model.config, model.num_timesteps, max_num)
        x, used = await submit(req)
        return req, x, used

    @app.post("/v1/samples")
    async def post_samples(request: Request) -> Response:
        try:
            body = json.loads(await request.body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error(ApiError(400, f"the request body is not valid JSON: {e}"))
        try:
            req, x, model = await sample(body)
        except ApiError as e:
            return error(e)
        result = {"images": encode_images(x, model.levels), "model": model.name or model.uri,
                  "version": model.version, "pinned": model.pinned, "sampler": req.sampler, "steps": req.steps,
                  "eta": req.eta, "labels": list(req.labels) if req.labels is not None else None}
        return JSONResponse(result, headers={VERSION_HEADER: _version(model), "X-Images": str(req.num)})

    @app.get("/v1/samples.png")
    async def get_grid(request: Request) -> Response:
        params = dict(request.query_params)
        try:
            req, x, model = await sample(query_body({"num": "16", **params}))
        except ApiError as e:
            return error(e)
        return Response(grid_png(x, model.levels), media_type="image/png",
                        headers={VERSION_HEADER: _version(model), "X-Images": str(req.num)})

    app.state.stats = stats
    return app


def direct_submit(holder: ModelHolder) -> Submit:
    """``submit`` without batching: each request sampled alone in a worker thread (the event loop stays free)."""

    async def submit(req: SamplesRequest) -> tuple[np.ndarray, ServedModel]:
        model = holder.current
        x = await asyncio.to_thread(model.sample, [req])
        return x[0], model

    return submit


__all__ = ["OPEN_ROUTES", "VERSION_HEADER", "RequestStats", "build_app", "direct_submit", "summarise", "token_digest"]
