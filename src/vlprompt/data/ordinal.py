"""Readers of ordinal-regression datasets: every image gets a numeric target and a rank.

Each reader returns :class:`~vlprompt.data.base.DatasetSplits` whose class list is the list of ranks and whose
samples carry ``label`` = rank index and ``target`` = the value in rank-value units, so that ordinal methods
(``--method ordinalclip`` and its baselines) read the rank values from the class names:

* ranks by value (``ranks="0:100"``: ranks ``0..100``, named ``"0"``..``"100"``; a value is rounded to its
  rank) or by bins (``ranks=[0, 10, 20, 40]`` or ``"0,10,20,40"``: ranks named by their bin centres), see
  :func:`vlprompt.data.ranks.ranks_from_values`; ``target`` is the raw value;
* datasets whose ranks are named groups (Adience's age groups, decades, aesthetic levels): ``target`` is the
  rank index, the unit in which the literature reports their MAE.

Readers (``load_dataset(name, root, **options)``):

* ``folder`` with ``target_regex``: the value is taken from each image's file name (first capture group, or
  the whole match), e.g. UTKFace ``^(\\d+)_``; ``csv`` with ``target_column``: a CSV with a ``path`` column and a
  numeric target column (and an optional ``split`` column).
* ``utkface``: the UTKFace folder (``<age>_<gender>_<race>_<date>.jpg.chip.jpg``; ranks 0..116).
* ``morph2``: MORPH II through the list files of OrdinalCLIP's reference (``data_list/ET_proto_train.txt`` and
  ``ET_proto_val.txt`` under the data root, each line ``<image path relative to the root> <age> [<age>..]``;
  ranks 0..100). The reference selects its model on the file it tests on; here that file is the test split and
  the validation split is carved out of the training list.
* ``adience``: the five subject-exclusive folds ``fold_0_data.txt``..``fold_4_data.txt`` (tab-separated, with a
  header; columns ``user_id, original_image, face_id, age, gender, ...``) and the images under
  ``aligned/<user_id>/landmark_aligned_face.<face_id>.<original_image>`` (or ``faces/<user_id>/
  coarse_tilt_aligned_face.<face_id>.<original_image>``); 8 age groups ``(0, 2)``..``(60, 100)``. Fold ``k`` is
  the test set, the other four are trained on.
* ``aesthetics``: the image aesthetics dataset of Schifanella et al. (ICWSM 2015): ``beauty-icwsm15-dataset.tsv``
  (columns ``#flickr_photo_id``, ``category``, ``beauty_scores`` = the raters' votes 1..5) and the images as
  ``<images>/<photo id>.jpg``; the label is ``int(median(votes)) - 1`` (5 levels); 5 folds.
* ``hci-dating``: the historical colour image dating dataset (Palermo et al., ECCV 2012): ``1930s/`` ..
  ``1970s/`` folders (5 decades); each of the 10 folds draws, per decade, 210 training, 5 validation and the
  remaining (50) test images.

Splits. Datasets distributed with folds use them (``fold``); the others are cut into ``folds`` deterministic
folds (:func:`vlprompt.data.ranks.k_fold_indices`, seeded by ``split_seed``) of which ``fold`` is the test set.
In every case the validation split is carved from the training images (``val_fraction``), never from the test
images. ``vlprompt ordinal-folds`` runs every fold and reports the mean and standard deviation.
"""
from __future__ import annotations

import csv
import math
import os
import random
import re
import statistics
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import DataError
from .ranks import RankValueError, k_fold_indices, rank_values_from_spec, ranks_from_values
from ._util import MAX_NAMED, is_image_file, list_images, list_subdirs, missing_files_error
from .base import DatasetSplits, Sample
from .templates import DEFAULT_TEMPLATE, check_template
from .user import csv_column, csv_image_path, csv_split, csv_target, read_csv_table

AGE_TEMPLATE = "a photo of a {} year old person."

#: number of folds of the datasets that come with their own folds / repeated splits
NATURAL_FOLDS = {"adience": 5, "hci-dating": 10}
#: default number of folds of the datasets cut into folds here
DEFAULT_FOLDS = 5

UTKFACE_REGEX = r"^(\d+)_"

ADIENCE_GROUPS = ((0, 2), (4, 6), (8, 12), (15, 20), (25, 32), (38, 43), (48, 53), (60, 100))
ADIENCE_NAMES = tuple(f"{lo}-{hi}" for lo, hi in ADIENCE_GROUPS)
ADIENCE_IMAGES = {"aligned": ("aligned", "landmark_aligned_face"), "faces": ("faces", "coarse_tilt_aligned_face")}

