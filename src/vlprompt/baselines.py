"""Training-free baselines: zero-shot CLIP (one hand-crafted prompt or a prompt ensemble) and CoOp's linear probe.

- Zero-shot: the class text features are ``backbone.encode_text([template.format(c) for c in classnames])``;
  with several templates, the L2-normalised features of each template are averaged per class and renormalised
  (CLIP's prompt ensembling, CoOp's ``ZeroshotCLIP2``). Logits (N, K) = ``logit_scale * cos(image, text)``.
- Linear probe (CoOp's ``lpclip/linear_probe.py``): scikit-learn ``LogisticRegression(lbfgs, l2, max_iter=1000)``
  on the *unnormalised* image features (test transform) of the few-shot train split. The inverse regularisation
  strength C is chosen on the few-shot val split: a coarse sweep over ``1e6, 1e4, ..., 1e-6`` (first best kept),
  then ``search_steps`` bisection steps in log10(C) between 0.1x and 10x the coarse peak; each step fits both
  ends, keeps the better one (the left on a tie) and halves the interval towards it. The chosen C is the winner
  of the last step, and the classifier reported is the one fitted on train with that C.

Image features come from the :class:`vlprompt.cache.FeatureCache` (test transform, view 0, seed 0: the same
entries the training runs use for evaluation). ``run_zeroshot`` / ``run_linear_probe`` write a run directory:
``config.yaml`` (the configuration, plus what was resolved from it), ``split.json`` (the samples used),
``results.json``, ``log.txt``; zero-shot also exports its classifier as a ``linear`` head under ``export/``
(usable by ``vlprompt predict``), the linear probe saves ``linear_probe.safetensors`` + ``linear_probe.json``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from ._io import atomic_save_safetensors, atomic_write_json, atomic_write_text
from .backbone import Backbone, load_backbone
from .cache import FeatureCache
from .data import (DatasetSplits, build_test_transform, build_train_transform, check_samples, few_shot_split,
                   get_dataset_info, load_dataset, load_split, require_split, resolve_templates, save_split,
                   subsample_classes, transform_id)
from .errors import DataError, VLPromptError
from .methods.base import classification_metrics, cosine_logits
from .runner import DataConfig, attach_log_file, default_cache_dir

log = logging.getLogger(__name__)

BASELINES = ("zeroshot", "linear_probe")

#: CoOp's coarse sweep of the logistic regression's C (its order: on a tie the first, i.e. the largest C, wins).
COARSE_C_GRID: tuple[float, ...] = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)


# ------------------------------------------------------------------------------------------------------------
# zero-shot
# ------------------------------------------------------------------------------------------------------------
def format_prompts(template: str, classnames: Sequence[str]) -> list[str]:
    """The prompt of each class (underscores in class names become spaces, as in CoOp)."""
    return [template.format(str(c).replace("_", " ")) for c in classnames]


@torch.no_grad()
def class_text_features(backbone: Backbone, classnames: Sequence[str], templates: Sequence[str], *,
                        progress: bool = False) -> torch.Tensor:
    """Normalised class text features (K, E) on the backbone's device.

    One template: ``normalize(encode_text(prompts))``. Several: the mean over templates of the normalised
    features of each template, renormalised (prompt ensembling)."""
    templates = list(templates)
    if not templates:
        raise VLPromptError("no prompt template to build the zero-shot classifier from")
    if not classnames:
        raise VLPromptError("no class names to build the zero-shot classifier from")
    from tqdm.auto import tqdm

    total = None
    for template in tqdm(templates, desc="text features", unit="template", leave=False, dynamic_ncols=True,
                         disable=None if (progress and len(templates) > 1) else True):
        feats = F.normalize(backbone.encode_text(format_prompts(template, classnames)).float(), dim=-1)
        total = feats if total is None else total + feats
    return F.normalize(total / len(templates), dim=-1)


def zeroshot_logits(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Logits (N, K) = ``logit_scale`` * cos(image features (N, E), class text features (K, E))."""
    return cosine_logits(image_features.float(), text_features.float().to(image_features.device), logit_scale)


@dataclass
class ZeroShotResult:
    """``metrics`` (top-1 and mean per-class accuracy in percent), ``logits`` (N, K) on the CPU, the class
    ``text_features`` (K, E), and the cache ``hits`` / ``misses`` of the image features."""

    metrics: dict
    logits: torch.Tensor
    text_features: torch.Tensor
    hits: int
    misses: int


