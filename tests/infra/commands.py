"""Find `ddpm-pipe ...` command lines in manifests and docs, and check them against the live CLI.

The vocabulary is read from the Typer app itself (``typer.main.get_command``), so a renamed
command or option makes every manifest that still uses the old name fail. Typer ships its own copy
of click, so commands and parameters are read by their attributes, not by click's classes.
"""

from __future__ import annotations

import re
import shlex
from functools import lru_cache
from typing import Any, Iterator

PROGRAM = "ddpm-pipe"
SHELL_SEPARATORS = {"&&", "||", ";", "|"}


@lru_cache(maxsize=1)
def cli() -> Any:
    import typer

    from pipelines.cli import app

    return typer.main.get_command(app)


def check(argv: list[str]) -> list[str]:
    """Problems with ``ddpm-pipe *argv``: unknown command/option, stray argument, missing required."""
    group = cli()
    path = [PROGRAM]
    args = list(argv)
    while hasattr(group, "commands"):  # a group: its flags (--debug), then a command's name
        while args and args[0].startswith("-"):
            if args[0] == "--help":
                return []
            if args[0].split("=", 1)[0] not in _opts(group):
                return [f"{' '.join(path)}: unknown option {args[0]}"]
            args.pop(0)
        if not args:
            return [f"{' '.join(path)}: no command"]
        name = args.pop(0)
        sub = group.commands.get(name)
        if sub is None:
            return [f"{' '.join(path)}: unknown command {name!r} (known: {sorted(group.commands)})"]
        group, path = sub, path + [name]
    return _check_options(group, " ".join(path), args)


HELP = object()  # click adds --help to every command; it is not in .params


def _opts(command: Any) -> dict[str, Any]:
    found: dict[str, Any] = {"--help": HELP}
    for param in command.params:
        for opt in [*param.opts, *getattr(param, "secondary_opts", [])]:
            found[opt] = param
    return found


def _check_options(command: Any, where: str, args: list[str]) -> list[str]:
    opts, seen, problems = _opts(command), set(), []
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("-"):
            problems.append(f"{where}: unexpected argument {token!r}")
            i += 1
            continue
        name, has_value = token.split("=", 1)[0], "=" in token
        param = opts.get(name)
        if param is None:
            problems.append(f"{where}: unknown option {name} (known: {sorted(o for o in opts if o.startswith('--'))})")
            i += 1
            continue
        if param is HELP:
            return problems
        seen.add(param.name)
        takes_value = getattr(param, "param_type_name", "") == "option" and not param.is_flag
        if takes_value and not has_value:
            if i + 1 >= len(args):
                problems.append(f"{where}: {name} needs a value")
            i += 1
        i += 1
    for param in command.params:
        if param.required and param.name not in seen:
            problems.append(f"{where}: missing required {param.opts[0]}")
    return problems


IMAGE_REF = re.compile(rf"^([\w.:-]+/)*{PROGRAM}:[\w.-]+$")  # [registry/...]ddpm-pipe:TAG


def split_line(text: str) -> Iterator[list[str]]:
    """Every ``ddpm-pipe ARGS`` in a shell line, ARGS up to the next ``&&``, ``;`` or ``|``.

    ``docker run [OPTS] IMAGE ARGS`` counts too: the image's entrypoint is ``ddpm-pipe``. Quoted
    scripts (``sh -c '...'``) are searched as well.
    """
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    tokens = list(lexer)
    docker_run = tokens[:2] == ["docker", "run"]
    for i, token in enumerate(tokens):
        if re.search(rf"(^|\s){PROGRAM}\s", token):  # a quoted script: sh -c 'ddpm-pipe ...'
            yield from split_line(token)
        elif token == PROGRAM or (docker_run and IMAGE_REF.match(token)):
            args = []
            for t in tokens[i + 1:]:
                if t in SHELL_SEPARATORS:
                    break
                args.append(t)
            if args or token == PROGRAM:  # a bare `docker run IMAGE` runs the image's CMD
                yield args


def in_yaml(node: Any) -> Iterator[list[str]]:
    """Command lines in a parsed YAML document: in strings, and in exec-form lists (``[ddpm-pipe, ...]``)."""
    if isinstance(node, dict):
        for value in node.values():
            yield from in_yaml(value)
    elif isinstance(node, list):
        if node and all(isinstance(x, str) for x in node) and PROGRAM in node:
            yield node[node.index(PROGRAM) + 1:]
        else:
            for value in node:
                yield from in_yaml(value)
    elif isinstance(node, str) and re.search(rf"(^|\s){PROGRAM}\s", node):
        yield from split_line(node)


def in_markdown(text: str) -> Iterator[list[str]]:
    """Command lines in the fenced code blocks of a Markdown file (backslash continuations joined)."""
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0]
            if re.search(rf"(^|[\s/'\"]){PROGRAM}[\s:]", line + " "):
                yield from split_line(line)
