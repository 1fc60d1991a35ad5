"""Readers of a user's own data: an image folder per class, or a CSV file.

Both return :class:`~vlprompt.data.base.DatasetSplits`; without an explicit split, a deterministic one
is generated per class as CoOp does (50% train / 20% val / 30% test, shuffled with ``split_seed``).
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Optional, Sequence

from ..errors import DataError
from ._util import (MAX_NAMED, check_exist, clean_classname, list_images, list_subdirs, numeric_names_warning,
                    split_per_class, split_trainval)
from .base import DatasetSplits, Sample, with_source_names
from .templates import DEFAULT_TEMPLATE, check_template

SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}

FOLDER_LAYOUT = ("<root>/<class>/*.jpg            (split generated: 50% train / 20% val / 30% test per class)\n"
                 "or <root>/train|val|test/<class>/*.jpg   (val/ optional: then 20% of train per class)")

CSV_LAYOUT = ("a CSV file with a header: path,label[,classname][,split][,<target>] (no other columns)\n"
              "  path: relative to the CSV's folder or absolute; label: class index or class name (indices are\n"
              "  named by the classname column or by the option classnames=<file>, one name per line);\n"
              "  split: train/val/test (else generated 50/20/30 per class); target: a numeric column named "
              "by target=<column> (ordinal tasks)")


def _resolve_root(root: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(root))))


def read_folder(root: str | os.PathLike, *, split_seed: int = 1, template: str = DEFAULT_TEMPLATE,
                name: str = "folder") -> DatasetSplits:
    """``root/<class>/<images>`` (classes sorted, names from folder names with ``_`` -> space).

    When ``root``'s sub-folders are only ``train``, ``val`` and/or ``test`` (also ``valid``,
    ``validation``), each is read as ``<split>/<class>/<images>``, the class list being the union of
    their class folders (sorted); a missing ``val/`` is carved out of ``train/`` (20% per class, CoOp's
    ``split_trainval``), a missing ``train/`` or ``test/`` stays empty. Otherwise a split is generated
    deterministically per class (50/20/30, ``split_seed``). Nothing is written into ``root``.
    """
    root = _resolve_root(root)
    if not root.is_dir():
        raise DataError(f"folder dataset: {root} is not a folder. Expected layout:\n{FOLDER_LAYOUT}")
    check_template(template)
    subdirs = list_subdirs(root)
    if not subdirs:
        raise DataError(f"folder dataset: {root} has no class sub-folders. Expected layout:\n{FOLDER_LAYOUT}")
    split_dirs = {d: SPLIT_ALIASES[d.lower()] for d in subdirs if d.lower() in SPLIT_ALIASES}
    extra: dict = {"root": str(root)}
    if split_dirs and len(split_dirs) == len(subdirs):
        if len(set(split_dirs.values())) != len(split_dirs):
            raise DataError(f"folder dataset: {root} has several folders for the same split: {sorted(split_dirs)}")
        by_split = {v: root / k for k, v in split_dirs.items()}
        classes = sorted({c for d in by_split.values() for c in list_subdirs(d)})
        if not classes:
            raise DataError(f"folder dataset: no class folders in {', '.join(str(d) for d in by_split.values())}")
        raw = {c: i for i, c in enumerate(classes)}
        folders = classes
        names = _clean_unique([clean_classname(c) for c in classes], root)
        parts: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
        for split, d in by_split.items():
            for c in list_subdirs(d):
                parts[split] += [Sample(p, raw[c], names[raw[c]]) for p in list_images(d / c)]
        if "val" not in by_split and parts["train"]:
            parts["train"], parts["val"] = split_trainval(parts["train"], split_seed)
            extra["val_from_train"] = True
        # what to do about it: training needs train/, evaluation test/ (`vlprompt eval` and `import` read only test/)
        lacks = {"train": "nothing to train on", "test": "nothing to evaluate on"}
        unavailable = {s: f"folder dataset {root} has no {s}/ folder ({lacks[s]}): add {root / s}/<class>/<images>, "
                          f"or put the class folders directly under {root} to have them split 50/20/30 per class"
                       for s in ("train", "test") if s not in by_split}
        if unavailable:
            extra["unavailable"] = unavailable
        train, val, test = parts["train"], parts["val"], parts["test"]
        extra["split_source"] = "folders"
    else:
        folders = subdirs
        names = _clean_unique([clean_classname(c) for c in subdirs], root)
        samples = []
        for label, c in enumerate(subdirs):
            samples += [Sample(p, label, names[label]) for p in list_images(root / c)]
        if not samples:
            raise DataError(f"folder dataset: no images in the class folders of {root}")
        train, val, test = split_per_class(samples, split_seed)
        extra.update(split_source="generated", split_seed=split_seed)
    empty = [names[i] for i in range(len(names)) if not any(s.label == i for s in (*train, *val, *test))]
    if empty:
        raise DataError(f"folder dataset: class folder(s) without images in {root}: {empty[:MAX_NAMED]}")
    warnings = numeric_names_warning(names, f"folder dataset {root}", "name the class folders by their classes "
                                     "(or use a CSV file with a classname column)")
    if warnings:
        extra["warnings"] = warnings
    with_source_names(extra, folders, names)  # the class folders' own names (underscores kept)
    return DatasetSplits(name=name, classnames=names, train=train, val=val, test=test, template=template, extra=extra)


def _clean_unique(names: list[str], source: object) -> list[str]:
    seen: dict[str, int] = {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
    dup = [n for n, k in seen.items() if k > 1]
    if dup:
        raise DataError(f"{source}: several classes have the same name after cleaning ('_' -> ' '): {dup[:MAX_NAMED]}")
    return names


def _parse_int(text: str) -> Optional[int]:
    t = text.strip()
    if t and (t.isdigit() or (t[0] in "+-" and t[1:].isdigit())):
        return int(t)
    return None


def read_csv_table(path: Path, required: Sequence[str]) -> tuple[list[str], dict[str, int], list[tuple[int, list[str]]]]:
    """Open a CSV file with a header row: ``(header, lower-case column index, [(row number, fields)])`` with
    blank rows dropped. A missing required column, a repeated column, a row with too few or too many fields
    or a file with no rows is a DataError naming the file (and row). See :func:`csv_refuse_unknown_columns`."""
    try:
        with open(path, "r", encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"csv dataset: cannot read {path}: {e}") from e
    if not rows:
        raise DataError(f"csv dataset: {path} is empty. Expected: {CSV_LAYOUT}")
    header = [h.strip() for h in rows[0]]
    col = {h.lower(): i for i, h in enumerate(header)}
    if len(col) != len(header):
        lower = [h.lower() for h in header]
        repeated = sorted({h for h in header if lower.count(h.lower()) > 1})
        raise DataError(f"csv dataset: {path} has repeated column(s) {repeated} (header: {header})")
    for required_col in required:
        if required_col not in col:
            raise DataError(f"csv dataset: {path} has no {required_col!r} column (header: {header}). "
                            f"Expected: {CSV_LAYOUT}")
    body = []
    for rowno, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) < len(header):
            raise DataError(f"csv dataset: {path} row {rowno} has {len(row)} fields, the header has {len(header)}")
        if any(c.strip() for c in row[len(header):]):  # values under no column (an unquoted comma in a path?)
            raise DataError(f"csv dataset: {path} row {rowno} has {len(row)} fields, the header has {len(header)} "
                            f"(quote values that contain commas)")
        body.append((rowno, row))
    if not body:
        raise DataError(f"csv dataset: {path} has a header but no rows")
    return header, col, body


def csv_refuse_unknown_columns(header: list[str], known: Sequence[str], path: Path, hint: str = "") -> None:
    """A DataError naming every column of ``header`` not in ``known`` (case-insensitive) and the known ones
    (``hint`` appended): a column that would not be read is more likely a typo than a wish."""
    known_lower = {k.lower() for k in known}
    unknown = [h for h in header if h.lower() not in known_lower]
    if unknown:
        raise DataError(f"csv dataset: {path} has unknown column(s) {unknown}; the known columns are "
                        f"{', '.join(known)}{hint}")


def csv_column(header: list[str], col: dict[str, int], name: str, path: Path) -> int:
    """Index of the column ``name`` (exact, else case-insensitive)."""
    index = {h: i for i, h in enumerate(header)}.get(name, col.get(str(name).lower()))
    if index is None:
        raise DataError(f"csv dataset: {path} has no target column {name!r} (header: {header})")
    return index


def csv_image_path(row: list[str], col: dict[str, int], rowno: int, path: Path) -> str:
    """The row's image as an absolute path (relative paths are relative to the CSV's folder)."""
    rel = row[col["path"]].strip()
    if not rel:
        raise DataError(f"csv dataset: {path} row {rowno}: empty 'path'")
    img = rel if os.path.isabs(os.path.expanduser(rel)) else str(path.parent / rel)
    return os.path.abspath(os.path.expanduser(img))


def csv_split(row: list[str], split_col: int, rowno: int, path: Path) -> str:
    value = row[split_col].strip().lower()
    if value not in SPLIT_ALIASES:
        raise DataError(f"csv dataset: {path} row {rowno}: split {row[split_col]!r} is not train, val or test")
    return SPLIT_ALIASES[value]


def csv_target(row: list[str], target_col: int, header: list[str], rowno: int, path: Path) -> float:
    raw = row[target_col].strip()
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DataError(f"csv dataset: {path} row {rowno}, column {header[target_col]!r}: target {raw!r} is not a "
                        f"finite number")
    return value


def read_csv(root: str | os.PathLike, *, target: Optional[str] = None, classnames: Optional[Sequence[str] | str] = None,
             split_seed: int = 1, template: str = DEFAULT_TEMPLATE, check_files: bool = True,
             name: str = "csv") -> DatasetSplits:
    """A CSV file ``root`` with a header row and columns ``path,label[,classname][,split][,<target>]``.

    - ``path``: relative to the CSV's folder, or absolute.
    - ``label``: integers in every row, or class names in every row (a mix is an error).
      With names, the classes are the sorted distinct names unless ``classnames`` fixes the list
      (a sequence, or the path of a text file with one name per line); a name outside it is an error;
      a ``classname`` column may only repeat the label.
      With integers and ``classnames``, a label indexes that list. Without it, the classes are exactly the
      distinct labels present, sorted numerically and relabelled 0..K-1 (labels 0, 1, 7 are three classes),
      named by the ``classname`` column, else by the label itself (``"7"``); a label named differently in
      two rows is an error naming both rows.
    - ``split``: ``train``/``val``/``test`` per row; without the column a split is generated
      deterministically per class (50/20/30, ``split_seed``).
    - ``target``: the name of a numeric column copied to :attr:`Sample.target` (ordinal tasks: age,
      score, year); a value that is not a finite number is a DataError naming the file, row and column.

    Any other column is an error naming it (a column that would not be read is more likely a typo).
    Every listed image must exist (``check_files``). Class names are cleaned (``_`` -> space) and must be
    distinct.
    """
    path = _resolve_root(root)
    if not path.is_file():
        raise DataError(f"csv dataset: {path} is not a file. Expected: {CSV_LAYOUT}")
    check_template(template)
    header, col, body = read_csv_table(path, ("path", "label"))
    target_col = csv_column(header, col, target, path) if target is not None else None
    known = ["path", "label", "classname", "split"] + ([header[target_col]] if target_col is not None else [])
    csv_refuse_unknown_columns(header, known, path, "" if target_col is not None else
                               " (a numeric column is read with the option target=<column>)")
    split_col = col.get("split")
    name_col = col.get("classname")

    records = []  # (rowno, abspath, label_text, classname_text, split, target)
    for rowno, row in body:
        img = csv_image_path(row, col, rowno, path)
        label_text = row[col["label"]].strip()
        if not label_text:
            raise DataError(f"csv dataset: {path} row {rowno}: empty 'label'")
        split = csv_split(row, split_col, rowno, path) if split_col is not None else None
        tval = csv_target(row, target_col, header, rowno, path) if target_col is not None else None
        cname = row[name_col].strip() if name_col is not None else None
        records.append((rowno, img, label_text, cname or None, split, tval))

    fixed = _read_classnames_option(classnames, path)
    ints = [_parse_int(r[2]) for r in records]
    is_int = [i is not None for i in ints]
    if any(is_int) and not all(is_int):
        r_int, r_txt = records[is_int.index(True)], records[is_int.index(False)]
        raise DataError(f"csv dataset: {path}: 'label' holds a class index in row {r_int[0]} ({r_int[2]!r}) but "
                        f"not in row {r_txt[0]} ({r_txt[2]!r}); use class indices or class names, not both")
    if all(is_int):
        labels, names = _index_labels(records, [int(i) for i in ints], fixed, name_col is not None, path)  # type: ignore[arg-type]
    else:
        for r in records:  # the label is the class name: a classname column could only contradict it
            if r[3] is not None and clean_classname(r[3]) != clean_classname(r[2]):
                raise DataError(f"csv dataset: {path} row {r[0]}: label {r[2]!r} is a class name but the "
                                f"classname column says {r[3]!r}; with class-name labels the classname column "
                                f"must be empty or repeat the label")
        texts = [r[2] for r in records]
        if fixed is not None:
            index = {}
            for i, nm in enumerate(fixed):
                index.setdefault(nm, i)
                index.setdefault(clean_classname(nm), i)
            for r, t in zip(records, texts):
                if t not in index and clean_classname(t) not in index:
                    raise DataError(f"csv dataset: {path} row {r[0]}: unknown class {t!r} (not among the "
                                    f"{len(fixed)} given class names)")
            labels = [index[t] if t in index else index[clean_classname(t)] for t in texts]
            names = list(fixed)
        else:
            classes = sorted({clean_classname(t) for t in texts})
            index = {c: i for i, c in enumerate(classes)}
            labels = [index[clean_classname(t)] for t in texts]
            names = classes
    names = _clean_unique([clean_classname(n) for n in names], f"csv dataset {path}")

    samples = [Sample(r[1], lab, names[lab], r[5]) for r, lab in zip(records, labels)]
    if check_files:
        check_exist(samples, f"csv dataset: {path}")
    extra: dict = {"csv": str(path)}
    if target is not None:
        extra["target"] = header[target_col]  # type: ignore[index]
    if split_col is not None:
        parts: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
        for r, s in zip(records, samples):
            parts[r[4]].append(s)
        train, val, test = parts["train"], parts["val"], parts["test"]
        extra["split_source"] = "column"
    else:
        train, val, test = split_per_class(samples, split_seed)
        extra.update(split_source="generated", split_seed=split_seed)
    if target is None:  # with a target column the labels may be ranks named by their numbers on purpose
        warnings = numeric_names_warning(names, f"csv dataset {path}", "give the names with the reader option "
                                         "classnames=<file> (--dataset-option classnames=names.txt: one name per "
                                         "line, line i naming label i) or a classname column")
        if warnings:
            extra["warnings"] = warnings
    return DatasetSplits(name=name, classnames=names, train=train, val=val, test=test, template=template, extra=extra)


def _index_labels(records: list, ints: list[int], fixed: Optional[list[str]], has_name_col: bool,
                  path: Path) -> tuple[list[int], list[str]]:
    """Labels 0..K-1 and the K class names for rows whose labels are integers.

    With ``fixed`` class names the label is an index into them (absent classes allowed: the user listed them).
    Otherwise the classes are exactly the distinct labels present, sorted numerically and relabelled
    0..K-1 (labels 0, 1, 7 make three classes, never eight), named by the classname column or else by the
    label itself. A label named differently in two rows is an error naming both rows."""
    bad = [(r[0], lab) for r, lab in zip(records, ints) if lab < 0 or (fixed is not None and lab >= len(fixed))]
    if bad:
        limit = f"0..{len(fixed) - 1}" if fixed is not None else "non-negative"
        raise DataError(f"csv dataset: {path} row {bad[0][0]}: label {bad[0][1]} is not a class index ({limit})")
    named: dict[int, tuple[str, int]] = {}  # label -> (cleaned class name, first row naming it)
    if fixed is not None:
        named = {i: (clean_classname(c), 0) for i, c in enumerate(fixed)}
    for r, lab in zip(records, ints):
        if r[3] is None:
            continue
        cname = clean_classname(r[3])
        prev = named.setdefault(lab, (cname, r[0]))
        if prev[0] != cname:
            where = f"in row {prev[1]}" if prev[1] else "in the given class names"
            raise DataError(f"csv dataset: {path}: label {lab} is named {prev[0]!r} {where} but {cname!r} in row "
                            f"{r[0]}")
    if fixed is not None:
        return ints, [named[i][0] for i in range(len(fixed))]
    present = sorted(set(ints))
    if has_name_col:
        unnamed = [lab for lab in present if lab not in named]
        if unnamed:
            rows = [r[0] for r, lab in zip(records, ints) if lab == unnamed[0]]
            raise DataError(f"csv dataset: {path}: label {unnamed[0]} has an empty classname in every row "
                            f"(rows {rows[:MAX_NAMED]}); name it in at least one row")
    relabel = {lab: i for i, lab in enumerate(present)}
    names = [named[lab][0] if lab in named else str(lab) for lab in present]
    return [relabel[lab] for lab in ints], names


def _read_classnames_option(classnames: Optional[Sequence[str] | str | os.PathLike], source: Path) -> Optional[list[str]]:
    if classnames is None:
        return None
    if isinstance(classnames, (str, os.PathLike)):
        p = Path(os.path.expanduser(os.fspath(classnames)))
        if not p.is_file():
            raise DataError(f"csv dataset {source}: class-name file {p} not found")
        with open(p, "r", encoding="utf-8") as f:
            out = [ln.strip() for ln in f if ln.strip()]
    else:
        out = [str(c) for c in classnames]
    if not out:
        raise DataError(f"csv dataset {source}: the given class-name list is empty")
    return out
