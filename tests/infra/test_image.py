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


def _stages() -> dict[str, list[tuple[str, str]]]:
    """The instructions of each ``FROM ... AS name`` stage ("" for the global ARGs before the first)."""
    stages: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for word, rest in _instructions():
        if word == "FROM":
            current = rest.split(" AS ")[-1] if " AS " in rest else rest
            stages[current] = []
        stages[current].append((word, rest))
    return stages


@pytest.mark.timeout(60)
def test_dockerfile_starts_from_slim_python_3_11_pinned_by_digest():
    image = _args("ARG")["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11-slim@sha256:[0-9a-f]{64}", image), image
    froms = [rest for word, rest in _instructions() if word == "FROM"]
    assert froms[0] == "${PYTHON_IMAGE} AS base"


@pytest.mark.timeout(60)
def test_dockerfile_has_cpu_and_cuda_torch_targets():
    stages = _stages()
    assert ("ENV", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") in stages["torch-cpu"]
    assert ("ENV", "TORCH_INDEX_URL=") in stages["torch-cuda"]  # PyPI's Linux torch is the CUDA build
    assert _args("ARG")["TORCH"] == "cpu", "CPU torch by default"
    assert stages["image"][0] == ("FROM", "torch-${TORCH} AS image")
    assert "TORCH_INDEX_URL" in (ROOT / "scripts/install.sh").read_text()


@pytest.mark.timeout(60)
def test_dockerfile_installs_dependencies_before_the_source_with_install_sh():
    steps = _stages()["image"]
    runs = [i for i, (word, rest) in enumerate(steps) if word == "RUN" and "scripts/install.sh" in rest]
    assert len(runs) == 2, "one RUN for the dependencies, one for the project"
    copy_all = steps.index(("COPY", ". /opt/ddpm-pipe"))
    deps, project = (shlex.split(steps[i][1]) for i in runs)
    assert runs[0] < copy_all < runs[1], "dependencies first: a source edit does not reinstall torch"
    assert "DEPS_ONLY=1" in deps and "DEPS_ONLY=1" not in project
    for call in (deps, project):
        at = call.index("scripts/install.sh")
        assert call[at + 1:] == ["/usr/local/bin/python", "pipeline,server"], "the CLI and MLflow's Postgres driver"
        assert "TORCH_SPEC=${TORCH_SPEC}" in call[:at] and "CONSTRAINTS=constraints.txt" in call[:at]
    copied = [rest for word, rest in steps[:runs[0]] if word == "COPY"]
    assert all(". " not in f" {c} " for c in copied), copied  # only what the dependencies are read from
    assert set(" ".join(copied).split()[:-1]) >= {"pyproject.toml", "constraints.txt", "scripts/install.sh"}
    default = re.search(r"TORCH_SPEC=\$\{TORCH_SPEC:-([^}]+)\}", (ROOT / "scripts/install.sh").read_text())
    assert _args("ARG")["TORCH_SPEC"] == default.group(1), "the image's torch pin must match install.sh's"
    assert "scripts/install.sh" in (ROOT / "Makefile").read_text(), "make setup uses the same script"


@pytest.mark.timeout(60)
def test_dockerfile_leaves_no_package_manager_cache():
    env = _args("ENV")
    assert env["PIP_NO_CACHE_DIR"] == "1" and env["UV_NO_CACHE"] == "1"
    apt = [rest for word, rest in _instructions() if word == "RUN" and "apt-get install" in rest]
    assert apt and all("rm -rf /var/lib/apt/lists/*" in rest for rest in apt)
    assert env["DDPM_GIT_COMMIT"] == "${GIT_COMMIT}", "runs in the image record the commit it was built from"


@pytest.mark.timeout(60)
def test_entrypoint_comment_names_where_the_image_installs():
    text = (ROOT / "scripts/entrypoint.sh").read_text()
    assert "/opt/venv" not in text and "/usr/local/bin" in text


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
              "pipelines/cli.py", "README.md", "LICENSE", "constraints.txt"]
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
