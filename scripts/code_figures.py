"""The figures of issue 24, measured from the source: how visible `pipelines/`'s dependencies are.

    python scripts/code_figures.py            # a table on stdout
    python scripts/code_figures.py --json     # the same as one JSON object

- imports inside functions in ``pipelines/`` (of the project's own modules, of the standard library,
  of third-party libraries) against imports at module level (statements, ``ast``);
- ``Any`` in annotations (parameters, returns, annotated assignments) in ``pipelines/``;
- functions over 80 lines (``def`` to its last line) in ``pipelines/`` and ``ddpm/``;
- import cycles among ``pipelines/`` modules (every import statement, in functions and under
  ``TYPE_CHECKING`` too: tests/pipelines/test_layering.py fails on one);
- README.md's size in characters and its longest line.

Standard library only, so it runs on any checkout, before or after a change.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OWN = ("ddpm", "pipelines")
LONG = 80


def _modules(package: str) -> dict[str, Path]:
    """``{dotted module name: path}`` of every ``.py`` file of ``package``."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _scoped(tree: ast.AST):
    """``(node, where)`` for every node of ``tree``; ``where``: "function", "type_checking" (an
    ``if TYPE_CHECKING:`` block at module level) or "module"."""
    stack = [(tree, "module")]
    while stack:
        node, where = stack.pop()
        yield node, where
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            where = "function"
        elif isinstance(node, ast.If) and where == "module" and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend((child, "type_checking") for child in node.body)
            stack.extend((child, where) for child in node.orelse)
            continue
        stack.extend((child, where) for child in ast.iter_child_nodes(node))


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool,
              packages: set[str] = frozenset()) -> list[str]:
    """The absolute names a statement imports (``from . import x`` resolved against ``module``);
    ``from P import x`` of a package ``P`` in ``packages`` names ``P.x`` (a submodule or a name in it)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
        base = ".".join([*anchor, base] if base else anchor)
    return [f"{base}.{a.name}" for a in node.names] if base in packages else [base]


def _kind(name: str) -> str:
    top = name.split(".")[0]
    if top in OWN:
        return "own"
    if top in sys.stdlib_module_names or top == "__future__":
        return "stdlib"
    return "third_party"


def imports(package: str = "pipelines") -> dict[str, int]:
    counts = {"in_functions": 0, "in_functions_own": 0, "in_functions_stdlib": 0, "in_functions_third_party": 0,
              "module_level": 0, "type_checking": 0}
    for module, path in _modules(package).items():
        for node, where in _scoped(ast.parse(path.read_text())):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if where != "function":
                counts["module_level" if where == "module" else "type_checking"] += 1
                continue
            counts["in_functions"] += 1
            counts[f"in_functions_{_kind(_imported(node, module, path.name == '__init__.py')[0])}"] += 1
    return counts


def any_annotations(package: str = "pipelines") -> dict[str, int]:
    """Annotations that are ``Any`` itself (``bare``: a parameter, return or field whose type is not
    said) and all that mention it (``mentions``: ``dict[str, Any]`` for a JSON-like result too)."""
    count = {"bare": 0, "mentions": 0}
    for path in _modules(package).values():
        for node in ast.walk(ast.parse(path.read_text())):
            notes = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                notes = [a.annotation for a in (*args.posonlyargs, *args.args, *args.kwonlyargs,
                                                args.vararg, args.kwarg) if a is not None]
                notes.append(node.returns)
            elif isinstance(node, ast.AnnAssign):
                notes = [node.annotation]
            for note in notes:
                if note is None:
                    continue
                count["bare"] += ast.unparse(note) in ("Any", "'Any'")
                count["mentions"] += any(isinstance(n, ast.Name) and n.id == "Any" for n in ast.walk(note))
    return count


def long_functions(package: str, limit: int = LONG) -> list[tuple[str, int]]:
    found = []
    for module, path in _modules(package).items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append((f"{module}.{node.name}", lines))
    return sorted(found, key=lambda item: -item[1])


def import_graph(package: str = "pipelines") -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``, every import statement counted (in functions
    and under ``TYPE_CHECKING`` too). A package's ``__init__`` is left out: importing a package for a
    constant of its ``__init__`` is no cycle as long as that ``__init__`` imports nothing back."""
    modules = _modules(package)
    packages = {m for m, p in modules.items() if p.name == "__init__.py"}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in _imported(node, module, path.name == "__init__.py", packages):
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name and name != module and modules[name].name != "__init__.py":
                    graph[module].add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def readme() -> dict[str, int]:
    text = (ROOT / "README.md").read_text()
    return {"chars": len(text), "lines": text.count("\n"),
            "lines_over_500_chars": sum(len(line) > 500 for line in text.splitlines())}


def figures() -> dict:
    graph = import_graph()
    return {"pipelines_files": len(_modules("pipelines")), "imports": imports(), "any_annotations": any_annotations(),
            "functions_over_80_lines": {p: long_functions(p) for p in OWN}, "import_cycles": cycles(graph),
            "readme": readme()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    result = figures()
    if parser.parse_args().json:
        print(json.dumps(result))
        return
    i = result["imports"]
    print(f"pipelines/ files                 {result['pipelines_files']}")
    print(f"imports inside functions         {i['in_functions']} (own {i['in_functions_own']}, stdlib "
          f"{i['in_functions_stdlib']}, third-party {i['in_functions_third_party']})")
    print(f"imports at module level          {i['module_level']} (and {i['type_checking']} under TYPE_CHECKING)")
    a = result["any_annotations"]
    print(f"annotations that are Any         {a['bare']} ({a['mentions']} mention it, dict[str, Any] included)")
    for package, found in result["functions_over_80_lines"].items():
        listed = ", ".join(f"{name} {n}" for name, n in found) or "none"
        print(f"functions over {LONG} lines ({package + '/)':<10} {listed}")
    print(f"import cycles in pipelines/      {'; '.join(' <-> '.join(c) for c in result['import_cycles']) or 'none'}")
    r = result["readme"]
    print(f"README.md                        {r['chars']} characters, {r['lines']} lines, "
          f"{r['lines_over_500_chars']} over 500 characters")


if __name__ == "__main__":
    main()