def evaluate_zeroshot(backbone: Backbone, samples, classnames: Sequence[str], templates: Sequence[str], transform,
                      cache: FeatureCache, *, batch_size: int = 64, progress: bool = False) -> ZeroShotResult:
    """Zero-shot classification of ``samples`` among ``classnames`` with ``templates`` (see the module doc)."""
    if not samples:
        raise DataError("nothing to evaluate: the split is empty")
    text = class_text_features(backbone, classnames, templates, progress=progress)
    feats = image_features(backbone, samples, transform, cache, batch_size=batch_size)
    logits = zeroshot_logits(feats.global_, text.cpu(), backbone.logit_scale)
    labels = torch.tensor([s.label for s in samples])
    return ZeroShotResult(classification_metrics(logits, labels, len(classnames)), logits, text.cpu(),
                          feats.hits, feats.misses)


def image_features(backbone: Backbone, samples, transform, cache: FeatureCache, *, local: bool = False,
                   batch_size: int = 64):
    """Cached features of ``samples`` under a deterministic ``transform`` (view 0, seed 0):
    a :class:`vlprompt.cache.CachedFeatures` with ``global_`` (N, E), unnormalised."""
    return cache.get(backbone, [s.path for s in samples], transform, transform_id=transform_id(transform), view=0,
                     seed=0, local=local, batch_size=batch_size)


# ------------------------------------------------------------------------------------------------------------
# linear probe
# ------------------------------------------------------------------------------------------------------------
@dataclass
class LinearProbeConfig:
    """``C``: a fixed inverse regularisation strength (no search); None: search it on the val split over
    ``c_grid`` then ``search_steps`` bisection steps. ``max_iter``: of L-BFGS."""

    C: Optional[float] = None
    c_grid: list = field(default_factory=lambda: list(COARSE_C_GRID))
    search_steps: int = 8
    max_iter: int = 1000

    def validate(self) -> "LinearProbeConfig":
        if self.C is not None and not (isinstance(self.C, (int, float)) and math.isfinite(self.C) and self.C > 0):
            raise VLPromptError(f"linear probe: C must be a positive finite number, got {self.C!r}")
        if not self.c_grid or not all(isinstance(c, (int, float)) and math.isfinite(c) and c > 0 for c in self.c_grid):
            raise VLPromptError(f"linear probe: c_grid must be a non-empty list of positive numbers, got {self.c_grid!r}")
        if isinstance(self.search_steps, bool) or not isinstance(self.search_steps, int) or self.search_steps < 0:
            raise VLPromptError(f"linear probe: search_steps must be an integer >= 0, got {self.search_steps!r}")
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise VLPromptError(f"linear probe: max_iter must be a positive integer, got {self.max_iter!r}")
        return self


def search_c(score: Callable[[float], float], grid: Sequence[float] = COARSE_C_GRID, steps: int = 8
             ) -> tuple[float, list[dict]]:
    """CoOp's search of C maximising ``score(C)`` (validation accuracy).

    Coarse: ``score`` at every value of ``grid``; the first best is the peak. Then ``steps`` bisection steps in
    log10(C) starting from [peak / 10, peak * 10]: score both ends, keep the better (the left on a tie) as the
    current choice and halve the interval towards it. Returns the choice after the last step (the coarse peak
    when ``steps == 0``) and the history: one ``{"stage", "C", "score"}`` per evaluation, in order.
    ``score`` is called once per distinct C."""
    memo: dict[float, float] = {}
    history: list[dict] = []

    def evaluate(c: float, stage: str) -> float:
        if c not in memo:
            memo[c] = float(score(c))
        history.append({"stage": stage, "C": c, "score": memo[c]})
        return memo[c]

    scores = [evaluate(float(c), "coarse") for c in grid]
    peak = float(grid[int(np.argmax(scores))])
    chosen = peak
    lo, hi = math.log10(peak) - 1.0, math.log10(peak) + 1.0
    for step in range(steps):
        c_lo, c_hi = float(10.0 ** lo), float(10.0 ** hi)
        s_lo, s_hi = evaluate(c_lo, f"step {step + 1}"), evaluate(c_hi, f"step {step + 1}")
        mid = 0.5 * (lo + hi)
        if s_lo < s_hi:
            chosen, lo = c_hi, mid
        else:
            chosen, hi = c_lo, mid
    return chosen, history


