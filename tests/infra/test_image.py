"""The Dockerfile only copies the tree, runs scripts/install.sh and enters through
scripts/entrypoint.sh; CI runs both scripts, so the image cannot drift from what is tested.

No Docker engine runs in CI: the Dockerfile is parsed, and the entrypoint is run against the venv
that scripts/install.sh built (`make setup`), through the same scripts/smoke.sh a built image is
checked with (`scripts/smoke.sh docker run --rm ddpm-pipe:VERSION`).
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ["scripts/install.sh", "scripts/entrypoint.sh", "scripts/smoke.sh"]


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each Dockerfile line, continuations joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [l for l in text.splitlines() if not l.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def _args(name: str) -> dict[str, str]:
    found = {}
    for word, rest in _instructions():
        if word == name:
            for key, _, value in (t.partition("=") for t in shlex.split(rest)):
                found[key] = value
    return found


@pytest.mark.timeout(60)
def test_dockerfile_starts_from_slim_python_3_11():
    assert _instructions()[0] == ("FROM", "python:3.11-slim")


@pytest.mark.timeout(60)
def test_dockerfile_installs_with_install_sh_and_the_same_torch_default():
    runs = [rest for word, rest in _instructions() if word == "RUN" and "scripts/install.sh" in rest]
    assert len(runs) == 1, "exactly one RUN calls scripts/install.sh"
    call = shlex.split(runs[0])
    at = call.index("scripts/install.sh")
    assert call[at + 1:] == ["/usr/local/bin/python"], "no extras: the image gets the runtime dependencies"
    assert "TORCH_SPEC=${TORCH_SPEC}" in call[:at] and "PIP_EXTRA_INDEX_URL=${TORCH_INDEX_URL}" in call[:at]
    default = re.search(r"TORCH_SPEC=\$\{TORCH_SPEC:-([^}]+)\}", (ROOT / "scripts/install.sh").read_text())
    args = _args("ARG")
    assert args["TORCH_SPEC"] == default.group(1), "the image's torch pin must match install.sh's"
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu"), "CPU torch by default"
    assert "scripts/install.sh" in (ROOT / "Makefile").read_text(), "make setup uses the same script"
    assert ("COPY", ". /opt/ddpm-pipe") in _instructions()


@pytest.mark.timeout(60)
def test_dockerfile_runs_as_a_non_root_user_through_the_entrypoint_script():
    steps = _instructions()
    users = [rest for word, rest in steps if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    entry = [i for i, (word, _) in enumerate(steps) if word == "ENTRYPOINT"]
    assert len(entry) == 1 and steps[entry[0]][1] == '["/opt/ddpm-pipe/scripts/entrypoint.sh"]'
    last_user = max(i for i, (word, _) in enumerate(steps) if word == "USER")
    assert last_user < entry[0]
    env = _args("ENV")
    assert env["DDPM_HOME"].startswith(env["HOME"] + "/"), "DDPM_HOME lives under the user's home"


@pytest.mark.timeout(60)
def test_dockerignore_keeps_what_install_sh_needs():
    patterns = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
                if l.strip() and not l.startswith("#")]
    needed = ["pyproject.toml", "scripts/install.sh", "scripts/entrypoint.sh", "ddpm/__init__.py",
              "pipelines/cli.py", "README.md"]
    for path in needed:
        hits = [p for p in patterns if fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/")]
        assert not hits, f".dockerignore drops {path} ({hits})"
    assert ".venv" in patterns and ".git" in patterns


@pytest.mark.timeout(60)
@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_executable_bash(script):
    path = ROOT / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    subprocess.run(["bash", "-n", str(path)], check=True)


def _entry_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DDPM_HOME"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the venv's ddpm-pipe
    env["HOME"] = str(tmp_path)
    return env


@pytest.mark.timeout(60)
def test_entrypoint_passes_the_smoke_checks(tmp_path):
    done = subprocess.run(["scripts/smoke.sh", "scripts/entrypoint.sh"], cwd=ROOT, env=_entry_env(tmp_path),
                          capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stderr
    assert "smoke: ok" in done.stdout
    assert (tmp_path / ".ddpm").is_dir(), "DDPM_HOME defaults to ~/.ddpm"


@pytest.mark.timeout(60)
def test_entrypoint_passes_ddpm_pipes_exit_code(tmp_path):
    done = subprocess.run(["scripts/entrypoint.sh", "train", "--no-such-option"], cwd=ROOT,
                          env=_entry_env(tmp_path), capture_output=True, text=True, timeout=50)
    assert done.returncode == 2, done.stderr
