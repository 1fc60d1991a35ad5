"""The evaluation protocols of CoOp / CoCoOp on top of a loaded dataset.

- Few-shot learning: :func:`few_shot_split` samples K training images per class and a val set of
  ``min(K, 4)`` per class (CoOp's ``generate_fewshot_dataset``), reproducibly for a seed: by default the very
  images CoOp / CoCoOp's code draws for that seed from the same split file (Dassl's rule), or those of CoOp's
  linear-probe script. :func:`read_dassl_few_shot` reads the few-shot samples Dassl cached
  (``split_fewshot/shot_K-seed_S.pkl``) without running code from them.
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
from .base import SOURCE_NAMES, DatasetSplits, Sample

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


SAMPLERS = ("dassl", "lpclip", "sorted")
SAMPLER_HELP = ("few-shot sampler: dassl = CoOp/CoCoOp's Dassl (random.seed(seed), random.sample per class in the "
                "split file's order: the very images of the original runs of a seed); lpclip = CoOp's linear-probe "
                "script (np.random.seed(seed), np.random.choice per class); sorted = the rule of vlprompt before "
                "dassl became the default (each class sorted by path: the images of runs made with it)")


def _shortfalls(samples: Sequence[Sample], num_classes: int, k: int, classnames: Sequence[str]) -> dict[str, list[int]]:
    return {classnames[label]: [have, k] for label, have in enumerate(samples_per_class(samples, num_classes))
            if have < k}


def _refuse_short(short: dict[str, list[int]], k: int, split: str) -> None:
    named = ", ".join(f"{c!r} has {have}" for c, (have, _) in list(short.items())[:MAX_NAMED])
    more = f" (and {len(short) - MAX_NAMED} more classes)" if len(short) > MAX_NAMED else ""
    raise DataError(f"few-shot sampling: {len(short)} class(es) have fewer than {k} {split} images: "
                    f"{named}{more}. Lower --shots, or pass --allow-fewer (data.allow_fewer: true) to take what there "
                    f"is")


def _draw_dassl(samples: Sequence[Sample], k: int, rng: random.Random) -> list[Sample]:
    """Dassl's ``generate_fewshot_dataset``: classes in the order they first appear, each class's images in the
    input (split file) order, ``random.sample(items, k)``. A short class (``allow_fewer``) gives all its images;
    Dassl would draw ``random.choices(items, k=k)`` (repeats) there, and that draw is made and discarded so the
    classes after it still get Dassl's images."""
    out: list[Sample] = []
    for items in group_by(samples, lambda s: s.label).values():  # insertion order = first appearance
        if len(items) >= k:
            out += rng.sample(items, k)
        else:
            rng.choices(items, k=k)
            out += items
    return out


def _draw_lpclip(samples: Sequence[Sample], k: int, rng, labels) -> list[Sample]:
    """CoOp's ``lpclip/linear_probe.py``: for each label of ``np.unique(train_label)``, ``np.random.choice`` of
    that class's indices (input order), ``size=k, replace=False``. A short class gives all its images in the
    order of ``rng.permutation``, the draw ``choice`` itself makes (legacy ``RandomState.choice`` takes
    ``permutation(n)[:k]``)."""
    import numpy as np

    all_labels = np.array([s.label for s in samples], dtype=np.int64)
    out: list[Sample] = []
    for label in labels:
        idx = np.flatnonzero(all_labels == label)
        pick = rng.choice(idx, size=k, replace=False) if len(idx) >= k else idx[rng.permutation(len(idx))]
        out += [samples[i] for i in pick]
    return out


def _draw_sorted(samples: Sequence[Sample], num_classes: int, k: int, rng: random.Random) -> list[Sample]:
    """vlprompt's rule before ``dassl`` became the default: labels 0..K-1, each class's images sorted by path,
    ``random.sample`` (independent of the input order, but not the images the original code drew)."""
    groups = group_by_label(samples)
    out: list[Sample] = []
    for label in range(num_classes):
        items = sorted(groups.get(label, []), key=lambda s: s.path)
        out += rng.sample(items, min(k, len(items)))
    return out


