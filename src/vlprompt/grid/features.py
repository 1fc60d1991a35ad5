"""Frozen-tower features once per grid: before the cells start, the features every cell will ask the cache for
are computed in one place, serially, so that parallel cells only read them (they never encode an image twice
nor race to write the same cache entries).

What a cell reads is what :func:`vlprompt.runs.run` reads: the test split under the test transform (view 0) --
the whole test split of its dataset, which holds the base and new halves too --, the few-shot train (and val)
images the run layer samples for its seed (:func:`vlprompt.runs.prepare_data`, the very same call), under the
test transform for methods that fit in closed form and as views 0..V-1 of the train augmentation for cached-view
training, and the test splits of the datasets it is evaluated on afterwards. A method that trains its own image
encoder encodes its images itself (nothing to cache); ``--online`` training encodes its training images at every
step (only its evaluation features are cached). Each distinct (backbone, weights, precision, device,
preprocessing, transform, view, local) becomes one :meth:`FeatureCache.get` over the union of the images.
"""
from __future__ import annotations

import json
import logging
import os
from ..errors import DataError, VLPromptError

log = logging.getLogger("vlprompt")

EVAL_BATCH = 64  # the batch of the evaluation sources (vlprompt.engine.sources.eval_source) (results do not depend on it)


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:500]


class FeaturePlan:
    """The union of the images each feature slot needs, in the cells' order."""

    def __init__(self):
        self.slots: dict[tuple, dict[str, None]] = {}
        self._datasets: dict[tuple, object] = {}
        self._checked: dict[tuple, list[str]] = {}

    def _split_paths(self, data, split: str) -> list[str]:
        """The readable images of one split of a dataset (whole, no sampling), loaded and checked once."""
        from ..data import check_samples, load_dataset

        key = (data.dataset, data.root, json.dumps(data.options, sort_keys=True, default=str))
        if key + (split,) in self._checked:
            return self._checked[key + (split,)]
        if key not in self._datasets:
            if not data.dataset.startswith("torchvision:") and not os.path.exists(data.root):
                raise DataError(f"data root {data.root} does not exist (`vlprompt datasets` shows the layout each "
                                f"dataset expects)")
            self._datasets[key] = load_dataset(data.dataset, data.root, **data.options)
        samples = getattr(self._datasets[key], split)
        # unreadable images are left out here; each cell's own check skips or refuses them as it is configured
        ok, problems = check_samples(samples, mode="skip", source=f"{data.dataset} {split} split") if samples \
            else ([], [])
        if problems:
            log.warning("%s %s split: %d unreadable image(s) not precomputed, e.g. %s", data.dataset, split,
                        len(problems), problems[0][0])
        self._checked[key + (split,)] = [s.path for s in ok]
        return self._checked[key + (split,)]

    def add_cell(self, cfg, evaluations: list) -> None:
        """Add what one cell (a resolved RunConfig) and its evaluations read. Raises the DataError its run would
        raise (then nothing of it is added)."""
        import dataclasses

        from ..engine.sources import feature_requests
        from ..methods import build_config, method_class
        from ..runs import prepare_data
        from ..runs.config import resolve_data

        cls = method_class(cfg.method)
        mcfg = build_config(cfg.method, cfg.method_options)
        requests = feature_requests(cls, mcfg, cfg.train)  # what the run itself will ask the cache for
        if not requests:
            return  # it encodes its images itself, in training and in evaluation
        pixels = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in cfg.pixels().items()))
        model = (cfg.backbone, cfg.pretrained, cfg.precision, cfg.device, pixels)
        local = any(r.local for r in requests)
        common = (model, cfg.preprocess, cfg.cache_dir, local)
        wanted: list[tuple[tuple, list[str]]] = []
        paths = {"test": self._split_paths(cfg.data, "test")}
        if any(r.split != "test" for r in requests):
            splits, _ = prepare_data(cfg.data, cfg.seed, needs=("train", "val"))
            paths["train"], paths["val"] = [s.path for s in splits.train], [s.path for s in splits.val]
        train_batch = cfg.train.feature_batch_size if cfg.train is not None else EVAL_BATCH
        crop = tuple(cfg.data.crop_scale) if cfg.data.crop_scale else None  # the train crop (test: none)
        for r in requests:
            batch = EVAL_BATCH if r.transform == "test" else train_batch
            for v in range(r.views):
                wanted.append((common + (r.transform, v, batch, crop if r.transform == "train" else None),
                               paths[r.split]))
        for e in evaluations:
            if e.get("base_to_new"):
                continue  # the halves of the cell's own test split, already in
            data = resolve_data({k: v for k, v in e.items() if k in ("dataset", "root", "options", "classes")})
            data = dataclasses.replace(data, shots=0, classes="all")
            wanted.append((common + ("test", 0, EVAL_BATCH, None), self._split_paths(data, e.get("split", "test"))))
        for slot, paths in wanted:
            target = self.slots.setdefault(slot, {})
            for p in paths:
                target.setdefault(p, None)

    def encode(self, progress: bool = True) -> list[dict]:
        """Compute (or find) every slot's features; one backbone load per model. Returns one summary per slot."""
        from ..backbone import load_backbone
        from ..backbone.cache import FeatureCache
        from ..data import transform_id
        from ..runs import transforms_for

        out = []
        models = list(dict.fromkeys(slot[0] for slot in self.slots))
        for model in models:
            name, pretrained, precision, device, pixels = model
            backbone = load_backbone(name, pretrained, device, precision=precision,
                                     pixels={k: list(v) if isinstance(v, tuple) else v for k, v in pixels})
            for slot, paths in self.slots.items():
                if slot[0] != model or not paths:
                    continue
                _, preprocess, cache_dir, local, kind, view, batch, crop = slot
                train_tf, test_tf = transforms_for(preprocess, backbone, crop)
                tf = train_tf if kind == "train" else test_tf
                feats = FeatureCache(cache_dir, progress=progress).get(
                    backbone, list(paths), tf, transform_id=transform_id(tf), view=view, seed=0, local=local,
                    batch_size=batch)
                out.append({"backbone": name, "transform": kind, "view": view, "local": local,
                            "images": len(paths), "hits": feats.hits, "misses": feats.misses})
                log.info("features %s %s view %d%s: %d images (%d computed now)", os.path.basename(str(name)), kind,
                         view, " +local" if local else "", len(paths), feats.misses)
            del backbone
            _free_accelerator()
        return out


def _free_accelerator() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def prefetch(payload: dict) -> dict:
    """Precompute the features of a grid's cells (``payload``: ``{"cells": [{"name", "config", "evaluations"}],
    "progress": bool, "threads": int or None}``), wherever the executor runs it. Returns ``{"errors": {cell:
    one-line error}, "slots": [...]}``: a cell whose data cannot be read is reported, not precomputed; the others
    go on."""
    from ..runs.config import RunConfig

    if payload.get("threads"):
        import torch

        torch.set_num_threads(int(payload["threads"]))
    plan = FeaturePlan()
    errors: dict[str, str] = {}
    for cell in payload["cells"]:
        try:
            plan.add_cell(RunConfig.from_dict(cell["config"]), cell.get("evaluations", []))
        except VLPromptError as e:
            errors[cell["name"]] = one_line(e)
    return {"errors": errors, "slots": plan.encode(progress=bool(payload.get("progress", True)))}


def cell_payload(cell) -> dict:
    return {"name": cell.name, "config": cell.config.to_dict(), "evaluations": list(cell.evaluations)}


__all__ = ["FeaturePlan", "prefetch", "cell_payload", "one_line"]
