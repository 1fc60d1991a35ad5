"""Evaluation: a method's metrics on a split (:func:`evaluate`, rank-shared under torchrun), a finished run on
any dataset or class split (:func:`evaluate_run`, written to ``RUN/eval/``), and the base-to-new protocol with the
harmonic mean (:func:`base_to_new`)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from .._io import atomic_write_json
from ..backbone import Backbone
from ..backbone.cache import FeatureCache
from ..engine import distributed
from ..engine.sources import eval_source, sample_targets
from ..engine.trainer import predict_logits
from ..errors import ConfigError, DataError
from ..methods import Method
from ..methods.base import Features
from . import directory
from .assembly import data_warnings, load_method, prepare_data, transforms_for
from .config import DataConfig, default_cache_dir

log = logging.getLogger("vlprompt")


def evaluate(method: Method, backbone: Backbone, samples, transform, cache: FeatureCache,
             batch_size: int = 256, progress: bool = False) -> tuple[dict, torch.Tensor]:
    """Metrics and logits of ``method`` on ``samples`` (what it reads comes from :func:`engine.sources.eval_source`:
    the frozen tower's features from the cache, or the images)."""
    if not samples:
        raise DataError("nothing to evaluate: the split is empty")
    labels = torch.tensor([s.label for s in samples])
    if distributed.active() and not isinstance(cache, distributed.RankSharedCache):
        cache = distributed.RankSharedCache(cache)
    source = eval_source(method, backbone, samples, transform, cache)
    if distributed.active():  # each rank a contiguous share of the images, gathered in order
        share = distributed.share(len(samples))
        mine = predict_logits(method, _Offset(source, share.start), share.stop - share.start, batch_size,
                              progress and distributed.is_main())
        logits = distributed.gather_rows(mine)
    else:
        logits = predict_logits(method, source, len(samples), batch_size, progress)
    return method.metrics(logits, labels, sample_targets(samples)), logits


class _Offset:
    """A source whose item i is item ``offset + i`` of another (a rank's share of an evaluation)."""

    def __init__(self, source, offset: int):
        self.source = source
        self.offset = offset

    def batch(self, idx: torch.Tensor, gen: torch.Generator) -> Features:
        return self.source.batch(idx + self.offset, gen)


def _run_identity(run_dir: Path) -> Optional[dict]:
    p = Path(run_dir) / "results.json"
    try:
        return json.loads(p.read_text()).get("identity")
    except (OSError, json.JSONDecodeError):
        return None


def run_cache_dir(run_dir: str | Path) -> str:
    """The feature cache a run used (``cache_dir`` of its config.yaml), where its evaluations look first: the
    default cache only for a run that records none."""
    held = directory.held_config(Path(run_dir)) or {}
    cache_dir = held.get("cache_dir")
    return cache_dir if isinstance(cache_dir, str) and cache_dir else default_cache_dir()


def evaluate_run(run_dir: str | Path, data: DataConfig, *, split: str = "test", device: Optional[str] = None,
                 cache_dir: Optional[str] = None, progress: bool = True, backbone: Optional[Backbone] = None) -> dict:
    """Evaluate a finished run on any dataset / class split (its classes replace the trained ones); writes
    ``RUN/eval/<dataset>-<classes>-<split>.json``. Features come from ``cache_dir``, by default the run's own
    (:func:`run_cache_dir`)."""
    run_dir = Path(run_dir)
    if split not in ("train", "val", "test"):
        raise ConfigError(f"--split must be train, val or test, got {split!r}")
    data = dataclasses.replace(data, shots=0, allow_fewer=False)
    data.root = os.path.abspath(os.path.expanduser(data.root))
    splits, skipped = prepare_data(data, None, needs=(split,))
    method, meta, backbone = load_method(run_dir, backbone=backbone, classnames=splits.classnames, device=device,
                                         dataset_template=splits.template)
    samples = getattr(splits, split)
    if not samples:
        raise DataError(f"{data.dataset}: no {split} images")
    warnings = data_warnings(splits)
    prompts = {}
    if method.template_field:  # the papers' cross-dataset protocol: the evaluated dataset's own prompt
        prompts = {"templates": getattr(method.config, method.template_field), "templates_from": meta["templates_from"]}
        log.info("%s: prompt template(s) %s (%s)", meta["method"], prompts["templates"],
                 "the evaluated dataset's own prompt" if meta["templates_from"] == "evaluated dataset"
                 else "as the run was configured")
    _, test_tf = transforms_for(meta.get("preprocess", "coop"), backbone)
    cache = FeatureCache(cache_dir or run_cache_dir(run_dir), progress=progress)
    metrics, _ = evaluate(method, backbone, samples, test_tf, cache, progress=progress)
    result = {"run": str(run_dir), "method": meta["method"], "trained_on": meta["dataset"],
              "dataset": data.dataset, "classes": data.classes, "split": split, "metrics": metrics, **prompts,
              "skipped_images": skipped, "warnings": warnings, "identity": _run_identity(run_dir),
              "eval_data": data.to_dict(), "precision_used": backbone.precision_used}
    name = f"{data.dataset.replace(':', '_').replace('/', '_')}-{data.classes}-{split}.json"
    atomic_write_json(run_dir / "eval" / name, result)
    return result


def harmonic_mean(base: float, new: float) -> float:
    """CoCoOp's H = 2 * base * new / (base + new) (0 when both are 0)."""
    return 2.0 * base * new / (base + new) if (base + new) > 0 else 0.0


def base_to_new(run_dir: str | Path, data: DataConfig, *, metric: str = "accuracy", device: Optional[str] = None,
                cache_dir: Optional[str] = None, progress: bool = True) -> dict:
    """The base-to-new protocol: test accuracy on the base classes and on the new classes (each half
    relabelled from 0), and their harmonic mean. Writes ``RUN/eval/base2new-<dataset>.json``. Only of a run
    trained on the base classes (or of a method that learns nothing): any other is refused
    (:func:`vlprompt.reporting.collect.base_to_new_problem`)."""
    from ..reporting.collect import base_to_new_problem, run_identity

    run_dir = Path(run_dir)
    problem = base_to_new_problem(run_identity(run_dir)[0]) if (run_dir / "method.json").is_file() else None
    if problem is not None:
        raise ConfigError(f"--base-to-new: {run_dir}: {problem}, and base / new / H would not measure generalisation "
                          f"to unseen classes. Train on the base half (--classes base) and evaluate that run, or "
                          f"evaluate this one on a class split with --classes base|new")
    _, meta, backbone = load_method(run_dir, device=device)
    out = {}
    for half in ("base", "new"):
        res = evaluate_run(run_dir, dataclasses.replace(data, classes=half), device=device, cache_dir=cache_dir,
                           progress=progress, backbone=backbone)
        out[half] = res["metrics"][metric]
    data = dataclasses.replace(data, shots=0, classes="all")
    data.root = os.path.abspath(os.path.expanduser(data.root))
    result = {"run": str(run_dir), "method": meta["method"], "dataset": data.dataset, "metric": metric,
              "base": out["base"], "new": out["new"], "harmonic_mean": harmonic_mean(out["base"], out["new"]),
              "identity": _run_identity(run_dir), "eval_data": data.to_dict()}
    atomic_write_json(run_dir / "eval" / f"base2new-{data.dataset.replace(':', '_').replace('/', '_')}.json", result)
    return result
