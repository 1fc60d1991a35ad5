"""vlprompt's data layer: dataset readers, the few-shot / base-to-new protocols, image loading,
transforms and prompt templates. Everything downstream depends only on :class:`Sample` and
:class:`DatasetSplits`.

The public names below are imported from their submodule on first use (PEP 562), so that
``import vlprompt.data`` and the protocol / template helpers do not pull in torch and torchvision
until images or transforms are actually needed.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .base import SOURCE_NAMES, DatasetSplits, Sample, source_classnames

#: public name -> submodule of vlprompt.data that defines it
_EXPORTS: dict[str, str] = {
    # registry
    "load_dataset": "registry", "DATASETS": "registry", "DatasetInfo": "registry", "ALIASES": "registry",
    "dataset_names": "registry", "describe_datasets": "registry", "get_dataset_info": "registry",
    # protocol
    "few_shot_split": "protocol", "subsample_classes": "protocol", "save_split": "protocol",
    "load_split": "protocol", "split_to_json": "protocol", "require_split": "protocol",
    "samples_per_class": "protocol", "group_by_label": "protocol", "SAMPLERS": "protocol",
    "read_dassl_few_shot": "protocol",
    # images
    "load_image": "images", "to_rgb": "images", "verify_image": "images", "check_samples": "images",
    "ImageDataset": "images",
    # transforms
    "build_train_transform": "transforms", "build_test_transform": "transforms", "build_transform": "transforms",
    "transform_id": "transforms", "describe_transform": "transforms", "CLIP_MEAN": "transforms",
    "CLIP_STD": "transforms",
    # templates
    "DEFAULT_TEMPLATE": "templates", "DATASET_TEMPLATES": "templates", "IMAGENET_TEMPLATES": "templates",
    "IMAGENET_TEMPLATES_SELECT": "templates", "TEMPLATE_SETS": "templates", "resolve_templates": "templates",
    "template_for": "templates", "check_template": "templates",
}

__all__ = ["Sample", "DatasetSplits", "SOURCE_NAMES", "source_classnames", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .images import ImageDataset, check_samples, load_image, to_rgb, verify_image
    from .protocol import (few_shot_split, group_by_label, load_split, require_split, samples_per_class,
                           save_split, split_to_json, subsample_classes)
    from .registry import (ALIASES, DATASETS, DatasetInfo, dataset_names, describe_datasets, get_dataset_info,
                           load_dataset)
    from .templates import (DATASET_TEMPLATES, DEFAULT_TEMPLATE, IMAGENET_TEMPLATES, IMAGENET_TEMPLATES_SELECT,
                            TEMPLATE_SETS, check_template, resolve_templates, template_for)
    from .transforms import (CLIP_MEAN, CLIP_STD, build_test_transform, build_train_transform, build_transform,
                             describe_transform, transform_id)