def few_shot_split(splits: DatasetSplits, shots: int, seed: int, *, allow_fewer: bool = False,
                   max_val_shots: int = 4, sampler: str = "dassl", val_shots: int | None = None) -> DatasetSplits:
    """K-shot training set and a ``min(K, 4)``-per-class val set, as CoOp's
    ``generate_fewshot_dataset(train, K)`` and ``generate_fewshot_dataset(val, min(K, 4))``.

    ``val_shots``: the val images per class instead (drawn after train, as CoOp draws its min(K, 4)); 0 keeps
    the whole val split, unsampled (Tip-Adapter's protocol). The training images are the same whatever it is.

    ``sampler`` (:data:`SAMPLER_HELP`): ``"dassl"`` (default) draws exactly the images CoOp / CoCoOp's code draws
    for this seed from the same split file: one ``random.Random(seed)`` stream (Dassl's ``random.seed(seed)``),
    train then val, classes in the order they first appear and each class in the input order -- so the result
    depends on the order of ``splits.train`` / ``splits.val`` (a CoOp split file's order). ``"lpclip"``: CoOp's
    linear-probe script (``np.random.seed(seed)``, sorted labels, ``np.random.choice`` per class, train then val).
    ``"sorted"``: vlprompt's rule before ``dassl`` became the default (each class sorted by path, labels in
    order), independent of the input order. Never uses ``hash()``: identical across processes.

    Returns a copy with ``train`` and ``val`` replaced (``test`` unchanged) and the sampling recorded in
    ``extra["few_shot"]``. A class with fewer than K images (or fewer val images than needed) is a DataError
    naming it; with ``allow_fewer=True`` all its images are taken and the shortfall is reported in
    ``extra["few_shot"]["short"]`` and a warning. An empty val split stays empty (ImageNet, whose val set CoOp
    does not subsample). ``train`` must not be empty.
    """
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise DataError(f"shots must be a positive integer, got {shots!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"seed must be an integer, got {seed!r}")
    if sampler not in SAMPLERS:
        raise DataError(f"unknown few-shot sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    if sampler == "lpclip" and not 0 <= seed < 2 ** 32:
        raise DataError(f"the lpclip sampler seeds numpy (np.random.seed): seed must be in 0..2**32-1, got {seed}")
    if val_shots is not None and (isinstance(val_shots, bool) or not isinstance(val_shots, int) or val_shots < 0):
        raise DataError(f"val_shots must be an integer >= 0, got {val_shots!r}")
    train_all = require_split(splits, "train")
    n = splits.num_classes
    whole_val = val_shots == 0
    val_k = min(shots, max_val_shots) if val_shots is None else val_shots
    short_train = _shortfalls(train_all, n, shots, splits.classnames)
    short_val = _shortfalls(splits.val, n, val_k, splits.classnames) if splits.val and not whole_val else {}
    for short, k, split in ((short_train, shots, "train"), (short_val, val_k, "val")):
        if short and not allow_fewer:
            _refuse_short(short, k, split)
    val: list[Sample] = []
    if sampler == "lpclip":
        import numpy as np

        rng = np.random.RandomState(seed)  # the legacy global stream np.random.seed(seed) sets
        labels = np.unique([s.label for s in train_all])  # the script walks the train labels for val too
        train = _draw_lpclip(train_all, shots, rng, labels)
        if splits.val and not whole_val:
            val = _draw_lpclip(splits.val, val_k, rng, labels)
    else:
        rng = random.Random(seed)  # the stream random.seed(seed) gives the module-level functions Dassl calls
        if sampler == "dassl":
            train = _draw_dassl(train_all, shots, rng)
            if splits.val and not whole_val:
                val = _draw_dassl(splits.val, val_k, rng)
        else:
            train = _draw_sorted(train_all, n, shots, rng)
            if splits.val and not whole_val:
                val = _draw_sorted(splits.val, n, val_k, rng)
    if whole_val:
        val = list(splits.val)
    info = {"shots": shots, "seed": seed, "val_shots": val_k if splits.val else 0, "sampler": sampler}
    if whole_val:
        info["val"] = "whole split"
    if short_train or short_val:
        info["short"] = {"train": short_train, "val": short_val}
        parts = [f"{split}: " + ", ".join(f"{c!r} {have}/{want}" for c, (have, want) in list(d.items())[:MAX_NAMED])
                 for split, d in (("train", short_train), ("val", short_val)) if d]
        warnings.warn(f"few-shot sampling of {splits.name}: some classes have fewer images than asked "
                      f"(taken all of them): {'; '.join(parts)}", stacklevel=2)
    extra = dict(splits.extra)
    extra["few_shot"] = info
    return replace(splits, train=train, val=val, extra=extra)


DASSL_DATUM = "dassl.data.datasets.base_dataset.Datum"


def _datum_fields(item, source: str) -> tuple[str, int, str]:
    from ..safe_pickle import Placeholder

    attrs = item.attrs if isinstance(item, Placeholder) and item.global_name == DASSL_DATUM else None
    attrs = attrs or {}
    impath, label, classname = attrs.get("_impath"), attrs.get("_label"), attrs.get("_classname")
    if (not isinstance(impath, str) or isinstance(label, bool) or not isinstance(label, int)
            or not isinstance(classname, str)):
        raise DataError(f"{source} is not a Dassl Datum with a string impath, an integer label and a classname: "
                        f"{item!r}"[:300])
    return impath, label, classname


def read_dassl_few_shot(path: str | os.PathLike, splits: DatasetSplits, shots: int | None = None) -> DatasetSplits:
    """Train and val exactly as a Dassl few-shot cache holds them: ``split_fewshot/shot_K-seed_S.pkl``, which
    CoOp's datasets write on the first run of a shots / seed and read on every later one (a pickle of
    ``{"train": [Datum], "val": [Datum]}``; ImageNet's has no val). Parsed without running code from the file
    (:func:`vlprompt.safe_pickle.load_pickle`: Datum objects become inert placeholders).

    The file holds the original machine's absolute paths: each image is found among ``splits``' own train (val)
    images by the part of its path after the folder all local images share (the dataset's image folder), and its
    label must be the local one (a DataError names the first image that is not found or disagrees). ``shots``
    (when given) must be the file's number of images per class. Returns a copy of ``splits`` with train and val
    replaced, in the file's order (a class Dassl sampled with repeats keeps them); ``extra["few_shot"]`` records
    the file."""
    from ..safe_pickle import load_pickle

    path = Path(path)
    if not path.is_file():
        raise DataError(f"few-shot file {path} not found")
    obj = load_pickle(path, error=DataError)
    if not isinstance(obj, dict) or not isinstance(obj.get("train"), list):
        raise DataError(f"few-shot file {path} is not a Dassl few-shot cache (a dict with 'train' and 'val' lists "
                        f"of Datum objects)")
    if obj.get("val") is None and splits.val:
        raise DataError(f"few-shot file {path} has no 'val' list but {splits.name} has a val split")
    local = [s for part in (splits.train, splits.val, splits.test) for s in part]
    if not local:
        raise DataError(f"few-shot file {path}: dataset {splits.name} has no images to find its images among")
    base = os.path.commonpath([os.path.dirname(s.path) for s in local])
    out: dict[str, list[Sample]] = {}
    for split, own in (("train", splits.train), ("val", splits.val)):
        items = obj.get(split) or []
        if not isinstance(items, list):
            raise DataError(f"few-shot file {path}: {split!r} must be a list of Datum objects")
        index = {Path(os.path.relpath(s.path, base)).as_posix(): s for s in own}
        depths = sorted({key.count("/") + 1 for key in index}, reverse=True)
        found = []
        for i, item in enumerate(items):
            impath, label, classname = _datum_fields(item, f"few-shot file {path}: {split}[{i}]")
            parts = impath.replace("\\", "/").split("/")
            sample = next((index[k] for k in ("/".join(parts[-d:]) for d in depths) if k in index), None)
            if sample is None:
                raise DataError(f"few-shot file {path}: {split} image {impath} is not among the {split} images of "
                                f"{splits.name} under {base} (matched by the path after that folder); is --root "
                                f"the dataset the file was made for?")
            if sample.label != label:
                raise DataError(f"few-shot file {path}: {split} image {impath} has label {label} ({classname!r}) "
                                f"but {sample.path} is label {sample.label} ({sample.classname!r}) here")
            found.append(sample)
        out[split] = found
    counts = Counter(s.label for s in out["train"])
    missing = [splits.classnames[label] for label in sorted({s.label for s in splits.train} - set(counts))]
    if missing:
        raise DataError(f"few-shot file {path} has no train image of class(es) {missing[:MAX_NAMED]}")
    per_class = sorted(set(counts.values()))
    if shots is not None and per_class != [shots]:
        raise DataError(f"few-shot file {path} holds {'/'.join(map(str, per_class))} train images per class, "
                        f"not --shots {shots}")
    val_counts = Counter(s.label for s in out["val"])
    info = {"shots": per_class[-1] if per_class else 0, "val_shots": max(val_counts.values(), default=0),
            "sampler": "dassl", "file": str(path)}
    extra = dict(splits.extra)
    extra["few_shot"] = info
    return replace(splits, train=out["train"], val=out["val"], extra=extra)


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
    if isinstance(extra.get(SOURCE_NAMES), list) and len(extra[SOURCE_NAMES]) == splits.num_classes:
        extra[SOURCE_NAMES] = [extra[SOURCE_NAMES][old] for old in selected]
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
