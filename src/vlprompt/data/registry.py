"""The dataset registry: every reader vlprompt knows, filled in explicitly here (no import side effects).

``load_dataset(name, root, **options)`` is the one entry point; ``DATASETS`` describes each reader
(its expected on-disk layout, template and options) for ``vlprompt datasets``.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from ..errors import DataError
from .base import DatasetSplits
from .standard import (FGVC_LAYOUT, IMAGENET_LAYOUT, IMAGENET_VARIANTS, SPLIT_FILE_DATASETS, read_fgvc_aircraft,
                       read_imagenet, read_imagenet_variant, read_split_file_dataset)
from .templates import DEFAULT_TEMPLATE, template_for
from .tv import LAYOUT as TORCHVISION_LAYOUT
from .tv import read_torchvision
from . import ordinal
from .user import CSV_LAYOUT, FOLDER_LAYOUT


@dataclass(frozen=True)
class DatasetInfo:
    """One reader: ``name`` as given to :func:`load_dataset`, a one-line ``title``, the expected
    ``layout`` (text), its hand-crafted ``template``, whether it is ``test_only``, and ``reader(root, **options)``."""

    name: str
    title: str
    layout: str
    template: str
    reader: Callable[..., DatasetSplits]
    test_only: bool = False

    @property
    def options(self) -> list[str]:
        """The keyword options the reader accepts."""
        return _options_of(self.reader)


def _options_of(fn: Callable) -> list[str]:
    sig = inspect.signature(fn)
    return [p.name for p in sig.parameters.values() if p.kind == inspect.Parameter.KEYWORD_ONLY]


_TITLES = {
    "caltech101": "Caltech101 (100 classes), CoOp's split",
    "oxford_pets": "Oxford-IIIT Pets (37 breeds), CoOp's split",
    "stanford_cars": "Stanford Cars (196 models), CoOp's split",
    "oxford_flowers": "Oxford 102 Flowers, CoOp's split",
    "food101": "Food-101, CoOp's split",
    "sun397": "SUN397 scenes, CoOp's split",
    "dtd": "Describable Textures (47 classes), CoOp's split",
    "eurosat": "EuroSAT RGB (10 land-use classes), CoOp's split and class names",
    "ucf101": "UCF101 middle frames (101 actions), CoOp's split",
}


def _build() -> dict[str, DatasetInfo]:
    reg: dict[str, DatasetInfo] = {}
    reg["imagenet"] = DatasetInfo("imagenet", "ImageNet-1k (val is the test set, as in CoOp)", IMAGENET_LAYOUT,
                                  template_for("imagenet"), read_imagenet)
    for name, spec in SPLIT_FILE_DATASETS.items():
        layout = f"{spec.layout}\n  (no split file: one is generated and saved under that name: {spec.generation})"
        reg[name] = DatasetInfo(name, _TITLES[name], layout, spec.template, partial(read_split_file_dataset, spec))
    reg["fgvc_aircraft"] = DatasetInfo("fgvc_aircraft", "FGVC Aircraft (100 variants), official split", FGVC_LAYOUT,
                                       template_for("fgvc_aircraft"), read_fgvc_aircraft)
    titles = {"imagenetv2": "ImageNetV2 matched-frequency (1000 classes)",
              "imagenet_sketch": "ImageNet-Sketch (1000 classes)",
              "imagenet_a": "ImageNet-A (its 200 classes, relabelled 0..199)",
              "imagenet_r": "ImageNet-R (its 200 classes, relabelled 0..199)"}
    for name, vspec in IMAGENET_VARIANTS.items():
        reg[name] = DatasetInfo(name, titles[name] + ", test only", vspec.layout, template_for(name),
                                partial(read_imagenet_variant, vspec), test_only=True)
    reg["folder"] = DatasetInfo("folder", "your images, one folder per class (or a target in file names)",
                                f"{FOLDER_LAYOUT}\nor, with target_regex=...: {ordinal.FOLDER_LAYOUT}",
                                DEFAULT_TEMPLATE, ordinal.read_folder_dataset)
    reg["csv"] = DatasetInfo("csv", "your images listed in a CSV file (root = the CSV file)",
                             f"{CSV_LAYOUT}\nor, with target_column=...: {ordinal.CSV_LAYOUT}", DEFAULT_TEMPLATE,
                             ordinal.read_csv_dataset)
    for name, (title, layout, template, reader) in ordinal.ORDINAL_DATASETS.items():  # ordinal regression
        reg[name] = DatasetInfo(name, title, layout, template, reader)
    reg["torchvision"] = DatasetInfo("torchvision:<Name>", "any torchvision.datasets class that downloads itself",
                                     TORCHVISION_LAYOUT, DEFAULT_TEMPLATE, read_torchvision)
    return reg


#: name -> DatasetInfo for every reader (``torchvision`` stands for the ``torchvision:<Name>`` family).
DATASETS: dict[str, DatasetInfo] = _build()

#: CoOp's dataset class names (its configs' ``DATASET.NAME``) -> vlprompt reader names.
ALIASES: dict[str, str] = {
    "ImageNet": "imagenet", "Caltech101": "caltech101", "OxfordPets": "oxford_pets", "StanfordCars": "stanford_cars",
    "OxfordFlowers": "oxford_flowers", "Food101": "food101", "FGVCAircraft": "fgvc_aircraft", "SUN397": "sun397",
    "DescribableTextures": "dtd", "EuroSAT": "eurosat", "UCF101": "ucf101", "ImageNetV2": "imagenetv2",
    "ImageNetSketch": "imagenet_sketch", "ImageNetA": "imagenet_a", "ImageNetR": "imagenet_r",
}


def dataset_names() -> list[str]:
    """The names :func:`load_dataset` accepts (``torchvision:<Name>`` written as such)."""
    return [info.name for info in DATASETS.values()]


def describe_datasets() -> str:
    """The text ``vlprompt datasets`` prints: each reader's name, title, prompt, options and layout."""
    blocks = []
    for info in DATASETS.values():
        head = f"{info.name}: {info.title}" + ("  [test only]" if info.test_only else "")
        opts = ", ".join(info.options) or "none"
        layout = "\n".join("    " + line for line in info.layout.splitlines())
        blocks.append(f"{head}\n  prompt: {info.template!r}\n  options: {opts}\n  layout:\n{layout}")
    return "\n\n".join(blocks)


