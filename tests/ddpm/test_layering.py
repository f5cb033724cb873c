"""The library's shape: ddpm/ imports no Ray, MLflow, Typer or pipelines, and its modules form no import cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "ddpm"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module this file imports, at the top or inside a function (both make a cycle)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: {d for d in _imports(p) if d in files and d != m} for m, p in files.items()}


def test_no_import_cycle_inside_ddpm():
    graph = _graph()
    assert "ddpm.diffusion" in graph and "ddpm.samplers" in graph["ddpm.pipeline"]
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if d == "ddpm":  # the package's lazy __init__ re-exports; importing it is not a cycle
                continue
            assert state.get(d) != 1, f"import cycle: {' -> '.join(stack[stack.index(d):] + [d])}"
            if d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_cycle_check_finds_a_cycle(monkeypatch):
    """The check above can fail: a planted diffusion -> samplers import closes a cycle."""
    graph = _graph()
    graph["ddpm.diffusion"] = graph["ddpm.diffusion"] | {"ddpm.samplers"}
    monkeypatch.setattr(sys.modules[__name__], "_graph", lambda: graph)
    try:
        test_no_import_cycle_inside_ddpm()
    except AssertionError as e:
        assert "ddpm.diffusion" in str(e) and "ddpm.samplers" in str(e)
    else:
        raise AssertionError("a planted cycle went unnoticed")


def test_ddpm_imports_no_ray_mlflow_typer_or_pipelines():
    forbidden = ("ray", "mlflow", "typer", "pipelines")
    for path in PACKAGE.rglob("*.py"):
        bad = {n for n in _imports(path) if n.split(".")[0] in forbidden}
        assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {sorted(bad)}"
    # And importing every module really loads none of them.
    code = ("import sys, importlib, pkgutil, ddpm\n"
            "for m in pkgutil.walk_packages(ddpm.__path__, 'ddpm.'): importlib.import_module(m.name)\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {forbidden!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_every_lazy_export_of_ddpm_data_resolves():
    import ddpm.data

    for name in ddpm.data.__all__:
        assert getattr(ddpm.data, name) is not None, name
