"""``torchvision:<Name>``: any dataset class of ``torchvision.datasets`` that downloads itself.

vlprompt's pipeline works on image files (features are cached per file, images are checked at start),
so a dataset whose samples are files (``samples`` / ``_samples`` / ``imgs`` / ``_image_files`` +
``_labels``, as ImageFolder, EuroSAT, Flowers102, DTD, Food101, OxfordIIITPet, StanfordCars, FGVCAircraft,
SUN397 have) is used through its files directly; an in-memory one (CIFAR10, MNIST, SVHN, ...) is exported
once as PNG files into ``<root>/vlprompt-export/<Name>/<split>/`` and reused from there.

Splits: the dataset's own ``split`` argument (``train``/``trainval``, ``val``/``valid``, ``test``) or
``train=True/False``; a missing val set is carved from train (20% per class, CoOp's ``split_trainval``);
a dataset with no split at all (EuroSAT, Caltech101, SUN397) is split per class 50/20/30 as CoOp does.
All deterministic for ``split_seed``.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
from pathlib import Path
from typing import Any, Optional

from .._io import atomic_write_json
from ..errors import DataError
from ._util import check_exist, clean_classname, split_per_class, split_trainval
from .base import DatasetSplits, Sample
from .standard import CALTECH_NEW_CNAMES, EUROSAT_NEW_CNAMES
from .templates import template_for

EXPORT_DIR = "vlprompt-export"
_EXPORT_VERSION = 1

#: torchvision class name -> the vlprompt reader whose template (and CoOp class naming) it shares.
TORCHVISION_EQUIVALENTS = {
    "EuroSAT": "eurosat", "Flowers102": "oxford_flowers", "DTD": "dtd", "Food101": "food101",
    "OxfordIIITPet": "oxford_pets", "FGVCAircraft": "fgvc_aircraft", "StanfordCars": "stanford_cars",
    "SUN397": "sun397", "Caltech101": "caltech101", "ImageNet": "imagenet", "UCF101": "ucf101",
}

_SPLIT_CANDIDATES = (("train", ("train", "trainval")), ("val", ("val", "valid", "validation")), ("test", ("test",)))

LAYOUT = ("torchvision:<Name>  (e.g. torchvision:EuroSAT, torchvision:CIFAR10): the dataset downloads itself "
          "into <root>;\n  in-memory datasets are exported once as PNG into <root>/vlprompt-export/<Name>/<split>/")


def _dataset_class(name: str):
    import torchvision.datasets as tvd

    cls = getattr(tvd, name, None)
    if cls is None or not inspect.isclass(cls):
        known = sorted(n for n in dir(tvd) if n[:1].isupper() and inspect.isclass(getattr(tvd, n)))
        raise DataError(f"torchvision:{name}: torchvision.datasets has no dataset class {name!r}; "
                        f"available: {', '.join(known)}")
    return cls


def _is_bad_split_error(e: Exception, value: str) -> bool:
    msg = str(e)
    return isinstance(e, ValueError) and "split" in msg.lower() and value in msg


def _load_error(name: str, root: Path, kwargs: dict, e: Exception) -> DataError:
    if isinstance(e, DataError):
        return e
    shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k != "root")
    hint = ""
    if "urlopen" in str(e) or "Name or service" in str(e) or isinstance(e, (ConnectionError, TimeoutError)):
        hint = (f" -- offline: download it elsewhere into {str(root)!r} as torchvision lays it out, or use a "
                f"copy in CoOp's layout with its standard reader (`vlprompt datasets` lists them)")
    return DataError(f"torchvision:{name}: could not load torchvision.datasets.{name}(root={str(root)!r}, "
                     f"{shown}): {type(e).__name__}: {e}{hint}")


def _instantiate(cls, name: str, root: Path, kwargs: dict) -> Any:
    try:
        return cls(**kwargs)
    except Exception as e:  # download failures, missing files, bad arguments: all the user's to fix
        raise _load_error(name, root, kwargs, e) from e


@contextlib.contextmanager
def _no_empty_folders_left(root: Path):
    """On failure (a download that cannot be made), remove the folders the dataset class created and left empty:
    ``root`` and its parents if they did not exist, and new sub-folders of ``root``. Only empty folders are ever
    removed (``os.rmdir``): a file, ours or the user's, stays."""
    missing = []  # root and its missing parents, deepest first
    p = root
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    before = set(os.listdir(root)) if root.is_dir() else set()
    try:
        yield
    except BaseException:
        new = (set(os.listdir(root)) - before) if root.is_dir() else set()
        for name in sorted(new):
            top = root / name
            if top.is_dir() and not top.is_symlink():
                for folder, _, _ in os.walk(top, topdown=False):
                    with contextlib.suppress(OSError):
                        os.rmdir(folder)
        for folder in missing:
            try:
                os.rmdir(folder)
            except OSError:
                break  # not empty (or not ours to judge): it and its parents stay
        raise


