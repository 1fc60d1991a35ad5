"""The evaluation protocols of CoOp / CoCoOp on top of a loaded dataset.

- Few-shot learning: :func:`few_shot_split` samples K training images per class and a val set of
  ``min(K, 4)`` per class (CoOp's ``generate_fewshot_dataset``), reproducibly for a seed.
- Base-to-new generalisation (CoCoOp): :func:`subsample_classes` keeps the first ``ceil(n/2)`` labels
  (``"base"``) or the rest (``"new"``), relabelled from 0. Train on ``subsample_classes(fs, "base")``,
  evaluate on the test sets of both halves.
- Cross-dataset transfer and domain generalisation need no code here: load the target dataset with
  :func:`vlprompt.data.load_dataset` (e.g. ``caltech101`` or ``imagenet_sketch`` after training on
  ``imagenet``) and evaluate on its ``test`` with its own class names.

A split is saved with the run (:func:`save_split`) and read back with :func:`load_split`, so a run's
exact images can be reused.
"""
from __future__ import annotations

import json
import math
import os
import random
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Literal, Sequence

from ..errors import DataError
from ._util import MAX_NAMED, check_exist, group_by, read_json
from .base import DatasetSplits, Sample

SPLIT_FORMAT = "vlprompt-split"
SPLIT_VERSION = 1


def samples_per_class(samples: Sequence[Sample], num_classes: int | None = None) -> list[int]:
    """Number of samples of each label: ``counts[label]`` (length ``num_classes`` or max label + 1)."""
    counts = Counter(s.label for s in samples)
    n = num_classes if num_classes is not None else (max(counts) + 1 if counts else 0)
    return [counts.get(i, 0) for i in range(n)]


def group_by_label(samples: Sequence[Sample]) -> dict[int, list[Sample]]:
    """``{label: [samples]}`` in label order, each list in the input order."""
    return dict(sorted(group_by(samples, lambda s: s.label).items()))


def require_split(splits: DatasetSplits, which: Literal["train", "val", "test"]) -> list[Sample]:
    """``splits.<which>``, or a DataError saying why this dataset has none (e.g. ImageNet without
    ``images/train``, a test-only ImageNet variant)."""
    if which not in ("train", "val", "test"):
        raise DataError(f"unknown split {which!r}: use train, val or test")
    samples = getattr(splits, which)
    if samples:
        return samples
    why = (splits.extra.get("unavailable") or {}).get(which)
    raise DataError(why or f"dataset {splits.name} has no {which} images")


def _sample_per_class(samples: Sequence[Sample], num_classes: int, k: int, rng: random.Random, split: str,
                      classnames: Sequence[str], allow_fewer: bool) -> tuple[list[Sample], dict[str, list[int]]]:
    groups = group_by_label(samples)
    out: list[Sample] = []
    short: dict[str, list[int]] = {}
    for label in range(num_classes):
        items = sorted(groups.get(label, []), key=lambda s: s.path)  # sorted: independent of input order
        if len(items) >= k:
            out += rng.sample(items, k)
        else:
            short[classnames[label]] = [len(items), k]
            out += rng.sample(items, len(items))
    if short and not allow_fewer:
        named = ", ".join(f"{c!r} has {have}" for c, (have, _) in list(short.items())[:MAX_NAMED])
        more = f" (and {len(short) - MAX_NAMED} more classes)" if len(short) > MAX_NAMED else ""
        raise DataError(f"few-shot sampling: {len(short)} class(es) have fewer than {k} {split} images: "
                        f"{named}{more}. Lower the shots or pass allow_fewer=True to take what there is")
    return out, short


