"""Prompt templates: per-dataset prompts, CLIP's 80, CoOp's 7, and resolve_templates."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from vlprompt.data import (DATASET_TEMPLATES, DATASETS, IMAGENET_TEMPLATES, IMAGENET_TEMPLATES_SELECT,
                           resolve_templates, template_for)
from vlprompt.errors import DataError


def _open_clip_templates() -> list[str]:
    # read open_clip's list without importing open_clip (that would take seconds): the module has no imports
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        pytest.skip("open_clip is not installed")
    source = Path(spec.origin).with_name("zero_shot_metadata.py").read_text()
    namespace: dict = {}
    exec(compile(source, "zero_shot_metadata.py", "exec"), namespace)
    return [t("{}") for t in namespace["OPENAI_IMAGENET_TEMPLATES"]]


def test_imagenet80_matches_clip_list():
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert list(IMAGENET_TEMPLATES) == _open_clip_templates()
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}." and IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."


def test_select_set_is_coops_seven():
    assert list(IMAGENET_TEMPLATES_SELECT) == ["itap of a {}.", "a bad photo of the {}.", "a origami {}.",
                                               "a photo of the large {}.", "a {} in a video game.", "art of the {}.",
                                               "a photo of the small {}."]
    assert set(IMAGENET_TEMPLATES_SELECT) <= set(IMAGENET_TEMPLATES)


def test_per_dataset_templates():
    expected = {"oxford_pets": "a photo of a {}, a type of pet.", "oxford_flowers": "a photo of a {}, a type of flower.",
                "fgvc_aircraft": "a photo of a {}, a type of aircraft.", "dtd": "{} texture.",
                "eurosat": "a centered satellite photo of {}.", "food101": "a photo of {}, a type of food.",
                "ucf101": "a photo of a person doing {}.", "caltech101": "a photo of a {}.",
                "stanford_cars": "a photo of a {}.", "sun397": "a photo of a {}.", "imagenet": "a photo of a {}."}
    for name, t in expected.items():
        assert DATASET_TEMPLATES[name] == t == template_for(name) == DATASETS[name].template
    assert template_for("folder") == "a photo of a {}."


def test_resolve_templates_sets_and_literals():
    dtd = "{} texture."
    assert resolve_templates(["dataset"], dtd) == [dtd]
    assert resolve_templates("imagenet80", dtd) == list(IMAGENET_TEMPLATES)
    assert resolve_templates(["imagenet-select"], dtd) == list(IMAGENET_TEMPLATES_SELECT)
    ens = resolve_templates(["ensemble"], dtd)
    assert ens == list(IMAGENET_TEMPLATES_SELECT) + [dtd] and len(ens) == 8
    assert resolve_templates(["ensemble"], "a photo of a {}.", dataset_name="imagenet") == list(IMAGENET_TEMPLATES_SELECT)
    mixed = resolve_templates(["a sketch of a {}.", "dataset", "imagenet-select", "a sketch of a {}."], dtd)
    assert mixed[:2] == ["a sketch of a {}.", dtd] and len(mixed) == 9  # duplicates dropped, order kept
    assert "{}" in resolve_templates(["{}"], dtd)


@pytest.mark.parametrize("spec, pattern", [
    (["imagenet81"], r"unknown prompt template set 'imagenet81'.*imagenet80, imagenet-select, dataset, ensemble"),
    (["a photo of {} and {}."], "exactly one"),
    (["a photo of {name}."], "exactly one"),
    (["a photo of {."], "not a valid format string"),
    ([], "no prompt template"),
    ([3], "must be a string"),
])
def test_resolve_templates_errors(spec, pattern):
    with pytest.raises(DataError, match=pattern):
        resolve_templates(spec, "a photo of a {}.")
