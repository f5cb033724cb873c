"""What a registered version's artifacts were when it was registered: the sha256 of every file.

MLflow's own ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` import and run the model's code
(``mlflow_model.py``, ``code/``) from the artifact store, unverified: whoever can write the store
can run code wherever the model is loaded that way. So at registration
(:func:`pipelines.registry.register.record_digests`) every file of the version's artifacts is hashed
into a listing, one ``<sha256>  <relative/path>`` line per file in path order (``sha256sum``'s
format: ``sha256sum -c`` checks a downloaded copy), stored as an artifact of the version's run under
:data:`LISTING_FOLDER`; the version's tags, which live in the registry's database and not in the
artifact store, hold the listing's own digest (:data:`SHA256_TAG`) and its path (:data:`LISTING_TAG`).
Every project path that loads a registered version reads its weights and config through
:func:`pipelines.registry.models.weights_folder`, which checks them with :func:`check` before use.
"""

from __future__ import annotations

import hashlib
import os

from pipelines.errors import UsageError

SHA256_TAG = "ddpm.artifacts.sha256"  # version tag: sha256 of the listing (its text, UTF-8)
LISTING_TAG = "ddpm.artifacts.listing"  # version tag: the listing's artifact path in the version's run
LISTING_FOLDER = "registry"  # the run's artifacts: registry/<name>-v<version>.sha256


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def listing(folder: str) -> str:
    """Every file under ``folder``: ``<sha256>  <path relative to folder>`` lines, sorted by path."""
    paths = sorted(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
                   for root, _dirs, files in os.walk(folder) for name in files)
    return "".join(f"{file_sha256(os.path.join(folder, p))}  {p}\n" for p in paths)


def parse(text: str) -> dict[str, str]:
    """``{relative path: sha256}`` of a :func:`listing`."""
    return {path: digest for digest, _, path in (line.partition("  ") for line in text.splitlines() if line)}


def check(files: dict[str, str], recorded: dict[str, str], model_uri: str) -> None:
    """Refuse unless every one of ``files`` (``{path relative to the model: local file}``) has the
    digest ``recorded`` at registration.

    :raises UsageError: (exit 2) naming the first file that differs or was not there.
    """
    for rel, local in sorted(files.items()):
        if rel not in recorded:
            raise UsageError(f"refused to load {model_uri}: its file {rel} was not among the files recorded at "
                             "registration: the artifact store was changed after registration. Register the model "
                             "again from a trusted checkpoint, and restrict who can write the artifact store")
        if file_sha256(local) != recorded[rel]:
            raise UsageError(f"refused to load {model_uri}: the sha256 of its file {rel} differs from the one "
                             "recorded at registration: the artifact store was changed after registration. "
                             "Register the model again from a trusted checkpoint, and restrict who can write the "
                             "artifact store")
