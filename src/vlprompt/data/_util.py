"""Small file-system and splitting helpers shared by the dataset readers (private)."""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

from ..errors import DataError
from .base import Sample

T = TypeVar("T")

#: File name endings read as images when a folder is listed (lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")

#: How many missing paths an error message names before it only counts the rest.
MAX_NAMED = 5


def clean_classname(name: str) -> str:
    """The class name as the papers put it into prompts: underscores become spaces, runs of white
    space collapse (CoOp's prompt learner does ``name.replace("_", " ")``)."""
    return " ".join(str(name).replace("_", " ").split())


_NUMBER = re.compile(r"^[+-]?\d+(\.\d+)?$")


def numeric_names_warning(classnames: Sequence[str], source: str, how: str) -> list[str]:
    """``[one line]`` when every class name is a bare number (the class names of integer labels): the text
    prompts then read "a photo of a 0." and carry no word of the class; ``how`` says how to give names. ``[]``
    otherwise. Ordinal readers, whose rank names are numbers by design, do not call it."""
    if not classnames or not all(_NUMBER.match(str(c).strip()) for c in classnames):
        return []
    shown = ", ".join(repr(str(c)) for c in list(classnames)[:3]) + (", ..." if len(classnames) > 3 else "")
    return [f"{source}: the class names are numbers ({shown}), so the text prompts carry no word of the class "
            f"(e.g. 'a photo of a {classnames[0]}.'); {how}"]


def split_camel_case(name: str) -> str:
    """``"ApplyEyeMakeup"`` -> ``"Apply_Eye_Makeup"`` (CoOp's renaming of UCF101 actions)."""
    parts = re.findall(r"[A-Z][^A-Z]*", name)
    return "_".join(parts) if parts else name


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(directory: str | os.PathLike, recursive: bool = False) -> list[str]:
    """Sorted absolute paths of the image files in ``directory`` (hidden files and non-images skipped)."""
    directory = os.path.abspath(directory)
    out: list[str] = []
    if recursive:
        for dirpath, dirnames, filenames in os.walk(directory):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            out.extend(os.path.join(dirpath, f) for f in filenames if is_image_file(f))
    else:
        with os.scandir(directory) as it:
            out = [e.path for e in it if is_image_file(e.name) and e.is_file()]
    return sorted(out)


def list_subdirs(directory: str | os.PathLike) -> list[str]:
    """Sorted names of the non-hidden sub-directories of ``directory``."""
    with os.scandir(directory) as it:
        return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())


def require_dir(path: Path, dataset: str, layout: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{dataset}: folder {path} not found. Expected layout:\n{layout}")
    return path


def require_file(path: Path, dataset: str, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{dataset}: {what} {path} not found")
    return path


def missing_files_error(paths: Iterable[str], source: str) -> DataError | None:
    """A DataError naming the first missing files of ``paths`` and how many are missing, or None."""
    missing = [p for p in paths if not os.path.exists(p)]
    if not missing:
        return None
    named = ", ".join(missing[:MAX_NAMED])
    more = f" (and {len(missing) - MAX_NAMED} more)" if len(missing) > MAX_NAMED else ""
    return DataError(f"{source} names {len(missing)} image file(s) that do not exist: {named}{more}")


def check_exist(samples: Sequence[Sample], source: str) -> None:
    err = missing_files_error((s.path for s in samples), source)
    if err is not None:
        raise err


def group_by(items: Iterable[T], key: Callable[[T], int]) -> dict[int, list[T]]:
    groups: dict[int, list[T]] = defaultdict(list)
    for item in items:
        groups[key(item)].append(item)
    return dict(groups)


def split_counts(n_total: int, p_train: float, p_val: float) -> tuple[int, int, int]:
    """CoOp's rounding (``round(n * p)`` for train and val, the rest test), made safe for tiny classes:
    test keeps at least one image, then val, before train gets any."""
    n_train = round(n_total * p_train)
    n_val = round(n_total * p_val)
    n_test = n_total - n_train - n_val
    while n_test < 1 and n_total >= 1:
        if n_val > 0 and n_val >= n_train:
            n_val -= 1
        elif n_train > 0:
            n_train -= 1
        else:
            n_val -= 1
        n_test += 1
    return n_train, n_val, n_test


def split_per_class(samples: Sequence[Sample], seed: int, p_train: float = 0.5,
                    p_val: float = 0.2) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """CoOp's ``read_and_split_data`` rule: per class (in label order) shuffle the images, first
    ``round(n * p_train)`` go to train, the next ``round(n * p_val)`` to val, the rest to test.
    Deterministic: the images of a class are sorted by path before a ``random.Random(seed)`` shuffles them."""
    rng = random.Random(seed)
    train: list[Sample] = []
    val: list[Sample] = []
    test: list[Sample] = []
    for label, items in sorted(group_by(samples, lambda s: s.label).items()):
        items = sorted(items, key=lambda s: s.path)
        rng.shuffle(items)
        n_train, n_val, _ = split_counts(len(items), p_train, p_val)
        train += items[:n_train]
        val += items[n_train:n_train + n_val]
        test += items[n_train + n_val:]
    return train, val, test


def split_trainval(samples: Sequence[Sample], seed: int, p_val: float = 0.2) -> tuple[list[Sample], list[Sample]]:
    """CoOp's ``split_trainval``: per class, ``round(n * p_val)`` shuffled images become val (at least
    one when the class has two or more), the rest train. Deterministic for a seed (sorted inputs)."""
    rng = random.Random(seed)
    train: list[Sample] = []
    val: list[Sample] = []
    for label, items in sorted(group_by(samples, lambda s: s.label).items()):
        items = sorted(items, key=lambda s: s.path)
        rng.shuffle(items)
        n_val = round(len(items) * p_val)
        if n_val == 0 and len(items) >= 2:
            n_val = 1
        val += items[:n_val]
        train += items[n_val:]
    return sorted(train, key=_order), sorted(val, key=_order)


def _order(s: Sample) -> tuple[int, str]:
    return (s.label, s.path)


def classnames_from_samples(groups: Iterable[Sequence[Sample]], source: str) -> list[str]:
    """The class list implied by samples carrying ``label`` and ``classname``: labels must be 0..N-1
    and each label must always carry the same name."""
    names: dict[int, str] = {}
    for samples in groups:
        for s in samples:
            prev = names.setdefault(s.label, s.classname)
            if prev != s.classname:
                raise DataError(f"{source}: label {s.label} is named both {prev!r} and {s.classname!r}")
    if not names:
        raise DataError(f"{source}: no samples")
    n = max(names) + 1
    if min(names) < 0:
        raise DataError(f"{source}: negative label {min(names)}")
    absent = [i for i in range(n) if i not in names]
    if absent:
        raise DataError(f"{source}: labels must be 0..{n - 1} without gaps; no sample has label(s) "
                        f"{absent[:MAX_NAMED]}{' ...' if len(absent) > MAX_NAMED else ''}")
    return [names[i] for i in range(n)]


def user_cache_dir() -> Path:
    """``$VLPROMPT_CACHE`` or ``$XDG_CACHE_HOME/vlprompt`` or ``~/.cache/vlprompt``."""
    env = os.environ.get("VLPROMPT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "vlprompt"


def path_digest(path: str | os.PathLike, n: int = 12) -> str:
    return hashlib.sha256(os.path.abspath(path).encode("utf-8")).hexdigest()[:n]


def read_json(path: str | os.PathLike, what: str):
    """The JSON content of ``path``; a missing or unreadable file is a DataError starting with ``what``."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise DataError(f"{what} {path} not found") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{what} {path} cannot be read as JSON: {e}") from e