#: Fits with fewer than this many (samples x features x classes) run BLAS on one thread.
SMALL_FIT = 10_000_000


def fit_logistic(x: np.ndarray, y: np.ndarray, C: float, max_iter: int = 1000):
    """``LogisticRegression(solver="lbfgs", l2, C, max_iter)`` fitted on features (N, E) and labels (N,);
    returns (classifier, converged)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    from threadpoolctl import threadpool_limits

    clf = LogisticRegression(solver="lbfgs", max_iter=max_iter, C=C)
    # small problems: BLAS threads only add synchronisation (measured 10-30x slower fits with 2 threads on a
    # busy 2-core machine); large ones keep the default thread pool
    small = x.shape[0] * x.shape[1] * max(len(np.unique(y)), 2) < SMALL_FIT
    with warnings.catch_warnings(record=True) as caught, \
            (threadpool_limits(limits=1, user_api="blas") if small else contextlib.nullcontext()):
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(x, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return clf, converged


def probe_logits(clf, x: np.ndarray, num_classes: int) -> torch.Tensor:
    """Decision values (N, K) of a fitted classifier, one column per label 0..K-1 (-inf for labels absent from
    its training data), so that ``argmax`` is its prediction."""
    d = np.asarray(clf.decision_function(x), dtype=np.float64)
    if d.ndim == 1:  # binary: sklearn's single column is the score of classes_[1]
        d = np.stack([np.zeros_like(d), d], axis=1)
    out = np.full((d.shape[0], num_classes), -np.inf)
    out[:, np.asarray(clf.classes_, dtype=np.int64)] = d
    return torch.from_numpy(out)


@dataclass
class LinearProbeResult:
    """The fitted ``classifier``, the chosen ``C``, its ``val_accuracy`` (percent, None without search), the
    search ``history`` (``{"stage", "C", "val_accuracy", "converged"}`` per evaluation) and whether the final fit
    ``converged``."""

    classifier: object
    C: float
    val_accuracy: Optional[float]
    history: list
    converged: bool


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def fit_linear_probe(train_x, train_y, val_x=None, val_y=None, config: Optional[LinearProbeConfig] = None, *,
                     progress: bool = False) -> LinearProbeResult:
    """CoOp's linear probe on features (N, E) with integer labels (N,): C fixed by ``config.C`` or searched on
    (``val_x``, ``val_y``) with :func:`search_c`; the classifier is fitted on the train features alone."""
    cfg = (config or LinearProbeConfig()).validate()
    xt, yt = _as_numpy(train_x), _as_numpy(train_y).astype(np.int64)
    if xt.ndim != 2 or len(xt) != len(yt) or len(xt) == 0:
        raise VLPromptError(f"linear probe: train features {xt.shape} and labels {yt.shape} do not match")
    if len(np.unique(yt)) < 2:
        raise VLPromptError("linear probe: the training data holds a single class; it needs at least two")
    fits: dict[float, tuple] = {}

    def fit(c: float):
        if c not in fits:
            fits[c] = fit_logistic(xt, yt, c, cfg.max_iter)
        return fits[c]

    if cfg.C is not None:
        clf, converged = fit(float(cfg.C))
        return LinearProbeResult(clf, float(cfg.C), None, [], converged)
    if val_x is None or val_y is None or len(val_y) == 0:
        raise VLPromptError("linear probe: no validation images to choose C on; give a fixed C "
                            "(`--C` on the command line) or use a dataset with a val split")
    xv, yv = _as_numpy(val_x), _as_numpy(val_y).astype(np.int64)
    if xv.ndim != 2 or xv.shape[1] != xt.shape[1] or len(xv) != len(yv):
        raise VLPromptError(f"linear probe: val features {xv.shape} and labels {yv.shape} do not match the train "
                            f"features {xt.shape}")
    from tqdm.auto import tqdm

    bar = tqdm(total=len(cfg.c_grid) + 2 * cfg.search_steps, desc="linear probe: C search", unit="fit",
               leave=False, dynamic_ncols=True, disable=None if progress else True)

    def val_accuracy(c: float) -> float:
        clf, _ = fit(c)
        bar.update(1)
        return 100.0 * float(np.mean(clf.predict(xv) == yv))

    try:
        chosen, history = search_c(val_accuracy, cfg.c_grid, cfg.search_steps)
    finally:
        bar.close()
    history = [{"stage": h["stage"], "C": h["C"], "val_accuracy": h["score"], "converged": fits[h["C"]][1]}
               for h in history]
    clf, converged = fit(chosen)
    val_acc = next(h["val_accuracy"] for h in history if h["C"] == chosen)
    return LinearProbeResult(clf, chosen, val_acc, history, converged)


# ------------------------------------------------------------------------------------------------------------
# runs
# ------------------------------------------------------------------------------------------------------------
@dataclass
class BaselineConfig:
    """One baseline run. ``method``: ``zeroshot`` or ``linear_probe``. ``templates``: the template spec of
    zero-shot (templates with ``{}`` and set names, see :func:`vlprompt.data.resolve_templates`; default the
    dataset's own); ``probe``: the linear probe's settings."""

    method: str
    backbone: str
    pretrained: Optional[str]
    data: DataConfig
    templates: list = field(default_factory=lambda: ["dataset"])
    probe: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    device: Optional[str] = None
    precision: str = "amp"
    cache_dir: str = field(default_factory=default_cache_dir)
    preprocess: str = "coop"  # coop | model (the backbone's own eval transform)
    batch_size: int = 64  # images per forward pass when features are computed

    def to_dict(self) -> dict:
        """The configuration as plain data, without the section of the other baseline."""
        d = asdict(self)
        if self.method == "zeroshot":
            d.pop("probe")
        elif self.method == "linear_probe":
            d.pop("templates")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BaselineConfig":
        d = {k: v for k, v in d.items() if k != "resolved"}
        d["data"] = DataConfig(**d["data"])
        d["probe"] = LinearProbeConfig(**d.get("probe", {}))
        return cls(**d)

    def identity_hash(self) -> str:
        """What decides the numbers (not where the cache lives, the device or the batch size)."""
        d = self.to_dict()
        for k in ("cache_dir", "device", "batch_size"):
            d.pop(k)
        if not self.data.shots:  # the seed only drives few-shot sampling
            d["data"]["seed"] = None
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def validate(self) -> "BaselineConfig":
        """Fail fast (before any model or image is loaded) on inconsistent settings."""
        if self.method not in BASELINES:
            raise VLPromptError(f"unknown baseline {self.method!r}; known: {', '.join(BASELINES)}")
        if self.preprocess not in ("coop", "model"):
            raise VLPromptError(f"preprocess must be 'coop' or 'model', got {self.preprocess!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise VLPromptError(f"batch size must be a positive integer, got {self.batch_size!r}")
        d = self.data
        if d.classes not in ("all", "base", "new"):
            raise VLPromptError(f"classes must be all, base or new, got {d.classes!r}")
        if self.method == "zeroshot":
            if d.shots:
                raise VLPromptError(f"zero-shot evaluates on all test images: --shots must be 0, got {d.shots}")
            if d.allow_fewer:
                raise VLPromptError("--allow-fewer applies to few-shot sampling; zero-shot samples nothing")
            info = get_dataset_info(d.dataset)  # an unknown dataset fails here
            resolve_templates(self.templates, d.options.get("template", info.template), dataset_name=info.name)
        else:
            get_dataset_info(d.dataset)
            if d.shots is None or d.shots < 0:
                raise VLPromptError(f"shots must be >= 0 (0: all training images), got {d.shots}")
            self.probe.validate()
        check_root(d)
        return self


def check_root(data: DataConfig) -> None:
    """A missing ``--root`` is one clear line (torchvision datasets download into theirs, so it may not exist)."""
    if not data.dataset.startswith("torchvision:") and not os.path.exists(os.path.expanduser(str(data.root))):
        raise DataError(f"data root {data.root} does not exist (`vlprompt datasets` shows the layout each dataset "
                        f"expects)")


def prepare_splits(data: DataConfig, needs: Sequence[str]) -> DatasetSplits:
    """The dataset with the protocol applied (classes subset, few-shot sampling when ``data.shots`` > 0), keeping
    only the splits in ``needs`` (the others emptied: their images are never opened), every kept image checked."""
    check_root(data)
    splits = load_dataset(data.dataset, data.root, **data.options)
    if data.classes != "all":
        splits = subsample_classes(splits, data.classes)
    if data.shots and data.shots > 0:
        splits = few_shot_split(splits, data.shots, data.seed, allow_fewer=data.allow_fewer)
    splits = splits.with_splits(**{n: [] for n in ("train", "val", "test") if n not in needs})
    for name in needs:
        samples = getattr(splits, name)
        if samples:
            ok, problems = check_samples(samples, mode=data.on_bad_image, source=f"{splits.name} {name} split")
            if problems:
                log.warning("%s split: skipped %d unreadable image(s), e.g. %s", name, len(problems), problems[0])
                splits = splits.with_splits(**{name: ok})
    return splits


def eval_transform(backbone: Backbone, preprocess: str = "coop"):
    """CoOp's test transform at the backbone's input size, or the backbone's own eval preprocessing."""
    return backbone.preprocess if preprocess == "model" else build_test_transform(backbone.image_size)


def _run_dir_state(run_dir: Path, cfg: BaselineConfig, force: bool) -> str:
    """``fresh`` (absent or empty), ``done`` (this exact run, finished), ``resume`` (this run, unfinished) or
    ``replace`` (another vlprompt run, with ``force``); anything else is an error. Nothing is written."""
    cfg_file = run_dir / "config.yaml"
    if run_dir.exists() and not run_dir.is_dir():
        raise VLPromptError(f"--output {run_dir} is a file, not a directory")
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return "fresh"
    if not cfg_file.exists():
        raise VLPromptError(f"{run_dir} is not empty and holds no config.yaml (not a vlprompt run): choose another "
                            f"--output")
    try:
        same = BaselineConfig.from_dict(yaml.safe_load(cfg_file.read_text())).identity_hash() == cfg.identity_hash()
    except Exception:  # another kind of run (training) or a damaged config: not this run
        same = False
    if force:
        return "replace"
    if not same:
        raise VLPromptError(f"{run_dir} holds another run (different configuration); choose another --output or "
                            f"pass --force to overwrite it")
    return "done" if (run_dir / "results.json").exists() else "resume"


def run_baseline(cfg: BaselineConfig, output: str | Path, *, force: bool = False, progress: bool = True) -> dict:
    """Run a baseline into the run directory ``output`` and return its results (also ``results.json``).

    A directory holding this exact finished run returns its results; an unfinished one is run again on its
    saved ``split.json``; one holding another run is an error unless ``force`` (then it is cleared). The data,
    templates and backbone are all checked before anything is written."""
    cfg.validate()
    run_dir = Path(output)
    state = _run_dir_state(run_dir, cfg, force)
    if state == "done":
        log.info("%s is already finished (pass --force to run it again)", run_dir)
        return json.loads((run_dir / "results.json").read_text())
    t_start = time.perf_counter()
    needs = {"zeroshot": ("test",), "linear_probe": ("train", "test") if cfg.probe.C is not None
             else ("train", "val", "test")}[cfg.method]
    split_file = run_dir / "split.json"
    splits = load_split(split_file) if state == "resume" and split_file.exists() else prepare_splits(cfg.data, needs)
    for name in needs:
        require_split(splits, name)
    if cfg.method == "linear_probe" and cfg.probe.C is None and not splits.val:
        raise DataError(f"{splits.name}: no val images to choose C on; pass a fixed --C (or, for imagenet, "
                        f"--dataset-option val_from_test=...)")
    templates = resolve_templates(cfg.templates, splits.template, dataset_name=splits.name) \
        if cfg.method == "zeroshot" else None
    backbone = load_backbone(cfg.backbone, cfg.pretrained, cfg.device, precision=cfg.precision)
    tf = eval_transform(backbone, cfg.preprocess)
    resolved = {"transform_id": transform_id(tf), "backbone_fingerprint": backbone.fingerprint,
                "logit_scale": backbone.logit_scale}
    if templates is not None:
        resolved = {"templates": templates, "dataset_template": splits.template, **resolved}

    if state == "replace":
        for child in run_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump({**cfg.to_dict(), "resolved": resolved},
                                                              sort_keys=False))
    save_split(splits, split_file)
    handler = attach_log_file(run_dir)
    try:
        t_load = time.perf_counter() - t_start
        cache = FeatureCache(cfg.cache_dir, progress=progress)
        if cfg.method == "zeroshot":
            results = _zeroshot(cfg, run_dir, splits, templates, backbone, tf, cache, progress)
        else:
            results = _linear_probe(cfg, run_dir, splits, needs, backbone, tf, cache, progress)
        results["timings"] = {"load_s": t_load, **results["timings"], "total_s": time.perf_counter() - t_start}
        atomic_write_json(run_dir / "results.json", results)
        return results
    finally:
        logging.getLogger("vlprompt").removeHandler(handler)
        handler.close()


