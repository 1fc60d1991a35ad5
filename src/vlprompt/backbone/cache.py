"""On-disk cache of frozen image-tower features.

Image features of a frozen backbone are computed once per (weights, transform, augmented view, seed, local
on/off, storage dtype, image file) and stored as safetensors shards with an append-only journal, then reused by
every later run, method and training seed that asks for the same thing.

Layout::

    <root>/<backbone.fingerprint>/<key>/         key = sha256(transform_id, view, seed, local, dtype)[:16]
        index.json                               what the directory holds (written when it starts)
        shards.jsonl                             the journal: one line per shard added or dropped
        shard-00000.safetensors                  tensors "global" (n, E) and, with local, "local" (n, M, E);
        shard-00001.safetensors ...              metadata "keys" (the n file keys in row order) and "crc32"
                                                 (per row: crc32 of its global bytes, then its local bytes)
        .lock                                    fcntl lock taken around every look-up and write

``index.json``: ``{"format": "vlprompt-feature-cache", "version": 2, "fingerprint", "backbone", "transform_id",
"view", "seed", "local", "dtype", "embed_dim": E, "local_tokens": M or null}``. ``shards.jsonl`` lines:
``{"add": name, "rows": n, "bytes": size, "sha256": of the file, "header_sha256": of its JSON header,
"embed_dim", "local_tokens", "keys": [...]}`` or ``{"drop": name, "reason": ...}``; a later shard holding a
key supersedes an earlier one. Adding a shard appends one line (no rewrite), so filling a directory with
ImageNet-train (1.28 M images, 1,250 shards of 1,024) costs linear time, and a look-up reads the journal once.

A *file key* is ``<absolute path>|<size>|<mtime_ns>`` (default), or ``sha256:<content hash>`` with
``hash_files=True`` (slower; survives moving or copying the dataset). The weights enter through the backbone's
content fingerprint, so any change of weights, transform id, view, seed, local flag, storage dtype or image
file is a miss.

Integrity: a shard is serialised in memory, written atomically (temporary file, fsync, rename), read back and
compared with the sha256 of what was meant, and only then recorded in the journal (append + fsync), so a run
killed at any point leaves a consistent cache (at worst an unrecorded shard, removed on the next use, or a
torn last journal line, ignored and cut off). A look-up checks cheaply each shard it needs: byte size, the
sha256 of its header, tensor names / shapes / dtype, the file keys of the rows used -- the tensor data is not
re-hashed. Each row is checked against its crc32 (and for finiteness) when it is read
(:meth:`CachedRows.read`). A shard that fails is dropped with a logged warning and its images are encoded
again (by :meth:`FeatureCache.get` at once; a training run stops with :class:`CorruptRows` and encodes them
when run again); a stored feature is never used unverified. An unreadable or foreign ``index.json`` is
discarded (warning) and the directory rebuilt.

Read-only caches (a lab's shared cache, a read-only mount): a cache directory this process may not write
(``os.access(W_OK)`` on it or its files; the nearest existing folder when it does not exist yet) is only read,
under a shared lock, and nothing in it is changed -- no index rebuilt, no leftover removed, no invalid shard
dropped (it is skipped). It serves the features it holds; a request it cannot serve is a :class:`CacheError`
naming the directory (pass a writable cache directory) instead of a write that would fail.

Memory: :meth:`FeatureCache.open` returns :class:`CachedRows`, which reads only the rows a batch asks for, so a
run's memory depends on its batch, not on the number of images x views x local tokens;
:meth:`FeatureCache.get` reads everything into memory (evaluation-sized requests).

Augmented views: view ``v`` of an image is drawn from a seed that is a stable hash of ``(seed, v, image
identity)`` (see :func:`view_seed`), so it does not depend on the batch size, the order of the paths, the number
of workers or threads, or what else is in the cache. A transform that takes a generator (``takes_generator``,
such as :class:`vlprompt.data.transforms.SeededCompose`, the train transform of
:func:`vlprompt.data.transforms.build_transforms`) is called as ``transform(image, generator=g)`` with its own
``torch.Generator`` seeded so; no global RNG is touched. A deterministic transform (Resize, CenterCrop,
ToTensor, Normalize...) is called as is. Any other transform (and a Dataset's own ``__getitem__``) runs under
torch, Python ``random`` and numpy RNGs seeded so and restored afterwards, one image at a time in the process
(a lock: threads would otherwise draw from each other's seeds). The image identity is
``<parent folder>/<file name>:<size>`` (``sha256:<content>`` with ``hash_files``), so moving the dataset keeps
the same augmentations. ``seed`` is the seed of this pool of views, not the training seed: keep it fixed to
share cached views between runs with different seeds.

Datasets plug in through a small interface (see :meth:`FeatureCache.get`): a sequence of image paths (or of
objects with a ``.path``, such as :class:`vlprompt.data.base.Sample`), or a ``torch.utils.data.Dataset`` that
exposes ``.paths`` and returns ``(image_tensor, ...)`` (its own transform applied) from ``__getitem__``.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import re
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from .._io import atomic_write_bytes, atomic_write_text, sha256_file
from ..errors import DataError, VLPromptError

log = logging.getLogger(__name__)

FORMAT = "vlprompt-feature-cache"
VERSION = 2
INDEX = "index.json"
JOURNAL = "shards.jsonl"
LOCK = ".lock"
SHARD_RE = re.compile(r"^shard-(\d+)\.safetensors$")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ST_DTYPES = {"float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2)}  # safetensors' names


class CacheError(VLPromptError):
    """The feature cache could not be used as asked (bad arguments, inconsistent features, a read-only cache that
    lacks what is asked)."""


_READ_ONLY_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


def _under(path, root) -> bool:
    """Whether ``path`` (an OSError's file name) lies in the folder ``root``."""
    if path is None:
        return False
    p, r = os.path.abspath(os.fsdecode(path)), os.path.abspath(os.fsdecode(root))
    return p == r or p.startswith(r + os.sep)


def writable(directory: Path) -> bool:
    """Whether this process may add to the cache directory ``directory``: the directory (or, while it does not
    exist, the nearest existing folder above it, where it would be created) and the cache's own files in it pass
    ``os.access(W_OK)`` (which also reports a read-only mount)."""
    directory = Path(directory)
    if not directory.exists():
        parent = directory.parent
        while not parent.exists() and parent.parent != parent:
            parent = parent.parent
        return parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)
    if not os.access(directory, os.W_OK | os.X_OK):
        return False
    return all(os.access(directory / name, os.W_OK) for name in (INDEX, JOURNAL, LOCK) if (directory / name).exists())