AESTHETICS_LEVELS = ("unacceptable", "flawed", "ordinary", "professional", "exceptional")
AESTHETICS_IMAGE_DIRS = ("images", "img_files", "imgs", "photos")
HCI_DECADES = ("1930s", "1940s", "1950s", "1960s", "1970s")

FOLDER_LAYOUT = ("<root>/**/<image files whose names hold the target>, e.g. UTKFace <age>_<gender>_<race>_<date>"
                 ".jpg.chip.jpg with target_regex='^(\\d+)_'")
CSV_LAYOUT = ("a CSV file with a header: path,<target column>[,split]; path relative to the CSV's folder or "
              "absolute; the target a number; split train/val/test (else folds are cut)")
UTKFACE_LAYOUT = "<root>/<age>_<gender>_<race>_<date>.jpg.chip.jpg (e.g. UTKFace/ or crop_part1/)"
MORPH_LAYOUT = ("<root>/data_list/ET_proto_train.txt and ET_proto_val.txt (OrdinalCLIP's lists: '<image path "
                "relative to root> <age> [<age> ...]' per line) and the images they name")
ADIENCE_LAYOUT = ("<root>/fold_0_data.txt .. fold_4_data.txt (tab-separated, header user_id, original_image, "
                  "face_id, age, ...) and <root>/aligned/<user_id>/landmark_aligned_face.<face_id>.<original_image> "
                  "(images=aligned) or <root>/faces/<user_id>/coarse_tilt_aligned_face.<face_id>.<original_image> "
                  "(images=faces)")
AESTHETICS_LAYOUT = ("<root>/beauty-icwsm15-dataset.tsv (columns #flickr_photo_id, category, beauty_scores) and "
                     "<root>/<images>/<photo id>.jpg, <images> one of images/, img_files/, imgs/, photos/")
HCI_LAYOUT = "<root>/1930s/ 1940s/ 1950s/ 1960s/ 1970s/ (the images of each decade)"


# --------------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------------
def _root(root) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(root))))


def _rank_names(spec) -> list[str]:
    return [f"{v:g}" for v in rank_values_from_spec(spec).tolist()]


def _default_range(values: Sequence[float], source: str) -> str:
    v = np.asarray(values, dtype=np.float64)
    if not np.all(v == np.round(v)):
        raise DataError(f"{source}: the targets are not all integers; give the ranks: ranks=lo:hi (values rounded "
                        f"to integer ranks) or bin edges ranks=e0,e1,...")
    lo, hi = int(v.min()), int(v.max())
    if hi <= lo:
        raise DataError(f"{source}: every target is {lo}; ordinal regression needs at least two ranks")
    return f"{lo}:{hi}"


def rank_samples(paths: Sequence[str], values: Sequence[float], ranks,
                 source: str) -> tuple[list[Sample], list[str], str]:
    """Samples (label = rank, target = value) of images with raw values, the rank names and the rank spec used
    (``ranks`` or, when None, ``"min:max"`` of integer values)."""
    if ranks is None:
        ranks = _default_range(values, source)
    if isinstance(ranks, (int, float)):
        raise DataError(f"{source}: ranks must be 'lo:hi' or bin edges, got {ranks!r}")
    try:
        idx, _ = ranks_from_values(list(values), ranks)
        names = _rank_names(ranks)
    except RankValueError as e:
        raise DataError(f"{source}: {e}") from e
    samples = [Sample(p, int(i), names[int(i)], float(v)) for p, i, v in zip(paths, idx.tolist(), values)]
    return samples, names, ranks if isinstance(ranks, str) else ",".join(f"{float(e):g}" for e in ranks)


