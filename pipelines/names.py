"""The one rule for names users give: runs, sweeps, workflows, experiments, registered models.

A name becomes a folder (``DDPM_HOME/workflows/<name>``, ``<storage>/<name>``), an MLflow tag and
search value, a Ray job id and a registered model name, so every command checks it here, first.
"""

from __future__ import annotations

from ddpm.config import NAME_PATTERN as PATTERN
from ddpm.config import NAME_RULE as ALLOWED  # the rule lives with ExperimentConfig, which checks its name
from pipelines.errors import UsageError


def check_name(value: str, option: str) -> str:
    """Return ``value`` if it is a valid name, else raise (exit 2) naming ``option`` and the rule.

    No ``/``, quote, space or leading ``.``: a name can neither leave its folder (``../x``) nor
    break an MLflow filter (``it's``).
    """
    if not isinstance(value, str) or not PATTERN.fullmatch(value):
        raise UsageError(f"{option} {value!r} is not a valid name: use {ALLOWED}")
    return value
