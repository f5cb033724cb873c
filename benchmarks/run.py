"""`make bench`: run the benchmark suite, write JSON to bench-results/ and print a markdown table.

    python -m benchmarks.run [--quick] [--only train,forward,digits,ray,allreduce,data] [--out bench-results]
    python -m benchmarks.run --table-only      # re-print the table from the JSON already written

Every ratio comes from one process alternating the models it compares; each JSON file records the
thread count and load averages. ``--quick`` runs tiny models in seconds (the smoke test uses it);
its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

BENCHES = ("train", "forward", "digits", "ray", "allreduce", "data")


def _runners(quick: bool, threads: int | None) -> dict[str, Callable[[str], Any]]:
    q = ["--quick"] if quick else []
    t = ["--threads", str(threads)] if threads else []

    def train(path):
        from benchmarks import bench_train
        return bench_train.main(q + t + ["--json-out", path])

    def forward(path):
        from benchmarks import bench_forward
        return bench_forward.main(q + t + ([] if quick else ["--ddim-steps", "50"]) + ["--json-out", path])

    def digits(path):
        from benchmarks import bench_digits
        return bench_digits.main(q + t + ["--time-to-quality", "--json-out", path])

    def ray(path):
        from benchmarks import bench_ray
        return bench_ray.main(q + t + ([] if quick else ["--steps", "200", "--repeats", "3"]) + ["--json-out", path])

    def allreduce(path):
        from benchmarks import bench_allreduce
        return bench_allreduce.main(q + ["--json-out", path])

    def data(path):
        from benchmarks import bench_data
        extra = ["--datasets", "digits", "--no-s3", "--epochs", "1"] if quick else ["--cifar-samples", "2000"]
        return bench_data.main(extra + ["--json-out", path])

    return {"train": train, "forward": forward, "digits": digits, "ray": ray, "allreduce": allreduce, "data": data}


def _load(out: str, name: str) -> dict | None:
    path = os.path.join(out, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def table(out: str) -> str:
    """The README/PERFORMANCE table from the JSON files in ``out`` (missing benches are left out)."""
    rows = ["| Benchmark | Ours | diffusers / reference | Ratio | Target | Load avg (1 min) |",
            "|---|---|---|---|---|---|"]
    tr = _load(out, "train")
    if tr:
        for r in tr["results"]:
            target = "≥ 1.05" if r["precision"] == "fp32" else "≥ 1.4"
            best = max((k for k in r if k.startswith("ours")), key=lambda k: r[k]["images_per_s"])
            ratio = r.get("ratio" if best == "ours" else f"ratio_{best.removeprefix('ours_')}", "-")
            peak = tr["matmul_peak"][r["precision"]]["median_gflops"]
            rows.append(f"| train step {r['precision']}, batch {r['batch']} (img/s; {best}) | "
                        f"{r[best]['images_per_s']} ({r[best]['gflops']} GFLOP/s = "
                        f"{100 * r[best]['share_of_matmul_peak']:.0f}% of {peak} matmul) | "
                        f"{r.get('diffusers', {}).get('images_per_s', '-')} | {ratio} | {target} | {r['load'][0]} |")
    fw = _load(out, "forward")
    if fw:
        for r in fw["results"]:
            target = "≥ 1.05" if r["precision"] == "fp32" else "≥ 1.4"
            best = max((k for k in r if k.startswith("ours")), key=lambda k: r[k]["evals_per_s"])
            ratio = r.get("ratio" if best == "ours" else f"ratio_{best.removeprefix('ours_')}", "-")
            share = (f" ({r[best]['gflops']} GFLOP/s = {100 * r[best]['share_of_matmul_peak']:.0f}% of "
                     f"{fw['matmul_peak'][r['precision']]['median_gflops']} matmul)" if "gflops" in r[best] else "")
            rows.append(f"| forward {r['precision']}, batch {r['batch']} (img/s; {best}) | {r[best]['evals_per_s']}{share} | "
                        f"{r.get('diffusers', {}).get('evals_per_s', '-')} | {ratio} | {target} | {r['load'][0]} |")
        if "ddim" in fw:
            d = fw["ddim"]
            rows.append(f"| DDIM {d['steps']} steps, {d['num']} images (s) | {d['ours_s']} | {d.get('diffusers_s', '-')} | "
                        f"{d.get('ratio', '-')} | ≥ 1 | {d['load'][0]} |")
    dg = _load(out, "digits")
    if dg:
        by = {r["precision"]: r for r in dg["runs"] if r["seed"] == 0}
        rel = dg["bf16_over_fp32"]
        rows.append(f"| digits {dg['steps']} steps bf16 vs fp32: loss; pixel Frechet (lower better); img/s | "
                    f"{by['bf16']['loss']}; {by['bf16']['pixel_frechet']}; {by['bf16']['images_per_s']} | "
                    f"{by['fp32']['loss']}; {by['fp32']['pixel_frechet']}; {by['fp32']['images_per_s']} | "
                    f"{rel['loss']}; {rel['pixel_frechet']}; {rel['images_per_s']} | loss, quality ≈ 1 | "
                    f"{by['bf16']['load'][0]} |")
        for q in dg.get("time_to_quality", []):
            got = (f"{q['seconds_to_floor']} s (step {q['reached_at_step']})" if q["seconds_to_floor"] is not None
                   else f"not reached in {q['checks'][-1]['step']} steps")
            rows.append(f"| digits {q['precision']}: training time until feature FD of {q['samples']} samples "
                        f"reaches the real floor ({q['floor_fd']}) | {got} | - | - | - | - |")
    ry = _load(out, "ray")
    if ry:
        rows.append(f"| digits training, 1-worker Ray Train vs plain (img/s) | {ry['ray']['images_per_s']} | "
                    f"{ry['plain']['images_per_s']} | {ry['ratio']} (end to end {ry['ratio_end_to_end']}) | ≥ 0.9 | "
                    f"{ry['machine']['loadavg'][0]} |")
    da = _load(out, "data")
    if da:
        digits_ips = (ry["plain"]["images_per_s"] if ry else
                      dg and max(r["images_per_s"] for r in dg["runs"]))  # the faster: the harder to feed
        consumption = {"digits": digits_ips,
                       "cifar": tr and tr["results"][0]["ours"]["images_per_s"]}
        for r in da["results"]:
            need = consumption.get(r["dataset"])
            ratio = round(r["samples_per_s_per_core"] / need, 1) if need else "-"
            rows.append(f"| decode {r['dataset']} {r['storage']} (samples/s per core) vs training consumption | "
                        f"{r['samples_per_s_per_core']} | {need or '-'} | {ratio} | ≥ 5 | - |")
    ar = _load(out, "allreduce")
    if ar:
        for r in ar["results"]:
            if r["workers"] > 1:
                rows.append(f"| gloo all-reduce {ar['mib']} MiB, {r['workers']} workers (s; bus GB/s) | "
                            f"{r['median_s']} ({r['bus_gb_per_s']}) | - | - | - | {r['load'][0]} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models, seconds: a smoke test")
    p.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {', '.join(BENCHES)}")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="bench-results", help="folder for the JSON files")
    p.add_argument("--table-only", action="store_true", help="print the table from existing JSON")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(BENCHES))
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; valid: {', '.join(BENCHES)}")
    if not args.table_only:
        runners = _runners(args.quick, args.threads)
        for name in names:
            print(f"[bench] {name}", file=sys.stderr, flush=True)
            runners[name](os.path.join(args.out, f"{name}.json"))
    text = table(args.out)
    print(text)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