def _check_int(value, name: str, lo: int, hi: Optional[int], source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise DataError(f"{source}: {name} must be an integer in {rng}, got {value!r}")
    return value


def _check_fraction(value, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise DataError(f"{source}: val_fraction must be a number in [0, 1), got {value!r}")
    return float(value)


def carve_val(train: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Move ``round(len(train) * fraction)`` training samples (drawn with ``random.Random(seed)`` from the
    path-sorted list) to a validation split. Returns ``(train, val)``, both sorted by path."""
    items = sorted(train, key=lambda s: s.path)
    n_val = int(round(len(items) * fraction))
    if fraction > 0 and n_val == 0 and len(items) >= 2:
        n_val = 1
    chosen = set(random.Random(seed).sample(range(len(items)), n_val))
    return [s for i, s in enumerate(items) if i not in chosen], [s for i, s in enumerate(items) if i in chosen]


def fold_split(samples: Sequence[Sample], *, folds: int, fold: int, seed: int, val_fraction: float,
               source: str) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """``(train, val, test)``: fold ``fold`` of ``folds`` deterministic folds (samples sorted by path first) is
    the test set; the validation split is carved from the rest (:func:`carve_val`)."""
    folds = _check_int(folds, "folds", 2, None, source)
    fold = _check_int(fold, "fold", 0, folds - 1, source)
    items = sorted(samples, key=lambda s: s.path)
    try:
        train_idx, test_idx = k_fold_indices(len(items), folds, seed)[fold]
    except ValueError as e:
        raise DataError(f"{source}: {e}") from e
    train, val = carve_val([items[i] for i in train_idx], val_fraction, seed)
    return train, val, [items[i] for i in test_idx]


def _handle_missing(samples: list[Sample], missing: str, source: str, extra: dict) -> list[Sample]:
    if missing not in ("error", "skip"):
        raise DataError(f"{source}: missing must be 'error' or 'skip', got {missing!r}")
    if missing == "error":
        err = missing_files_error((s.path for s in samples), source)
        if err is not None:
            raise DataError(f"{err} (pass missing=skip to leave them out)")
        return samples
    kept = [s for s in samples if os.path.exists(s.path)]
    if len(kept) < len(samples):
        extra["missing_images"] = extra.get("missing_images", 0) + len(samples) - len(kept)
    return kept


def _splits(name, classnames, train, val, test, template, extra) -> DatasetSplits:
    extra = dict(extra)
    extra["ordinal"] = True
    return DatasetSplits(name=name, classnames=list(classnames), train=list(train), val=list(val), test=list(test),
                         template=template, extra=extra)


# --------------------------------------------------------------------------------------------------
# folder / csv with a numeric target
# --------------------------------------------------------------------------------------------------
def read_target_folder(root, *, target_regex: str, ranks=None, recursive: bool = True, unmatched: str = "error",
                       folds: Optional[int] = None, fold: Optional[int] = None, split_seed: int = 1,
                       val_fraction: float = 0.1, template: str = DEFAULT_TEMPLATE,
                       name: str = "folder") -> DatasetSplits:
    """Images under ``root`` whose target value is read from the file name by ``target_regex`` (``re.search``
    on the file name; the first capture group, else the whole match, must be a number).

    ``unmatched``: ``error`` (default; names the first files) or ``skip`` files the regex does not match.
    Split: ``folds`` (default 5) deterministic folds, ``fold`` (default 0) is the test set, validation carved
    from the rest (``val_fraction``); ``split_seed`` seeds both.
    """
    root = _root(root)
    source = f"folder dataset {root}"
    if not root.is_dir():
        raise DataError(f"{source}: not a folder. Expected layout:\n{FOLDER_LAYOUT}")
    check_template(template)
    try:
        pattern = re.compile(target_regex)
    except (re.error, TypeError) as e:
        raise DataError(f"{source}: target_regex {target_regex!r} is not a regular expression ({e})") from e
    if unmatched not in ("error", "skip"):
        raise DataError(f"{source}: unmatched must be 'error' or 'skip', got {unmatched!r}")
    files = list_images(root, recursive=bool(recursive))
    if not files:
        raise DataError(f"{source}: no image files{' (searched recursively)' if recursive else ''}")
    paths, values, misses, bad = [], [], [], []
    for f in files:
        m = pattern.search(os.path.basename(f))
        if m is None:
            misses.append(os.path.basename(f))
            continue
        text = m.group(1) if m.groups() else m.group(0)
        try:
            v = float(text)
        except (TypeError, ValueError):
            v = math.nan
        if not math.isfinite(v):
            bad.append((os.path.basename(f), text))
            continue
        paths.append(f)
        values.append(v)
    if bad:
        raise DataError(f"{source}: target_regex {target_regex!r} captures {bad[0][1]!r} from {bad[0][0]!r}, not a "
                        f"number ({len(bad)} file(s) like this)")
    if not paths:
        raise DataError(f"{source}: target_regex {target_regex!r} matches none of the {len(files)} image file names "
                        f"(e.g. {misses[0]!r})")
    extra: dict = {"root": str(root), "target_regex": target_regex}
    if misses:
        if unmatched == "error":
            more = f" (and {len(misses) - MAX_NAMED} more)" if len(misses) > MAX_NAMED else ""
            raise DataError(f"{source}: target_regex {target_regex!r} does not match {len(misses)} of {len(files)} "
                            f"file names: {misses[:MAX_NAMED]}{more}; pass unmatched=skip to leave them out")
        extra["unmatched_skipped"] = len(misses)
    samples, names, spec = rank_samples(paths, values, ranks, source)
    folds = DEFAULT_FOLDS if folds is None else folds
    fold = 0 if fold is None else fold
    train, val, test = fold_split(samples, folds=folds, fold=fold, seed=split_seed,
                                  val_fraction=_check_fraction(val_fraction, source), source=source)
    extra.update(ranks=spec, folds=folds, fold=fold, split_seed=split_seed, val_fraction=val_fraction)
    return _splits(name, names, train, val, test, template, extra)


def read_target_csv(root, *, target_column: str, ranks=None, folds: Optional[int] = None, fold: Optional[int] = None,
                    split_seed: int = 1, val_fraction: float = 0.1, template: str = DEFAULT_TEMPLATE,
                    check_files: bool = True, name: str = "csv") -> DatasetSplits:
    """A CSV file with a header, a ``path`` column and the numeric column ``target_column``.

    A ``split`` column (train/val/test) fixes the split (then ``folds``/``fold`` do not apply; without val rows
    the validation split is carved from train); otherwise ``folds`` (default 5) deterministic folds are cut and
    ``fold`` (default 0) is the test set. Other columns (e.g. a ``label``) are not read.
    """
    path = _root(root)
    if not path.is_file():
        raise DataError(f"csv dataset: {path} is not a file. Expected: {CSV_LAYOUT}")
    check_template(template)
    source = f"csv dataset {path}"
    header, col, body = read_csv_table(path, ("path",))
    tcol = csv_column(header, col, target_column, path)
    scol = col.get("split")
    if scol is not None and (folds is not None or fold is not None):
        raise DataError(f"{source}: the file has a 'split' column; folds/fold do not apply to it")
    paths = [csv_image_path(row, col, rowno, path) for rowno, row in body]
    values = [csv_target(row, tcol, header, rowno, path) for rowno, row in body]
    split_of = [csv_split(row, scol, rowno, path) for rowno, row in body] if scol is not None else []
    if check_files:
        err = missing_files_error(paths, source)
        if err is not None:
            raise err
    samples, names, spec = rank_samples(paths, values, ranks, source)
    val_fraction = _check_fraction(val_fraction, source)
    extra: dict = {"csv": str(path), "target": header[tcol], "ranks": spec, "split_seed": split_seed}
    if scol is not None:
        parts: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
        for s, which in zip(samples, split_of):
            parts[which].append(s)
        train, val, test = parts["train"], parts["val"], parts["test"]
        if not val and train:
            train, val = carve_val(train, val_fraction, split_seed)
            extra["val_from_train"] = val_fraction
        extra["split_source"] = "column"
    else:
        folds = DEFAULT_FOLDS if folds is None else folds
        fold = 0 if fold is None else fold
        train, val, test = fold_split(samples, folds=folds, fold=fold, seed=split_seed, val_fraction=val_fraction,
                                      source=source)
        extra.update(split_source="folds", folds=folds, fold=fold, val_fraction=val_fraction)
    return _splits(name, names, train, val, test, template, extra)


# --------------------------------------------------------------------------------------------------
# named datasets
# --------------------------------------------------------------------------------------------------
def read_utkface(root, *, ranks="0:116", folds: int = DEFAULT_FOLDS, fold: int = 0, split_seed: int = 1,
                 val_fraction: float = 0.1, unmatched: str = "error", template: str = AGE_TEMPLATE) -> DatasetSplits:
    """UTKFace: ages from the file names (``^(\\d+)_``), ranks 0..116; ``folds`` deterministic folds."""
    root = _root(root)
    if not root.is_dir():
        raise DataError(f"utkface: folder {root} not found. Expected layout:\n{UTKFACE_LAYOUT}")
    return read_target_folder(root, target_regex=UTKFACE_REGEX, ranks=ranks, recursive=True, unmatched=unmatched,
                              folds=folds, fold=fold, split_seed=split_seed, val_fraction=val_fraction,
                              template=template, name="utkface")


def _read_list(path: Path, image_root: Path, source: str) -> tuple[list[str], list[float]]:
    """``<relative image path> <value> [<value> ...]`` per line; the middle value is the label (the reference
    evaluates on it)."""
    if not path.is_file():
        raise DataError(f"{source}: list file {path} not found. Expected layout:\n{MORPH_LAYOUT}")
    paths, values = [], []
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise DataError(f"{source}: {path} line {lineno}: expected '<image> <value>', got {line.strip()!r}")
            try:
                vals = [float(p) for p in parts[1:]]
            except ValueError:
                raise DataError(f"{source}: {path} line {lineno}: the values {parts[1:]} are not numbers")
            paths.append(str(image_root / parts[0]))
            values.append(vals[len(vals) // 2])
    if not paths:
        raise DataError(f"{source}: list file {path} is empty")
    return paths, values


def read_morph2(root, *, train_list: str = "data_list/ET_proto_train.txt",
                test_list: str = "data_list/ET_proto_val.txt",
                val_list: Optional[str] = None, image_root: Optional[str] = None, ranks="0:100",
                val_fraction: float = 0.1, split_seed: int = 1, missing: str = "error",
                template: str = AGE_TEMPLATE, shift_ranks: int = 0, shift_removed: float = 0.0) -> DatasetSplits:
    """MORPH II through list files (OrdinalCLIP's layout; paths relative to ``root`` or ``image_root``).

    ``test_list`` is the test split; the validation split is ``val_list`` when given, else carved from the
    training list (the reference validates on its test list). ``shift_ranks`` / ``shift_removed``: OrdinalCLIP's
    distribution-shift setting (:func:`shift_training_ranks`)."""
    root = _root(root)
    source = f"morph2 {root}"
    if not root.is_dir():
        raise DataError(f"morph2: folder {root} not found. Expected layout:\n{MORPH_LAYOUT}")
    check_template(template)
    if not train_list or not test_list:
        raise DataError(f"{source}: train_list and test_list are required")
    images = _root(image_root) if image_root else root
    parts = {}
    for which, rel in (("train", train_list), ("val", val_list), ("test", test_list)):
        if rel is None:
            continue
        p = Path(rel) if os.path.isabs(rel) else root / rel
        parts[which] = _read_list(p, images, source)
    if ranks is None:
        ranks = _default_range([x for v in parts.values() for x in v[1]], source)
    extra: dict = {"root": str(root), "lists": {k: v for k, v in
                   (("train", train_list), ("val", val_list), ("test", test_list)) if v}}
    out: dict[str, list[Sample]] = {}
    for which, (paths, values) in parts.items():
        samples, names, spec = rank_samples(paths, values, ranks, f"{source} ({which} list)")
        out[which] = _handle_missing(samples, missing, f"{source} ({which} list)", extra)
    extra["ranks"] = spec
    train, test = out["train"], out["test"]
    if "val" in out:
        val = out["val"]
    else:
        train, val = carve_val(train, _check_fraction(val_fraction, source), split_seed)
        extra.update(val_from_train=val_fraction, split_seed=split_seed)
    if shift_ranks or shift_removed:
        train, extra["shift"] = shift_training_ranks(train, names, shift_ranks, shift_removed, split_seed, source)
    return _splits("morph2", names, train, val, test, template, extra)


def shift_training_ranks(train: Sequence[Sample], classnames: Sequence[str], n_ranks: int, removed: float,
                         seed: int, source: str) -> tuple[list[Sample], dict]:
    """OrdinalCLIP's distribution shift (Li et al., NeurIPS 2022, Sec. 4.4): ``n_ranks`` ranks drawn at random
    among those present in the training split lose the fraction ``removed`` of their training images (the
    validation and test splits are untouched). Both draws use ``random.Random(seed)``: the ranks from the sorted
    labels, then per chosen rank (in label order) the images to drop from its path-sorted list. Returns the
    reduced training split (path-sorted) and what was removed."""
    present = sorted({s.label for s in train})
    n_ranks = _check_int(n_ranks, "shift_ranks", 1, max(len(present) - 1, 1), source)
    if isinstance(removed, bool) or not isinstance(removed, (int, float)) or not 0 < removed < 1:
        raise DataError(f"{source}: shift_removed must be a fraction in (0, 1), got {removed!r}")
    rng = random.Random(seed)
    chosen = sorted(rng.sample(present, n_ranks))
    by_label: dict[int, list[Sample]] = {}
    for s in sorted(train, key=lambda s: s.path):
        by_label.setdefault(s.label, []).append(s)
    dropped: set[str] = set()
    for label in chosen:
        items = by_label[label]
        k = int(round(len(items) * removed))
        dropped.update(items[i].path for i in rng.sample(range(len(items)), k))
    kept = [s for s in sorted(train, key=lambda s: s.path) if s.path not in dropped]
    return kept, {"ranks": [classnames[label] for label in chosen], "removed": float(removed),
                  "images_removed": len(dropped)}


def _read_tsv(path: Path, need: Sequence[str], source: str) -> tuple[list[list[str]], dict[str, int]]:
    """Rows of a tab-separated file (header included) and the index of each needed column."""
    try:
        with open(path, "r", encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{source}: cannot read {path}: {e}") from e
    if not rows:
        raise DataError(f"{source}: {path} is empty")
    header = [h.strip() for h in rows[0]]
    if not all(h in header for h in need):
        raise DataError(f"{source}: {path} header {header[:8]} lacks one of {tuple(need)}")
    return rows, {h: header.index(h) for h in need}


def _adience_rank(age: str, unusual: str) -> Optional[int]:
    """Rank (0..7) of an Adience age field: an exact group ``(lo, hi)``; else (``unusual="nearest"``) the
    group containing the midpoint of a range or a single number, or the nearest group; None when it is
    ``None``/empty, or unusual and skipped."""
    text = age.strip()
    nums = [int(x) for x in re.findall(r"\d+", text)]
    if not nums or text.lower() == "none":
        return None
    if len(nums) == 2 and tuple(nums) in ADIENCE_GROUPS:
        return ADIENCE_GROUPS.index(tuple(nums))
    if unusual == "skip" or len(nums) > 2:
        return None
    mid = sum(nums) / len(nums)
    dist = [0.0 if lo <= mid <= hi else min(abs(mid - lo), abs(mid - hi)) for lo, hi in ADIENCE_GROUPS]
    return int(np.argmin(dist))


def read_adience(root, *, fold: int = 0, images: str = "aligned", unusual: str = "nearest", val_fraction: float = 0.1,
                 split_seed: int = 1, missing: str = "error", template: str = AGE_TEMPLATE) -> DatasetSplits:
    """Adience age groups: fold ``fold`` (0..4) of the five ``fold_<k>_data.txt`` files is the test set.

    ``unusual``: ages that are not one of the 8 groups (a few entries are single ages or other ranges) go to the
    group containing their midpoint or the nearest one (``nearest``), or are left out (``skip``); ``None``
    ages are always left out (counted in ``extra``)."""
    root = _root(root)
    source = f"adience {root}"
    if not root.is_dir():
        raise DataError(f"adience: folder {root} not found. Expected layout:\n{ADIENCE_LAYOUT}")
    check_template(template)
    fold = _check_int(fold, "fold", 0, 4, source)
    if images not in ADIENCE_IMAGES:
        raise DataError(f"{source}: images must be one of {sorted(ADIENCE_IMAGES)}, got {images!r}")
    if unusual not in ("nearest", "skip"):
        raise DataError(f"{source}: unusual must be 'nearest' or 'skip', got {unusual!r}")
    folder, prefix = ADIENCE_IMAGES[images]
    per_fold: list[list[Sample]] = []
    dropped = {"no_age": 0, "unusual": 0}
    remapped = 0
    for k in range(5):
        path = root / f"fold_{k}_data.txt"
        if not path.is_file():
            raise DataError(f"{source}: {path.name} not found. Expected layout:\n{ADIENCE_LAYOUT}")
        rows, c = _read_tsv(path, ("user_id", "original_image", "face_id", "age"), source)
        samples = []
        for rowno, row in enumerate(rows[1:], start=2):
            if not row or all(not x.strip() for x in row):
                continue
            if len(row) <= max(c.values()):
                raise DataError(f"{source}: {path} row {rowno} has {len(row)} fields")
            rank = _adience_rank(row[c["age"]], unusual)
            if rank is None:
                key = "no_age" if not re.findall(r"\d+", row[c["age"]]) else "unusual"
                dropped[key] += 1
                continue
            nums = tuple(int(x) for x in re.findall(r"\d+", row[c["age"]]))
            remapped += nums not in ADIENCE_GROUPS
            img = root / folder / row[c["user_id"]].strip() / \
                f"{prefix}.{row[c['face_id']].strip()}.{row[c['original_image']].strip()}"
            samples.append(Sample(str(img), rank, ADIENCE_NAMES[rank], float(rank)))
        per_fold.append(samples)
    extra: dict = {"root": str(root), "fold": fold, "folds": 5, "images": images, "unusual": unusual,
                   "dropped": dropped, "remapped_unusual": remapped}
    test = _handle_missing(per_fold[fold], missing, source, extra)
    rest = _handle_missing([s for k in range(5) if k != fold for s in per_fold[k]], missing, source, extra)
    train, val = carve_val(rest, _check_fraction(val_fraction, source), split_seed)
    return _splits("adience", ADIENCE_NAMES, train, val, test, template, extra)


def read_aesthetics(root, *, tsv: str = "beauty-icwsm15-dataset.tsv", images: Optional[str] = None,
                    category: Optional[str] = None, folds: int = DEFAULT_FOLDS, fold: int = 0, split_seed: int = 1,
                    val_fraction: float = 0.0625, missing: str = "error",
                    template: str = "a photo of {} aesthetic quality.") -> DatasetSplits:
    """The image aesthetics dataset: 5 levels (``int(median(votes)) - 1``), ``folds`` folds, ``val_fraction``
    of the training part for validation (75% train, 5% val, 20% test with the defaults, as POE and OrdinalCLIP),
    optionally one ``category`` (animals, urban, people, nature)."""
    root = _root(root)
    source = f"aesthetics {root}"
    if not root.is_dir():
        raise DataError(f"aesthetics: folder {root} not found. Expected layout:\n{AESTHETICS_LAYOUT}")
    check_template(template)
    table = Path(tsv) if os.path.isabs(tsv) else root / tsv
    if not table.is_file():
        raise DataError(f"{source}: {table} not found. Expected layout:\n{AESTHETICS_LAYOUT}")
    if images is None:
        found = [d for d in AESTHETICS_IMAGE_DIRS if (root / d).is_dir()]
        if not found:
            raise DataError(f"{source}: no image folder ({', '.join(AESTHETICS_IMAGE_DIRS)}); pass images=<folder>")
        image_dir = root / found[0]
    else:
        image_dir = Path(images) if os.path.isabs(images) else root / images
        if not image_dir.is_dir():
            raise DataError(f"{source}: image folder {image_dir} not found")
    rows, c = _read_tsv(table, ("#flickr_photo_id", "category", "beauty_scores"), source)
    categories = sorted({r[c["category"]].strip() for r in rows[1:] if len(r) > c["category"]})
    if category is not None and category not in categories:
        raise DataError(f"{source}: unknown category {category!r}; the file has {categories}")
    samples = []
    for rowno, row in enumerate(rows[1:], start=2):
        if not row or all(not x.strip() for x in row):
            continue
        if len(row) <= max(c.values()):
            raise DataError(f"{source}: {table} row {rowno} has {len(row)} fields")
        if category is not None and row[c["category"]].strip() != category:
            continue
        try:
            votes = [int(v) for v in row[c["beauty_scores"]].split(",") if v.strip()]
        except ValueError:
            raise DataError(f"{source}: {table} row {rowno}: beauty_scores {row[c['beauty_scores']]!r} are not "
                            f"integers")
        if not votes or not all(1 <= v <= 5 for v in votes):
            raise DataError(f"{source}: {table} row {rowno}: beauty_scores {votes} must be votes in 1..5")
        rank = int(statistics.median(votes)) - 1
        path = image_dir / f"{row[c['#flickr_photo_id']].strip()}.jpg"
        samples.append(Sample(str(path), rank, AESTHETICS_LEVELS[rank], float(rank)))
    extra: dict = {"root": str(root), "category": category, "images": str(image_dir)}
    samples = _handle_missing(samples, missing, source, extra)
    if not samples:
        raise DataError(f"{source}: no images")
    train, val, test = fold_split(samples, folds=folds, fold=fold, seed=split_seed,
                                  val_fraction=_check_fraction(val_fraction, source), source=source)
    extra.update(folds=folds, fold=fold, split_seed=split_seed, val_fraction=val_fraction)
    return _splits("aesthetics", AESTHETICS_LEVELS, train, val, test, template, extra)


def read_hci_dating(root, *, fold: int = 0, train_per_decade: int = 210, val_per_decade: int = 5,
                    template: str = "a photo taken in the {}.") -> DatasetSplits:
    """Historical colour image dating: 5 decades; fold ``fold`` (0..9) draws, per decade, ``train_per_decade``
    training and ``val_per_decade`` validation images (``random.Random(fold)`` over the sorted file names) and
    tests on the rest."""
    root = _root(root)
    source = f"hci-dating {root}"
    if not root.is_dir():
        raise DataError(f"hci-dating: folder {root} not found. Expected layout:\n{HCI_LAYOUT}")
    check_template(template)
    fold = _check_int(fold, "fold", 0, NATURAL_FOLDS["hci-dating"] - 1, source)
    present = set(list_subdirs(root))
    absent = [d for d in HCI_DECADES if d not in present]
    if absent:
        raise DataError(f"{source}: decade folder(s) {absent} not found. Expected layout:\n{HCI_LAYOUT}")
    rng = random.Random(fold)
    train, val, test = [], [], []
    for rank, decade in enumerate(HCI_DECADES):
        files = sorted(f for f in os.listdir(root / decade) if is_image_file(f))
        if len(files) <= train_per_decade + val_per_decade:
            raise DataError(f"{source}: {decade}/ has {len(files)} images; need more than "
                            f"{train_per_decade} + {val_per_decade}")
        rng.shuffle(files)
        s = [Sample(str(root / decade / f), rank, decade, float(rank)) for f in files]
        train += s[:train_per_decade]
        val += s[train_per_decade:train_per_decade + val_per_decade]
        test += s[train_per_decade + val_per_decade:]
    extra = {"root": str(root), "fold": fold, "folds": NATURAL_FOLDS["hci-dating"]}
    return _splits("hci-dating", HCI_DECADES, train, val, test, template, extra)


# --------------------------------------------------------------------------------------------------
# `folder` and `csv` with or without a numeric target
# --------------------------------------------------------------------------------------------------
def _ordinal_options_unused(source: str, **options) -> None:
    given = sorted(k for k, v in options.items() if v is not None)
    if given:
        raise DataError(f"{source}: option(s) {given} apply to ordinal datasets only (give target_regex / "
                        f"target_column)")


def read_folder_dataset(root, *, split_seed: int = 1, template: str = DEFAULT_TEMPLATE, name: str = "folder",
                        target_regex: Optional[str] = None, ranks=None, recursive: Optional[bool] = None,
                        unmatched: Optional[str] = None, folds: Optional[int] = None, fold: Optional[int] = None,
                        val_fraction: Optional[float] = None) -> DatasetSplits:
    """``folder``: one folder per class (:func:`vlprompt.data.user.read_folder`), or, with ``target_regex``,
    images whose target value is in their file names (:func:`read_target_folder`)."""
    from .user import read_folder

    if target_regex is None:
        _ordinal_options_unused(f"folder dataset {root}", ranks=ranks, recursive=recursive, unmatched=unmatched,
                                folds=folds, fold=fold, val_fraction=val_fraction)
        return read_folder(root, split_seed=split_seed, template=template, name=name)
    return read_target_folder(root, target_regex=target_regex, ranks=ranks,
                              recursive=True if recursive is None else recursive,
                              unmatched=unmatched or "error", folds=folds, fold=fold, split_seed=split_seed,
                              val_fraction=0.1 if val_fraction is None else val_fraction,
                              template=template, name=name)


def read_csv_dataset(root, *, target: Optional[str] = None, classnames=None, split_seed: int = 1,
                     template: str = DEFAULT_TEMPLATE, check_files: bool = True, name: str = "csv",
                     target_column: Optional[str] = None, ranks=None, folds: Optional[int] = None,
                     fold: Optional[int] = None, val_fraction: Optional[float] = None) -> DatasetSplits:
    """``csv``: labelled rows (:func:`vlprompt.data.user.read_csv`), or, with ``target_column``, rows whose
    rank comes from a numeric column (:func:`read_target_csv`)."""
    from .user import read_csv

    if target_column is None:
        _ordinal_options_unused(f"csv dataset {root}", ranks=ranks, folds=folds, fold=fold, val_fraction=val_fraction)
        return read_csv(root, target=target, classnames=classnames, split_seed=split_seed, template=template,
                        check_files=check_files, name=name)
    if target is not None or classnames is not None:
        raise DataError(f"csv dataset {root}: target_column (ranks from a numeric column) excludes target= and "
                        f"classnames= (labelled rows)")
    return read_target_csv(root, target_column=target_column, ranks=ranks, folds=folds, fold=fold,
                           split_seed=split_seed, val_fraction=0.1 if val_fraction is None else val_fraction,
                           template=template, check_files=check_files, name=name)


#: name -> (title, layout, template, reader) of the named ordinal datasets (registered in ``registry.py``)
ORDINAL_DATASETS = {
    "utkface": ("UTKFace ages 0-116 from file names, deterministic folds", UTKFACE_LAYOUT, AGE_TEMPLATE, read_utkface),
    "morph2": ("MORPH II ages 0-100 through OrdinalCLIP's list files", MORPH_LAYOUT, AGE_TEMPLATE, read_morph2),
    "adience": ("Adience, 8 age groups, its 5 subject-exclusive folds", ADIENCE_LAYOUT, AGE_TEMPLATE, read_adience),
    "aesthetics": ("image aesthetics (Schifanella et al.), 5 levels, 5 folds", AESTHETICS_LAYOUT,
                   "a photo of {} aesthetic quality.", read_aesthetics),
    "hci-dating": ("historical colour image dating, 5 decades, 10 splits", HCI_LAYOUT, "a photo taken in the {}.",
                   read_hci_dating),
}


def fold_count(dataset: str, options: dict) -> Optional[int]:
    """How many folds a dataset's protocol has: fixed ones (Adience 5, HCI dating 10), the ``folds`` option,
    or the default of readers that cut folds; None when it has none (MORPH II's lists, CSV split columns)."""
    if dataset in NATURAL_FOLDS:
        return NATURAL_FOLDS[dataset]
    if "folds" in options and options["folds"] is not None:
        return int(options["folds"])
    if dataset in ("utkface", "aesthetics"):
        return DEFAULT_FOLDS
    if dataset == "folder" and options.get("target_regex") is not None:
        return DEFAULT_FOLDS
    if dataset == "csv" and options.get("target_column") is not None:
        return DEFAULT_FOLDS
    return None