def few_shot_split(splits: DatasetSplits, shots: int, seed: int, *, allow_fewer: bool = False,
                   max_val_shots: int = 4) -> DatasetSplits:
    """K-shot training set and a ``min(K, 4)``-per-class val set, as CoOp's
    ``generate_fewshot_dataset(train, K)`` and ``generate_fewshot_dataset(val, min(K, 4))``.

    Deterministic and identical across processes for a ``seed``: each class's images are sorted by
    path and drawn with ``random.Random(seed)`` (train first, then val), never with ``hash()``.
    Returns a copy with ``train`` and ``val`` replaced (``test`` unchanged) and the sampling recorded
    in ``extra["few_shot"]``. A class with fewer than K images (or fewer val images than needed) is a
    DataError naming it; with ``allow_fewer=True`` all its images are taken and the shortfall is
    reported in ``extra["few_shot"]["short"]`` and a warning. An empty val split stays empty
    (ImageNet, whose val set CoOp does not subsample). ``train`` must not be empty.
    """
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise DataError(f"shots must be a positive integer, got {shots!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"seed must be an integer, got {seed!r}")
    train_all = require_split(splits, "train")
    rng = random.Random(seed)
    n = splits.num_classes
    train, short_train = _sample_per_class(train_all, n, shots, rng, "train", splits.classnames, allow_fewer)
    val_k = min(shots, max_val_shots)
    short_val: dict[str, list[int]] = {}
    val: list[Sample] = []
    if splits.val:
        val, short_val = _sample_per_class(splits.val, n, val_k, rng, "val", splits.classnames, allow_fewer)
    info = {"shots": shots, "seed": seed, "val_shots": val_k if splits.val else 0}
    if short_train or short_val:
        info["short"] = {"train": short_train, "val": short_val}
        parts = [f"{split}: " + ", ".join(f"{c!r} {have}/{want}" for c, (have, want) in list(d.items())[:MAX_NAMED])
                 for split, d in (("train", short_train), ("val", short_val)) if d]
        warnings.warn(f"few-shot sampling of {splits.name}: some classes have fewer images than asked "
                      f"(taken all of them): {'; '.join(parts)}", stacklevel=2)
    extra = dict(splits.extra)
    extra["few_shot"] = info
    return replace(splits, train=train, val=val, extra=extra)


def subsample_classes(splits: DatasetSplits, which: Literal["base", "new", "all"] = "all") -> DatasetSplits:
    """CoOp/CoCoOp's base-to-new split: the labels present in ``train`` (all labels when train is
    empty), sorted; the first ``ceil(n/2)`` are ``"base"``, the rest ``"new"``. The chosen half is
    relabelled from 0 in every split and ``classnames`` re-indexed; ``"all"`` returns ``splits`` as is.
    ``extra["subsample"]`` records the half and the original labels (``original_labels[new] = old``)."""
    if which not in ("base", "new", "all"):
        raise DataError(f"subsample_classes: which must be 'base', 'new' or 'all', got {which!r}")
    if which == "all":
        return splits
    labels = sorted({s.label for s in splits.train}) if splits.train else list(range(splits.num_classes))
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if which == "base" else labels[m:]
    if not selected:
        raise DataError(f"subsample_classes: dataset {splits.name} has no {which} classes ({len(labels)} classes)")
    relabel = {old: new for new, old in enumerate(selected)}
    classnames = [splits.classnames[old] for old in selected]

    def convert(samples: Sequence[Sample]) -> list[Sample]:
        return [replace(s, label=relabel[s.label]) for s in samples if s.label in relabel]

    extra = dict(splits.extra)
    extra["subsample"] = {"which": which, "original_labels": list(selected), "num_classes_before": splits.num_classes}
    return replace(splits, classnames=classnames, train=convert(splits.train), val=convert(splits.val),
                   test=convert(splits.test), extra=extra)


def _jsonable(value):
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def split_to_json(splits: DatasetSplits) -> dict:
    """The JSON object :func:`save_split` writes."""

    def rows(samples: Sequence[Sample]) -> list:
        return [[s.path, s.label, s.classname] + ([s.target] if s.target is not None else []) for s in samples]

    return {
        "format": SPLIT_FORMAT, "version": SPLIT_VERSION, "name": splits.name, "classnames": list(splits.classnames),
        "template": splits.template, "extra": {k: v for k, v in splits.extra.items() if _jsonable(v)},
        "train": rows(splits.train), "val": rows(splits.val), "test": rows(splits.test),
    }


def save_split(splits: DatasetSplits, path: str | os.PathLike) -> Path:
    """Save ``splits`` (absolute image paths, labels, class names, targets, class list, template and the
    JSON-able ``extra``) to ``path`` atomically, e.g. into a run directory. Returns the path."""
    from .._io import atomic_write_json  # imports torch: only when saving

    path = Path(path)
    atomic_write_json(path, split_to_json(splits))
    return path


def load_split(path: str | os.PathLike, *, check_files: bool = True) -> DatasetSplits:
    """Read a split written by :func:`save_split`. Raises DataError naming the file and field when
    it is malformed or inconsistent, and (``check_files``) when listed images no longer exist."""
    path = Path(path)
    obj = read_json(path, "split file")
    if not isinstance(obj, dict) or obj.get("format") != SPLIT_FORMAT:
        raise DataError(f"split file {path} is not a vlprompt split (no \"format\": \"{SPLIT_FORMAT}\")")
    if obj.get("version") != SPLIT_VERSION:
        raise DataError(f"split file {path} has version {obj.get('version')!r}; this vlprompt reads {SPLIT_VERSION}")
    classnames = obj.get("classnames")
    if not isinstance(classnames, list) or not classnames or not all(isinstance(c, str) for c in classnames):
        raise DataError(f"split file {path}: field 'classnames' must be a non-empty list of strings")
    for field in ("name", "template"):
        if not isinstance(obj.get(field), str):
            raise DataError(f"split file {path}: field {field!r} must be a string")
    extra = obj.get("extra", {})
    if not isinstance(extra, dict):
        raise DataError(f"split file {path}: field 'extra' must be an object")
    parts = {}
    for split in ("train", "val", "test"):
        rows = obj.get(split)
        if not isinstance(rows, list):
            raise DataError(f"split file {path}: field {split!r} must be a list")
        out = []
        for i, row in enumerate(rows):
            ok = (isinstance(row, list) and len(row) in (3, 4) and isinstance(row[0], str)
                  and isinstance(row[1], int) and not isinstance(row[1], bool) and isinstance(row[2], str)
                  and (len(row) == 3 or (isinstance(row[3], (int, float)) and not isinstance(row[3], bool))))
            if not ok:
                raise DataError(f"split file {path}: {split}[{i}] must be [path, label, classname(, target)], "
                                f"got {row!r}"[:300])
            if not 0 <= row[1] < len(classnames):
                raise DataError(f"split file {path}: {split}[{i}] has label {row[1]} outside 0..{len(classnames) - 1}")
            if row[2] != classnames[row[1]]:
                raise DataError(f"split file {path}: {split}[{i}] names class {row[2]!r} but label {row[1]} is "
                                f"{classnames[row[1]]!r}")
            out.append(Sample(row[0], row[1], row[2], float(row[3]) if len(row) == 4 else None))
        parts[split] = out
    if check_files:
        check_exist([s for v in parts.values() for s in v], f"split file {path}")
    return DatasetSplits(name=obj["name"], classnames=list(classnames), template=obj["template"], extra=extra, **parts)
