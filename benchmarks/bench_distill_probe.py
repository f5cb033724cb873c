"""Where a distilled student loses against its teacher: four probes, JSON out.

- ``paths``: from the same noise, the RMS distance (pixels in [-1, 1]) between each model's DDIM
  state and a reference model's at every reference timestep the model also visits, and at the end.
  The reference is the first teacher on its K-step grid; a student after k rounds visits every
  2^k-th of those timesteps.
- ``positions``: one round's distillation error per student position: the mean squared distance
  (x space) between the student's x~ and its teacher's two-step target on noised training and
  held-out digits, from a ``distill`` checkpoint (which holds that round's teacher); ``--start``
  uses the teacher as the student (the round's starting point).
- ``pair``: two models, each with its own sampler (or ``URI#ROW``: a row of ``bench_samplers``), the
  same noise seeds: every score's paired difference on the yardstick's lower-is-better scale
  (negative: the first is better) and its z.
- ``grids``: the same noise seeds through each model, side by side in one PNG (docs/img/distill_grids.png).

::

    python -m benchmarks.bench_distill_probe paths --reference models:/ddpm-digits/1 --reference-steps 32 \\
        --spacing cosine --models models:/e4-cos/1 models:/ddpm-digits/1#4
    python -m benchmarks.bench_distill_probe positions --student models:/e4-cos/1 \\
        --checkpoint $DDPM_HOME/ray/e4-cos/checkpoint_00004050/checkpoint.pt --teacher-steps 8 --spacing cosine
    python -m benchmarks.bench_distill_probe pair models:/e4-cos/1 models:/e4-base/1 --num 2000 --seeds 0 1
    python -m benchmarks.bench_distill_probe grids --out docs/img/distill_grids.png \\
        --models models:/ddpm-digits/1 'models:/ddpm-digits/1#ddim:4@cosine' models:/e4-t64/1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from typing import Any

from benchmarks import common


def _paths(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from ddpm.noise import NoiseSource
    from ddpm.samplers import config_spacing
    from ddpm.samplers.ddim import DDIMSampler
    from pipelines.registry.models import load

    def states(uri: str, steps: int | None, spacing: str | None) -> dict[int, torch.Tensor]:
        m = load(uri)
        steps, spacing = steps or m.config.sample.steps, spacing or config_spacing(m.config.sample, "ddim")
        s, net = DDIMSampler(m.diffusion, steps, 0.0, spacing), m.model.eval()
        shape = (args.num, m.config.model.in_channels, m.config.model.image_size, m.config.model.image_size)
        noise = NoiseSource(shape, generator=torch.Generator().manual_seed(args.seed))
        x, out = noise.next(), {}
        with torch.no_grad():
            for i, t in enumerate(s.timesteps):
                out[t] = x
                x, _ = s.step(net, x, i, noise, True)
        out[-1] = x  # the end: clean data
        return out

    ref = states(args.reference, args.reference_steps, args.spacing)
    rows = []
    for spec in args.models:  # URI, or URI#STEPS: DDIM on the reference's spacing at STEPS
        uri, _, given = spec.partition("#")
        got = states(uri, int(given), args.spacing) if given else states(uri, None, None)
        rows.append({"model": spec, "rms": {str(t): round((got[t] - ref[t]).pow(2).mean().sqrt().item(), 5)
                                            for t in got if t in ref}})
        print(f"[paths] {spec}: " + " ".join(f"t={t}:{v}" for t, v in rows[-1]["rms"].items()))
    return {"reference": args.reference, "reference_steps": args.reference_steps, "spacing": args.spacing, "rows": rows}


def _positions(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from ddpm import features
    from ddpm.distill import ProgressiveDistillation
    from ddpm.samplers.timesteps import space_timesteps
    from pipelines.registry.models import load

    student = load(args.student)
    d = student.diffusion
    teacher = copy.deepcopy(student.model)
    teacher.load_state_dict(torch.load(args.checkpoint, weights_only=False, map_location="cpu")["distill"]["teacher"])
    teacher.eval()
    net = teacher if args.start else student.model.eval()
    grid = space_timesteps(d.num_timesteps, args.teacher_steps, args.spacing, d.alphas_cumprod)
    rnd = ProgressiveDistillation(d, grid)
    train, _, test, _ = features.digits_split()
    out: dict[str, Any] = {"student_timesteps": rnd.timesteps, "start": args.start}
    for name, data in (("train", train[: len(test)]), ("held_out", test)):
        g, errors = torch.Generator().manual_seed(args.seed), []
        for i in range(rnd.steps):
            pos = torch.full((len(data),), i, dtype=torch.long)
            t, total = rnd.student_t(pos), 0.0
            for _ in range(args.repeats):
                x_t = d.q_sample(data, t, torch.randn(data.shape, generator=g))
                with torch.no_grad():
                    target = rnd.target_xstart(teacher, x_t, pos)
                    x0 = d.p_mean_variance_from_output(d.model_output(net, x_t, t, None), x_t, t, False)["pred_xstart"]
                total += (x0 - target).pow(2).mean().item()
            errors.append(round(total / args.repeats, 6))
        out[name] = errors
        print(f"[positions] {name} t={rnd.timesteps}: {errors}")
    return out


def _pipeline(spec: str) -> tuple[Any, Any]:
    """``URI`` (sampled with its own config's sampler) or ``URI#ROW`` (with
    :func:`benchmarks.bench_samplers.parse_row`'s): the loaded model and its :class:`DDPMPipeline`."""
    from benchmarks.bench_samplers import student_spec
    from ddpm.inference import SamplingNet
    from ddpm.pipeline import DDPMPipeline
    from pipelines.registry.models import load

    uri, row = student_spec(spec)
    m = load(uri)
    kw = {} if row is None else {"sampler": row.sampler, "steps": row.steps, "eta": row.eta, "spacing": row.spacing}
    return m, DDPMPipeline.from_config(SamplingNet(m.model), m.config, m.diffusion, **kw)


def _pair(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.bench_quality import Yardstick, gaps
    from pipelines.registry.evaluate import load_eval_data
    from pipelines.settings import resolve

    settings = resolve()
    pipes = [_pipeline(spec) for spec in (args.a, args.b)]
    ev = load_eval_data(pipes[0][0].config, None, settings)
    ys = Yardstick(ev, settings)
    draws = []
    for seed in args.seeds:
        sa, sb = (ys.scores(pipe(args.num, seed)) for _, pipe in pipes)
        diff = {k: {"diff": d, "se": se, "z": d / se if se > 0 else None}
                for k, (d, se) in gaps(sa, sb, True, None).items() if se == se}
        draws.append({"seed": seed, "a_minus_b": diff})
        print(f"[pair] seed {seed}: " + " ".join(f"{k} {v['diff']:+.4g} (z {v['z']:+.1f})"
                                                 for k, v in diff.items() if v["z"] is not None))
    return {"a": args.a, "b": args.b, "num": args.num, "draws": draws}


def _grids(args: argparse.Namespace) -> dict[str, Any]:
    """The same ``--num`` noise seeds through each model (its own sampler, or ``URI#ROW`` as
    :func:`benchmarks.bench_samplers.parse_row`), side by side in one PNG, each titled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ddpm.image import grid

    fig, axes = plt.subplots(1, len(args.models), figsize=(2.4 * len(args.models), 2.8), squeeze=False)
    panels = []
    for ax, spec in zip(axes[0], args.models):
        _, pipe = _pipeline(spec)
        x = pipe(args.num, args.seed)
        ax.imshow(grid(x, nrow=8, scale=1).squeeze(), cmap="gray", interpolation="nearest")
        title = spec.partition("#")[0].removeprefix("models:/")
        ax.set_title(f"{title}\n{pipe.sampler} {pipe.steps}, {pipe.spacing}", fontsize=8)
        ax.axis("off")
        panels.append({"model": spec, "sampler": pipe.sampler, "steps": pipe.steps, "spacing": pipe.spacing})
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"[grids] wrote {args.out}")
    return {"out": args.out, "num": args.num, "panels": panels}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="probe", required=True)
    q = sub.add_parser("paths")
    q.add_argument("--reference", required=True)
    q.add_argument("--reference-steps", type=int, default=32)
    q.add_argument("--spacing", default="cosine", help="the reference's DDIM grid")
    q.add_argument("--models", nargs="+", required=True,
                   help="URI: DDIM on the model's own grid (a student); URI#STEPS: DDIM at STEPS on --spacing")
    q.add_argument("--num", type=int, default=512)
    q = sub.add_parser("positions")
    q.add_argument("--student", required=True)
    q.add_argument("--checkpoint", required=True, help="a distill checkpoint.pt of the round (holds its teacher)")
    q.add_argument("--teacher-steps", type=int, required=True)
    q.add_argument("--spacing", default="cosine")
    q.add_argument("--start", action="store_true", help="the teacher as the student: the round's start")
    q.add_argument("--repeats", type=int, default=4)
    q = sub.add_parser("pair")
    q.add_argument("a", help="URI (its own sampler) or URI#ROW (bench_samplers' rows)")
    q.add_argument("b", help="the same")
    q.add_argument("--num", type=int, default=2000)
    q.add_argument("--seeds", type=int, nargs="+", default=[0])
    q = sub.add_parser("grids")
    q.add_argument("--models", nargs="+", required=True, help="URI (its own sampler) or URI#ROW (bench_samplers' rows)")
    q.add_argument("--num", type=int, default=64)
    q.add_argument("--out", required=True, help="the PNG to write")
    for q in sub.choices.values():
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    common.set_threads(common.cores())
    result = {"benchmark": f"distill_probe.{args.probe}", "machine": common.machine(),
              **{"paths": _paths, "positions": _positions, "pair": _pair, "grids": _grids}[args.probe](args)}
    if args.json_out:
        os.makedirs(os.path.dirname(args.json_out) or ".", exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