# ------------------------------------------------------------------------------------------------------------
# small public helpers
# ------------------------------------------------------------------------------------------------------------
def default_loader(path: str):
    """The data layer's robust loader (RGB, EXIF orientation, alpha on white, clear errors), so cached
    features see exactly the pixels that online training and evaluation see."""
    from ..data.images import load_image

    return load_image(path)


def view_seed(seed: int, view: int, identity: str) -> int:
    """The RNG seed of augmented view ``view`` of the image ``identity`` (a stable hash, 63 bits)."""
    digest = hashlib.sha256(f"{int(seed)}|{int(view)}|{identity}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# one seeded block at a time: the global RNGs are shared by every thread of the process
_GLOBAL_RNG_LOCK = threading.RLock()


@contextlib.contextmanager
def seeded(derived: int) -> Iterator[None]:
    """Run a block with torch's CPU generator, Python's ``random`` and numpy's global RNG seeded by ``derived``;
    all three are restored afterwards (transforms on the CPU draw from these; CUDA generators are not touched).
    Blocks are serialised by a process-wide lock, so concurrent threads cannot draw from each other's seeds.
    Only for transforms that cannot take a generator (see :func:`apply_view_transform`).

    ``torch.default_generator.manual_seed`` rather than ``torch.manual_seed``: the latter also queues a seed for
    every lazily initialised accelerator, capturing a stack trace each time (milliseconds per image)."""
    import numpy as np

    with _GLOBAL_RNG_LOCK:
        torch_state = torch.get_rng_state()
        py_state = random.getstate()
        np_state = np.random.get_state()
        torch.default_generator.manual_seed(derived)
        random.seed(derived)
        np.random.seed(derived % (1 << 32))
        try:
            yield
        finally:
            torch.set_rng_state(torch_state)
            random.setstate(py_state)
            np.random.set_state(np_state)


_DETERMINISTIC_STEPS: Optional[tuple] = None


def _deterministic_steps() -> tuple:
    global _DETERMINISTIC_STEPS
    if _DETERMINISTIC_STEPS is None:
        from torchvision import transforms as T

        steps = [T.Resize, T.CenterCrop, T.ToTensor, T.PILToTensor, T.ConvertImageDtype, T.Normalize, T.Grayscale]
        try:  # open_clip's own eval transforms (image_transform_v2) are deterministic too
            from open_clip.transform import CenterCropOrPad, MaybeConvertMode, MaybeToTensor
            steps += [CenterCropOrPad, MaybeConvertMode, MaybeToTensor]
        except ImportError:  # pragma: no cover - open_clip is a dependency
            pass
        _DETERMINISTIC_STEPS = tuple(steps)
    return _DETERMINISTIC_STEPS


def is_deterministic(transform: Any) -> bool:
    """True when ``transform`` (a torchvision ``Compose`` or one step) certainly draws no random numbers: every
    step is of a known deterministic type (exact type, so a random subclass is not mistaken for one)."""
    from torchvision import transforms as T

    steps = transform.transforms if type(transform) is T.Compose else [transform]
    known = _deterministic_steps()
    for step in steps:
        if type(step) in known:
            continue
        if type(step).__name__ == "ResizeKeepRatio" and type(step).__module__.startswith("open_clip") and \
                not getattr(step, "random_scale_prob", 1) and not getattr(step, "random_aspect_prob", 1):
            continue
        return False
    return True


def apply_view_transform(transform: Callable, image: Any, derived: int) -> Any:
    """``transform(image)`` with its randomness drawn from the seed ``derived``: through its own
    ``torch.Generator`` when the transform takes one (``takes_generator``), not at all when it is deterministic,
    else under :func:`seeded` global RNGs."""
    if getattr(transform, "takes_generator", False):
        return transform(image, generator=torch.Generator().manual_seed(derived))
    if is_deterministic(transform):
        return transform(image)
    with seeded(derived):
        return transform(image)


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise CacheError(f"feature cache dtype must be one of {', '.join(DTYPES)}, got {dtype}")


def _path_of(item: Any) -> str:
    p = getattr(item, "path", item)
    if not isinstance(p, (str, os.PathLike)):
        raise CacheError(f"expected an image path (str, PathLike or an object with .path), got {type(item).__name__}")
    return os.path.abspath(os.path.expanduser(os.fspath(p)))


# ------------------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------------------
@dataclass
class CachedFeatures:
    """Features of the requested images, in the order given, on the CPU, as float32 whatever the storage dtype.

    ``global_``: (N, E); ``local``: (N, M, E) or None; ``keys``: the N file keys; ``hits`` / ``misses``: how many
    distinct images came from the cache / were encoded now; ``directory``: the cache directory used.
    """

    global_: torch.Tensor
    local: Optional[torch.Tensor]
    keys: list[str]
    hits: int
    misses: int
    directory: Path

    def __len__(self) -> int:
        return self.global_.shape[0]


# ------------------------------------------------------------------------------------------------------------
# what gets encoded
# ------------------------------------------------------------------------------------------------------------
class _EncodeSet(torch.utils.data.Dataset):
    """The images still missing; item j -> (j, transformed view of image j)."""

    def __init__(self, positions: list[int], identities: list[str], paths: Sequence[str], *, seed: int, view: int,
                 transform: Optional[Callable], loader: Callable, dataset: Optional[torch.utils.data.Dataset]):
        self.positions = positions
        self.identities = identities
        self.paths = paths
        self.seed = seed
        self.view = view
        self.transform = transform
        self.loader = loader
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, j: int):
        pos = self.positions[j]
        derived = view_seed(self.seed, self.view, self.identities[j])
        if self.dataset is not None:
            with seeded(derived):  # the Dataset applies its own transform: only the global RNGs reach it
                item = self.dataset[pos]
            image = item[0] if isinstance(item, (tuple, list)) else item
        else:
            image = self.loader(self.paths[pos])
            if self.transform is not None:
                image = apply_view_transform(self.transform, image, derived)
        if not isinstance(image, torch.Tensor):
            raise CacheError(f"the transform must return a tensor image, got {type(image).__name__} for "
                             f"{self.paths[pos]}")
        return j, image


