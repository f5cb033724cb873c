"""How much a score's standard error depends on the jackknife's grouping, and what more groups cost.

Every score of the yardstick carries a delete-a-group jackknife standard error
(:func:`ddpm.metrics.score_value`). With G groups the error's own relative error falls as about
1 / sqrt(2 (G - 1)); for scores that are not smooth (k-NN precision and recall, class histograms)
the grouping matters more. This benchmark scores one set of images, known and fixed, against the
held-out split with the digits and pixel yardsticks as ``evaluate`` does, then gives each score's
standard error under ``--seeds`` groupings (the jackknife's own seed) at each ``--groups`` count:
smallest, largest, and their coefficient of variation; and the time one ``score_values`` call takes
at each count (alternated, median). No model is needed: the images are ``--num`` training digits
with Gaussian pixel noise of ``--noise`` (so they are not the training images themselves).

    python -m benchmarks.bench_groups [--num 500] [--groups 10 40] [--seeds 6] [--json-out ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

from benchmarks import common


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num", type=int, default=500, help="images scored (training digits with noise)")
    p.add_argument("--noise", type=float, default=0.05, help="standard deviation of the pixel noise added")
    p.add_argument("--groups", type=int, nargs="+", default=[10, 40])
    p.add_argument("--seeds", type=int, default=6, help="groupings (jackknife seeds 0 .. seeds-1) per count")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", default=None, help="the digits feature net's cache (default: $DDPM_HOME/cache)")
    p.add_argument("--json-out", default=os.path.join("bench-results", "groups.json"))
    args = p.parse_args(argv)
    if args.seeds < 2 or min(args.groups) < 2:
        p.error("--seeds and every --groups must be 2 or more")

    import torch

    from ddpm import features, metrics
    from ddpm.pixel_scores import PixelYardstick

    threads = common.set_threads(args.threads)
    train, _, test, _ = features.digits_split()
    if not 2 <= args.num <= len(train):
        p.error(f"--num must be between 2 and {len(train)} (the training digits)")
    net, _ = features.load_digits_feature_net(args.cache_dir)
    g = torch.Generator().manual_seed(0)
    images = train[torch.randperm(len(train), generator=g)[:args.num]]
    images = images + args.noise * torch.randn(images.shape, generator=g)
    scores = {**features.DigitsYardstick(net, test, train).scores(images), **PixelYardstick(test, train).scores(images)}
    scores = {name: s for name, s in scores.items() if s.standard_error}
    load_before, start = common.load(), time.perf_counter()
    seconds = common.alternate({str(G): (lambda G=G: common.timed(lambda: metrics.score_values(scores, groups=G)))
                                for G in args.groups}, repeats=3)
    table: dict[str, dict[str, Any]] = {}
    zero: list[str] = []  # scores with a zero error under some grouping (a copy rate of 0): nothing to compare
    for name, score in scores.items():
        by_count = {G: [metrics.score_value(score, groups=G, seed=s)[1] for s in range(args.seeds)]
                    for G in args.groups}
        if min(min(ses) for ses in by_count.values()) <= 0:
            zero.append(name)
            continue
        table[name] = {str(G): {"min_se": min(ses), "max_se": max(ses), "max_over_min": max(ses) / min(ses),
                                "cv": statistics.stdev(ses) / statistics.fmean(ses)} for G, ses in by_count.items()}
        print(f"[bench_groups] {name}: " + "; ".join(
            f"{G} groups {t['min_se']:.3g}-{t['max_se']:.3g} (cv {t['cv']:.2f})" for G, t in table[name].items()),
            flush=True)
    result = {"benchmark": "groups", "num": args.num, "noise": args.noise, "num_reference": len(test),
              "seeds": args.seeds, "groups": args.groups, "machine": common.machine(threads),
              "load_before": load_before, "load_after": common.load(), "wall_s": round(time.perf_counter() - start, 1),
              "score_values_s": {G: common.median(v) for G, v in seconds.items()}, "scores": table,
              "zero_error": zero}
    print("[bench_groups] one score_values call: " + ", ".join(
        f"{G} groups {s:.2f} s" for G, s in result["score_values_s"].items()))
    print(common.write_json(result, args.json_out))
    return result


if __name__ == "__main__":
    main()
