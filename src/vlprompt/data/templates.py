"""Prompt templates: CoOp's per-dataset hand-crafted prompts, CLIP's 80 ImageNet prompts, CoOp's
7-prompt ensemble set, and :func:`resolve_templates` turning a user's spec into template strings.

A template is a string with exactly one ``{}`` standing for the class name.
"""
from __future__ import annotations

import string
from typing import Iterable, Sequence

from ..errors import DataError

#: The prompt used when a dataset has no hand-crafted one (CoOp's default, and CLIP's).
DEFAULT_TEMPLATE = "a photo of a {}."

#: CoOp's hand-crafted prompt per dataset (its ``CUSTOM_TEMPLATES``), keyed by vlprompt's reader name.
DATASET_TEMPLATES: dict[str, str] = {
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": "a photo of a {}.",
    "food101": "a photo of {}, a type of food.",
    "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenetv2": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
}

#: CLIP's 80 prompts for ImageNet (OpenAI's notebook "Prompt_Engineering_for_ImageNet"; the same list
#: as ``open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES``, written as "{}" strings).
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.",
    "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.", "a photo of a {}.",
    "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.",
    "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
    "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.",
    "a photo of the small {}.", "a photo of the weird {}.", "the cartoon {}.", "art of the {}.",
    "a drawing of the {}.", "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.",
    "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.", "a toy {}.",
    "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.", "a tattoo of the {}.",
)

#: The 7 prompts CoOp ensembles (``IMAGENET_TEMPLATES_SELECT``, used by its ZeroshotCLIP2).
IMAGENET_TEMPLATES_SELECT: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

#: Names accepted by :func:`resolve_templates` besides literal templates.
TEMPLATE_SETS = ("imagenet80", "imagenet-select", "dataset", "ensemble")


def template_for(dataset: str) -> str:
    """CoOp's hand-crafted prompt of a dataset reader name; the default prompt for any other name."""
    return DATASET_TEMPLATES.get(dataset, DEFAULT_TEMPLATE)


def check_template(template: str) -> str:
    """Return ``template`` if it has exactly one ``{}`` and no other format field, else raise DataError."""
    if not isinstance(template, str):
        raise DataError(f"a prompt template must be a string, got {type(template).__name__}")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise DataError(f"prompt template {template!r} is not a valid format string: {e}") from e
    if fields != [""]:
        raise DataError(f"prompt template {template!r} must contain exactly one '{{}}' for the class name "
                        f"(and no other '{{...}}' field)")
    return template


def resolve_templates(spec: str | Sequence[str], dataset_template: str = DEFAULT_TEMPLATE, *,
                      dataset_name: str | None = None) -> list[str]:
    """Turn a template spec into a list of template strings (order kept, duplicates dropped).

    Each item of ``spec`` is a template containing ``{}`` or the name of a set:
    ``imagenet80`` (CLIP's 80 prompts), ``imagenet-select`` (CoOp's 7), ``dataset`` (the
    dataset's hand-crafted prompt, ``dataset_template``), ``ensemble`` (CoOp's ZeroshotCLIP2: the 7
    plus the dataset's prompt; for ImageNet, ``dataset_name="imagenet"``, the 7 alone as there).
    """
    if isinstance(spec, str):
        spec = [spec]
    items = list(spec)
    if not items:
        raise DataError("no prompt template given (an empty list)")
    check_template(dataset_template)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise DataError(f"a prompt template must be a string, got {item!r}")
        out.extend(_expand(item, dataset_template, dataset_name))
    return list(dict.fromkeys(out))


def _expand(item: str, dataset_template: str, dataset_name: str | None) -> Iterable[str]:
    key = item.strip().lower()
    if key == "imagenet80":
        return IMAGENET_TEMPLATES
    if key == "imagenet-select":
        return IMAGENET_TEMPLATES_SELECT
    if key == "dataset":
        return [dataset_template]
    if key == "ensemble":
        if dataset_name == "imagenet":
            return IMAGENET_TEMPLATES_SELECT
        return [*IMAGENET_TEMPLATES_SELECT, dataset_template]
    if "{" in item or "}" in item:
        return [check_template(item)]
    raise DataError(f"unknown prompt template set {item!r}: use a template containing '{{}}' or one of "
                    f"{', '.join(TEMPLATE_SETS)}")