def run_zeroshot(cfg: BaselineConfig, output: str | Path, **kw) -> dict:
    """:func:`run_baseline` with ``method="zeroshot"``."""
    return run_baseline(dataclasses.replace(cfg, method="zeroshot"), output, **kw)


def run_linear_probe(cfg: BaselineConfig, output: str | Path, **kw) -> dict:
    """:func:`run_baseline` with ``method="linear_probe"``."""
    return run_baseline(dataclasses.replace(cfg, method="linear_probe"), output, **kw)


def _common_results(cfg: BaselineConfig, splits: DatasetSplits) -> dict:
    return {"method": cfg.method, "dataset": cfg.data.dataset, "classes": cfg.data.classes,
            "num_classes": splits.num_classes, "backbone": cfg.backbone, "pretrained": cfg.pretrained,
            "shots": cfg.data.shots, "seed": cfg.data.seed if cfg.data.shots else None}


def _zeroshot(cfg, run_dir: Path, splits: DatasetSplits, templates: list, backbone: Backbone, tf,
              cache: FeatureCache, progress: bool) -> dict:
    samples = splits.test
    log.info("zero-shot %s: %d classes, %d test images, %d template(s)%s", splits.name, splits.num_classes,
             len(samples), len(templates), f": {templates[0]!r}" if len(templates) == 1 else "")
    t0 = time.perf_counter()
    text = class_text_features(backbone, splits.classnames, templates, progress=progress).cpu()
    t_text = time.perf_counter() - t0
    t0 = time.perf_counter()
    feats = image_features(backbone, samples, tf, cache, batch_size=cfg.batch_size)
    t_features = time.perf_counter() - t0
    t0 = time.perf_counter()
    logits = zeroshot_logits(feats.global_, text, backbone.logit_scale)
    metrics = classification_metrics(logits, torch.tensor([s.label for s in samples]), splits.num_classes)
    t_eval = time.perf_counter() - t0
    atomic_save_safetensors(run_dir / "export" / "head.safetensors", {"text_features": text})
    atomic_write_json(run_dir / "export" / "head.json", {
        "kind": "linear", "logit_scale": backbone.logit_scale, "method": "zeroshot", "templates": templates,
        "classnames": list(splits.classnames), "backbone": cfg.backbone, "pretrained": cfg.pretrained,
        "preprocess": cfg.preprocess, "image_size": backbone.image_size, "source_run": str(run_dir),
        "vlprompt_head": 1})
    log.info("test: accuracy %.2f, mean per-class accuracy %.2f", metrics["accuracy"],
             metrics["mean_per_class_accuracy"])
    return {**_common_results(cfg, splits), "templates": templates, "metrics": metrics,
            "cache": {"hits": feats.hits, "misses": feats.misses},
            "timings": {"text_s": t_text, "features_s": t_features, "eval_s": t_eval}}


