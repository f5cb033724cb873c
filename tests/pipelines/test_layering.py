"""The pipelines layer's shape: the command line loads no Ray, MLflow or torch until a command runs,
and pipelines/ has no import cycle (scripts/code_figures.py draws the graph; docs/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("ray", "mlflow", "torch")


def _figures():
    spec = importlib.util.spec_from_file_location("code_figures", ROOT / "scripts" / "code_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _loaded_after(code: str) -> list[str]:
    """The heavy libraries a fresh interpreter has loaded after running ``code``."""
    probe = f"{code}\nimport sys\nprint(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return eval(out.stdout.strip().splitlines()[-1])  # a list literal this probe printed


def test_importing_the_command_line_loads_no_ray_mlflow_or_torch():
    assert _loaded_after("import pipelines.cli") == []
    assert _loaded_after("import pipelines.entry") == []


def test_help_of_every_command_loads_no_ray_mlflow_or_torch():
    """``--help`` runs the root callback (the console mode) and parses the options: nothing heavy."""
    commands = ["", "train", "tune", "evaluate", "promote", "sample", "interpolate", "import-diffusers", "run",
                "data prepare", "config show", "distill", "serve"]
    code = ("import contextlib, io, sys\nfrom pipelines.cli import app\n"
            f"for cmd in {commands!r}:\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try:\n"
            "            app([*cmd.split(), '--help'], prog_name='ddpm-pipe')\n"
            "        except SystemExit as e:\n"
            "            assert e.code == 0, (cmd, e.code)")
    assert _loaded_after(code) == []
    assert _loaded_after("import pipelines.train.command") == ["mlflow", "ray", "torch"]  # the probe can see them


def test_no_import_cycle_inside_pipelines():
    figures = _figures()
    graph = figures.import_graph("pipelines")
    assert "pipelines.sample.pool" in graph["pipelines.sample.command"]  # the graph sees in-function imports too
    assert figures.cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    """The check above can fail: the pool importing the command again (as sample_pool did) is a cycle."""
    figures = _figures()
    graph = figures.import_graph("pipelines")
    graph["pipelines.sample.pool"] = graph["pipelines.sample.pool"] | {"pipelines.sample.command"}
    assert figures.cycles(graph) == [["pipelines.sample.command", "pipelines.sample.pool"]]


def test_package_inits_import_nothing_of_the_package():
    """The graph leaves each package's ``__init__`` out; that is sound while they import nothing back."""
    for init in (ROOT / "pipelines").rglob("__init__.py"):
        for node in ast.walk(ast.parse(init.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("pipelines") and not node.level, init
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("pipelines") for a in node.names), init