def clean_torchvision_classnames(name: str, classes: list[Any]) -> list[str]:
    """Class names of a torchvision dataset as the papers write them: the first of a tuple of synonyms
    (ImageNet), CoOp's renames (EuroSAT, Caltech101), SUN397's ``indoor``/``outdoor`` first, Stanford
    Cars' year first, then ``_`` -> space."""
    out = []
    for c in classes:
        if isinstance(c, (tuple, list)):
            c = c[0] if c else ""
        c = str(c)
        if name == "EuroSAT":
            c = EUROSAT_NEW_CNAMES.get(c, c)
        elif name == "Caltech101":
            c = CALTECH_NEW_CNAMES.get(c, c)
        elif name == "SUN397":
            c = " ".join(c.strip("/").split("/")[::-1])
        elif name == "StanfordCars":
            words = c.split(" ")
            if len(words) > 1 and re.fullmatch(r"\d{4}", words[-1]):
                c = " ".join([words[-1]] + words[:-1])
        out.append(clean_classname(c))
    return out


def _file_list(ds: Any) -> Optional[list[tuple[str, int]]]:
    """(path, label) per item when the dataset keeps its samples as files, else None."""
    n = len(ds)
    for attr in ("samples", "_samples", "imgs"):
        items = getattr(ds, attr, None)
        if isinstance(items, list) and len(items) == n and all(
                isinstance(t, (tuple, list)) and len(t) == 2 and isinstance(t[0], (str, os.PathLike))
                and isinstance(t[1], int) for t in items):
            return [(os.path.abspath(os.fspath(p)), int(y)) for p, y in items]
    labels = getattr(ds, "_labels", None)
    for attr in ("_image_files", "_images"):
        files = getattr(ds, attr, None)
        if (isinstance(files, list) and isinstance(labels, list) and len(files) == len(labels) == n
                and all(isinstance(p, (str, os.PathLike)) for p in files) and all(isinstance(y, int) for y in labels)):
            return [(os.path.abspath(os.fspath(p)), int(y)) for p, y in zip(files, labels)]
    return None


def _to_pil(image: Any, where: str):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    try:
        import numpy as np
        import torch

        if isinstance(image, torch.Tensor):
            from torchvision.transforms.functional import to_pil_image

            return to_pil_image(image)
        if isinstance(image, np.ndarray):
            return Image.fromarray(image)
    except Exception as e:
        raise DataError(f"{where}: cannot turn the image into a PIL image: {e}") from e
    raise DataError(f"{where}: items are {type(image).__name__}, not images")


def _label_of(target: Any, where: str) -> int:
    try:
        import torch

        if isinstance(target, torch.Tensor) and target.numel() == 1:
            target = target.item()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(target, bool) or not isinstance(target, int):
        if hasattr(target, "item"):
            target = target.item()
        if isinstance(target, bool) or not isinstance(target, int):
            raise DataError(f"{where}: the target {target!r} is not a class index (only classification "
                            f"datasets with integer targets are supported)")
    return int(target)


def export_images(ds: Any, out_dir: Path, where: str) -> list[tuple[str, int]]:
    """Write every item of an in-memory dataset as ``out_dir/<label>/<index>.png`` once; a manifest
    written last (atomically) marks a complete export, which later calls reuse."""
    manifest = out_dir / "manifest.json"
    n = len(ds)
    if manifest.is_file():
        try:
            with open(manifest, "r", encoding="utf-8") as f:
                m = json.load(f)
            if m.get("version") == _EXPORT_VERSION and m.get("count") == n:
                items = [(str(out_dir / rel), int(y)) for rel, y in m["samples"]]
                if all(os.path.exists(p) for p, _ in items[:50]):
                    return items
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged manifest: export again
    width = max(6, len(str(n)))
    rel_items = []
    for i in range(n):
        image, target = ds[i][:2]
        label = _label_of(target, f"{where} item {i}")
        rel = f"{label}/{i:0{width}d}.png"
        dest = out_dir / rel
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp")
            _to_pil(image, f"{where} item {i}").save(tmp, format="PNG")
            os.replace(tmp, dest)
        rel_items.append((rel, label))
    atomic_write_json(manifest, {"version": _EXPORT_VERSION, "count": n, "samples": rel_items})
    return [(str(out_dir / rel), y) for rel, y in rel_items]


