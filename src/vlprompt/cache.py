"""On-disk cache of frozen image-tower features.

Image features of a frozen backbone are computed once per (weights, transform, augmented view, seed, local
on/off, storage dtype, image file) and stored as safetensors shards with a JSON index, then reused by every
later run, method and training seed that asks for the same thing.

Layout::

    <root>/<backbone.fingerprint>/<key>/         key = sha256(transform_id, view, seed, local, dtype)[:16]
        index.json                               what the directory holds (see below)
        shard-00000.safetensors                  tensors "global" (n, E) and, with local, "local" (n, M, E);
        shard-00001.safetensors ...              metadata "keys": the JSON list of the n file keys, in row order
        .lock                                    fcntl lock taken around every read-modify-write of the index

``index.json``::

    {"format": "vlprompt-feature-cache", "version": 1, "fingerprint": ..., "backbone": ..., "transform_id": ...,
     "view": 0, "seed": 0, "local": false, "dtype": "float32", "embed_dim": E, "local_tokens": M or null,
     "shards": {"shard-00000.safetensors": {"rows": n, "bytes": size, "sha256": hex}},
     "entries": {file key: [shard name, row]}}

A *file key* is ``<absolute path>|<size>|<mtime_ns>`` (default), or ``sha256:<content hash>`` with
``hash_files=True`` (slower; survives moving or copying the dataset). The weights enter through the backbone's
content fingerprint, so any change of weights, transform id, view, seed, local flag, storage dtype or image
file is a miss.

Safety: a shard is written atomically (temporary file, fsync, rename) *before* the index that references it,
and the index is replaced atomically, so a run killed at any point leaves a consistent cache (at worst an
unreferenced shard, removed on the next use). On load every shard a request needs is checked (byte size,
sha256, readable, tensor names / shapes / dtype, file keys): a shard that fails is dropped with a logged
warning and its images are encoded again; a stored feature is never used unverified. An unreadable
``index.json`` is discarded (warning) and the directory rebuilt.

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

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from ._io import atomic_save_safetensors, atomic_write_text, sha256_file
from .errors import DataError, VLPromptError

log = logging.getLogger(__name__)

FORMAT = "vlprompt-feature-cache"
VERSION = 1
INDEX = "index.json"
LOCK = ".lock"
SHARD_RE = re.compile(r"^shard-(\d+)\.safetensors$")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CacheError(VLPromptError):
    """The feature cache could not be used as asked (bad arguments, inconsistent features)."""


# ------------------------------------------------------------------------------------------------------------
# small public helpers
# ------------------------------------------------------------------------------------------------------------
def default_loader(path: str):
    """The data layer's robust loader (RGB, EXIF orientation, alpha on white, clear errors), so cached
    features see exactly the pixels that online training and evaluation see."""
    from .data.images import load_image

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

    # -- the main entry point -----------------------------------------------------------------------------
    def get(self, backbone, paths, transform=None, *, transform_id: Optional[str] = None, view: int = 0,
            seed: int = 0, local: bool = False, batch_size: int = 64, num_workers: int = 0,
            loader: Optional[Callable] = None, dtype: torch.dtype = torch.float32) -> CachedFeatures:
        """Features of the images, from the cache where valid, encoded (and stored) otherwise.

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
            batch_size, num_workers: of the DataLoader over the images to encode.
            loader: path -> PIL image; default :func:`default_loader`. The loader is not part of the key: a
                custom loader that changes pixels must be reflected in ``transform_id``.
            dtype: storage dtype (``torch.float16`` halves the disk use of local features; part of the key);
                the returned features are float32 either way, rounded through the storage dtype, so a miss and
                a later hit return identical tensors.
        """
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

        with self._locked(directory):
            index = self._load_index(directory, meta, backbone)
            found = self._read_cached(directory, index, list(first), local, dtype)
            self._collect_garbage(directory, index)

        missing = [k for k in first if k not in found]
        store = _Store(self, directory, meta, backbone, local, dtype)
        found.update(store.encode([first[k] for k in missing], [idents[first[k]] for k in missing], abs_paths,
                                  keys, seed=seed, view=view, transform=transform,
                                  loader=loader or default_loader, dataset=dataset, batch_size=batch_size,
                                  num_workers=num_workers, progress=self.progress))
        global_, local_t = _assemble(keys, found, local, int(getattr(backbone, "embed_dim", 0) or 0))
        return CachedFeatures(global_, local_t, keys, hits=len(first) - len(missing), misses=len(missing),
                              directory=directory)

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
    def _locked(self, directory: Path) -> Iterator[None]:
        directory.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no inter-process lock
            yield
            return
        with open(directory / LOCK, "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    @staticmethod
    def _fresh_index(meta: dict, backbone) -> dict:
        return {**meta, "backbone": str(getattr(backbone, "name", "")),
                "embed_dim": int(getattr(backbone, "embed_dim", 0) or 0) or None, "local_tokens": None,
                "shards": {}, "entries": {}}

    def _load_index(self, directory: Path, meta: dict, backbone) -> dict:
        """Read and sanity-check the index (lock held); a broken one is replaced by an empty one."""
        path = directory / INDEX
        if not path.exists():
            return self._fresh_index(meta, backbone)
        try:
            index = json.loads(path.read_text())
            if not isinstance(index, dict):
                raise ValueError("not a JSON object")
            for field in ("shards", "entries"):
                if not isinstance(index.get(field), dict):
                    raise ValueError(f"no '{field}' object")
        except (OSError, ValueError, UnicodeDecodeError) as e:
            log.warning("feature cache %s: unreadable index (%s): rebuilding it", directory, e)
            return self._reset(directory, meta, backbone)
        wrong = {k: (index.get(k), v) for k, v in meta.items() if index.get(k) != v}
        if wrong:
            log.warning("feature cache %s: the index describes other features (%s): rebuilding it", directory,
                        ", ".join(f"{k}={a!r} not {b!r}" for k, (a, b) in wrong.items()))
            return self._reset(directory, meta, backbone)
        emb = getattr(backbone, "embed_dim", None)
        if emb is not None and index.get("embed_dim") not in (None, int(emb)):
            log.warning("feature cache %s: index says E=%s, the backbone has E=%s: rebuilding it", directory,
                        index.get("embed_dim"), emb)
            return self._reset(directory, meta, backbone)
        # entries must point at known shards and rows
        bad = 0
        for key, ref in list(index["entries"].items()):
            ok = (isinstance(ref, list) and len(ref) == 2 and ref[0] in index["shards"] and isinstance(ref[1], int)
                  and 0 <= ref[1] < int(index["shards"][ref[0]].get("rows", 0)))
            if not ok:
                del index["entries"][key]
                bad += 1
        if bad:
            log.warning("feature cache %s: %d index entries point at no valid shard row: they will be re-encoded",
                        directory, bad)
        return index

    def _reset(self, directory: Path, meta: dict, backbone) -> dict:
        """Remove every shard of ``directory`` and write an empty index (lock held)."""
        for p in directory.iterdir():
            if SHARD_RE.match(p.name):
                p.unlink(missing_ok=True)
        index = self._fresh_index(meta, backbone)
        _write_index(directory, index)
        return index

    def _read_cached(self, directory: Path, index: dict, keys: list[str], local: bool,
                     dtype: torch.dtype) -> dict[str, tuple]:
        """key -> (global tensor, local tensor or None, row) for the requested keys found in verified shards
        (lock held); invalid shards are dropped from the index and deleted."""
        entries = index["entries"]
        wanted = {k: entries[k] for k in keys if k in entries}
        if not wanted:
            return {}
        refs: dict[str, list[tuple[str, int]]] = {}  # every entry of the shards we need, by shard
        needed = {ref[0] for ref in wanted.values()}
        for k, (shard, row) in entries.items():
            if shard in needed:
                refs.setdefault(shard, []).append((k, row))
        found: dict[str, tuple] = {}
        dropped = False
        for name in sorted(needed):
            try:
                g, loc = self._verified_shard(directory, name, index, refs[name], local, dtype)
            except _BadShard as e:
                log.warning("feature cache %s: shard %s is invalid (%s): dropping it; its images will be encoded "
                            "again", directory, name, e)
                self._drop_shard(directory, index, name)
                dropped = True
                continue
            for k, row in refs[name]:
                if k in wanted:
                    found[k] = (g, loc, row)
        if dropped:
            _write_index(directory, index)
        return found

    def _verified_shard(self, directory: Path, name: str, index: dict, refs: list[tuple[str, int]], local: bool,
                        dtype: torch.dtype) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        info = index["shards"][name]
        path = directory / name
        try:
            size = path.stat().st_size
        except OSError:
            raise _BadShard("the file is missing")
        if size != info.get("bytes"):
            raise _BadShard(f"{size} bytes, the index recorded {info.get('bytes')} (truncated or rewritten)")
        # read once, check and parse the same bytes (safetensors' own loaders map the file: a later change of
        # the file would change, or crash, tensors already checked)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise _BadShard(f"unreadable: {e}") from e
        if len(data) != info.get("bytes"):
            raise _BadShard(f"{len(data)} bytes, the index recorded {info.get('bytes')}")
        if hashlib.sha256(data).hexdigest() != info.get("sha256"):
            raise _BadShard("checksum mismatch (corrupted)")
        try:
            from safetensors.torch import load as load_safetensors

            header_len = int.from_bytes(data[:8], "little")
            file_meta = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
            tensors = load_safetensors(data)
        except Exception as e:  # safetensors raises its own error types for truncated / malformed files
            raise _BadShard(f"unreadable: {e}") from e
        del data
        g, loc = tensors.get("global"), tensors.get("local")
        rows = int(info.get("rows", -1))
        emb, m = index.get("embed_dim"), index.get("local_tokens")
        if g is None:
            raise _BadShard("no 'global' tensor")
        if g.dtype != dtype or g.dim() != 2 or g.shape[0] != rows or (emb is not None and g.shape[1] != emb):
            raise _BadShard(f"'global' is {g.dtype} {tuple(g.shape)}, expected {dtype} ({rows}, {emb})")
        if local:
            if loc is None:
                raise _BadShard("no 'local' tensor")
            if (loc.dtype != dtype or loc.dim() != 3 or loc.shape[0] != rows or loc.shape[2] != g.shape[1]
                    or (m is not None and loc.shape[1] != m)):
                raise _BadShard(f"'local' is {loc.dtype} {tuple(loc.shape)}, expected {dtype} ({rows}, {m}, "
                                f"{g.shape[1]})")
        elif loc is not None:
            raise _BadShard("an unexpected 'local' tensor")
        try:
            shard_keys = json.loads(file_meta.get("keys", "null"))
        except ValueError:
            shard_keys = None
        if not isinstance(shard_keys, list) or len(shard_keys) != rows:
            raise _BadShard("no valid list of file keys in its metadata")
        for key, row in refs:
            if shard_keys[row] != key:
                raise _BadShard(f"row {row} holds {shard_keys[row]!r}, the index says {key!r}")
        if not (torch.isfinite(g).all() and (loc is None or torch.isfinite(loc).all())):
            raise _BadShard("non-finite features")
        return g, loc

    @staticmethod
    def _drop_shard(directory: Path, index: dict, name: str) -> None:
        index["shards"].pop(name, None)
        for key in [k for k, ref in index["entries"].items() if ref[0] == name]:
            del index["entries"][key]
        (directory / name).unlink(missing_ok=True)

    def _collect_garbage(self, directory: Path, index: dict) -> None:
        """Delete shards no entry references, unreferenced shard files and stale temporary files (lock held)."""
        referenced = {ref[0] for ref in index["entries"].values()}
        changed = False
        for name in [s for s in index["shards"] if s not in referenced]:
            index["shards"].pop(name)
            changed = True
        for p in directory.iterdir():
            if (SHARD_RE.match(p.name) and p.name not in index["shards"]) or \
                    (p.name.startswith(".") and p.name.endswith(".tmp")):
                log.info("feature cache %s: removing leftover %s", directory, p.name)
                p.unlink(missing_ok=True)
        if changed:
            _write_index(directory, index)

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
            nbytes = sum(p.stat().st_size for p in d.iterdir() if p.is_file())
            out.append({"directory": str(d), **{k: index.get(k) for k in (
                "fingerprint", "backbone", "transform_id", "view", "seed", "local", "dtype", "embed_dim",
                "local_tokens")}, "images": len(index.get("entries", {}) or {}),
                "shards": len(index.get("shards", {}) or {}), "bytes": nbytes})
        return out

    def clear(self, fingerprint: Optional[str] = None) -> int:
        """Delete the cached features (only those of one backbone fingerprint when given); returns the number of
        cache directories removed. Only files the cache writes are deleted, so a mistaken root is harmless."""
        removed = 0
        for d in self._directories():
            if fingerprint is not None and d.parent.name != fingerprint:
                continue
            with self._locked(d):
                for p in d.iterdir():
                    if p.name != LOCK and (p.name == INDEX or SHARD_RE.match(p.name)
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
               progress: bool) -> dict[str, tuple]:
        out: dict[str, tuple] = {}
        if not positions:
            return out
        from tqdm.auto import tqdm

        data = _EncodeSet(positions, identities, paths, seed=seed, view=view, transform=transform, loader=loader,
                          dataset=dataset)
        # an own generator: creating the loader's iterator must not consume the caller's global torch RNG
        batches = torch.utils.data.DataLoader(data, batch_size=max(1, int(batch_size)), shuffle=False,
                                              num_workers=int(num_workers), generator=torch.Generator().manual_seed(0))
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
                        key = keys[positions[j]]
                        out[key] = (g, loc, r)
                        self.buffer.append((key, g[r], loc[r] if loc is not None else None))
                    while len(self.buffer) >= self.cache.shard_size:
                        self.flush(self.cache.shard_size)
                    bar.update(len(idx))
            self.flush()
        finally:
            bar.close()
        return out

    def flush(self, count: Optional[int] = None) -> None:
        """Write the first ``count`` buffered rows (all by default) as a new shard, then reference it in the index."""
        rows = self.buffer[:count] if count is not None else list(self.buffer)
        if not rows:
            return
        del self.buffer[:len(rows)]
        keys = [r[0] for r in rows]
        tensors = {"global": torch.stack([r[1] for r in rows])}
        if self.local:
            tensors["local"] = torch.stack([r[2] for r in rows])
        c = self.cache
        with c._locked(self.directory):
            index = c._load_index(self.directory, self.meta, self.backbone)
            emb = int(tensors["global"].shape[1])
            m = int(tensors["local"].shape[1]) if self.local else None
            if (index.get("embed_dim") not in (None, emb)) or (m is not None and index.get("local_tokens")
                                                                 not in (None, m)):
                raise CacheError(f"{self.directory}: new features are ({emb}, M={m}), the cache holds "
                                 f"({index.get('embed_dim')}, M={index.get('local_tokens')}); feed images of one size")
            name = self._next_name(index)
            path = self.directory / name
            atomic_save_safetensors(path, tensors, metadata={"format": FORMAT, "keys": json.dumps(keys)})
            index["embed_dim"], index["local_tokens"] = emb, m
            index["shards"][name] = {"rows": len(keys), "bytes": path.stat().st_size, "sha256": sha256_file(path)}
            for row, key in enumerate(keys):
                index["entries"][key] = [name, row]
            # shards whose rows have all been superseded (another process encoded the same images) go
            referenced = {ref[0] for ref in index["entries"].values()}
            for stale in [s for s in index["shards"] if s not in referenced]:
                index["shards"].pop(stale)
            _write_index(self.directory, index)
            for p in self.directory.iterdir():
                if SHARD_RE.match(p.name) and p.name not in index["shards"]:
                    p.unlink(missing_ok=True)

    def _next_name(self, index: dict) -> str:
        used = [int(m.group(1)) for m in (SHARD_RE.match(p.name) for p in self.directory.iterdir()) if m]
        used += [int(m.group(1)) for m in (SHARD_RE.match(s) for s in index["shards"]) if m]
        return f"shard-{max(used, default=-1) + 1:05d}.safetensors"


def _write_index(directory: Path, index: dict) -> None:
    """Replace the index atomically (compact JSON: it is rewritten after every new shard)."""
    atomic_write_text(directory / INDEX, json.dumps(index, separators=(",", ":")) + "\n")


def _assemble(keys: list[str], found: dict[str, tuple], local: bool, embed_dim: int):
    """Gather the rows of ``keys`` (from shard or batch tensors) into float32 (N, E) and (N, M, E) tensors."""
    if not keys:
        return torch.empty(0, embed_dim), (torch.empty(0, 0, embed_dim) if local else None)
    groups: dict[int, tuple[tuple, list[int], list[int]]] = {}  # one group per source tensor
    for pos, k in enumerate(keys):
        g, loc, row = found[k]
        grp = groups.setdefault(id(g), ((g, loc), [], []))
        grp[1].append(pos)
        grp[2].append(row)
    (g0, l0), _, _ = next(iter(groups.values()))
    global_ = torch.empty(len(keys), g0.shape[1])
    local_t = torch.empty(len(keys), l0.shape[1], l0.shape[2]) if local else None
    for (g, loc), pos, rows in groups.values():
        pos_t, rows_t = torch.tensor(pos), torch.tensor(rows)
        if g.shape[1:] != global_.shape[1:] or (local and loc.shape[1:] != local_t.shape[1:]):
            raise CacheError(f"features of different shapes in one request ({tuple(g.shape[1:])} vs "
                             f"{tuple(global_.shape[1:])}): feed images of one size")
        global_[pos_t] = g[rows_t].float()
        if local:
            local_t[pos_t] = loc[rows_t].float()
    return global_, local_t


def cache_info(root: str | Path) -> list[dict]:
    """Summaries of every cache directory under ``root`` (see :meth:`FeatureCache.info`)."""
    return FeatureCache(root, progress=False).info()


def clear_cache(root: str | Path, fingerprint: Optional[str] = None) -> int:
    """Delete cached features under ``root`` (see :meth:`FeatureCache.clear`)."""
    return FeatureCache(root, progress=False).clear(fingerprint)
