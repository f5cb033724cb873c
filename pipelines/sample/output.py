"""`ddpm-pipe sample`'s output folder: what it holds and whether it is ours (resume), the file formats
(png, npz, webdataset chunks; layout in ``pipelines/sample/command.py``) and the manifest written last.
"""

from __future__ import annotations

import io
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import ddpm
from ddpm.data.shards import build_tar
from ddpm.data.storage import atomic_write, is_local, open_fs, storage_options_for
from ddpm.image import grid, png_bytes, to_uint8
from pipelines.errors import RefusedError, UsageError, first_line
from pipelines.sample.request import labels_of
from pipelines.storage.lock import FolderLock
from pipelines.storage.outputs import (TEMP, listing, missing_folders, refuse_foreign,
                                       remove_if_empty)

MANIFEST = "manifest.json"
JOB_FILE = ".ddpm-sample.json"
_PNG = re.compile(r"^(\d{8})(?:-class(\d+))?\.png$")  # -class<c>: the class a conditional sample asked for
_STRIP = re.compile(r"^(\d{8})-progressive\.png$")
_CHUNK = re.compile(r"^samples-(\d{8})-(\d{8})\.(npz|tar)$")
_PROBE = re.compile(r"^\.ddpm-probe-[0-9a-f]{8}$")  # OutputFolder.check_writable's probe
_CHUNK_EXT = {"npz": "npz", "webdataset": "tar"}  # the chunked formats of FORMATS (the other: png)


class OutputFolder:
    """The output URL: what it holds, whether it is ours, and atomic writes into it."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/") or url
        try:
            self.fs, self.root = open_fs(self.url, storage_options_for(self.url))
        except Exception as e:
            raise UsageError(f"output {url!r} cannot be opened: {first_line(e)}") from e

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def names(self) -> list[str]:
        return listing(self.fs, self.root, self.url)

    def check_writable(self) -> None:
        """Write and delete a probe object, so a bad URL fails before any sampling; a local folder
        made for the probe is removed again (nothing is left until the job has checked everything)."""
        probe = self.path(f".ddpm-probe-{uuid.uuid4().hex[:8]}")
        made = missing_folders(self.root) if is_local(self.fs) else []
        try:
            if is_local(self.fs):
                self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"")
            self.fs.rm(probe)
        except Exception as e:
            raise UsageError(f"output {self.url!r} is not writable: {first_line(e)}") from e
        finally:
            remove_if_empty(made)

    def lock(self) -> FolderLock:
        """The folder's one-writer lock (``with folder.lock():``; :class:`pipelines.storage.lock.FolderLock`)."""
        return FolderLock(self.fs, self.root, self.url, "sample")

    def read_json(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.fs.cat_file(self.path(name)))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RefusedError(f"{self.url}/{name} is not a sampling record; refusing to write there") from None

    def write(self, name: str, data: bytes) -> None:
        atomic_write(self.fs, self.path(name), data)

    def remove(self, name: str) -> None:
        self.fs.rm(self.path(name))


@dataclass
class FolderState:
    done: set[int]
    record: dict[str, Any] | None  # the job file, else the manifest
    manifest: dict[str, Any] | None
    temporaries: list[str] = field(default_factory=list)  # ours, half-written (atomic_write's)


def _is_ours(name: str) -> bool:
    return bool(name in (MANIFEST, JOB_FILE) or _PROBE.match(name) or _PNG.match(name) or _STRIP.match(name)
                or _CHUNK.match(name))


def inspect_folder(folder: OutputFolder, fmt: str) -> FolderState:
    """Indices present, and the settings record; refuse a folder holding anything that is not ours.

    Reads only: ownership is decided before anything is touched (``pipelines.storage.outputs``); the caller
    removes dead jobs' temporaries once it holds the folder's lock.
    """
    names = folder.names()
    temporaries = refuse_foreign(folder.url, names, _is_ours, "samples of this tool")
    done: set[int] = set()
    ours = 0
    for name in names:
        if name in (MANIFEST, JOB_FILE) or TEMP.match(name) or _PROBE.match(name):
            continue
        if m := _PNG.match(name):
            ours += 1
            if fmt == "png":
                done.add(int(m.group(1)))
        elif _STRIP.match(name):
            ours += 1
        elif m := _CHUNK.match(name):
            ours += 1
            if fmt != "png" and m.group(3) == _CHUNK_EXT[fmt]:
                done.update(range(int(m.group(1)), int(m.group(2))))
    manifest = folder.read_json(MANIFEST)
    job = folder.read_json(JOB_FILE)
    record = job if job is not None else manifest
    if ours and record is None:
        raise RefusedError(f"output {folder.url!r} holds samples with no record of their settings "
                           f"({JOB_FILE} or {MANIFEST}); choose an empty or new folder")
    return FolderState(done=done, record=record, manifest=manifest, temporaries=temporaries)