def read_torchvision(name: str, root: str | os.PathLike, *, download: bool = True, split_seed: int = 1,
                     check_files: bool = True, dataset_kwargs: Optional[dict] = None) -> DatasetSplits:
    """Load ``torchvision.datasets.<name>`` under ``root`` (downloading it when ``download``) as
    DatasetSplits; see the module docstring for splits and the file export. ``dataset_kwargs`` are
    passed to the dataset class (e.g. ``{"partition": 2}`` for DTD)."""
    cls = _dataset_class(name)
    root = Path(os.path.abspath(os.path.expanduser(os.fspath(root))))
    params = inspect.signature(cls).parameters
    base = dict(dataset_kwargs or {})
    base["root"] = str(root)
    if "download" in params:
        base["download"] = download
    elif download is not True:
        raise DataError(f"torchvision:{name}: this dataset class takes no download argument")
    where = f"torchvision:{name}"
    with _no_empty_folders_left(root):
        parts = _instantiate_splits(cls, name, root, base, params, where)
    return _read_parts(name, root, parts, where, split_seed, check_files)


def _instantiate_splits(cls, name: str, root: Path, base: dict, params, where: str) -> dict[str, tuple[str, Any]]:
    """Our split -> (the dataset's split value, the dataset object)."""
    parts: dict[str, tuple[str, Any]] = {}
    if "split" in params and "split" not in base:
        for ours, candidates in _SPLIT_CANDIDATES:
            for value in candidates:
                try:
                    ds = cls(**base, split=value)
                except Exception as e:
                    if _is_bad_split_error(e, value):
                        continue
                    raise _load_error(name, root, {**base, "split": value}, e) from e
                parts[ours] = (value, ds)
                break
        lacking = [s for s in ("train", "test") if s not in parts]
        if lacking:
            raise DataError(f"{where}: its split argument accepts no {' nor '.join(lacking)} split "
                            f"(tried train/trainval, test); pass dataset_kwargs={{'split': ...}} to read one "
                            f"split of it, or use the 'folder' reader")
    elif "train" in params and "train" not in base:
        parts["train"] = ("train", _instantiate(cls, name, root, {**base, "train": True}))
        parts["test"] = ("test", _instantiate(cls, name, root, {**base, "train": False}))
    else:
        parts["all"] = ("all", _instantiate(cls, name, root, base))
    return parts


def _read_parts(name: str, root: Path, parts: dict, where: str, split_seed: int, check_files: bool) -> DatasetSplits:
    first = next(iter(parts.values()))[1]
    classes = getattr(first, "classes", None) or getattr(first, "categories", None)
    exported = False
    raw: dict[str, list[tuple[str, int]]] = {}
    for ours, (value, ds) in parts.items():
        files = _file_list(ds)
        if files is None:
            files = export_images(ds, root / EXPORT_DIR / name / value, f"{where} ({value})")
            exported = True
        raw[ours] = files
    n_labels = max((y for items in raw.values() for _, y in items), default=-1) + 1
    if classes is not None:
        names = clean_torchvision_classnames(name, list(classes))
        if len(names) < n_labels:
            raise DataError(f"{where}: labels go up to {n_labels - 1} but the dataset names {len(names)} classes")
    else:
        names = [str(i) for i in range(n_labels)]

    def to_samples(items: list[tuple[str, int]]) -> list[Sample]:
        return [Sample(p, y, names[y]) for p, y in items]

    extra: dict = {"torchvision": name, "root": str(root), "exported": exported,
                   "splits_used": {k: v for k, (v, _) in parts.items()}}  # our split -> the dataset's split
    if "all" in raw:
        train, val, test = split_per_class(to_samples(raw["all"]), split_seed)
        extra.update(split_source="generated", split_seed=split_seed)
    else:
        train, test = to_samples(raw["train"]), to_samples(raw["test"])
        if "val" in raw:
            val = to_samples(raw["val"])
        else:
            train, val = split_trainval(train, split_seed)
            extra.update(val_from_train=True, split_seed=split_seed)
    if check_files:
        check_exist([*train, *val, *test], where)
    reader = TORCHVISION_EQUIVALENTS.get(name, "")
    return DatasetSplits(name=f"torchvision:{name}", classnames=names, train=train, val=val, test=test,
                         template=template_for(reader), extra=extra)
