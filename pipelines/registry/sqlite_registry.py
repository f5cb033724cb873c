"""Read one registered version from a local sqlite registry without importing MLflow.

Importing MLflow and opening its SQLAlchemy store costs about 2 s on 2 cores: more than sampling 500
digits from a 4-step student (issue 28's 3-s target for ``sample --num 500``). A registered version
whose files are already in the local cache (:func:`pipelines.registry.models.weights_folder`) needs
from the registry only what the version is: its run, its source and its tags. For the embedded
default's registry (``sqlite:///...``) this module reads those from the database file with the
standard library's ``sqlite3``, read-only, with the conditions MLflow's own store applies
(``mlflow.store.model_registry.sqlalchemy_store``: a deleted version is not there; the default
workspace); the files themselves are still checked against the digests written with them and the
version's ``ddpm.artifacts.sha256`` tag (:func:`pipelines.registry.models._intact`).

:func:`find_version` answers only what it can answer exactly as MLflow would: ``models:/NAME/VERSION``
and ``models:/NAME@ALIAS`` on a ``sqlite:///`` registry, with MLflow's workspaces off. Anything else
(another store, ``latest``, a stage, a version that is not there, a database it cannot read) gives
None, and the caller asks MLflow, whose answer (and error message) is the reference.
"""

from __future__ import annotations

import os
import re
import sqlite3
from dataclasses import dataclass, field
from urllib.parse import unquote

DELETED = "Deleted_Internal"  # mlflow.entities.model_registry.model_version_stages.STAGE_DELETED_INTERNAL
DEFAULT_WORKSPACE = "default"  # mlflow.utils.workspace_utils.DEFAULT_WORKSPACE_NAME
_VERSION = re.compile(r"models:/([^/@]+)/([1-9][0-9]*)/?")
_ALIAS = re.compile(r"models:/([^/@]+)@([^/@]+)/?")


@dataclass(frozen=True)
class VersionRecord:
    """The fields of ``mlflow.entities.model_registry.ModelVersion`` that loading a model reads."""

    name: str
    version: str
    run_id: str | None
    source: str | None
    tags: dict[str, str] = field(default_factory=dict)
    model_id: str | None = None  # the sqlite store leaves it empty too (models.model_id_of reads source)


def database_path(registry_uri: str) -> str | None:
    """The file of a ``sqlite:///PATH`` registry URI (``sqlite:////abs`` is absolute); None for any
    other store or a URI with query parameters."""
    if not registry_uri.startswith("sqlite:///") or "?" in registry_uri:
        return None
    path = unquote(registry_uri[len("sqlite:///"):])
    return path if path and path != ":memory:" else None


def find_version(registry_uri: str, uri: str) -> VersionRecord | None:
    """The version ``uri`` names in the registry at ``registry_uri``, or None when this module cannot
    answer as MLflow would (see the module docstring); never raises for a database it cannot read."""
    path = database_path(registry_uri)
    if path is None or os.environ.get("MLFLOW_ENABLE_WORKSPACES", "").strip().lower() in ("1", "true", "yes"):
        return None
    by_version, by_alias = _VERSION.fullmatch(uri), _ALIAS.fullmatch(uri)
    if by_alias and by_alias.group(2).lower() == "latest":  # MLflow's own meaning: the highest version
        return None
    if not (by_version or by_alias) or not os.path.isfile(path):
        return None
    try:
        with _connect(path) as db:
            return _read(db, by_version, by_alias)
    except (sqlite3.Error, ValueError):  # locked, not MLflow's schema, an older schema: MLflow decides
        return None


def _connect(path: str) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)


def _read(db: sqlite3.Connection, by_version: re.Match | None, by_alias: re.Match | None) -> VersionRecord | None:
    has_workspace = "workspace" in {row[1] for row in db.execute("PRAGMA table_info(model_versions)")}
    scope, scope_args = (" AND workspace = ?", (DEFAULT_WORKSPACE,)) if has_workspace else ("", ())
    if by_alias:
        name, alias = by_alias.groups()
        found = db.execute(f"SELECT version FROM registered_model_aliases WHERE name = ? AND alias = ?{scope}",
                           (name, alias, *scope_args)).fetchone()
        if found is None:
            return None
        version = int(found[0])
    else:
        name, version = by_version.group(1), int(by_version.group(2))
    row = db.execute(f"SELECT name, version, run_id, source FROM model_versions WHERE name = ? AND version = ? "
                     f"AND current_stage != ?{scope}", (name, version, DELETED, *scope_args)).fetchone()
    if row is None:
        return None
    tags = dict(db.execute(f"SELECT key, value FROM model_version_tags WHERE name = ? AND version = ?{scope}",
                           (name, version, *scope_args)).fetchall())
    return VersionRecord(name=row[0], version=str(row[1]), run_id=row[2], source=row[3], tags=tags)
