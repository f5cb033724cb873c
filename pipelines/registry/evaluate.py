"""`ddpm-pipe evaluate`: a model URI -> held-out bits/dim, sample quality and speed, logged to MLflow.

What is measured (every result keyed by what it depends on, see ``ddpm.metrics.result_key``):

- ``bpd``: the full variational bound (Ho et al. 2020, eq. 5; T model calls per batch) on the first
  :data:`BPD_IMAGES` (64) images of the held-out split, in manifest order, noise seeded with 0.
  Key: ``bpd/bound:full/data:<test manifest hash>/num:<images>``. With ``bound="estimate"`` (``--bound
  estimate``), the stratified unbiased estimate of that bound from :data:`BPD_CALLS` model calls
  (``ddpm.likelihood.bits_per_dim_estimate``, seed 0) with its standard error, ``bound:estimate-16``:
  T / 16 times cheaper, for a quick look at a model whose T calls take minutes.
- From ``num`` samples (sample i uses noise seed ``i``; one process, or the sample job with
  ``--nodes`` above 1), quantised to the data's grey levels, compared with the held-out test split
  (which neither the feature network nor the model trained on):
  digits (``ddpm.features.evaluate_samples``): ``fd``, ``kid``, ``precision``, ``recall`` (k=3),
  ``class_tv`` and ``classes_covered`` against the test split; ``classifier_score`` and
  ``confidence`` of the samples; ``copy_rate`` against the training split. Each with its standard
  error (``<metric>_se``) and ``<metric>_floor``: the same comparison for the same number of
  training images in place of the samples (copy rate: the test split's own);
  any other data with a training split, offline (``ddpm.data_features``): ``fd``, ``kid``,
  ``precision``, ``recall`` and ``copy_rate`` as above, in the feature space of a small network
  trained on that training split (to tell its images' quarter-turns apart, and their classes when the
  split has labels), trained once per split and cached, keyed ``features:data-cnn-v1-<task>``;
  RGB images: ``fid`` (Inception-v3) as well when ``DDPM_INCEPTION_WEIGHTS`` names the weights file;
  any data with a training split (``ddpm.pixel_scores``): ``pixel_fd`` (Frechet distance in the
  whitened PCA space of the training pixels) and ``fine_spread`` (the samples' variance along the
  finer components over the test split's; 1 is real spread), keyed ``features:pixel-pca-v1-<K>``.
  Keys: ``<metric>/data:<hash>/eta:<eta>/features:<net version>/num:<num>/sampler:<s>/steps:<n>/vs:test-<M>``
  (``vs`` names the set compared with; none for a score of the samples alone); floors:
  ``<metric>_floor/data:<hash>/features:<net version>/num:<n>/real:train/vs:test-<M>``.
- ``sec_per_sample``: wall-clock sampling time over ``num``.

A class-conditional model (``model.num_classes``): the samples above are its null class (its
unconditional scores) unless ``--class``/``--classes`` ask for classes (keys then add ``classes``
and ``guidance``); it adds conditional accuracy overall and per class, the per-class KID, within-class
diversity and the guidance sweep (``pipelines/registry/evaluate_classes.py``).

Where results go: a ``runs:/`` URI logs to that run; ``models:/`` logs to the version's run and
tags the version (``ddpm.eval.<key>`` = value, read by `ddpm-pipe promote`); a checkpoint gets an
evaluation run of its own. ``--table`` adds the sampler table (DDPM at T steps; DDIM at 10, 20, 50,
100 steps with eta 0 and 1), printed and logged as ``evaluation/sampler_table.{json,md}``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from ddpm import features, pixel_scores
from ddpm.config import ExperimentConfig
from ddpm.data.manifest import identity, resolve_split
from ddpm.data.reader import load_split, to_float
from ddpm.data.storage import DataError
from ddpm.image import save_grid, to_levels
from ddpm.inference import SamplingNet
from ddpm.likelihood import bits_per_dim, bits_per_dim_estimate
from ddpm.metrics import INCEPTION_WEIGHTS_HINT, direction, inception_fid, parse_result_key, result_key
from ddpm.pipeline import DDPMPipeline
from ddpm.samplers import config_spacing, default_spacing
from pipelines import console, tracking
from pipelines.errors import PipelineError, UsageError
from pipelines.registry import EVAL_TAG, LAST_TAG, models, register
from pipelines.registry.evaluate_classes import SWEEP, SWEEP_SCORES, ClassYardstick, sweep_markdown
from pipelines.registry.models import LoadedModel
from pipelines.sample.command import sample_to_tensor
from pipelines.sample.request import labels_of, resolve_classes, resolve_settings
from pipelines.settings import Settings, redact_obj, resolve
from pipelines.storage.data import ensure_prepared, warn_if_shared
from pipelines.storage.scratch import scratch

BPD_IMAGES = 64  # held-out images for the full bound: its cost is T model calls per image batch
BPD_CALLS = 16  # model calls of --bound estimate (the strata of likelihood.bits_per_dim_estimate)
BOUNDS = ("full", "estimate")  # --bound: T model calls per batch, or BPD_CALLS
K_NEAREST = 3  # precision/recall neighbourhood (Kynkaanniemi et al. 2019)
TABLE_ROWS = (("ddpm", 1000, 0.0),  # (sampler, steps, eta): the DDIM paper's Table 1 shape
              *((("ddim", s, e)) for e in (0.0, 1.0) for s in (10, 20, 50, 100)))
INCEPTION_ENV = "DDPM_INCEPTION_WEIGHTS"


@dataclass
class EvalData:
    test: torch.Tensor  # float [N x C x H x W] in [-1, 1]
    train: torch.Tensor | None  # float, the training split (digits reference); None when not found
    levels: int
    source: str
    test_hash: str  # of the test manifest
    hash: str  # of the train and test manifests together
    test_url: str
    train_url: str | None
    test_labels: torch.Tensor | None = None  # int64 [N], the held-out images' true classes (None: unlabelled)
    train_labels: torch.Tensor | None = None


def evaluate_command(model: str, data: str | None = None, num: int = 1000, sampler: str | None = None,
                     steps: int | None = None, nodes: int = 1, table: bool = False,
                     address: str | None = None, *, eta: float | None = None, bpd_images: int = BPD_IMAGES,
                     table_rows: tuple = TABLE_ROWS, parent_run_id: str | None = None,
                     run_name: str | None = None, classes: tuple[int, ...] = (), balanced: bool = False,
                     guidance: float | None = None, guidance_sweep: bool | None = None,
                     bound: str = "full") -> dict[str, Any]:
    """Evaluate ``model`` and log every keyed result; returns them with a readable ``message``.

    ``sampler``, ``steps`` and ``eta`` left None are the model's own (its config's ``sample`` section),
    settled once here (:func:`pipelines.sample.request.resolve_settings`), as the classes and
    guidance of a class-conditional model (:func:`pipelines.sample.request.resolve_classes`);
    ``guidance_sweep`` (default: on for a class-conditional model) adds the sweep. The results go to
    a run of their own, ``run_name`` under ``parent_run_id`` when given (the workflow's), see
    :func:`log_results`."""
    check_num(num)
    if bound not in BOUNDS:
        raise UsageError(f"--bound must be one of {', '.join(BOUNDS)}, got {bound!r}")
    settings = resolve(address=address)
    tracking.configure(settings)
    loaded = models.load(model)
    cfg = loaded.config
    sampler, steps, eta = resolve_settings(cfg, sampler, steps, eta)  # before any work
    classes, guidance = resolve_classes(cfg, classes, balanced, guidance)
    if guidance_sweep and not cfg.model.num_classes:
        raise UsageError("--guidance-sweep needs a class-conditional model (model.num_classes > 0); this one "
                         "is unconditional")
    ev = load_eval_data(cfg, data, settings)

    results: list[dict[str, Any]] = []
    bpd = held_out_bpd(loaded, ev, bpd_images, bound=bound)
    results.append(bpd)
    main = measure_sampler(loaded, ev, sampler, steps, eta, num, nodes, address, settings, classes, guidance)
    cond = None
    if cfg.model.num_classes:
        cond = measure_classes(loaded, ev, main, nodes, address, settings, guidance, guidance_sweep is not False)
        main["results"].extend(cond["primary"])  # conditional accuracy and class spread: the setting asked for
    results.extend(main["results"])
    results.extend(cond["results"] if cond else [])
    rows = []
    if table:
        T = loaded.diffusion.num_timesteps
        for s, n, e in dict.fromkeys((s, min(n, T), e) for s, n, e in table_rows):
            console.info(f"[evaluate] sampler table: {s} {n} steps eta {e:g}")
            row = measure_sampler(loaded, ev, s, n, e, num, nodes, address, settings, classes, guidance)
            rows.append(row)
            results.extend(r for r in row["results"] if r["key"] not in {x["key"] for x in results})

    with console.phase("evaluate", "logging the results to MLflow"):
        target = log_results(loaded, model, results, main, rows, settings, data_url=ev.test_url,
                             parent_run_id=parent_run_id, run_name=run_name, cond=cond)
    message = _message(model, bpd, main, rows, target, cond)
    return {"message": message, "model": model, "results": results, "bpd": bpd["value"],
            "scores": main["scores"], "floors": main.get("floors", {}), "se": main.get("se", {}),
            "floor_se": main.get("floor_se", {}),
            "compared": {n: c["label"] for n, c in main.get("compared", {}).items()},
            "floor_compared": {n: c["label"] for n, c in main.get("floor_compared", {}).items()},
            "sec_per_sample": main["sec_per_sample"], "sampler": main["sampler"],
            "steps": main["steps"], "eta": main["eta"], "spacing": main["spacing"], "num": num,
            "table": [_row_summary(r) for r in rows],
            "classes": list(classes) or None, "guidance": guidance, "conditional": _cond_summary(cond),
            "feature_net": main.get("feature_net"), "notes": main.get("notes", []), **target}


def check_num(num: int, option: str = "--num") -> None:
    """The number of samples evaluation needs: above ``K_NEAREST + 1`` (k-NN precision/recall with
    its jackknife standard error, which leaves a group out and still needs k + 1 points)."""
    if num <= K_NEAREST + 1:
        raise UsageError(f"{option} must be above {K_NEAREST + 1} (k-NN precision/recall with its standard "
                         f"error), got {num}")


# -- data -------------------------------------------------------------------------------------------
def _manifest_hash(value: dict[str, Any]) -> str:
    """The ``data:<hash>`` part of result keys: 12 hex digits of the sha256 of a manifest, or of
    ``{"train": manifest or None, "test": manifest}``, each as :func:`ddpm.data.manifest.identity`
    (so data prepared before image hashes were recorded keeps its digest)."""
    value = identity(value) if "format" in value else {k: m and identity(m) for k, m in value.items()}
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def load_eval_data(cfg: ExperimentConfig, data: str | None, settings: Settings) -> EvalData:
    """The held-out (test) split and, when present, the training split of the model's data.

    ``data`` is a dataset folder (holding ``train/`` and ``test/``) or a split folder whose test split
    is next to it; default: the config's ``data.url``, else ``<data>/<source>/{test,train}`` (``Settings.data_url``),
    prepared from the config's source if missing.
    """
    base = data or cfg.data.url
    try:
        if base:
            test_url = cfg.data.holdout_url if not data and cfg.data.holdout_url else resolve_split(base, "test")
            try:
                train_url: str | None = resolve_split(base, "train")
            except DataError:
                train_url = None
        else:
            test_url = settings.data_url(cfg.data.source, "test")
            train_url = settings.data_url(cfg.data.source, "train")
            ensure_prepared(cfg.data.source, test_url, "test")
            ensure_prepared(cfg.data.source, train_url, "train")
        test, test_labels, test_manifest = load_split(test_url)
        train, train_labels, train_manifest = None, None, None
        if train_url is not None:
            train, train_labels, train_manifest = load_split(train_url)
    except DataError as e:
        raise UsageError(f"evaluation data: {e}") from None
    m = cfg.model
    want = [m.in_channels, m.image_size, m.image_size]
    if test_manifest["shape"] != want or test_manifest["levels"] != cfg.data.levels:
        raise UsageError(f"{test_url} holds {test_manifest['shape']} images on {test_manifest['levels']} levels; "
                         f"the model makes {want} on {cfg.data.levels}")
    if train_manifest is not None:
        warn_if_shared(train_manifest, test_manifest, train_url, test_url, "evaluate")
    levels = cfg.data.levels
    both = _manifest_hash({"train": train_manifest, "test": test_manifest})
    return EvalData(test=to_float(test, levels), train=None if train is None else to_float(train, levels),
                    levels=levels, source=str(test_manifest["source"]), test_hash=_manifest_hash(test_manifest),
                    hash=both, test_url=test_url, train_url=train_url,
                    test_labels=test_labels if test_manifest.get("labels") else None,
                    train_labels=train_labels if train_manifest and train_manifest.get("labels") else None)


# -- measurements -----------------------------------------------------------------------------------
def _result(metric: str, value: float, se: float | None = None, **depends_on: str | int | float) -> dict[str, Any]:
    """A keyed result; ``se`` (its standard error, when known) is logged under ``se_key``."""
    out = {"key": result_key(metric, **depends_on), "metric": metric, "value": float(value),
           "direction": direction(metric)}
    if se is not None and math.isfinite(se):
        out.update(se=float(se), se_key=result_key(f"{metric}_se", **depends_on))
    return out


def held_out_bpd(loaded: LoadedModel, ev: EvalData, images: int, batch_size: int = 64,
                 bound: str = "full") -> dict[str, Any]:
    """Mean bits/dim over the first ``images`` held-out images: the full bound (T model calls per
    batch), or with ``bound="estimate"`` its stratified estimate (:data:`BPD_CALLS` calls per batch)
    and standard error."""
    start = time.perf_counter()
    values, errors = held_out_bpd_values(loaded, ev, images, batch_size, bound)
    bpd = values.double().mean().item()
    if errors is None:
        out = _result("bpd", bpd, bound="full", data=ev.test_hash, num=len(values))
    else:  # the images' estimates are independent: the mean's standard error from theirs
        se = errors.double().pow(2).sum().sqrt().item() / len(values)
        out = _result("bpd", bpd, se, bound=f"estimate-{BPD_CALLS}", data=ev.test_hash, num=len(values))
    out["seconds"] = time.perf_counter() - start
    return out


def held_out_bpd_values(loaded: LoadedModel, ev: EvalData, images: int, batch_size: int = 64,
                        bound: str = "full") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Bits/dim ``[N]`` of each of the first ``images`` held-out images (the full bound; with
    ``bound="estimate"`` its stratified estimate, and each estimate's standard error ``[N]``, else
    None), with a progress line; the same images and generator seeds on every call, so two models'
    values pair image by image (``benchmarks.bench_bpd``)."""
    x = ev.test[:images]
    calls, batches = (loaded.diffusion.num_timesteps if bound == "full" else BPD_CALLS), -(-len(x) // batch_size)
    what = "full bound" if bound == "full" else f"stratified estimate of the bound, {BPD_CALLS} calls"
    bar = console.Progress("evaluate", calls * batches, "call",
                           what=f"bits/dim, {what} on {len(x)} held-out images")
    g = torch.Generator().manual_seed(0)
    values, errors = [], []
    for b, i in enumerate(range(0, len(x), batch_size)):
        def progress(done: int, _calls: int, b: int = b) -> None:
            bar.at(b * calls + done)

        if bound == "full":
            values.append(bits_per_dim(loaded.diffusion, loaded.model, x[i:i + batch_size], levels=ev.levels,
                                       generator=g, progress=progress))
        else:
            est, err = bits_per_dim_estimate(loaded.diffusion, loaded.model, x[i:i + batch_size], levels=ev.levels,
                                             num_timesteps=BPD_CALLS, seed=b, progress=progress)
            values.append(est)
            errors.append(err)
    bar.close()
    return torch.cat(values), (torch.cat(errors) if errors else None)


def generate_samples(loaded: LoadedModel, sampler: str, steps: int, eta: float, num: int, nodes: int,
                     address: str | None, seed: int = 0, classes: tuple[int, ...] = (),
                     guidance: float | None = None) -> torch.Tensor:
    """``num`` samples in [-1, 1]; sample i draws its noise from ``ddpm.noise.sample_seed(seed, i)``
    and, with ``classes``, asks for ``classes[i mod len(classes)]`` with ``guidance`` (settled)."""
    if nodes > 1:  # the batch-sampling job (`ddpm-pipe sample`'s Ray actors): same seeds, same images
        # The version loaded here (and scored, and tagged for `promote`), not whatever an alias names by now.
        return sample_to_tensor(model=loaded.pinned, num=num, sampler=sampler, steps=steps, eta=eta, seed=seed,
                                nodes=nodes, batch_size=loaded.config.sample.batch_size, address=address,
                                progress=False, classes=classes, guidance=guidance)
    # SamplingNet as the sample job's workers run it: same seeds, same images.
    pipe = DDPMPipeline.from_config(SamplingNet(loaded.model), loaded.config, loaded.diffusion,
                                    sampler=sampler, steps=steps, eta=eta, guidance=guidance)
    batches = -(-num // pipe.batch_size)
    asked = f", classes in turn, guidance {guidance:g}" if classes else ""
    how = f"{sampler}, {pipe.steps} steps{f', eta {pipe.eta:g}' if pipe.eta else ''}{asked}"
    bar = console.Progress("evaluate", batches * pipe.steps, "call",
                           what=f"sampling {num} images ({how}, {batches} batch{'es' * (batches > 1)})")
    x = pipe(num, seed, call_progress=bar.at, class_labels=labels_of(list(range(num)), classes))
    bar.close()
    return x


def measure_sampler(loaded: LoadedModel, ev: EvalData, sampler: str, steps: int, eta: float, num: int,
                    nodes: int, address: str | None, settings: Settings, classes: tuple[int, ...] = (),
                    guidance: float | None = None) -> dict[str, Any]:
    """Sample ``num`` images with one settled sampler setting (and classes and guidance); score them
    against held-out data, with floors.

    Each result's key says what was compared with what: ``vs:test-<M>`` (the held-out split) or
    ``vs:train-<M>`` (copy rate), and a floor's ``real:train``/``real:test`` with its ``num``.
    """
    start = time.perf_counter()
    x = generate_samples(loaded, sampler, steps, eta, num, nodes, address, classes=classes, guidance=guidance)
    asked = _asked(classes, guidance, loaded.config.model.num_classes)
    out = score_samples(x, time.perf_counter() - start, ev, sampler, steps, eta, settings, asked=asked,
                        spacing=config_spacing(loaded.config.sample, sampler))
    out.update(classes=classes, guidance=guidance, labels=labels_of(list(range(num)), classes))
    return out


def _asked(classes: tuple[int, ...], guidance: float | None, num_classes: int) -> dict[str, str | float]:
    """What a result depends on besides the sampler: the classes asked for (``balanced``: every class
    in turn) and the guidance; nothing when no class was asked (keys as an unconditional model's)."""
    if not classes:
        return {}
    which = "balanced" if classes == tuple(range(num_classes)) else "-".join(map(str, classes))
    return {"classes": which, "guidance": float(guidance)}


def score_samples(x: torch.Tensor, seconds: float, ev: EvalData, sampler: str, steps: int, eta: float,
                  settings: Settings, asked: dict[str, str | float] | None = None,
                  spacing: str | None = None) -> dict[str, Any]:
    """Score samples ``x`` (float ``[N x C x H x W]`` in [-1, 1]) made in ``seconds`` by one sampler
    setting (``asked``: the classes and guidance, :func:`_asked`; ``spacing``: where the sampler put
    its steps, ``None`` for its default), as :func:`measure_sampler` does; for samples made elsewhere
    (``benchmarks/bench_quality.py`` scores a diffusers model's with it).

    A spacing other than the sampler's default is part of every key (``spacing:trailing``): a
    distilled student's DDIM 4 (``trailing``) and its teacher's (``linspace``) are different grids."""
    num = len(x)
    samples = to_float(to_levels(x, ev.levels), ev.levels)  # on the data's own grey levels
    spacing = spacing or default_spacing(sampler)
    grid = {"spacing": spacing} if spacing != default_spacing(sampler) else {}
    deps = {"sampler": sampler, "steps": steps, "eta": float(eta), "num": num, **grid, **(asked or {})}
    out: dict[str, Any] = {"sampler": sampler, "steps": steps, "eta": float(eta), "spacing": spacing, "num": num,
                           "sec_per_sample": seconds / num, "samples": samples, "scores": {}, "floors": {},
                           "se": {}, "floor_se": {}, "compared": {}, "floor_compared": {}, "notes": [],
                           "features": "none"}
    results = [_result("sec_per_sample", seconds / num, **deps)]
    with console.phase("evaluate", f"scoring {num} samples against the test split ({len(ev.test)} images)"):
        scores = _quality(samples, ev, settings, out)

    def finite(x: float | None) -> float | None:  # no standard error (classes_covered): None, not NaN
        return x if x is not None and math.isfinite(x) else None

    for name, c in out["compared"].items():
        value, se = scores[name], finite(scores.get(f"{name}_se"))
        vs = {"vs": c["vs"]} if c["vs"] else {}
        out["scores"][name], out["se"][name] = value, se
        space = c.get("features", out["features"])  # pixel scores name their PCA space
        results.append(_result(name, value, se, data=ev.hash, features=space, **deps, **vs))
        if f"{name}_floor" in scores:
            floor, floor_se = scores[f"{name}_floor"], finite(scores.get(f"{name}_floor_se"))
            f = out["floor_compared"][name]
            out["floors"][name], out["floor_se"][name] = floor, floor_se
            results.append(_result(f"{name}_floor", floor, floor_se, data=ev.hash, features=space,
                                   num=f["num"], real=f["real"], **vs))
    out["results"] = results
    return out


# -- class-conditional models ---------------------------------------------------------------------
def measure_classes(loaded: LoadedModel, ev: EvalData, main: dict[str, Any], nodes: int, address: str | None,
                    settings: Settings, guidance: float | None, sweep: bool) -> dict[str, Any]:
    """A class-conditional model's scores (``pipelines/registry/evaluate_classes.py``): ``num``
    samples of the main setting's sampler asked for every class in turn, at the guidance asked for
    (the model's own when none) and, with ``sweep``, at every w of :data:`SWEEP` (the same seeds).

    Returns ``primary`` (``cond_accuracy``, ``class_spread``: the setting asked for), ``results``
    (per class, ``section`` ``class<c>/``; the sweep's, ``guidance-<w>/``), ``per_class``,
    ``sweep`` (the table's rows), ``samples`` (at the guidance asked for) and ``notes``.
    """
    K, num = loaded.config.model.num_classes, main["num"]
    w0 = loaded.config.sample.guidance if guidance is None else guidance
    out: dict[str, Any] = {"guidance": w0, "num": num, "primary": [], "results": [], "per_class": {}, "sweep": [],
                           "samples": None, "notes": []}
    yardstick, version = _class_yardstick(ev, settings, K, out["notes"])
    if yardstick is None:
        return out
    balanced = tuple(range(K))
    labels = torch.tensor(labels_of(list(range(num)), balanced))
    made = {w0: (main["samples"], main["sec_per_sample"] * num)} if main["classes"] == balanced else {}

    def samples_at(w: float) -> tuple[torch.Tensor, float]:
        if w not in made:
            start = time.perf_counter()
            x = generate_samples(loaded, main["sampler"], main["steps"], main["eta"], num, nodes, address,
                                 classes=balanced, guidance=w)
            made[w] = to_float(to_levels(x, ev.levels), ev.levels), time.perf_counter() - start
        return made[w]

    deps = {"sampler": main["sampler"], "steps": main["steps"], "eta": main["eta"], "num": num, "data": ev.hash,
            "features": version, "classes": "balanced"}
    vs = {n: {} if n == "cond_accuracy" else {"vs": f"test-{len(ev.test)}"} for n in SWEEP_SCORES}
    out["samples"], _ = samples_at(w0)
    scored = yardstick.scores(out["samples"], labels)
    out["scores"] = scored.overall
    out["primary"] = [_result(n, *scored.overall[n], **deps, guidance=w0, **vs[n]) for n in ("cond_accuracy", "class_spread")]
    for c, row in scored.per_class.items():
        out["per_class"][c] = row
        out["results"].append({**_result("cond_accuracy", *row["cond_accuracy"], **deps, guidance=w0, **{"class": c}),
                               "section": f"class{c}/"})
        if "kid" in row:
            out["results"].append({**_result("kid", *row["kid"], **deps, guidance=w0, **{"class": c},
                                             vs=f"test-class{c}-{yardstick.reference(c)}"), "section": f"class{c}/"})
    for w in SWEEP if sweep else ():
        x, seconds = samples_at(w)
        s = scored if w == w0 else yardstick.scores(x, labels, per_class=False)
        out["sweep"].append({"guidance": w, "num": num, "sec_per_sample": seconds / num,
                             "scores": {n: s.overall[n][0] for n in SWEEP_SCORES},
                             "se": {n: s.overall[n][1] for n in SWEEP_SCORES}})
        keys = {r["key"] for r in out["primary"]}
        out["results"].extend({**r, "section": f"guidance-{w:g}/"} for r in (
            _result(n, *s.overall[n], **deps, guidance=w, **vs[n]) for n in SWEEP_SCORES) if r["key"] not in keys)
    return out


def _class_yardstick(ev: EvalData, settings: Settings, num_classes: int,
                     notes: list[str]) -> tuple[ClassYardstick | None, str]:
    """The digits classifier's :class:`ClassYardstick` and its version, or ``(None, "")`` with a note
    saying why the data allow no conditional scores."""
    if ev.source != "digits" or ev.test.shape[1:] != (1, 8, 8) or num_classes != features.NUM_CLASSES:
        notes.append(f"conditional accuracy skipped: it needs the digits classifier ({features.NUM_CLASSES} "
                     f"classes of 8x8 digits), not {num_classes} classes of {ev.source!r}")
        return None, ""
    if ev.train is None or ev.test_labels is None or ev.train_labels is None:
        notes.append("conditional accuracy skipped: it needs labelled held-out and training splits")
        return None, ""
    net, info = features.load_digits_feature_net(settings.home / "cache")
    return ClassYardstick(net, ev.test, ev.test_labels, ev.train, ev.train_labels, K_NEAREST), info["version"]


def _cond_summary(cond: dict[str, Any] | None) -> dict[str, Any] | None:
    """The conditional scores as plain data (the command's JSON result)."""
    if cond is None:
        return None
    return {"guidance": cond["guidance"], "num": cond["num"], "notes": cond["notes"], "sweep": cond["sweep"],
            "scores": {n: v for n, (v, _) in cond.get("scores", {}).items()},
            "se": {n: se for n, (_, se) in cond.get("scores", {}).items()},
            "per_class": {str(c): {k: (list(v) if isinstance(v, tuple) else v) for k, v in row.items()}
                          for c, row in cond["per_class"].items()}}


def _compared(scores: dict[str, float], what: dict[str, str | None], n_samples: int, n_ref: int,
              n_train: int, n_floor: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """What each score and its floor compared: ``vs`` (key part) and a readable ``label``."""
    sets = {"reference": (f"test-{n_ref}", f"the test split ({n_ref})"),
            "train": (f"train-{n_train}", f"the training split ({n_train})")}
    compared, floors = {}, {}
    for name in what:
        if name not in scores:
            continue
        vs, vs_label = sets[what[name]] if what[name] else (None, "")
        compared[name] = {"vs": vs, "label": f"{name} vs {vs_label}" if vs else name,
                          "samples": f"{n_samples} samples"}
        real, n = ("test", n_ref) if name == "copy_rate" else ("train", n_floor)
        kind = "test images" if real == "test" else "training images"
        floors[name] = {"real": real, "num": n, "label": f"{n} {kind}" + (f" vs {vs_label}" if vs else "")}
    return compared, floors


def _quality(samples: torch.Tensor, ev: EvalData, settings: Settings, out: dict[str, Any]) -> dict[str, float]:
    """Scores, standard errors and floors: the pixel-space scores for any data with a training split
    (``ddpm.pixel_scores``), then those of the data's feature space; fills ``out``'s
    ``compared``/``floor_compared`` and notes what was skipped and why."""
    if ev.train is None:
        return _feature_quality(samples, ev, settings, out)
    pixel = pixel_scores.evaluate_pixels(samples, ev.test, ev.train)
    n_floor = min(len(samples), len(ev.train))
    _record(out, *_compared(pixel, pixel_scores.COMPARED_WITH, len(samples), len(ev.test), len(ev.train), n_floor),
            space=f"{pixel_scores.FEATURES}-{int(pixel['pca_components'])}")
    return {**pixel, **_feature_quality(samples, ev, settings, out)}


def _record(out: dict[str, Any], compared: dict[str, Any], floors: dict[str, Any], space: str | None = None) -> None:
    """Add what a group of scores and their floors compared (:func:`_compared`) to ``out``; ``space``
    names their feature space in their keys when it is not ``out["features"]``."""
    if space is not None:
        for c in compared.values():
            c["features"] = space
    out["compared"].update(compared)
    out["floor_compared"].update(floors)


def _feature_quality(samples: torch.Tensor, ev: EvalData, settings: Settings, out: dict[str, Any]) -> dict[str, float]:
    """Scores in the data's feature space: the digits network's for digits; for other data with a
    training split, a network trained on that split (``ddpm.data_features``, offline), and
    Inception-v3 FID as well for RGB when its weights are given."""
    if samples.shape[1:] == (1, 8, 8) and ev.source == "digits":
        if ev.train is None:
            out["notes"].append("sample quality skipped: no training split next to the test split")
            return {}
        net, info = features.load_digits_feature_net(settings.home / "cache")
        out["features"] = info["version"]
        out["feature_net"] = {"version": info["version"], "test_accuracy": info["test_accuracy"]}
        _few_samples_note(len(samples), out)
        scores = features.evaluate_samples(samples, ev.test, ev.train, net=net, k=K_NEAREST)
        _record(out, *_compared(scores, features.COMPARED_WITH, len(samples), len(ev.test), len(ev.train),
                                int(scores["num_floor"])))
        return scores
    scores: dict[str, float] = {}
    if ev.train is not None:
        scores = _data_feature_quality(samples, ev, settings, out)
    else:
        out["notes"].append("feature scores skipped: no training split next to the test split to train a "
                            "feature network on (prepare one with data prepare --test-fraction)")
    if samples.shape[1] == 3:
        scores.update(_inception_quality(samples, ev, out))
    return scores


def _few_samples_note(num: int, out: dict[str, Any]) -> None:
    if num <= features.FEATURE_DIM:
        out["notes"].append(f"{num} samples for {features.FEATURE_DIM}-d features: FD and recall "
                            "are dominated by estimation noise; use --num of a few hundred or more")


def _data_feature_quality(samples: torch.Tensor, ev: EvalData, settings: Settings,
                          out: dict[str, Any]) -> dict[str, float]:
    """``fd``, ``kid``, ``precision``, ``recall`` and ``copy_rate`` in the feature space of a network
    trained on the training split (``ddpm.data_features``; trained once per split, then cached)."""
    from ddpm import data_features

    cache = settings.home / "cache"
    what = (f"training the feature network on {min(len(ev.train), data_features.MAX_TRAIN_IMAGES)} training "
            f"images ({'their classes and ' if ev.train_labels is not None else ''}quarter-turns; cached after)")
    with contextlib.nullcontext() if data_features.cache_path(ev.hash, cache).is_file() else console.phase("evaluate", what):
        net, info = data_features.load_data_feature_net(ev.train, ev.train_labels, ev.hash, cache, ev.test,
                                                        ev.test_labels)
    space = f"{info['version']}-{info['task']}"
    out["feature_net"] = {"version": info["version"], "task": info["task"], "test_accuracy": info["test_accuracy"],
                          "chance": 1.0 / (info["num_classes"] * data_features.TURNS)}
    _few_samples_note(len(samples), out)
    scores = data_features.evaluate_samples(samples, ev.test, ev.train, net, k=K_NEAREST)
    _record(out, *_compared(scores, data_features.COMPARED_WITH, len(samples), len(ev.test), len(ev.train),
                            int(scores["num_floor"])), space=space)
    if out["features"] == "none":
        out["features"] = space
    return scores


def _inception_quality(samples: torch.Tensor, ev: EvalData, out: dict[str, Any]) -> dict[str, float]:
    """Inception-v3 FID against the test split, when ``DDPM_INCEPTION_WEIGHTS`` names the weights."""
    weights = os.environ.get(INCEPTION_ENV)
    if not weights:
        out["notes"].append(f"Inception FID skipped: set {INCEPTION_ENV} to the weights file. "
                            f"{INCEPTION_WEIGHTS_HINT}")
        return {}
    try:
        fid = inception_fid(ev.test, samples, weights)
        n = min(len(samples), len(ev.train)) if ev.train is not None else 0
        floor = inception_fid(ev.test, ev.train[:n], weights) if ev.train is not None else float("nan")
    except (FileNotFoundError, ImportError) as e:
        raise UsageError(str(e)) from None
    _record(out, *_compared({"fid": fid}, {"fid": "reference"}, len(samples), len(ev.test), n, n),
            space="inception-v3-2048")
    return {"fid": fid, "fid_floor": floor}


# -- logging ----------------------------------------------------------------------------------------
def _row_summary(row: dict[str, Any]) -> dict[str, Any]:
    keys = ("sampler", "steps", "eta", "spacing", "num", "sec_per_sample", "scores", "se", "floors", "floor_se")
    return {**{k: row[k] for k in keys},
            "compared": {n: c["label"] for n, c in row["compared"].items()},
            "floor_compared": {n: c["label"] for n, c in row["floor_compared"].items()}}


def _cell(value: float, se: float | None) -> str:
    return f"{value:.4g}" + (f" ± {se:.2g}" if se is not None else "")


def table_markdown(rows: list[dict[str, Any]]) -> str:
    """The sampler table as markdown: one row per setting (value ± standard error), then the floor.

    Column headers say what the samples were compared with; the line under the table says what
    the floor row is.
    """
    names = list(dict.fromkeys(n for r in rows for n in r["compared"]))
    labels = {n: c["label"] for r in rows for n, c in r["compared"].items()}
    head = ["sampler", "steps", "eta", *(labels[n] for n in names), "s/sample"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        grid = f" ({r['spacing']})" if r.get("spacing") not in (None, default_spacing(r["sampler"])) else ""
        cells = [r["sampler"] + grid, str(r["steps"]), f"{r['eta']:g}",
                 *(_cell(r["scores"][n], r["se"].get(n)) if n in r["scores"] else "-" for n in names),
                 f"{r['sec_per_sample']:.4g}"]
        lines.append("| " + " | ".join(cells) + " |")
    if rows and rows[0]["floors"]:
        first = rows[0]
        floors, ses = first["floors"], first["floor_se"]
        lines.append("| real data (floor) | - | - | "
                     + " | ".join(_cell(floors[n], ses.get(n)) if n in floors else "-" for n in names) + " | - |")
        what = dict.fromkeys(c["label"].split(" vs ")[0] for c in first["floor_compared"].values())
        lines.append("\nfloor: the same comparison with " + " / ".join(what)
                     + " in place of the samples (copy_rate: the test split's own); ± is one standard error "
                     "(jackknife)")
    return "\n".join(lines)


def _versions_of(uri: str, meta: dict[str, Any]) -> list[tuple[str, str]]:
    """Registered versions the results describe: the URI's own, or every version of a runs:/ model."""
    if meta.get("name"):
        return [(meta["name"], meta["version"])]
    if uri.startswith("runs:/") and meta.get("run_id"):
        try:
            found = tracking.client().search_model_versions(f"run_id = '{meta['run_id']}'")
        except Exception:  # a store without a registry
            return []
        return [(mv.name, str(mv.version)) for mv in found]
    return []


def metric_names(results: list[dict[str, Any]], primary: list[dict[str, Any]]) -> dict[str, str]:
    """``{result key: metric name in the evaluation run}`` for every result and standard error: the
    setting asked for by its metric's name (``bpd``, ``kid``, ``kid_se``, ``fd_floor``); a sampler
    table row's under its setting (``ddim-10-eta0/kid``: a chart section per setting); a result with
    a ``section`` under it (``class3/cond_accuracy``, ``guidance-2/recall``)."""
    asked = {r["key"] for r in primary} | {r["se_key"] for r in primary if "se_key" in r}
    names = {}
    for r in results:
        for key, metric in ((r["key"], r["metric"]), (r.get("se_key"), f"{r['metric']}_se")):
            if key is None:
                continue
            deps = parse_result_key(key)[1]
            grid = f"-{deps['spacing']}" if "spacing" in deps else ""
            setting = r.get("section") or (
                f"{deps['sampler']}-{deps['steps']}-eta{deps['eta']}{grid}/" if "sampler" in deps else "table/")
            names[key] = metric if key in asked else setting + metric
    return names


def _evaluation_run(loaded: LoadedModel, uri: str, settings: Settings, parent_run_id: str | None,
                    run_name: str | None) -> str:
    """The evaluation's own run, beside the model's training run (its experiment, under its workflow
    when it has one) or in the config's experiment for a checkpoint; resumed by name."""
    c = tracking.client()
    if loaded.run_id:
        trained = c.get_run(loaded.run_id)
        exp_id, parent = trained.info.experiment_id, parent_run_id or trained.data.tags.get("mlflow.parentRunId")
        label = f"{loaded.name}-v{loaded.version}" if loaded.name else f"run-{loaded.run_id[:12]}"
    else:
        exp_id, parent = tracking.experiment_id(loaded.config.name, settings), parent_run_id
        label = hashlib.sha256(uri.encode()).hexdigest()[:10]
    tags = {tracking.KIND_TAG: "evaluate", "ddpm.model_uri": uri,
            **({"ddpm.model_version": f"{loaded.name}/{loaded.version}"} if loaded.name else {}),
            **({"ddpm.model_run_id": loaded.run_id} if loaded.run_id else {})}
    run_id, _ = tracking.start_or_resume_run(exp_id, run_name or f"evaluate-{label}", tags, parent_run_id=parent)
    return run_id


def log_results(loaded: LoadedModel, uri: str, results: list[dict[str, Any]], main: dict[str, Any],
                rows: list[dict[str, Any]], settings: Settings, data_url: str | None = None,
                parent_run_id: str | None = None, run_name: str | None = None,
                cond: dict[str, Any] | None = None) -> dict[str, Any]:
    """Log the evaluation to a run of its own (:func:`_evaluation_run`) and tag the model's versions.

    The run's metrics have short names (:func:`metric_names`); each one's full result key (what it
    depends on) is the run's tag ``ddpm.key.<name>``, and every result is in the run's
    ``evaluation/results-<stamp>.md`` table. The setting asked for is linked to the logged model
    (its model page) and to the held-out split, logged as the run's evaluation dataset. Each version
    gets ``ddpm.eval.<key>`` = value for every result, and ``ddpm.eval_last.<metric>`` = the key of
    the setting asked for (what `ddpm-pipe promote` reads); its short tags and description are
    ``register.record_evaluation``'s.
    """
    primary = results[:1] + main["results"]
    c = tracking.client()
    run_id = _evaluation_run(loaded, uri, settings, parent_run_id, run_name)
    try:
        versions = _versions_of(uri, {"run_id": loaded.run_id, "name": loaded.name, "version": loaded.version})
        stamp = _log_metrics(c, run_id, loaded, results, primary, main, data_url)
        _log_artifacts(c, run_id, uri, loaded, results, main, rows, stamp, cond)
        for name, version in versions:
            for r in results:
                c.set_model_version_tag(name, version, EVAL_TAG + r["key"], repr(r["value"]))
                if "se_key" in r:
                    c.set_model_version_tag(name, version, EVAL_TAG + r["se_key"], repr(r["se"]))
            for r in primary:  # the setting asked for, not the table's rows
                c.set_model_version_tag(name, version, LAST_TAG + r["metric"], r["key"])
            c.set_model_version_tag(name, version, "ddpm.eval_time", stamp)
        register.record_evaluation(c, run_id, versions, primary, results, stamp)
    except Exception as e:
        tracking.end_run(run_id, "FAILED")
        raise PipelineError(f"logging the evaluation to MLflow failed: {type(e).__name__}: {e}") from e
    tracking.end_run(run_id)
    return {"run_id": run_id, "versions": [f"models:/{n}/{v}" for n, v in versions]}


def _log_metrics(c: MlflowClient, run_id: str, loaded: LoadedModel, results: list[dict[str, Any]],
                 primary: list[dict[str, Any]], main: dict[str, Any], data_url: str | None) -> str:
    """The results as short-named metrics, their keys as tags; returns the evaluation's time stamp."""
    names = metric_names(results, primary)
    values = {r["key"]: r["value"] for r in results} | {r["se_key"]: r["se"] for r in results if "se_key" in r}
    if main.get("feature_net"):
        key = f"feature_net_test_accuracy/features:{main['features']}"
        names[key], values[key] = "feature_net_test_accuracy", main["feature_net"]["test_accuracy"]
    dataset = tracking.log_dataset(run_id, data_url, "evaluation") if data_url else None
    linked = {"model_id": loaded.model_id} if loaded.model_id else {}
    if linked and dataset is not None:
        linked.update(dataset_name=dataset.name, dataset_digest=dataset.digest)
    asked = {r["key"] for r in primary}
    now = int(time.time() * 1000)
    metrics = [Metric(names[k], v, now, 0, **(linked if k in asked else {})) for k, v in values.items()]
    tags = [RunTag(f"ddpm.key.{names[k]}", k) for k in values]
    for i in range(0, max(len(metrics), len(tags)), 100):  # MLflow takes at most 100 tags per batch
        c.log_batch(run_id, metrics=metrics[i:i + 100], tags=tags[i:i + 100])
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def _log_artifacts(c: MlflowClient, run_id: str, uri: str, loaded: LoadedModel, results: list[dict[str, Any]],
                   main: dict[str, Any], rows: list[dict[str, Any]], stamp: str,
                   cond: dict[str, Any] | None = None) -> None:
    """The full report (JSON), the main setting's sample grid, with ``--table`` the sampler table, and
    of a class-conditional model the grid of every class (column c asked for class c) and the
    guidance sweep (``guidance_sweep.{json,md}``)."""
    with scratch("eval") as tmp:
        doc = {"model": uri, "time": stamp, "results": results, "notes": main.get("notes", []),
               "feature_net": main.get("feature_net"), "table": [_row_summary(r) for r in rows],
               "conditional": _cond_summary(cond)}
        files = [Path(tmp) / f"evaluation-{stamp}.json", Path(tmp) / f"samples-{main['sampler']}-{main['steps']}-{stamp}.png"]
        files[0].write_text(json.dumps(redact_obj(doc), indent=1, default=str))
        save_grid(main["samples"][:64], str(files[1]), levels=loaded.config.data.levels)
        if rows:
            files += [Path(tmp) / "sampler_table.json", Path(tmp) / "sampler_table.md"]
            files[2].write_text(json.dumps([_row_summary(r) for r in rows], indent=1))
            files[3].write_text(table_markdown(rows) + "\n")
        if cond is not None and cond["samples"] is not None:
            K = loaded.config.model.num_classes
            files.append(Path(tmp) / f"samples-classes-w{cond['guidance']:g}-{stamp}.png")
            save_grid(cond["samples"][:K * 8], str(files[-1]), levels=loaded.config.data.levels, nrow=K)
        if cond is not None and cond["sweep"]:
            files += [Path(tmp) / "guidance_sweep.json", Path(tmp) / "guidance_sweep.md"]
            files[-2].write_text(json.dumps(cond["sweep"], indent=1))
            files[-1].write_text(sweep_markdown(cond["sweep"]) + "\n")
        for f in files:
            c.log_artifact(run_id, str(f), "evaluation")


def _cond_lines(cond: dict[str, Any], main: dict[str, Any]) -> list[str]:
    """A class-conditional model's scores, in words (the command's message)."""
    lines = [f"  note: {n}" for n in cond["notes"]]
    if "scores" not in cond:
        return lines
    (acc, acc_se), (spread, spread_se) = cond["scores"]["cond_accuracy"], cond["scores"]["class_spread"]
    ceiling = (f" (ceiling: the classifier on the held-out digits, {main['feature_net']['test_accuracy']:.3f})"
               if main.get("feature_net") else "")
    lines += [f"{cond['num']} samples of every class in turn, guidance {cond['guidance']:g}: conditional accuracy "
              f"{_cell(acc, acc_se)}{ceiling}; class spread {_cell(spread, spread_se)} (1: the real digits')",
              "  per class (accuracy, KID vs that class's held-out digits): " + "; ".join(
                  f"{c}: {row['cond_accuracy'][0]:.3f}" + (f", {row['kid'][0]:.3g}" if "kid" in row else "")
                  for c, row in cond["per_class"].items())]
    if cond["sweep"]:
        lines.append(sweep_markdown(cond["sweep"]))
    return lines


def _message(uri: str, bpd: dict[str, Any], main: dict[str, Any], rows: list[dict[str, Any]],
             target: dict[str, Any], cond: dict[str, Any] | None = None) -> str:
    bound = bpd["key"].split("bound:")[1].split("/")[0]
    se = f" ± {bpd['se']:.4f}" if "se" in bpd else ""
    lines = [f"{uri}: {bpd['value']:.4f}{se} bits/dim ({'full bound' if bound == 'full' else bound + ' of the bound'}, "
             f"{bpd['key'].split('num:')[1].split('/')[0]} held-out images)",
             f"{main['sampler']} {main['steps']} steps eta {main['eta']:g}, {main['num']} samples: "
             f"{main['sec_per_sample'] * 1000:.1f} ms/sample"]
    for name, value in main["scores"].items():
        what, floor = main["compared"][name], main["floors"].get(name)
        line = f"  {what['label']:<38} {_cell(value, main['se'].get(name)):<18}"
        if floor is not None:
            line += (f" (real data floor {_cell(floor, main['floor_se'].get(name))}: "
                     f"{main['floor_compared'][name]['label']})")
        lines.append(line)
    net = main.get("feature_net")
    if net and "task" in net:  # trained on this data's training split: its task's accuracy on the test split
        lines.append(f"  feature net {net['version']}, trained on the training split ({net['task']}): "
                     f"{net['test_accuracy']:.3f} accuracy on the test split (chance {net['chance']:.3f})")
    elif net:
        lines.append(f"  feature net {net['version']}: {net['test_accuracy']:.3f} test accuracy")
    lines.extend(f"  note: {n}" for n in main.get("notes", []))
    if cond is not None:
        lines.extend(_cond_lines(cond, main))
    if rows:
        lines.append(table_markdown(rows))
    where = ", ".join(target["versions"]) or "no registered version"
    lines.append(f"logged to MLflow run {target['run_id']} ({where})")
    return "\n".join(lines)
