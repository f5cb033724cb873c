"""The ``ddpm-pipe`` entry point: says which extra to install when the pipeline's libraries are missing.

``pip install ddpm-pipe`` gives the library (``ddpm``) alone; the command line needs
``pip install "ddpm-pipe[pipeline]"`` (Typer, Ray, MLflow, pyarrow, s3fs, optuna).
"""

from __future__ import annotations

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

    cli_main()
