"""CoOp's split files ``split_zhou_<Name>.json``: reading, and writing a generated one (private).

Format: ``{"train": [[relpath, label, classname], ...], "val": [...], "test": [...]}`` with paths
relative to the dataset's image folder.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

from .._io import atomic_write_json
from ..errors import DataError
from ._util import check_exist, classnames_from_samples, clean_classname, path_digest, read_json, user_cache_dir
from .base import Sample

SPLIT_NAMES = ("train", "val", "test")


def cached_split_path(dataset_dir: Path, filename: str) -> Path:
    """Where a generated split goes when the dataset folder is not writable."""
    return user_cache_dir() / "splits" / f"{dataset_dir.name}-{path_digest(dataset_dir)}" / filename


def find_split_file(dataset_dir: Path, filename: str) -> Path | None:
    """The split file in the dataset folder, else one generated earlier into the user cache, else None."""
    for candidate in (dataset_dir / filename, cached_split_path(dataset_dir, filename)):
        if candidate.is_file():
            return candidate
    return None


def read_coop_split(path: Path, image_dir: Path, dataset: str, check_files: bool = True
                    ) -> tuple[list[str], list[Sample], list[Sample], list[Sample], list[str]]:
    """Read a CoOp split file; class names are cleaned (``_`` -> space), the last item is the names as the file
    spells them. Raises DataError on a bad file, inconsistent labels, or (with ``check_files``) listed images that
    do not exist."""
    raw = read_json(path, f"{dataset}: split file")
    return parse_coop_split(raw, image_dir, f"{dataset}: split file {path}", check_files)


def parse_coop_split(raw: object, image_dir: Path, source: str, check_files: bool = True
                     ) -> tuple[list[str], list[Sample], list[Sample], list[Sample], list[str]]:
    """Parse the JSON object of a CoOp split file (``source`` names it in error messages): (cleaned class names,
    train, val, test, class names as the file spells them)."""
    if not isinstance(raw, dict):
        raise DataError(f"{source} must hold an object with keys train/val/test")
    image_dir = Path(os.path.abspath(image_dir))
    splits: dict[str, list[Sample]] = {}
    for name in SPLIT_NAMES:
        if name not in raw:
            raise DataError(f"{source} has no {name!r} list")
        entries = raw[name]
        if not isinstance(entries, list):
            raise DataError(f"{source}: {name!r} must be a list")
        out = []
        for i, entry in enumerate(entries):
            if (not isinstance(entry, (list, tuple)) or len(entry) != 3 or not isinstance(entry[0], str)
                    or not isinstance(entry[2], str) or isinstance(entry[1], bool)):
                raise DataError(f"{source}: {name}[{i}] must be [relative_path, label, "
                                f"classname], got {entry!r}"[:300])
            try:
                label = int(entry[1])
            except (TypeError, ValueError):
                raise DataError(f"{source}: {name}[{i}] has a non-integer label "
                                f"{entry[1]!r}")
            out.append(Sample(path=str(image_dir / entry[0]), label=label, classname=entry[2]))
        splits[name] = out
    raw_names = classnames_from_samples(splits.values(), source)
    classnames = [clean_classname(n) for n in raw_names]  # repeated names are allowed (as ImageNet's "crane")
    cleaned = {k: [Sample(s.path, s.label, classnames[s.label], s.target) for s in v] for k, v in splits.items()}
    if check_files:
        check_exist([s for k in SPLIT_NAMES for s in cleaned[k]], source)
    return classnames, cleaned["train"], cleaned["val"], cleaned["test"], list(raw_names)


def coop_split_json(train: Sequence[Sample], val: Sequence[Sample], test: Sequence[Sample],
                    image_dir: Path) -> dict:
    image_dir = os.path.abspath(image_dir)

    def rel(s: Sample) -> list:
        return [Path(os.path.relpath(s.path, image_dir)).as_posix(), s.label, s.classname]

    return {"train": [rel(s) for s in train], "val": [rel(s) for s in val], "test": [rel(s) for s in test]}


def write_coop_split(dataset_dir: Path, filename: str, train: Sequence[Sample], val: Sequence[Sample],
                     test: Sequence[Sample], image_dir: Path, dataset: str) -> Path:
    """Save a generated split as ``dataset_dir/filename`` (atomically); when the folder is not
    writable, save it under the user cache instead and warn. Returns where it went."""
    obj = coop_split_json(train, val, test, image_dir)
    target = dataset_dir / filename
    try:
        atomic_write_json(target, obj)
        return target
    except OSError as e:
        fallback = cached_split_path(dataset_dir, filename)
        try:
            atomic_write_json(fallback, obj)
        except OSError as e2:
            warnings.warn(f"{dataset}: generated a split but could not save it to {target} ({e}) nor to "
                          f"{fallback} ({e2}); it will be generated again (deterministically) next time",
                          stacklevel=3)
            return target
        warnings.warn(f"{dataset}: dataset folder {dataset_dir} is not writable ({e.strerror or e}); "
                      f"saved the generated split to {fallback} instead", stacklevel=3)
        return fallback