def _linear_probe(cfg, run_dir: Path, splits: DatasetSplits, needs: Sequence[str], backbone: Backbone, tf,
                  cache: FeatureCache, progress: bool) -> dict:
    log.info("linear probe %s: %d classes, %d train / %d val / %d test images", splits.name, splits.num_classes,
             len(splits.train), len(splits.val), len(splits.test))
    t0 = time.perf_counter()
    parts = {name: image_features(backbone, getattr(splits, name), tf, cache, batch_size=cfg.batch_size)
             for name in needs}
    t_features = time.perf_counter() - t0

    def labels(name):
        return np.array([s.label for s in getattr(splits, name)], dtype=np.int64)

    t0 = time.perf_counter()
    val = parts.get("val")
    probe = fit_linear_probe(parts["train"].global_, labels("train"), None if val is None else val.global_,
                             None if val is None else labels("val"), cfg.probe, progress=progress)
    t_fit = time.perf_counter() - t0
    if not probe.converged:
        log.warning("linear probe: L-BFGS did not converge in %d iterations at C=%g", cfg.probe.max_iter, probe.C)
    t0 = time.perf_counter()
    logits = probe_logits(probe.classifier, _as_numpy(parts["test"].global_), splits.num_classes)
    metrics = classification_metrics(logits, torch.from_numpy(labels("test")), splits.num_classes)
    t_eval = time.perf_counter() - t0
    clf = probe.classifier
    atomic_save_safetensors(run_dir / "linear_probe.safetensors",
                            {"weight": torch.from_numpy(np.asarray(clf.coef_, dtype=np.float32)),
                             "bias": torch.from_numpy(np.asarray(clf.intercept_, dtype=np.float32))})
    atomic_write_json(run_dir / "linear_probe.json", {
        "C": probe.C, "classes": [int(c) for c in clf.classes_], "classnames": list(splits.classnames),
        "features": "unnormalised image features, " + ("the backbone's preprocessing" if cfg.preprocess == "model"
                                                        else "CoOp's test transform"),
        "decision": "weight @ feature + bias, one row per entry of classes (binary: one row, the score of "
                    "classes[1])",
        "backbone": cfg.backbone, "pretrained": cfg.pretrained, "image_size": backbone.image_size})
    log.info("linear probe: C=%g (val accuracy %s); test accuracy %.2f, mean per-class accuracy %.2f", probe.C,
             "n/a" if probe.val_accuracy is None else f"{probe.val_accuracy:.2f}", metrics["accuracy"],
             metrics["mean_per_class_accuracy"])
    return {**_common_results(cfg, splits), "C": probe.C, "C_searched": cfg.probe.C is None,
            "val_accuracy": probe.val_accuracy, "converged": probe.converged, "metrics": metrics,
            "search": probe.history,
            "cache": {"hits": sum(p.hits for p in parts.values()), "misses": sum(p.misses for p in parts.values())},
            "timings": {"features_s": t_features, "fit_s": t_fit, "eval_s": t_eval}}


