"""Held-out bits/dim of two or more models, paired per image: is one recipe's likelihood worse?

Each model's full variational bound (:func:`ddpm.likelihood.bits_per_dim`, T model calls per batch of
64) on the same held-out images (the test split of the first model's data, all of it unless
``--images``), one value per image with one seeded generator per model, by the code ``ddpm-pipe
evaluate --bound full`` runs (:func:`pipelines.registry.evaluate.held_out_bpd_values`). Every later
model is compared with the first per image: the mean difference and its standard error over the
images (the images' own spread cancels, so the paired difference is far finer than either mean's
error), and the smallest difference the comparison could call (two standard errors).

    python -m benchmarks.bench_bpd --models /work/bench-models/recipes/eps.pt /work/bench-models/recipes/edm.pt \
        [--images 360] [--json-out bench-results/bpd.json]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from benchmarks import common


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", required=True, help="checkpoint paths or model URIs; the first is the baseline")
    p.add_argument("--images", type=int, default=None, help="the first N held-out images (default: all)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json-out", default=os.path.join("bench-results", "bpd.json"))
    args = p.parse_args(argv)
    if len(args.models) < 2:
        p.error("--models needs two or more models: the first is compared with the others")

    from benchmarks.bench_samplers import load
    from pipelines.registry.evaluate import held_out_bpd_values, load_eval_data
    from pipelines.settings import resolve

    threads = common.set_threads(args.threads)
    settings = resolve()
    load_before, start = common.load(), time.perf_counter()
    rows: list[dict[str, Any]] = []
    ev, base = None, None
    for uri in args.models:
        loaded = load(uri)
        if ev is None:
            ev = load_eval_data(loaded.config, None, settings)
        t0 = time.perf_counter()
        values = held_out_bpd_values(loaded, ev, args.images or len(ev.test))[0].double()
        n = len(values)
        row = {"model": uri, "prediction": loaded.config.diffusion.prediction, "images": n,
               "bpd": round(values.mean().item(), 4), "se": round((values.std() / n ** 0.5).item(), 4),
               "seconds": round(time.perf_counter() - t0, 1)}
        if base is None:
            base = values
        else:
            d = values - base
            se = (d.std() / n ** 0.5).item()
            row["vs_first"] = {"diff": round(d.mean().item(), 4), "se": round(se, 4),
                               "z": round(d.mean().item() / se, 2) if se > 0 else None, "mdd": round(2 * se, 4)}
        print(f"[bench_bpd] {uri}: {row['bpd']} ± {row['se']} bits/dim on {n} held-out images"
              + (f"; minus the first: {row['vs_first']['diff']} ± {row['vs_first']['se']}" if "vs_first" in row else ""),
              flush=True)
        rows.append(row)
    result = {"benchmark": "bpd", "machine": common.machine(threads), "load_before": load_before,
              "load_after": common.load(), "wall_s": round(time.perf_counter() - start, 1),
              "compared": "full bound per held-out image; later models minus the first, paired per image",
              "rows": rows}
    common.write_json(result, args.json_out)
    print(f"[bench_bpd] wrote {args.json_out}")
    return result


if __name__ == "__main__":
    main()
