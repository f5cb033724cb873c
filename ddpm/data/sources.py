"""Data sources: each yields ``Sample(key, image, label)`` with ``image`` a uint8 array H x W x C.

Images are kept as they are (no resizing, no re-quantisation); labels are kept where the source has
them, though the models are unconditional, as in the paper. :func:`open_source` picks the kind:

- ``digits``: scikit-learn's 8 x 8 digits (1797 images, values 0..16, so ``levels=17``), stored as
  uint8 0..16. Fixed split: every 5th image (index % 5 == 0) is ``test`` (360), the rest ``train``
  (1437). The rule uses no random numbers, so it never changes between library versions.
- an image folder (local or any fsspec URL) of PNG/JPEG files, grey (mode L) or RGB (palette images
  become RGB). If it holds ``train/`` and ``test/`` folders, ``--split`` picks one. Images in class
  subfolders get labels 0..K-1 in sorted folder-name order; images at the top have none (mixing both
  is an error). All images must share one size and mode; the others are skipped and reported.
- a ``.npy`` or ``.npz`` file of uint8 images: N x H x W (grey), N x H x W x C (channels last) or
  N x C x H x W (channels first, recognised when C is 1 or 3 and the last axis is not). A ``.npz``
  gives the images as ``images_{split}``, ``x_{split}``, ``images``, ``x`` or its only array, labels
  likewise as ``labels_{split}``, ``y_{split}``, ``labels`` or ``y``, and may hold ``levels``.
- the CIFAR-10 "python version" archive (``cifar-10-python.tar.gz``) from a path or URL:
  ``data_batch_1..5`` are ``train``, ``test_batch`` is ``test``. Its pickles are read with an
  unpickler that only builds dicts, lists, bytes and numpy arrays.
- ``sample-images``: scikit-learn's two sample photographs (``load_sample_images``: china.jpg and
  flower.jpg, 427 x 640 RGB, shipped with the library) cut into non-overlapping 32 x 32 crops, 260 of
  each, labelled 0 (china) and 1 (flower); the split is :func:`carve`'s with ``test_fraction``
  :data:`SAMPLE_IMAGES_TEST_FRACTION` and seed 0.

:func:`carve` splits any one source into ``train`` and ``test`` by the content of each image
(``data prepare --test-fraction``): seeded, stable when images are added or renamed, and an image
and its exact copies always land in the same split.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import posixpath
import tarfile
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

from ddpm.data.manifest import image_hash
from ddpm.data.storage import SourceError, open_fs

DIGITS_TEST_EVERY = 5  # digits: index % 5 == 0 is the test split
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
CROP = 32  # sample-images: crop side in pixels
SAMPLE_IMAGES_TEST_FRACTION = 0.2  # sample-images: about 104 of its 520 crops held out
SPLITS = ("train", "test")


class Sample(NamedTuple):
    key: str  # unique in the split, no dots (WebDataset groups members by the part before the dot)
    image: np.ndarray  # uint8, H x W x C
    label: int | None


class Skip(NamedTuple):
    key: str
    reason: str  # why the source could not provide this sample


@dataclass
class Source:
    """A data source of one split: its name (the default output folder), levels and samples."""

    name: str
    split: str
    levels: int
    num_samples: int  # upper bound used for the progress bar
    iterate: Callable[[], Iterator[Sample | Skip]]
    classes: list[str] | None = None
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    split_rule: dict[str, Any] | None = None  # how images were assigned to this split (into the manifest)

    def __iter__(self) -> Iterator[Sample | Skip]:
        return self.iterate()


def open_source(spec: str, split: str = "train", storage_options: dict[str, Any] | None = None) -> Source:
    """Resolve ``spec`` (``digits``, a folder, a .npy/.npz file, a CIFAR-10 archive) into a Source."""
    if split not in SPLITS:
        raise SourceError(f"split {split!r} is not valid; valid: {', '.join(SPLITS)}")
    lower = spec.lower().rstrip("/")
    if lower == "digits":
        return digits(split)
    if lower == "sample-images":
        return sample_images(split)
    if lower in ("cifar10", "cifar-10"):
        raise SourceError("the cifar10 source needs your copy of the archive: "
                          "--source /path/or/url/cifar-10-python.tar.gz")
    if lower.endswith((".npz", ".npy")):
        return array_file(spec, split, storage_options)
    if lower.endswith((".tar.gz", ".tgz")):
        return cifar10(spec, split, storage_options)
    fs, path = open_fs(spec, storage_options)
    if fs.isdir(path):
        return image_folder(spec, split, storage_options)
    if fs.exists(path):
        raise SourceError(f"source {spec!r} is not a folder, .npy/.npz file or .tar.gz CIFAR-10 archive")
    raise SourceError(f"source {spec!r} not found; valid: digits, sample-images, an image folder, a .npy/.npz "
                      "file, or a CIFAR-10 python archive")


# -- digits -------------------------------------------------------------------------------------
def digits(split: str = "train") -> Source:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.uint8)  # values are the integers 0..16
    index = np.arange(len(images))
    keep = index % DIGITS_TEST_EVERY == 0 if split == "test" else index % DIGITS_TEST_EVERY != 0
    chosen = index[keep]

    def iterate() -> Iterator[Sample]:
        for i in chosen:
            yield Sample(f"{i:07d}", images[i][:, :, None], int(bunch.target[i]))

    return Source("digits", split, 17, len(chosen), iterate, classes=[str(c) for c in range(10)],
                  description=f"scikit-learn digits, {split} = index % {DIGITS_TEST_EVERY} "
                              f"{'==' if split == 'test' else '!='} 0")


# -- a held-out split carved from one source ----------------------------------------------------
CARVE_RULE = ("test when the first 8 bytes of sha256('<seed>:<image hash>'), read as a big-endian "
              "fraction of 2^64, are below test_fraction; train otherwise")


def in_test(hash_: str, test_fraction: float, seed: int = 0) -> bool:
    """Whether :func:`carve` puts the image of content hash ``hash_`` (:func:`ddpm.data.manifest.image_hash`)
    in the test split: :data:`CARVE_RULE`. No random generator is involved, so the rule never changes
    with a library version; each image is decided alone, so adding images moves none of the others."""
    digest = hashlib.sha256(f"{int(seed)}:{hash_}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction


def carve(source: Source, test_fraction: float, seed: int = 0) -> dict[str, Source]:
    """``{"train": ..., "test": ...}``: ``source``'s images split by :func:`in_test`, about
    ``test_fraction`` of them (a binomial share, not an exact count) in ``test``.

    Both keep the source's keys, labels and classes; what the source skips is reported with the
    training split. Exact copies of an image share its hash, so they never straddle the splits. The
    rule, fraction and seed are each split's ``split_rule`` (written into its manifest).
    """
    if not 0.0 < test_fraction < 1.0:
        raise SourceError(f"test fraction must be in (0, 1), got {test_fraction}")
    rule = {"rule": CARVE_RULE, "test_fraction": float(test_fraction), "seed": int(seed), "of": source.name}

    def split_of(split: str) -> Source:
        def iterate() -> Iterator[Sample | Skip]:
            for item in source:
                if isinstance(item, Skip):
                    if split == "train":
                        yield item
                elif in_test(image_hash(item.image), test_fraction, seed) == (split == "test"):
                    yield item

        return Source(source.name, split, source.levels, source.num_samples, iterate, classes=source.classes,
                      description=f"{source.description}, {split} of a {test_fraction:g} test fraction (seed {seed})",
                      split_rule=rule)

    return {"train": split_of("train"), "test": split_of("test")}


def sample_images(split: str = "train") -> Source:
    """scikit-learn's two sample photographs as 32 x 32 RGB crops (see the module docstring)."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    names = [posixpath.basename(f).rsplit(".", 1)[0] for f in photos.filenames]

    def iterate() -> Iterator[Sample]:
        for label, photo in enumerate(photos.images):
            rows, cols = photo.shape[0] // CROP, photo.shape[1] // CROP
            for r in range(rows):
                for c in range(cols):
                    crop = photo[r * CROP:(r + 1) * CROP, c * CROP:(c + 1) * CROP]
                    yield Sample(f"{label}{r:03d}{c:03d}", np.ascontiguousarray(crop, dtype=np.uint8), label)

    total = sum((p.shape[0] // CROP) * (p.shape[1] // CROP) for p in photos.images)
    whole = Source("sample-images", "train", 256, total, iterate, classes=names,
                   description=f"scikit-learn sample images ({', '.join(names)}) in {CROP}x{CROP} crops")
    return carve(whole, SAMPLE_IMAGES_TEST_FRACTION)[split]


# -- arrays -------------------------------------------------------------------------------------
def _channels_last(images: np.ndarray, where: str) -> np.ndarray:
    if images.ndim == 3:
        return images[:, :, :, None]
    if images.ndim == 4:
        if images.shape[-1] in (1, 3):
            return images
        if images.shape[1] in (1, 3):
            return images.transpose(0, 2, 3, 1)
    raise SourceError(f"{where}: images of shape {images.shape}; expected N x H x W, N x H x W x C "
                      "or N x C x H x W with C = 1 or 3")


def _as_uint8(images: np.ndarray, where: str) -> np.ndarray:
    if images.dtype == np.uint8:
        return images
    if np.issubdtype(images.dtype, np.integer) and images.size and images.min() >= 0 and images.max() <= 255:
        return images.astype(np.uint8)
    raise SourceError(f"{where}: images must be uint8 (or integers in 0..255), got {images.dtype}; "
                      "images are stored as they are, so convert them yourself")


def array_file(url: str, split: str = "train", storage_options: dict[str, Any] | None = None) -> Source:
    fs, path = open_fs(url, storage_options)
    if not fs.exists(path):
        raise SourceError(f"source {url!r} not found")
    with fs.open(path, "rb") as f:
        raw = io.BytesIO(f.read())
    labels = None
    levels = 256
    try:
        if path.lower().endswith(".npy"):
            images = np.load(raw, allow_pickle=False)
        else:
            with np.load(raw, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            image_keys = [f"images_{split}", f"x_{split}", "images", "x"]
            name = next((k for k in image_keys if k in arrays), None)
            if name is None and len(arrays) == 1:
                name = next(iter(arrays))
            if name is None:
                raise SourceError(f"{url}: no image array; expected one of {', '.join(image_keys)} "
                                  f"(found {', '.join(arrays) or 'nothing'})")
            images = arrays[name]
            label_key = next((k for k in (f"labels_{split}", f"y_{split}", "labels", "y") if k in arrays), None)
            labels = None if label_key is None else arrays[label_key].astype(np.int64).reshape(-1)
            if "levels" in arrays:
                levels = _levels(arrays["levels"], url)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, SourceError):
            raise
        raise SourceError(f"{url}: cannot read the array file: {e}") from None
    images = _as_uint8(_channels_last(np.asarray(images), url), url)
    if labels is not None and len(labels) != len(images):
        raise SourceError(f"{url}: {len(labels)} labels for {len(images)} images")
    if not 2 <= levels <= 256 or int(images.max(initial=0)) >= levels:
        raise SourceError(f"{url}: levels={levels} but values reach {int(images.max(initial=0))}")

    def iterate() -> Iterator[Sample]:
        for i in range(len(images)):
            yield Sample(f"{i:07d}", images[i], None if labels is None else int(labels[i]))

    name = posixpath.basename(path).rsplit(".", 1)[0]
    return Source(name, split, levels, len(images), iterate, description=f"array file {url}")


def _levels(value: np.ndarray, where: str) -> int:
    """A ``levels`` entry: one integer (a 0-d or one-element array of integers)."""
    if value.size != 1 or not (np.issubdtype(value.dtype, np.integer)
                               or (np.issubdtype(value.dtype, np.floating) and float(value.reshape(-1)[0]).is_integer())):
        raise SourceError(f"{where}: 'levels' must be one integer, got an array of shape {list(value.shape)} "
                          f"({value.dtype})")
    return int(value.reshape(-1)[0])


# -- image folder -------------------------------------------------------------------------------
def image_folder(url: str, split: str = "train", storage_options: dict[str, Any] | None = None) -> Source:
    from PIL import Image, UnidentifiedImageError

    fs, root = open_fs(url, storage_options)
    if fs.isdir(f"{root}/{split}"):
        root = f"{root}/{split}"
    files = sorted(p for p in fs.find(root) if p.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise SourceError(f"{url}: no .png/.jpg/.jpeg images found")
    rel = [posixpath.relpath(p, root) for p in files]
    top = [r for r in rel if "/" not in r]
    classes = sorted({r.split("/", 1)[0] for r in rel if "/" in r})
    if top and classes:
        raise SourceError(f"{url}: mixes images at the top ({top[0]}) with class subfolders ({classes[0]}/); "
                          "put every image in a class folder, or none")
    class_index = {c: i for i, c in enumerate(classes)}

    def iterate() -> Iterator[Sample | Skip]:
        first: tuple[tuple[int, ...], str] | None = None
        for i, (path, r) in enumerate(zip(files, rel)):
            key = f"{i:07d}"
            try:
                with fs.open(path, "rb") as f:
                    data = f.read()
                with Image.open(io.BytesIO(data)) as img:
                    if img.mode == "P":
                        img = img.convert("RGB")
                    if img.mode not in ("L", "RGB"):
                        yield Skip(key, f"{r}: mode {img.mode}; only grey (L) and RGB are stored as they are")
                        continue
                    arr = np.asarray(img, dtype=np.uint8)
            except UnidentifiedImageError:  # its message shows the file object, not the file
                yield Skip(key, f"{r}: unreadable image (not a PNG or JPEG file)")
                continue
            except (OSError, ValueError) as e:
                yield Skip(key, f"{r}: unreadable image ({e})")
                continue
            arr = arr[:, :, None] if arr.ndim == 2 else arr
            if first is None:
                first = (arr.shape, r)
            elif arr.shape != first[0]:
                yield Skip(key, f"{r}: shape {arr.shape} differs from {first[1]} {first[0]}")
                continue
            label = class_index[r.split("/", 1)[0]] if classes else None
            yield Sample(key, arr, label)

    name = posixpath.basename(url.rstrip("/")) or "images"
    return Source(name, split, 256, len(files), iterate, classes=classes or None,
                  description=f"image folder {url}")


# -- CIFAR-10 -----------------------------------------------------------------------------------
class _RestrictedUnpickler(pickle.Unpickler):
    """Builds only what the CIFAR-10 batches hold: dicts, lists, str/bytes and numpy arrays."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # protocol-2 pickles written by Python 3 encode bytes this way
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch")


def _load_batch(raw: bytes, where: str) -> tuple[np.ndarray, list[int]]:
    try:
        batch = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:
        raise SourceError(f"{where}: not a CIFAR-10 batch ({e})") from None
    if not isinstance(batch, dict):
        raise SourceError(f"{where}: not a CIFAR-10 batch (it unpickles to a {type(batch).__name__}, not a dict)")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = np.asarray(batch.get("data")), batch.get("labels")
    if not isinstance(labels, (list, np.ndarray)):
        labels = None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels is None \
            or len(labels) != len(data):
        raise SourceError(f"{where}: expected data (N, 3072) uint8 and N labels, got data "
                          f"{data.shape} {data.dtype} and {None if labels is None else len(labels)} labels")
    try:
        return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), [int(x) for x in labels]
    except (TypeError, ValueError):
        raise SourceError(f"{where}: labels must be integers") from None


def cifar10(url: str, split: str = "train", storage_options: dict[str, Any] | None = None) -> Source:
    fs, path = open_fs(url, storage_options)
    if not fs.exists(path):
        raise SourceError(f"CIFAR-10 archive {url!r} not found")
    wanted = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    found: dict[str, bytes] = {}
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:gz") as tar:
            for member in tar:
                base = posixpath.basename(member.name)
                if member.isfile() and base in wanted:
                    found[base] = tar.extractfile(member).read()  # read in memory, never extracted
    except (tarfile.TarError, OSError, EOFError) as e:
        raise SourceError(f"{url}: not a readable .tar.gz archive ({e})") from None
    missing = [w for w in wanted if w not in found]
    if missing:
        raise SourceError(f"{url}: archive lacks {', '.join(missing)} (is it cifar-10-python.tar.gz?)")
    batches = [_load_batch(found[w], f"{url}:{w}") for w in wanted]
    total = sum(len(b[0]) for b in batches)

    def iterate() -> Iterator[Sample]:
        i = 0
        for images, labels in batches:
            for img, label in zip(images, labels):
                yield Sample(f"{i:07d}", np.ascontiguousarray(img), label)
                i += 1

    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    return Source("cifar10", split, 256, total, iterate, classes=classes,
                  description=f"CIFAR-10 python archive {url}")