# ------------------------------------------------------------------------------------------------------------
# feature precomputation
# ------------------------------------------------------------------------------------------------------------
def cache_features(backbone: Backbone, splits: DatasetSplits, cache: FeatureCache, *,
                   which: Sequence[str] = ("train", "val", "test"), views: int = 0, local: bool = False,
                   preprocess: str = "coop", batch_size: int = 64) -> list[dict]:
    """Compute and cache the features later runs read: every split in ``which`` under the test transform
    (view 0; what evaluation, zero-shot and the linear probe use) and, with ``views`` > 0, views 0..views-1 of
    the train split under CoOp's train augmentation (what ``vlprompt train --views N`` uses). ``local`` caches
    local features too (PLOT). Returns one summary per request: split, transform, view, images, hits, misses."""
    if isinstance(views, bool) or not isinstance(views, int) or views < 0:
        raise VLPromptError(f"views must be an integer >= 0, got {views!r}")
    unknown = [w for w in which if w not in ("train", "val", "test")]
    if unknown:
        raise VLPromptError(f"unknown split(s) {unknown}: use train, val, test")
    test_tf = eval_transform(backbone, preprocess)
    out = []
    for name in which:
        samples = getattr(splits, name)
        if not samples:
            log.info("%s: no %s images", splits.name, name)
            continue
        log.info("%s %s: %d images, test transform", splits.name, name, len(samples))
        feats = image_features(backbone, samples, test_tf, cache, local=local, batch_size=batch_size)
        out.append({"split": name, "transform": "test", "view": 0, "images": len(samples), "hits": feats.hits,
                    "misses": feats.misses, "local": local, "directory": str(feats.directory)})
    if views:
        if "train" not in which or not splits.train:
            raise VLPromptError("augmented views are of the train split: it is not selected or empty")
        train_tf = build_train_transform(backbone.image_size)
        tid = transform_id(train_tf)
        paths = [s.path for s in splits.train]
        for v in range(views):
            log.info("%s train: view %d/%d (augmented)", splits.name, v + 1, views)
            feats = cache.get(backbone, paths, train_tf, transform_id=tid, view=v, seed=0, local=local,
                              batch_size=batch_size)
            out.append({"split": "train", "transform": "train", "view": v, "images": len(paths), "hits": feats.hits,
                        "misses": feats.misses, "local": local, "directory": str(feats.directory)})
    return out