def check_same(folder: OutputFolder, record: dict[str, Any] | None, wanted: dict[str, Any]) -> None:
    if record is None:
        return
    diff = [f"{k}={record.get(k)!r} (asked {wanted[k]!r})" for k in wanted if record.get(k) != wanted[k]]
    if diff:
        raise RefusedError(f"output {folder.url!r} holds samples made with other settings: {'; '.join(diff)}. "
                           "Use another --out, or the same settings to resume")


def sample_png(x: np.ndarray, levels: int) -> bytes:
    """One image ``[C x H x W]`` in [-1, 1] -> PNG bytes (quantised to the data's levels, 0..255): the
    bytes of a ``sample --format png`` file, and of each image ``serve`` returns."""
    return png_bytes(_uint8(x[None], levels)[0])


def _strip_png(preds: np.ndarray, levels: int) -> bytes:
    """The K predictions ``[K x C x H x W]`` of one sample as a row (the paper's figure 6)."""
    return png_bytes(grid(torch.tensor(preds), levels=levels, nrow=len(preds), pad=1))


def _uint8(x: np.ndarray, levels: int) -> np.ndarray:
    """``[N x C x H x W]`` in [-1, 1] -> uint8 ``[N x H x W x C]`` (:func:`ddpm.image.to_uint8`)."""
    return to_uint8(torch.tensor(x), levels)


def png_name(i: int, label: int | None = None) -> str:
    """Sample i's PNG: ``{i:08d}.png``, or ``{i:08d}-class{c}.png`` when it asked for class c."""
    return f"{i:08d}.png" if label is None else f"{i:08d}-class{label}.png"


def write_unit(folder: OutputFolder, fmt: str, result: dict[str, Any], levels: int) -> list[str]:
    """Write one unit's samples atomically; return the file names written. A class-conditional
    unit's ``labels`` (the class each sample asked for) go beside them: in the PNG names, as the
    npz key ``labels``, as each tar sample's ``.cls`` (as the training shards store labels)."""
    indices, x, preds = result["indices"], result["x"], result["progressive"]
    labels = result.get("labels")
    images = _uint8(x, levels)  # the unit at once (every format): the bytes of sample_png, image by image
    if fmt == "png":
        names = []
        for k, i in enumerate(indices):
            if preds is not None:  # the strip first: the sample's PNG marks the index done
                folder.write(f"{i:08d}-progressive.png", _strip_png(preds[k], levels))
            names.append(png_name(i, None if labels is None else labels[k]))
            folder.write(names[-1], png_bytes(images[k]))
        return names
    name = f"samples-{indices[0]:08d}-{indices[-1] + 1:08d}.{_CHUNK_EXT[fmt]}"
    if fmt == "npz":
        arrays = {"indices": np.asarray(indices, dtype=np.int64), "x": x.astype(np.float32),
                  "images": images}
        if labels is not None:
            arrays["labels"] = np.asarray(labels, dtype=np.int64)
        if preds is not None:
            n, k = preds.shape[:2]
            arrays["progressive"] = _uint8(preds.reshape(n * k, *preds.shape[2:]), levels).reshape(
                n, k, *preds.shape[3:], preds.shape[2])
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        folder.write(name, buf.getvalue())
    else:
        members = []
        for k, i in enumerate(indices):
            members.append((f"{i:08d}.png", png_bytes(images[k])))
            if labels is not None:
                members.append((f"{i:08d}.cls", str(int(labels[k])).encode()))
            if preds is not None:
                members.append((f"{i:08d}.progressive.png", _strip_png(preds[k], levels)))
        folder.write(name, build_tar(members))
    return [name]


def write_manifest(folder: OutputFolder, record: dict[str, Any], timings: dict[str, Any]) -> dict[str, Any]:
    """The folder's ``manifest.json``: ``record`` (the job's settings and ``count``), the timings, the
    file names, and with classes asked the class of every sample (``labels``, index order)."""
    fmt = record["format"]
    classes = tuple(record.get("classes") or ())
    png = "{i:08d}-class{label}.png" if classes else "{i:08d}.png"
    manifest = {**record, "ddpm_version": ddpm.__version__, "timings": timings,
                "files": (png if fmt == "png" else f"samples-{{start:08d}}-{{end:08d}}.{_CHUNK_EXT[fmt]}"),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if classes:
        manifest["labels"] = labels_of(list(range(record["count"])), classes)
    folder.write(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
    return manifest


__all__ = ["JOB_FILE", "MANIFEST", "FolderState", "OutputFolder", "check_same", "inspect_folder", "png_name",
           "sample_png", "write_manifest", "write_unit"]