# ------------------------------------------------------------------------------------------------------------
# the cache
# ------------------------------------------------------------------------------------------------------------
class FeatureCache:
    """A directory of cached image features (see the module docstring for the layout and guarantees).

    Args:
        root: the cache root (created on first write).
        shard_size: images per shard (a shard is flushed to disk as soon as it is full, so a long encoding that
            is interrupted keeps its finished shards).
        progress: show a tqdm bar while encoding (tqdm hides it when stderr is not a terminal).
        hash_files: key images by the sha256 of their content instead of path + size + mtime.
    """

    def __init__(self, root: str | Path, shard_size: int = 1024, progress: bool = True, hash_files: bool = False):
        if shard_size < 1:
            raise CacheError(f"shard_size must be >= 1, got {shard_size}")
        self.root = Path(root).expanduser()
        self.shard_size = int(shard_size)
        self.progress = progress
        self.hash_files = hash_files
        self._content_hashes: dict[tuple, str] = {}

    # -- keys ---------------------------------------------------------------------------------------------
    def directory(self, backbone, transform_id: str, *, view: int = 0, seed: int = 0, local: bool = False,
                  dtype: torch.dtype = torch.float32) -> Path:
        """The directory holding the features of this (backbone, transform id, view, seed, local, dtype)."""
        return self.root / str(backbone.fingerprint) / self._key(transform_id, view, seed, local, _dtype_name(dtype))

    @staticmethod
    def _key(transform_id: str, view: int, seed: int, local: bool, dtype: str) -> str:
        blob = json.dumps({"transform_id": transform_id, "view": int(view), "seed": int(seed), "local": bool(local),
                           "dtype": dtype}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _file_keys(self, paths: Sequence[str]) -> tuple[list[str], list[str]]:
        """(cache keys, augmentation identities) of the files."""
        keys, idents = [], []
        for p in paths:
            try:
                st = os.stat(p)
            except OSError as e:
                raise DataError(f"image file {p}: {e.strerror or e}") from e
            if self.hash_files:
                memo = (p, st.st_size, st.st_mtime_ns, st.st_ino)
                h = self._content_hashes.get(memo)
                if h is None:
                    h = self._content_hashes[memo] = sha256_file(p)
                keys.append(f"sha256:{h}")
                idents.append(f"sha256:{h}")
            else:
                keys.append(f"{p}|{st.st_size}|{st.st_mtime_ns}")
                idents.append(f"{os.path.basename(os.path.dirname(p))}/{os.path.basename(p)}:{st.st_size}")
        return keys, idents

    def augmentation_identities(self, paths: Sequence) -> list[str]:
        """The identity each image's augmented views are seeded from (:func:`view_seed`): view ``v`` of image ``i``
        is ``apply_view_transform(transform, image, view_seed(seed, v, identities[i]))`` -- what the cache
        encoded, so a method can have the very image of a cached view (PromptSRC's paired views)."""
        return self._file_keys([_path_of(p) for p in paths])[1]

    # -- the entry points ---------------------------------------------------------------------------------
    def get(self, backbone, paths, transform=None, *, transform_id: Optional[str] = None, view: int = 0,
            seed: int = 0, local: bool = False, batch_size: int = 64, num_workers: int = 0,
            loader: Optional[Callable] = None, dtype: torch.dtype = torch.float32) -> CachedFeatures:
        """Features of the images, from the cache where valid, encoded (and stored) otherwise, all in memory.

        Args:
            backbone: a :class:`vlprompt.backbone.Backbone` (anything with ``fingerprint`` and
                ``encode_image(images, local=)``).
            paths: either a sequence of image paths (str / PathLike / objects with ``.path``), each loaded with
                ``loader`` then ``transform`` (which must return a (3, H, W) tensor); or a torch ``Dataset``
                exposing ``.paths`` (one per item) whose ``__getitem__`` returns ``(image_tensor, ...)`` with its
                own transform applied (then ``transform`` is ignored and ``transform_id`` is required).
            transform: the image transform (a torchvision transform; random ones give augmented views).
            transform_id: a string identifying the transform (part of the key), e.g.
                ``vlprompt.data.transforms.transform_id(transform)``; default ``repr(transform)`` (a warning is
                logged when that repr holds a memory address, as a lambda's does).
            view: the augmented view index; ``seed``: the seed of the pool of views (see the module docstring).
            local: also return local features (N, M, E).
            batch_size: images per forward pass of the tower; num_workers: processes decoding and augmenting
                the images to encode (``torch.utils.data.DataLoader`` workers; the features do not depend on it).
            loader: path -> PIL image; default :func:`default_loader`. The loader is not part of the key: a
                custom loader that changes pixels must be reflected in ``transform_id``.
            dtype: storage dtype (``torch.float16`` halves the disk use of local features; part of the key);
                the returned features are float32 either way, rounded through the storage dtype, so a miss and
                a later hit return identical tensors.

        Every row returned is checked against its checksum; a shard that fails is dropped (warning) and its
        images encoded again. :meth:`open` gives the same features without holding them in memory.
        """
        for attempt in range(3):
            rows = self.open(backbone, paths, transform, transform_id=transform_id, view=view, seed=seed,
                             local=local, batch_size=batch_size, num_workers=num_workers, loader=loader, dtype=dtype)
            try:
                global_, local_t = rows.read_all()
            except CorruptRows as e:
                if attempt == 2:
                    raise
                log.warning("feature cache %s: %s", rows.directory, e.reason)
                continue
            finally:
                rows.close()
            return CachedFeatures(global_, local_t, rows.keys, hits=rows.hits, misses=rows.misses,
                                  directory=rows.directory)
        raise AssertionError("unreachable")  # pragma: no cover

    def open(self, backbone, paths, transform=None, *, transform_id: Optional[str] = None, view: int = 0,
             seed: int = 0, local: bool = False, batch_size: int = 64, num_workers: int = 0,
             loader: Optional[Callable] = None, dtype: torch.dtype = torch.float32) -> "CachedRows":
        """Like :meth:`get` (same arguments), but the features stay on disk: the images missing from the cache
        are encoded and stored, and the returned :class:`CachedRows` reads the rows a batch asks for, so memory
        does not grow with the number of images, views or local tokens. The shards are checked cheaply here
        (byte size, header checksum, tensor names / shapes / dtype, file keys); each row is checked against its
        own checksum when it is read."""
        dtype_name = _dtype_name(dtype)
        dataset = None
        if isinstance(paths, torch.utils.data.Dataset) and not isinstance(paths, (list, tuple)):
            dataset = paths
            if not hasattr(dataset, "paths"):
                raise CacheError("a Dataset given to FeatureCache.get must expose .paths (one image path per item)")
            if transform_id is None:
                raise CacheError("a Dataset applies its own transform: pass transform_id= to name it")
            if len(dataset.paths) != len(dataset):
                raise CacheError(f"dataset.paths has {len(dataset.paths)} entries for {len(dataset)} items")
            paths = dataset.paths
        elif transform is None and transform_id is None:
            raise CacheError("pass a transform (and ideally a transform_id) for image paths")
        if transform_id is None:
            transform_id = repr(transform)
            if re.search(r" at 0x[0-9a-f]+", transform_id):
                log.warning("the transform's repr contains a memory address (%s): cached features will not be "
                            "reused by another run; pass transform_id=", transform_id[:80])
        abs_paths = [_path_of(p) for p in paths]
        keys, idents = self._file_keys(abs_paths)
        directory = self.directory(backbone, transform_id, view=view, seed=seed, local=local, dtype=dtype)
        meta = {"format": FORMAT, "version": VERSION, "fingerprint": str(backbone.fingerprint),
                "transform_id": transform_id, "view": int(view), "seed": int(seed), "local": bool(local),
                "dtype": dtype_name}

        first: dict[str, int] = {}  # key -> first position (duplicates are encoded once)
        for i, k in enumerate(keys):
            first.setdefault(k, i)

        if writable(directory):
            try:
                where, shards, misses = self._fill(directory, meta, backbone, first, idents, abs_paths, keys,
                                                   local=local, dtype=dtype, seed=seed, view=view,
                                                   transform=transform, loader=loader, dataset=dataset,
                                                   batch_size=batch_size, num_workers=num_workers)
                return CachedRows(self, directory, keys, where, shards, local=local, dtype_name=dtype_name,
                                  embed_dim=int(getattr(backbone, "embed_dim", 0) or 0), hits=len(first) - misses,
                                  misses=misses)
            except OSError as e:  # a write refused although the folder looked writable (another owner, a mount)
                if e.errno not in _READ_ONLY_ERRNOS or not _under(e.filename, self.root):
                    raise
                log.info("feature cache %s: %s: reading it as a read-only cache", directory, e)
        with self._locked(directory, shared=True):
            where, shards = self._lookup(directory, meta, backbone, set(first), local, dtype_name, read_only=True)
        missing = [k for k in first if k not in where]
        if missing:
            raise CacheError(self._read_only_message(directory, f"lacks {len(missing)} of the {len(first)} image "
                                                                f"features asked for"))
        return CachedRows(self, directory, keys, where, shards, local=local, dtype_name=dtype_name,
                          embed_dim=int(getattr(backbone, "embed_dim", 0) or 0), hits=len(first), misses=0,
                          read_only=True)

    def _fill(self, directory: Path, meta: dict, backbone, first: dict, idents: list, abs_paths: list, keys: list, *,
              local: bool, dtype: torch.dtype, seed: int, view: int, transform, loader, dataset, batch_size: int,
              num_workers: int) -> tuple[dict, dict, int]:
        """Look the keys up in a writable directory and encode (and store) the missing images: (where, shards,
        number of images encoded)."""
        dtype_name = _dtype_name(dtype)
        with self._locked(directory):
            where, shards = self._lookup(directory, meta, backbone, set(first), local, dtype_name)
        missing = [k for k in first if k not in where]
        if missing:
            store = _Store(self, directory, meta, backbone, local, dtype)
            store.encode([first[k] for k in missing], [idents[first[k]] for k in missing], abs_paths, keys,
                         seed=seed, view=view, transform=transform, loader=loader or default_loader,
                         dataset=dataset, batch_size=batch_size, num_workers=num_workers, progress=self.progress)
            with self._locked(directory):
                new_where, new_shards = self._lookup(directory, meta, backbone, set(missing), local, dtype_name)
            where.update(new_where)
            shards.update(new_shards)
            lost = [k for k in missing if k not in where]
            if lost:
                raise CacheError(f"feature cache {directory}: {len(lost)} image(s) just encoded are no longer in "
                                 f"the cache (removed by another process?); run again")
        return where, shards, len(missing)

    def _read_only_message(self, directory: Path, what: str) -> str:
        return (f"feature cache {self.root} is read-only here and {what} (directory {directory}): pass a writable "
                f"--cache-dir (a new folder is fine; only the missing features are encoded there)")

    def transformed(self, paths, transform=None, *, view: int = 0, seed: int = 0,
                    loader: Optional[Callable] = None) -> torch.Tensor:
        """The (N, 3, H, W) images :meth:`get` would encode for these arguments (to look at augmented views, or to
        check the cache against a direct ``backbone.encode_image``). Nothing is cached."""
        dataset = None
        if isinstance(paths, torch.utils.data.Dataset) and not isinstance(paths, (list, tuple)):
            dataset, paths = paths, paths.paths
        abs_paths = [_path_of(p) for p in paths]
        _, idents = self._file_keys(abs_paths)
        data = _EncodeSet(list(range(len(abs_paths))), idents, abs_paths, seed=seed, view=view, transform=transform,
                          loader=loader or default_loader, dataset=dataset)
        return torch.stack([data[j][1] for j in range(len(data))]) if len(data) else torch.empty(0, 3, 0, 0)

    # -- index --------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, directory: Path, shared: bool = False) -> Iterator[None]:
        """The directory's lock: exclusive (the directory and its lock file created if needed), or ``shared``
        for a read-only directory (readers wait for a writer that holds it; nothing is created)."""
        if not shared:
            directory.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no inter-process lock
            yield
            return
        if shared and not (directory / LOCK).is_file():  # no writer ever used it
            yield
            return
        with open(directory / LOCK, "r" if shared else "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    @staticmethod
    def _fresh_index(meta: dict, backbone) -> dict:
        return {**meta, "backbone": str(getattr(backbone, "name", "")),
                "embed_dim": int(getattr(backbone, "embed_dim", 0) or 0) or None, "local_tokens": None}

    def _load_index(self, directory: Path, meta: dict, backbone, read_only: bool = False) -> Optional[dict]:
        """Read and check ``index.json`` (lock held); a missing, broken or foreign one starts the directory
        afresh (``read_only``: None, the directory serves nothing)."""
        path = directory / INDEX
        if not path.exists():
            return None if read_only else self._reset(directory, meta, backbone)
        action = "not using it (read-only)" if read_only else "rebuilding it"
        try:
            index = json.loads(path.read_text())
            if not isinstance(index, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError, UnicodeDecodeError) as e:
            log.warning("feature cache %s: unreadable index (%s): %s", directory, e, action)
            return None if read_only else self._reset(directory, meta, backbone)
        wrong = {k: (index.get(k), v) for k, v in meta.items() if index.get(k) != v}
        if wrong:
            log.warning("feature cache %s: the index describes other features (%s): %s", directory,
                        ", ".join(f"{k}={a!r} not {b!r}" for k, (a, b) in wrong.items()), action)
            return None if read_only else self._reset(directory, meta, backbone)
        emb = getattr(backbone, "embed_dim", None)
        if emb is not None and index.get("embed_dim") not in (None, int(emb)):
            log.warning("feature cache %s: index says E=%s, the backbone has E=%s: %s", directory,
                        index.get("embed_dim"), emb, action)
            return None if read_only else self._reset(directory, meta, backbone)
        return index

    def _reset(self, directory: Path, meta: dict, backbone) -> dict:
        """Remove every shard and the journal of ``directory`` and write a fresh index (lock held)."""
        for p in directory.iterdir():
            if SHARD_RE.match(p.name) or p.name == JOURNAL:
                p.unlink(missing_ok=True)
        index = self._fresh_index(meta, backbone)
        _write_index(directory, index)
        return index

    def _lookup(self, directory: Path, meta: dict, backbone, wanted: set, local: bool, dtype_name: str,
                read_only: bool = False) -> tuple[dict[str, tuple[str, int]], dict[str, "_Shard"]]:
        """(key -> (shard, row), shard -> its checked layout) for the ``wanted`` keys found in valid shards (lock
        held); a shard that fails its checks is dropped (warning; ``read_only``: skipped, nothing written) and its
        images count as missing."""
        index = self._load_index(directory, meta, backbone, read_only)
        if index is None:
            return {}, {}
        live, where = _read_journal(directory, wanted)
        if not read_only:
            self._collect_garbage(directory, live)
        refs: dict[str, list[tuple[str, int]]] = {}
        for k, (name, row) in where.items():
            refs.setdefault(name, []).append((k, row))
        shards: dict[str, _Shard] = {}
        for name in sorted(refs):
            try:
                shards[name] = _check_shard(directory, name, live[name], refs[name], local, dtype_name,
                                            index.get("embed_dim"), index.get("local_tokens"))
            except _BadShard as e:
                if read_only:
                    log.warning("feature cache %s: shard %s is invalid (%s): not using it (read-only cache)",
                                directory, name, e)
                else:
                    log.warning("feature cache %s: shard %s is invalid (%s): dropping it; its images will be "
                                "encoded again", directory, name, e)
                    self._drop_shard(directory, name, str(e))
                for k, _ in refs[name]:
                    del where[k]
        return where, shards

    def _drop_shard(self, directory: Path, name: str, reason: str) -> None:
        """Forget a shard (lock held): a ``drop`` record in the journal, then the file goes."""
        _append_journal(directory, {"drop": name, "reason": reason[:200]})
        (directory / name).unlink(missing_ok=True)

    def _collect_garbage(self, directory: Path, live: dict) -> None:
        """Delete shard files the journal does not reference (a writer killed between writing a shard and
        recording it) and stale temporary files (lock held: no writer is between the two steps now).

        Shards whose rows were all superseded by a later shard (two processes encoding the same images at once)
        stay until the directory is cleared: finding them would need the whole key table in memory."""
        for p in directory.iterdir():
            if (SHARD_RE.match(p.name) and p.name not in live) or (p.name.startswith(".") and p.name.endswith(".tmp")):
                log.info("feature cache %s: removing leftover %s", directory, p.name)
                p.unlink(missing_ok=True)

    # -- housekeeping -------------------------------------------------------------------------------------
    def _directories(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p.parent for p in self.root.glob(f"*/*/{INDEX}"))

    def info(self) -> list[dict]:
        """One summary per cache directory: its key parts, number of images, shards and bytes."""
        out = []
        for d in self._directories():
            try:
                index = json.loads((d / INDEX).read_text())
            except (OSError, ValueError):
                index = {}
            live, where = _read_journal(d, None)
            nbytes = sum(p.stat().st_size for p in d.iterdir() if p.is_file())
            out.append({"directory": str(d), **{k: index.get(k) for k in (
                "fingerprint", "backbone", "transform_id", "view", "seed", "local", "dtype", "embed_dim",
                "local_tokens")}, "images": len(where), "shards": len(live), "bytes": nbytes})
        return out

    def clear(self, fingerprint: Optional[str] = None) -> int:
        """Delete the cached features (only those of one backbone fingerprint when given); returns the number of
        cache directories removed. Only files the cache writes are deleted, so a mistaken root is harmless."""
        removed = 0
        for d in self._directories():
            if fingerprint is not None and d.parent.name != fingerprint:
                continue
            if not writable(d):
                raise CacheError(f"feature cache {self.root} is read-only here (directory {d}): it cannot be cleared "
                                 f"by this user")
            with self._locked(d):
                for p in d.iterdir():
                    if p.name != LOCK and (p.name in (INDEX, JOURNAL) or SHARD_RE.match(p.name)
                                           or (p.name.startswith(".") and p.name.endswith(".tmp"))):
                        p.unlink(missing_ok=True)
            (d / LOCK).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                d.rmdir()
            with contextlib.suppress(OSError):
                d.parent.rmdir()
            removed += 1
        return removed


class _BadShard(Exception):
    pass


class CorruptRows(CacheError):
    """A row read from a shard failed its checksum (or was short, or non-finite): the shard has been dropped
    from the cache, so the next run encodes its images again."""

    def __init__(self, directory: Path, name: str, reason: str):
        self.reason = f"shard {name} is invalid ({reason}): dropping it; its images will be encoded again"
        super().__init__(f"feature cache {directory}: shard {name} is invalid ({reason}): it was dropped; run "
                         f"again (a run: with --resume) to encode its images again")


# ------------------------------------------------------------------------------------------------------------
# shards: layout, checks, the journal
# ------------------------------------------------------------------------------------------------------------
@dataclass
class _Shard:
    """Where the rows of one checked shard lie in its file."""

    name: str
    path: Path
    rows: int
    global_offset: int  # absolute byte offset of row 0 of "global"
    local_offset: Optional[int]
    local_tokens: Optional[int]
    embed_dim: int
    crc: list  # per row: crc32 of the row's "global" bytes then its "local" bytes


def _read_header(path: Path, size: int) -> tuple[bytes, int]:
    """The raw JSON header of a safetensors file and where its data starts (only the header is read)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise _BadShard("no safetensors header")
        n = int.from_bytes(head, "little")
        if not 0 < n <= size - 8:
            raise _BadShard(f"header length {n} does not fit a {size}-byte file")
        return f.read(n), 8 + n


def _check_shard(directory: Path, name: str, info: dict, refs: list[tuple[str, int]], local: bool,
                 dtype_name: str, embed_dim: Optional[int], local_tokens: Optional[int]) -> _Shard:
    """The cheap checks of a shard (size, header checksum, tensor layout, file keys of the rows used); the
    rows themselves are checked when read (:meth:`CachedRows.read`)."""
    path = directory / name
    try:
        size = path.stat().st_size
    except OSError:
        raise _BadShard("the file is missing")
    if size != info["bytes"]:
        raise _BadShard(f"{size} bytes, the index recorded {info['bytes']} (truncated or rewritten)")
    try:
        raw, data_start = _read_header(path, size)
    except OSError as e:
        raise _BadShard(f"unreadable: {e}") from e
    if hashlib.sha256(raw).hexdigest() != info["header_sha256"]:
        raise _BadShard("header checksum mismatch (corrupted)")
    try:
        header = json.loads(raw)
        file_meta = header.get("__metadata__") or {}
        shard_keys = json.loads(file_meta.get("keys", "null"))
        crc = json.loads(file_meta.get("crc32", "null"))
    except (ValueError, AttributeError) as e:
        raise _BadShard(f"unreadable header: {e}") from e
    rows = int(info["rows"])
    code, itemsize = _ST_DTYPES[dtype_name]

    def layout(tensor: str, shape: list) -> int:
        t = header.get(tensor)
        if not isinstance(t, dict):
            raise _BadShard(f"no '{tensor}' tensor")
        if t.get("dtype") != code or t.get("shape") != shape:
            raise _BadShard(f"'{tensor}' is {t.get('dtype')} {t.get('shape')}, expected {code} {shape}")
        begin, end = t.get("data_offsets", (0, -1))
        count = 1
        for s in shape:
            count *= s
        if end - begin != count * itemsize or data_start + end > size:
            raise _BadShard(f"'{tensor}' data offsets {begin}..{end} do not fit its shape")
        return data_start + begin

    def dim(tensor: str, ndim: int, axis: int, expected: Optional[int]) -> int:
        # the size the index fixed for this directory, else the shard's own (then checked for consistency)
        if expected is not None:
            return int(expected)
        shape = (header.get(tensor) or {}).get("shape") if isinstance(header.get(tensor), dict) else None
        return int(shape[axis]) if isinstance(shape, list) and len(shape) == ndim else -1

    emb = dim("global", 2, 1, embed_dim)
    g_off = layout("global", [rows, emb])
    l_off, m = None, None
    if local:
        m = dim("local", 3, 1, local_tokens)
        l_off = layout("local", [rows, m, emb])
    elif "local" in header:
        raise _BadShard("an unexpected 'local' tensor")
    if not isinstance(shard_keys, list) or len(shard_keys) != rows:
        raise _BadShard("no valid list of file keys in its metadata")
    if not isinstance(crc, list) or len(crc) != rows:
        raise _BadShard("no valid list of row checksums in its metadata")
    for key, row in refs:
        if shard_keys[row] != key:
            raise _BadShard(f"row {row} holds {shard_keys[row]!r}, the index says {key!r}")
    return _Shard(name, path, rows, g_off, l_off, m, int(emb), crc)


def _read_journal(directory: Path, wanted: Optional[set]) -> tuple[dict[str, dict], dict[str, tuple[str, int]]]:
    """Replay ``shards.jsonl``: (live shard -> its record without keys, key -> (shard, row) for the ``wanted``
    keys, every key when None). A later shard holding a key supersedes an earlier one. A last line without its
    newline (a writer killed mid-append) is ignored; any other unreadable line is skipped with a warning."""
    live: dict[str, dict] = {}
    where: dict[str, tuple[str, int]] = {}
    path = directory / JOURNAL
    if not path.exists():
        return live, where
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                break
            try:
                rec = json.loads(line)
                if "drop" in rec:
                    name = rec["drop"]
                    if live.pop(name, None) is not None:
                        where = {k: v for k, v in where.items() if v[0] != name}
                    continue
                name, keys, rows = rec["add"], rec["keys"], rec["rows"]
                if not (SHARD_RE.match(name) and isinstance(keys, list) and len(keys) == rows
                        and isinstance(rec["bytes"], int) and isinstance(rec["header_sha256"], str)):
                    raise ValueError("not a shard record")
            except (ValueError, KeyError, TypeError) as e:
                log.warning("feature cache %s: %s line %d is unreadable (%s): skipped", directory, JOURNAL, n, e)
                continue
            if live.pop(name, None) is not None:  # a reused name: the old rows are gone
                where = {k: v for k, v in where.items() if v[0] != name}
            live[name] = {k: v for k, v in rec.items() if k != "keys"}
            for row, k in enumerate(keys):
                if wanted is None or k in wanted:
                    where[k] = (name, row)
    return live, where


def _append_journal(directory: Path, record: dict) -> None:
    """Append one record to the journal and fsync it (lock held). A torn last line left by a killed writer is
    cut off first, so it cannot swallow this record."""
    path = directory / JOURNAL
    line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
    with open(path, "a+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                _cut_torn_tail(f, size)
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _cut_torn_tail(f, size: int) -> None:
    pos, chunk = size, 1 << 16
    while pos > 0:
        start = max(0, pos - chunk)
        f.seek(start)
        block = f.read(pos - start)
        nl = block.rfind(b"\n")
        if nl >= 0:
            f.truncate(start + nl + 1)
            return
        pos = start
    f.truncate(0)


def _row_crc(global_row, local_row=None) -> int:
    crc = zlib.crc32(global_row)
    return zlib.crc32(local_row, crc) if local_row is not None else crc


# ------------------------------------------------------------------------------------------------------------
# lazy rows
# ------------------------------------------------------------------------------------------------------------
class CachedRows:
    """The cached features of N requested images (in the order given), read from the shard files only when
    asked for (:meth:`read`), as float32 whatever the storage dtype. Every row read is checked against its
    checksum and for finiteness; a failure drops the shard and raises :class:`CorruptRows`.

    Rows are read with ``os.preadv`` into fresh buffers rather than through a memory map: pages of a mapped file
    count towards the resident set of the process and would grow it to the size of every view read.

    ``keys``: the N file keys; ``hits`` / ``misses``: distinct images found / encoded by :meth:`FeatureCache.open`;
    ``directory``: the cache directory; ``embed_dim`` E; ``local_tokens`` M (None without local features).
    """

    MAX_OPEN_FILES = 64

    def __init__(self, cache: FeatureCache, directory: Path, keys: list[str], where: dict, shards: dict, *,
                 local: bool, dtype_name: str, embed_dim: int, hits: int, misses: int, read_only: bool = False):
        import numpy as np

        self.cache, self.directory, self.keys = cache, directory, keys
        self.local, self.dtype_name, self.hits, self.misses = local, dtype_name, hits, misses
        self.read_only = read_only
        names = sorted(shards)
        self._shards = [shards[n] for n in names]
        slot = {n: i for i, n in enumerate(names)}
        self._shard_of = np.fromiter((slot[where[k][0]] for k in keys), dtype=np.int32, count=len(keys))
        self._row_of = np.fromiter((where[k][1] for k in keys), dtype=np.int64, count=len(keys))
        dims = {(s.embed_dim, s.local_tokens) for s in self._shards}
        if len(dims) > 1:
            raise CacheError(f"features of different shapes in one request ({sorted(dims, key=str)}): feed images "
                             f"of one size")
        self.embed_dim, self.local_tokens = next(iter(dims)) if dims else (embed_dim, 0 if local else None)
        self._itemsize = _ST_DTYPES[dtype_name][1]
        self._fds: "collections.OrderedDict[int, int]" = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict:  # open files do not travel to other processes
        return {**self.__dict__, "_fds": collections.OrderedDict()}

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    def _fd(self, s: int) -> int:
        fd = self._fds.get(s)
        if fd is not None:
            self._fds.move_to_end(s)
            return fd
        shard = self._shards[s]
        try:
            fd = os.open(shard.path, os.O_RDONLY)
        except FileNotFoundError as e:
            raise CacheError(f"feature cache {self.directory}: shard {shard.name} was removed while this run read "
                             f"it (the cache cleared by another process?); run again") from e
        self._fds[s] = fd
        if len(self._fds) > self.MAX_OPEN_FILES:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def read_all(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Every row: (N, E) and (N, M, E) or None, float32."""
        return self.read(torch.arange(len(self)))

    def read(self, positions) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The rows at ``positions`` (indices into the requested images): (B, E) and (B, M, E) or None, float32.
        Runs of consecutive rows of one shard are read with one system call."""
        import numpy as np

        pos = torch.as_tensor(positions, dtype=torch.long).reshape(-1).numpy()
        b, e, m = len(pos), self.embed_dim, self.local_tokens
        if b == 0:
            return torch.empty(0, e), (torch.empty(0, m or 0, e) if self.local else None)
        g_bytes = e * self._itemsize
        l_bytes = (m or 0) * e * self._itemsize
        gbuf = np.empty((b, g_bytes), np.uint8)
        lbuf = np.empty((b, l_bytes), np.uint8) if self.local else None
        sh, rw = self._shard_of[pos], self._row_of[pos]
        order = np.lexsort((rw, sh))
        i = 0
        while i < b:
            j = i + 1
            while j < b and sh[order[j]] == sh[order[i]] and rw[order[j]] == rw[order[j - 1]] + 1:
                j += 1
            s, r0, sel = int(sh[order[i]]), int(rw[order[i]]), order[i:j]
            shard = self._shards[s]
            fd = self._fd(s)
            gbuf[sel] = self._pread(fd, shard, shard.global_offset + r0 * g_bytes, (j - i, g_bytes))
            if lbuf is not None:
                lbuf[sel] = self._pread(fd, shard, shard.local_offset + r0 * l_bytes, (j - i, l_bytes))
            i = j
        for k in range(b):
            shard = self._shards[int(sh[k])]
            if _row_crc(gbuf[k], None if lbuf is None else lbuf[k]) != shard.crc[int(rw[k])]:
                self._corrupt(shard, f"row {int(rw[k])} fails its checksum (corrupted)")
        dtype = DTYPES[self.dtype_name]
        g = torch.from_numpy(gbuf).view(dtype).reshape(b, e).float()
        loc = torch.from_numpy(lbuf).view(dtype).reshape(b, m, e).float() if lbuf is not None else None
        bad = ~torch.isfinite(g).all(-1)
        if loc is not None:
            bad |= ~torch.isfinite(loc).flatten(1).all(-1)
        if bad.any():
            k = int(bad.nonzero()[0, 0])
            self._corrupt(self._shards[int(sh[k])], f"row {int(rw[k])}: non-finite features")
        return g, loc

    def _pread(self, fd: int, shard: _Shard, offset: int, shape: tuple[int, int]):
        import numpy as np

        buf = np.empty(shape, np.uint8)
        got = os.preadv(fd, [buf], offset)
        if got != buf.nbytes:
            self._corrupt(shard, f"short read at byte {offset} (truncated)")
        return buf

    def _corrupt(self, shard: _Shard, reason: str) -> None:
        if self.read_only:  # nothing can be dropped or encoded again here
            raise CacheError(self.cache._read_only_message(self.directory, f"its shard {shard.name} is invalid "
                                                                           f"({reason})"))
        with self.cache._locked(self.directory):
            live, _ = _read_journal(self.directory, set())
            if shard.name in live:
                self.cache._drop_shard(self.directory, shard.name, reason)
        raise CorruptRows(self.directory, shard.name, reason)


# ------------------------------------------------------------------------------------------------------------
# encoding and writing
# ------------------------------------------------------------------------------------------------------------
class _Store:
    """Encodes the missing images and appends them to the cache shard by shard."""

    def __init__(self, cache: FeatureCache, directory: Path, meta: dict, backbone, local: bool, dtype: torch.dtype):
        self.cache = cache
        self.directory = directory
        self.meta = meta
        self.backbone = backbone
        self.local = local
        self.dtype = dtype
        self.buffer: list[tuple[str, torch.Tensor, Optional[torch.Tensor]]] = []

    def encode(self, positions: list[int], identities: list[str], paths: Sequence[str], keys: Sequence[str], *,
               seed: int, view: int, transform, loader, dataset, batch_size: int, num_workers: int,
               progress: bool) -> None:
        if not positions:
            return
        from tqdm.auto import tqdm

        data = _EncodeSet(positions, identities, paths, seed=seed, view=view, transform=transform, loader=loader,
                          dataset=dataset)
        device = getattr(self.backbone, "device", None)
        # workers decode and augment in parallel; each image's augmentation is seeded by (seed, view, image), and
        # the batches (hence the tower's inputs) are the same for any number of workers. An own generator:
        # creating the loader's iterator must not consume the caller's global torch RNG.
        batches = torch.utils.data.DataLoader(
            data, batch_size=max(1, int(batch_size)), shuffle=False, num_workers=int(num_workers),
            pin_memory=getattr(device, "type", "cpu") == "cuda", generator=torch.Generator().manual_seed(0))
        bar = tqdm(total=len(positions), desc=f"encoding {getattr(self.backbone, 'name', 'images')}"
                   f"{' (local)' if self.local else ''}", unit="img", disable=None if progress else True,
                   dynamic_ncols=True)
        try:
            with torch.no_grad():
                for idx, images in batches:
                    result = self.backbone.encode_image(images, local=self.local)
                    g, loc = result if self.local else (result, None)
                    g = g.detach().to("cpu", self.dtype)
                    loc = loc.detach().to("cpu", self.dtype) if loc is not None else None
                    if g.dim() != 2 or g.shape[0] != len(idx) or (loc is not None and (
                            loc.dim() != 3 or loc.shape[0] != len(idx) or loc.shape[2] != g.shape[1])):
                        raise CacheError(f"encode_image returned {tuple(g.shape)}"
                                         f"{'' if loc is None else ' / ' + str(tuple(loc.shape))} for "
                                         f"{len(idx)} images")
                    if not torch.isfinite(g).all() or (loc is not None and not torch.isfinite(loc).all()):
                        raise CacheError("the image tower produced non-finite features (NaN/inf); nothing cached "
                                         "for this batch")
                    for r, j in enumerate(idx.tolist()):
                        self.buffer.append((keys[positions[j]], g[r], loc[r] if loc is not None else None))
                    while len(self.buffer) >= self.cache.shard_size:
                        self.flush(self.cache.shard_size)
                    bar.update(len(idx))
            self.flush()
        finally:
            bar.close()

    def flush(self, count: Optional[int] = None) -> None:
        """Write the first ``count`` buffered rows (all by default) as a new shard, check it on disk, then record
        it in the journal (one appended line: no rewrite of what is already there)."""
        from safetensors.torch import save as save_safetensors

        rows = self.buffer[:count] if count is not None else list(self.buffer)
        if not rows:
            return
        del self.buffer[:len(rows)]
        keys = [r[0] for r in rows]
        tensors = {"global": torch.stack([r[1] for r in rows]).contiguous()}
        if self.local:
            tensors["local"] = torch.stack([r[2] for r in rows]).contiguous()
        # per-row checksums of the exact bytes stored (uint8 views: no copy)
        g8 = tensors["global"].view(torch.uint8).reshape(len(rows), -1).numpy()
        l8 = tensors["local"].view(torch.uint8).reshape(len(rows), -1).numpy() if self.local else None
        crc = [_row_crc(g8[i], None if l8 is None else l8[i]) for i in range(len(rows))]
        data = save_safetensors(tensors, metadata={"format": FORMAT, "keys": json.dumps(keys),
                                                   "crc32": json.dumps(crc)})
        header = data[8:8 + int.from_bytes(data[:8], "little")]
        emb = int(tensors["global"].shape[1])
        m = int(tensors["local"].shape[1]) if self.local else None
        c = self.cache
        with c._locked(self.directory):
            index = c._load_index(self.directory, self.meta, self.backbone)
            if (index.get("embed_dim") not in (None, emb)) or (m is not None and index.get("local_tokens")
                                                                 not in (None, m)):
                raise CacheError(f"{self.directory}: new features are ({emb}, M={m}), the cache holds "
                                 f"({index.get('embed_dim')}, M={index.get('local_tokens')}); feed images of one size")
            if index.get("embed_dim") is None or (m is not None and index.get("local_tokens") is None):
                index["embed_dim"], index["local_tokens"] = emb, m
                _write_index(self.directory, index)  # once per directory: the shapes every shard must have
            name = self._next_name()
            path = self.directory / name
            atomic_write_bytes(path, data)
            digest = hashlib.sha256(data).hexdigest()
            # verified as written: what is on disk is what was meant (read back once, now, not on every use)
            if path.stat().st_size != len(data) or sha256_file(path) != digest:
                path.unlink(missing_ok=True)
                raise CacheError(f"{path}: the shard read back differs from what was written (disk full or "
                                 f"failing?)")
            _append_journal(self.directory, {"add": name, "rows": len(keys), "bytes": len(data), "sha256": digest,
                                             "header_sha256": hashlib.sha256(header).hexdigest(),
                                             "embed_dim": emb, "local_tokens": m, "keys": keys})

    def _next_name(self) -> str:
        used = [int(m.group(1)) for m in (SHARD_RE.match(p.name) for p in self.directory.iterdir()) if m]
        return f"shard-{max(used, default=-1) + 1:05d}.safetensors"


def _write_index(directory: Path, index: dict) -> None:
    """Replace ``index.json`` atomically (only when a directory starts or learns its feature shapes)."""
    atomic_write_text(directory / INDEX, json.dumps(index, separators=(",", ":")) + "\n")


def cache_info(root: str | Path) -> list[dict]:
    """Summaries of every cache directory under ``root`` (see :meth:`FeatureCache.info`)."""
    return FeatureCache(root, progress=False).info()


def clear_cache(root: str | Path, fingerprint: Optional[str] = None) -> int:
    """Delete cached features under ``root`` (see :meth:`FeatureCache.clear`)."""
    return FeatureCache(root, progress=False).clear(fingerprint)