def get_dataset_info(name: str) -> DatasetInfo:
    """The registry entry of a dataset name (aliases and ``torchvision:<Name>`` resolved)."""
    if name.startswith("torchvision:"):
        return DATASETS["torchvision"]
    key = ALIASES.get(name, name)
    if key not in DATASETS or key == "torchvision":
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(dataset_names())}")
    return DATASETS[key]


def load_dataset(name: str, root: str | os.PathLike, **options: Any) -> DatasetSplits:
    """Load a dataset by name: a standard one (``oxford_flowers``, ``imagenet``, ``imagenet_r``, ...;
    CoOp's class names such as ``OxfordFlowers`` work too), ``folder`` (``root`` = the folder),
    ``csv`` (``root`` = the CSV file) or ``torchvision:<Name>`` (``root`` = where it downloads).

    ``options`` are the reader's keyword options (see ``DATASETS[name].options``); an unknown one is a
    DataError rather than silently ignored. Unknown names raise DataError listing the known ones.
    """
    if not isinstance(name, str) or not name:
        raise DataError(f"dataset name must be a non-empty string, got {name!r}")
    info = get_dataset_info(name)
    allowed = info.options
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise DataError(f"dataset {name!r} does not take option(s) {unknown}; it takes: "
                        f"{', '.join(allowed) if allowed else 'none'}")
    if name.startswith("torchvision:"):
        cls_name = name.split(":", 1)[1]
        if not cls_name:
            raise DataError("torchvision dataset name missing: write torchvision:<Name>, e.g. torchvision:EuroSAT")
        return read_torchvision(cls_name, root, **options)
    return info.reader(root, **options)
