"""Assembling a run from its resolved configuration: the data with the protocol applied, the transforms and pixel
statistics of the backbone, and the method's files (``method.json`` + ``prompt.safetensors``: what rebuilds the
method on any class list, :func:`load_method`)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

from .._io import atomic_save_safetensors, atomic_write_json
from ..backbone import Backbone, load_backbone
from ..data import (DatasetSplits, check_samples, few_shot_split, load_dataset, load_split, subsample_classes)
from ..data.transforms import build_transforms
from ..errors import CheckpointError, DataError
from ..methods import Method, build_method, method_class
from . import directory
from .config import DataConfig, RunConfig

log = logging.getLogger("vlprompt")


def needed_splits(cls: type, config) -> tuple[str, ...]:
    """The splits a method's run reads: a method that neither trains nor sets itself up from the training data
    only evaluates on test (:meth:`Method.needs_training_data`)."""
    return ("train", "val", "test") if cls.needs_training_data(config) else ("test",)


def prepare_data(data: DataConfig, seed: Optional[int], needs: Sequence[str] = ("train", "val", "test"),
                 split_file: Optional[Path] = None) -> tuple[DatasetSplits, dict]:
    """The dataset with the protocol applied, as CoOp's code does it: few-shot sampling of the train and val
    splits first (``seed``), then the base / new classes (``subsample_classes``, relabelled from 0); the same
    images for every method -- CoOp, CoCoOp, PLOT, the linear probe -- of the same data, shots and seed. The
    splits not in ``needs`` are emptied (their images are never opened); the images of the others are checked
    up front (a bad file stops the run at once, or is skipped and counted with ``on_bad_image="skip"``).
    ``split_file`` (a resumed run's ``split.json``: it keeps the images it started with, whatever sampler drew
    them) is read instead when given; ``data.fewshot_file`` (Dassl's pkl) replaces the sampling. Returns (splits,
    skipped images per split)."""
    from ..data.protocol import read_dassl_few_shot

    if split_file is not None:
        return load_split(split_file), {}
    if not data.dataset.startswith("torchvision:") and not os.path.exists(data.root):
        raise DataError(f"data root {data.root} does not exist (`vlprompt datasets` shows the layout each dataset "
                        f"expects)")
    splits = load_dataset(data.dataset, data.root, **data.options)
    if data.shots > 0 and data.fewshot_file:
        splits = read_dassl_few_shot(data.fewshot_file, splits, data.shots)
    elif data.shots > 0:
        splits = few_shot_split(splits, data.shots, seed, allow_fewer=data.allow_fewer, sampler=data.sampler,
                                val_shots=data.val_shots)
    if data.classes != "all":
        splits = subsample_classes(splits, data.classes)
    splits = splits.with_splits(**{name: [] for name in ("train", "val", "test") if name not in needs})
    skipped = {}
    for name in needs:
        samples = getattr(splits, name)
        if samples:
            ok, problems = check_samples(samples, mode=data.on_bad_image, source=f"{splits.name} {name} split")
            if problems:
                skipped[name] = len(problems)
                log.warning("%s split: skipped %d unreadable image(s), e.g. %s: %s", name, len(problems),
                            problems[0][0], problems[0][1])
                splits = splits.with_splits(**{name: ok})
    return splits, skipped


def data_warnings(splits: DatasetSplits) -> list[str]:
    """The warnings the dataset's reader recorded (``extra["warnings"]``, e.g. class names that are bare numbers),
    each logged once; results.json and eval files carry them."""
    warnings = [str(w) for w in splits.extra.get("warnings") or []]
    for w in warnings:
        log.warning("%s", w)
    return warnings


def transforms_for(preprocess: str, backbone: Backbone, crop_scale: Optional[Sequence[float]] = None):
    """(train, test) image transforms: the backbone's pixel statistics (``backbone.pixel_statistics``) with CoOp's
    crop/flip policy (``coop``; ``crop_scale``: the train crop's area range, ``data.crop_scale``) or open_clip's own
    pipeline for these weights (``model``)."""
    return build_transforms(backbone.preprocess_cfg, preprocess, crop_scale)


def recorded_pixels(meta: dict) -> Optional[dict]:
    """The pixel statistics a run's method.json (or an exported head.json) records, for ``load_backbone(...,
    pixels=)``: eval, export and predict use those the run was made with. Files written before they were recorded
    took a tag's, an hf-hub: / local-dir: config's (None: the loader takes them again), or for a checkpoint file
    open_clip's defaults (OpenAI's), which a later loader would no longer choose for every architecture."""
    from ..backbone import PIXEL_KEYS

    stats = meta.get("pixels")
    if isinstance(stats, dict):
        return {k: stats[k] for k in PIXEL_KEYS if stats.get(k) is not None}
    pretrained, name = meta.get("pretrained"), str(meta.get("backbone"))
    if pretrained and os.path.isfile(str(pretrained)) and not name.startswith(("hf-hub:", "local-dir:")):
        from open_clip.transform import PreprocessCfg

        defaults = dataclasses.asdict(PreprocessCfg())
        return {k: list(defaults[k]) if isinstance(defaults[k], tuple) else defaults[k] for k in PIXEL_KEYS}
    return None


def log_pixel_statistics(backbone: Backbone, preprocess: str) -> None:
    """The pixel statistics in log.txt; a warning when some that the ``preprocess`` policy uses are open_clip's
    defaults for a weights file (CoOp's policy has no resize mode)."""
    stats = backbone.pixel_statistics
    text = (f"pixel statistics: mean {stats['mean']}, std {stats['std']}, {stats['interpolation']}, resize "
            f"{stats['resize_mode']} ({stats['source']})")
    if set(backbone.pixel_fallback) - ({"resize_mode"} if preprocess == "coop" else set()):
        log.warning("%s", text)
    else:
        log.info("%s", text)


def save_method(run_dir: Path, cfg: RunConfig, method: Method, splits: DatasetSplits) -> None:
    atomic_save_safetensors(run_dir / "prompt.safetensors", method.learned_state())
    meta = {"method": cfg.method, "config": method.config.to_dict(), "classnames": list(method.classnames),
            "backbone": cfg.backbone, "pretrained": cfg.pretrained, "dataset": cfg.data.dataset,
            "template": splits.template, "preprocess": cfg.preprocess, "image_size": method.backbone.image_size,
            "pixels": method.backbone.pixel_statistics, "precision": cfg.precision}
    if method.template_field:  # what the user asked for (e.g. ["dataset"]), resolved again on other datasets
        meta["template_request"] = method.template_request
    atomic_write_json(run_dir / "method.json", meta)


def template_request(cls: type, meta: dict):
    """The template request of a saved ``uses_template`` method (method.json's ``template_request``). A run written
    before it was recorded holds only the resolved templates: when they are what the method's default request
    (the dataset's own prompt) gives on its dataset, that default is taken, else the templates as they are."""
    if "template_request" in meta:
        return meta["template_request"]
    saved = (meta.get("config") or {}).get(cls.template_field)
    default = cls.config_class().to_dict().get(cls.template_field)
    return default if cls.expand_templates(default, meta.get("template")) == saved else saved


def load_method(run_dir: Path, backbone: Optional[Backbone] = None, classnames: Optional[Sequence[str]] = None,
                device: Optional[str] = None, dataset_template: Optional[str] = None
                ) -> tuple[Method, dict, Backbone]:
    """Rebuild a run's method from its directory, optionally on another class list (a class-specific context or
    a linear probe refuses class lists other than its own). ``dataset_template``: the own prompt of the dataset
    it is rebuilt for; a method whose hand-crafted templates follow its dataset's (zero-shot and the baselines on
    its class features, with the default ``dataset`` templates) then uses that one, explicit templates stay.
    ``meta["templates_from"]`` says which: ``"evaluated dataset"`` or ``"run"``."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    directory.check_not_busy(run_dir)  # a run being written (resumed, forced again) is read when it is done
    meta_path = run_dir / "method.json"
    if not meta_path.exists():
        raise CheckpointError(f"{run_dir}: no method.json (not a finished vlprompt run)")
    try:
        meta = json.loads(meta_path.read_text())
        state = load_file(str(run_dir / "prompt.safetensors"))
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{run_dir}: cannot read the trained method ({e})") from e
    cls = method_class(meta["method"])
    options, template = cls.config_for_loading(dict(meta["config"])), meta.get("template")
    if cls.template_field:
        request = template_request(cls, meta)
        meta["templates_from"] = "run"
        if dataset_template is not None and cls.template_follows_dataset(request):
            options[cls.template_field], template = request, dataset_template
            meta["templates_from"] = "evaluated dataset"
    if backbone is None:
        # the precision the run was made with (runs written before it was recorded: the default, amp)
        backbone = load_backbone(meta["backbone"], meta["pretrained"], device, pixels=recorded_pixels(meta),
                                 precision=meta.get("precision", "amp"))
    method = build_method(meta["method"], options, backbone, meta["classnames"], template=template)
    method.load_learned_state({k: v.to(backbone.device) for k, v in state.items()})
    if classnames is not None and list(classnames) != list(meta["classnames"]):
        method.set_classnames(classnames)
    return method, meta, backbone
