"""The ``ddpm-pipe`` entry point: says which extra to install when the pipeline's libraries are missing.

``pip install ddpm-pipe`` gives the library (``ddpm``) alone; the command line needs
``pip install "ddpm-pipe[pipeline]"`` (Typer, Ray, MLflow, pyarrow, s3fs, optuna).
"""

from __future__ import annotations

import gc
import importlib.util
import sys

PIPELINE_MODULES = ("typer", "ray", "mlflow", "pyarrow", "s3fs")


def missing() -> list[str]:
    return [m for m in PIPELINE_MODULES if importlib.util.find_spec(m) is None]


def main() -> None:
    absent = missing()
    if absent:
        print(f"ddpm-pipe: the command line needs the pipeline extra (missing: {', '.join(absent)}); "
              "install it with: pip install 'ddpm-pipe[pipeline]'", file=sys.stderr)
        raise SystemExit(2)
    from pipelines.cli import main as cli_main

    try:
        cli_main()
    finally:
        # The command is done and has closed its files. The interpreter's last garbage collection
        # would now traverse every object torch's import made (about 0.3 s of a 3 s `sample`);
        # frozen objects are skipped by it. Modules are still torn down and atexit handlers run.
        gc.freeze()
