"""Running a resolved configuration: data + backbone + method + engine, wired together, in a run directory.

One path for every method and baseline (:func:`run`). Everything that can be refused -- the configuration,
the data (missing files, too few images for the shots), the weights, the method on these classes (a context
too long for a class name, a word init of another length) -- is checked BEFORE the run directory is touched;
then ``run.json`` + ``config.yaml`` + ``split.json`` are written, the method learns (by gradient, by a
closed-form fit, or not at all), and ``results.json`` closes the run. A run directory holds ``config.yaml``
(the resolved configuration), ``split.json`` (the exact samples used), ``log.txt``, ``prompt.safetensors`` +
``method.json`` (the learned tensors and what rebuilds the method on any class list), ``results.json`` (the
configuration, its identity and hash, the metrics), and for trained methods ``metrics.jsonl``,
``training_curve.png`` and ``checkpoints/``.

Under torchrun every rank calls :func:`run` with the same arguments (``torchrun --nproc-per-node N -m vlprompt
train ...``): all ranks resolve and check the same things, rank 0 alone writes the run directory, the training
and the evaluations are split over the ranks (:mod:`vlprompt.engine.distributed`), and every rank returns rank
0's results.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from .._io import atomic_save_safetensors, atomic_write_json, atomic_write_text
from ..backbone import Backbone, load_backbone
from ..cache import FeatureCache
from ..data import (DatasetSplits, check_samples, few_shot_split, load_dataset, load_split,
                    save_split, source_classnames, subsample_classes, transform_id)
from ..data.transforms import build_transforms
from ..engine import distributed
from ..engine.callbacks import BestEpoch, MetricsJsonl, TensorBoard, TrainingCurve
from ..engine.sources import eval_source, features_of_images, sample_targets, split_data, train_source
from ..engine.trainer import Trainer, predict_logits, seed_everything
from ..errors import CheckpointError, ConfigError, DataError, VLPromptError
from ..methods import Method, build_config, build_method, method_class
from ..methods.base import Features, cosine_logits
from . import directory
from .config import DataConfig, RunConfig, config_hash, default_cache_dir, dump_config, request_of, resolve

log = logging.getLogger("vlprompt")


# -- logging ----------------------------------------------------------------------------------------
def attach_log_file(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "log.txt", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    return handler


# -- data -------------------------------------------------------------------------------------------
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
        splits = few_shot_split(splits, data.shots, seed, allow_fewer=data.allow_fewer, sampler=data.sampler)
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


def transforms_for(preprocess: str, backbone: Backbone):
    """(train, test) image transforms: the backbone's pixel statistics (``backbone.pixel_statistics``) with CoOp's
    crop/flip policy (``coop``) or open_clip's own pipeline for these weights (``model``)."""
    return build_transforms(backbone.preprocess_cfg, preprocess)


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


# -- features -----------------------------------------------------------------------------------------
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


# -- method files -------------------------------------------------------------------------------------
def save_method(run_dir: Path, cfg: RunConfig, method: Method, splits: DatasetSplits) -> None:
    atomic_save_safetensors(run_dir / "prompt.safetensors", method.learned_state())
    meta = {"method": cfg.method, "config": method.config.to_dict(), "classnames": list(method.classnames),
            "backbone": cfg.backbone, "pretrained": cfg.pretrained, "dataset": cfg.data.dataset,
            "template": splits.template, "preprocess": cfg.preprocess, "image_size": method.backbone.image_size,
            "pixels": method.backbone.pixel_statistics}
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
        backbone = load_backbone(meta["backbone"], meta["pretrained"], device, pixels=recorded_pixels(meta))
    method = build_method(meta["method"], options, backbone, meta["classnames"], template=template)
    method.load_learned_state({k: v.to(backbone.device) for k, v in state.items()})
    if classnames is not None and list(classnames) != list(meta["classnames"]):
        method.set_classnames(classnames)
    return method, meta, backbone


# -- a run ------------------------------------------------------------------------------------------
def run(cfg: RunConfig | dict, output: str | Path, *, resume: bool = False, force: bool = False,
        progress: bool = True) -> dict:
    """Run a configuration (resolved, or a request that :func:`resolve` resolves) into ``output``; returns its
    results (also ``results.json``). See :mod:`vlprompt.runs.directory` for what happens to an existing
    directory. Under torchrun, every rank calls it (see the module doc)."""
    if not isinstance(cfg, RunConfig):
        cfg = resolve(cfg)
    with distributed.session(cfg.device) as session:
        results = _run(cfg, Path(output), resume=resume, force=force, progress=progress and distributed.is_main(),
                       device=session.device)
        return distributed.broadcast_object(results)


def _run(cfg: RunConfig, run_dir: Path, *, resume: bool, force: bool, progress: bool, device: Optional[str]) -> dict:
    main = distributed.is_main()
    request_hash = cfg.identity_hash()
    marker = directory.read_marker(run_dir) if run_dir.is_dir() else None
    if (not force and marker and marker.get("request_hash") == request_hash
            and directory.is_finished(run_dir)):  # this very run, finished: nothing to load
        log.info("%s is already finished (pass --force to run it again)", run_dir)
        return json.loads((run_dir / "results.json").read_text())
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--output {run_dir} is a file, not a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not directory.is_run_dir(run_dir):
        directory.inspect(run_dir, "", resume=resume, force=force)  # raises: not a vlprompt run

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    # everything that can be refused, before anything is written
    t_start = time.perf_counter()
    cls = method_class(cfg.method)
    needs = needed_splits(cls, build_config(cfg.method, cfg.method_options))
    same_request = bool(marker and marker.get("request_hash") == request_hash and not force)

    split_file = run_dir / "split.json"
    splits, skipped = prepare_data(cfg.data, cfg.seed, needs,
                                   split_file if (same_request and split_file.is_file()) else None)
    if "train" in needs and not splits.train:
        raise DataError(f"{cfg.data.dataset}: no training images")
    if not splits.test:
        raise DataError(f"{cfg.data.dataset}: no test images to evaluate on")
    backbone = load_backbone(cfg.backbone, cfg.pretrained, device or cfg.device, precision=cfg.precision,
                             pixels=cfg.pixels())
    train_tf, test_tf = transforms_for(cfg.preprocess, backbone)
    seed_everything(cfg.seed or 0)  # the method's initial values (random contexts) follow the seed
    method = build_method(cfg.method, cfg.method_options, backbone, splits.classnames, template=splits.template,
                          source_names=source_classnames(splits))
    # record what is actually used (e.g. the number of context vectors a word init gives)
    cfg = dataclasses.replace(cfg, method_options=method.config.to_dict())
    if cls.trains(method.config) and cfg.train is not None:
        distributed.check_supported(method, cfg.train, len(splits.train))
    adopted = None
    if not same_request and not force and directory.is_run_dir(run_dir):
        adopted = directory.adopt_earlier(run_dir, cfg)  # a run an earlier version wrote: it goes on as it was
        if adopted is not None:
            held_splits = load_split(split_file)
            if list(held_splits.classnames) != list(splits.classnames):
                adopted = None
            else:
                log.info("%s: a run written by an earlier version (data.sampler=%s); continuing it on its own "
                         "split.json", run_dir, adopted.data.sampler)
                cfg, splits, skipped = adopted, held_splits, {}
    identity = cfg.identity()
    state = directory.inspect(run_dir, config_hash(identity), resume=resume, force=force,
                              adopted=adopted is not None)
    distributed.barrier()  # every rank has read the directory as it was; rank 0 may now write it
    if state.action == "done":
        log.info("%s is already finished (pass --force to run it again)", run_dir)
        return json.loads((run_dir / "results.json").read_text())
    with run_directory(run_dir, cfg, identity, request_hash=request_hash, splits=splits, action=state.action,
                       main=main):
        for name, n in skipped.items():
            log.warning("%s split: %d unreadable image(s) skipped (--skip-bad-images)", name, n)
        warnings = data_warnings(splits)  # in log.txt, now that it is attached
        log_pixel_statistics(backbone, cfg.preprocess)
        results = _execute(cfg, run_dir, method, backbone, splits, train_tf, test_tf, state.action == "resume",
                           progress, t_start)
        results["skipped_images"] = skipped
        results["warnings"] = warnings
        return finish_run(run_dir, cfg, identity, results, main=main)


@contextlib.contextmanager
def run_directory(run_dir: Path, cfg: RunConfig, identity: dict, *, request_hash: str, splits: DatasetSplits,
                  action: str, main: bool = True, **marker):
    """The run directory while a run writes it (every writer of runs goes through here: ``run``, ``import``):
    ``action`` from :func:`directory.inspect` (``replace`` clears it, ``restart`` drops the unfinished run's
    records, ``resume`` keeps its split.json), then run.json (running), config.yaml and split.json are written
    (by rank 0 under torchrun) and log.txt attached; a failure marks run.json failed, with the error."""
    if main:
        if action == "replace":
            log.info("%s: replacing the run it held", run_dir)
            directory.clear(run_dir)
        elif action == "restart":
            for name in ("metrics.jsonl", "results.json", "best.safetensors"):
                (run_dir / name).unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        directory.write_marker(run_dir, status="running", request_hash=request_hash,
                               config_hash=config_hash(identity), method=cfg.method, **marker)
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
        split_file = run_dir / "split.json"
        if not split_file.is_file() or action != "resume":
            save_split(splits, split_file)
    distributed.barrier()  # the run directory is ready
    handler = attach_log_file(run_dir) if main else None
    try:
        yield
    except BaseException as e:
        if main:
            directory.write_marker(run_dir, status="failed", error=f"{type(e).__name__}: {e}"[:500])
        raise
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


def finish_run(run_dir: Path, cfg: RunConfig, identity: dict, results: dict, *, main: bool = True) -> dict:
    """Close a run: its results carry the configuration, its identity and hash; results.json is written and
    run.json says done."""
    results["config"] = cfg.to_dict()
    results["identity"] = identity
    results["config_hash"] = config_hash(identity)
    if main:
        atomic_write_json(run_dir / "results.json", results)
        directory.write_marker(run_dir, status="done")
    metrics = results["metrics"]
    log.info("test: %s", ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float)))
    return results


def _execute(cfg: RunConfig, run_dir: Path, method: Method, backbone: Backbone, splits: DatasetSplits, train_tf,
             test_tf, resume: bool, progress: bool, t_start: float) -> dict:
    """The method's lifecycle (:class:`Method`): setup from the training data, training when it trains, the
    after-training hook on the validation split, the learned tensors saved, the test evaluation, the artefacts."""
    log.info("%s on %s: %d classes, %d train / %d val / %d test images", cfg.method, splits.name,
             splits.num_classes, len(splits.train), len(splits.val), len(splits.test))
    described = method.describe()
    for k, v in described.items():
        log.info("%s: %s = %s", cfg.method, k, v)
    cls = type(method)
    cache = FeatureCache(cfg.cache_dir, progress=progress)
    if distributed.active():  # each rank encodes its share of the images
        cache = distributed.RankSharedCache(cache)
    transforms = (train_tf, test_tf)
    timings: dict = {}
    results: dict = {}
    train_data = val_data = None
    if cls.needs_training_data(method.config):
        workers = cfg.train.batch_workers if cfg.train is not None else 0
        train_data = split_data(method, cfg.train, backbone, splits.train, transforms, cache, workers=workers)
        val_data = split_data(method, cfg.train, backbone, splits.val, transforms, cache,
                              workers=workers) if splits.val else None
    if cls.setup_reads:
        t0 = time.perf_counter()
        results["setup"] = method.setup(train_data, val_data) or {}
        timings["setup_s"] = time.perf_counter() - t0
    if cls.trains(method.config) and cfg.train is not None:
        state, selected = _train(cfg, run_dir, method, backbone, splits, cache, transforms, resume, progress,
                                 timings)
        results["train"] = {"final_loss": state.history[-1]["loss"] if state.history else None,
                            "final_train_accuracy": state.history[-1]["train_accuracy"] if state.history else None,
                            "steps": state.step, "skipped_steps": state.skipped_steps}
        results["epochs"] = cfg.train.epochs
        if selected is not None:
            results["selected_epoch"] = selected
    t0 = time.perf_counter()
    after = method.after_training(val_data) or {}
    if after:
        results["after_training"] = after
        timings["after_training_s"] = time.perf_counter() - t0
    if distributed.is_main():
        save_method(run_dir, cfg, method, splits)
    t0 = time.perf_counter()
    metrics, test_logits = evaluate(method, backbone, splits.test, test_tf, cache, progress=progress)
    timings["eval_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    out = {"method": cfg.method, "dataset": cfg.data.dataset, "classes": cfg.data.classes,
           "num_classes": splits.num_classes, "backbone": cfg.backbone, "pretrained": cfg.pretrained,
           "shots": cfg.data.shots, "seed": cfg.seed, "metrics": metrics, **results, "method_info": described,
           "pixel_statistics": backbone.pixel_statistics, "timings": timings, "world_size": distributed.world_size()}
    if distributed.is_main():  # it writes files
        out.update(method.on_test_end(run_dir, test_logits, splits.test) or {})
    return out


def _train(cfg, run_dir, method, backbone, splits, cache, transforms, resume, progress, timings):
    tc = cfg.train
    t0 = time.perf_counter()
    source = train_source(method, tc, backbone, splits.train, transforms, cache)
    timings["features_s"] = time.perf_counter() - t0
    labels = torch.tensor([s.label for s in splits.train])
    targets = sample_targets(splits.train)
    if tc.eval_every and not splits.val:
        log.warning("--eval-every %d: %s has no val split; nothing is evaluated during training", tc.eval_every,
                    splits.name)
    callbacks = [MetricsJsonl(run_dir, resumed=resume)]
    if cfg.tensorboard:
        callbacks.append(TensorBoard(run_dir))
    best = BestEpoch(method, run_dir) if (splits.val and tc.eval_every and method.selection()) else None
    if best is not None:
        callbacks.append(best)
    callbacks.append(TrainingCurve(run_dir))
    trainer = Trainer(method, tc, run_dir, seed=cfg.seed, config_hash=cfg.identity_hash(), progress=progress,
                      callbacks=callbacks)
    if resume:
        trainer.resume()
    _, test_tf = transforms

    def val_metrics():
        return evaluate(method, backbone, splits.val, test_tf, cache)[0] if splits.val else {}

    t0 = time.perf_counter()
    trainer.fit(source, labels, targets, evaluate=val_metrics)
    timings["train_s"] = time.perf_counter() - t0
    return trainer.state, (best.selected if best is not None else None)


# -- after a run ------------------------------------------------------------------------------------
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
              "eval_data": data.to_dict()}
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
    (:func:`vlprompt.report.base_to_new_problem`)."""
    from ..report import base_to_new_problem, run_identity

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


# -- heads ------------------------------------------------------------------------------------------
def export_run(run_dir: str | Path, output: Optional[str | Path] = None, device: Optional[str] = "cpu") -> Path:
    """Write a deployable head: ``head.safetensors`` + ``head.json`` (``kind`` from the method: ``linear``
    class text features, ``affine`` weight and bias, ``prompt`` the learned tensors, or the method's own)."""
    run_dir = Path(run_dir)
    out = Path(output) if output else run_dir / "export"
    method, meta, backbone = load_method(run_dir, device=device)
    head = method.export_head()
    if head is None:
        tensors, info = method.learned_state(), {"kind": "prompt"}
    else:
        tensors, info = head
    info = {**info, "method": meta["method"], "config": meta["config"], "classnames": list(method.classnames),
            "template": meta.get("template"), "backbone": meta["backbone"], "pretrained": meta["pretrained"],
            "preprocess": meta.get("preprocess", "coop"), "image_size": backbone.image_size,
            "pixels": meta.get("pixels") or backbone.pixel_statistics, "source_run": str(run_dir), "vlprompt_head": 1}
    atomic_save_safetensors(out / "head.safetensors", {k: v.detach().cpu() for k, v in tensors.items()})
    atomic_write_json(out / "head.json", info)
    return out


def read_head(head_dir: str | Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    head_dir = Path(head_dir)
    try:
        info = json.loads((head_dir / "head.json").read_text())
        tensors = load_file(str(head_dir / "head.safetensors"))
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{head_dir}: not an exported head ({e}); create one with `vlprompt export RUN`") from e
    return info, tensors


def head_logits(info: dict, tensors: dict, backbone: Backbone, x: torch.Tensor, method: Optional[Method] = None):
    """Logits (B, K) of an exported head on preprocessed images (B, 3, H, W)."""
    kind = info["kind"]
    if kind == "linear":
        return cosine_logits(backbone.encode_image(x), tensors["text_features"].to(backbone.device),
                             float(info["logit_scale"])).cpu()
    if kind == "affine":
        feats = backbone.encode_image(x).float()
        return (feats @ tensors["weight"].to(feats.device).t() + tensors["bias"].to(feats.device)).cpu()
    if kind == "prompt":
        return method(features_of_images(method, backbone, x.to(backbone.device))).float().cpu()
    return method_class(info["method"]).head_logits(tensors, info, backbone, x).cpu()


def predict_images(head_dir: str | Path, images: Sequence[str], topk: int = 5, device: Optional[str] = None,
                   batch_size: int = 32) -> list[dict]:
    """Top-k classes of image files with an exported head (and a value, for heads that predict one)."""
    from ..data import load_image

    if topk < 1:
        raise ConfigError(f"--topk must be >= 1, got {topk}")
    info, tensors = read_head(head_dir)
    backbone = load_backbone(info["backbone"], info["pretrained"], device, pixels=recorded_pixels(info))
    _, tf = transforms_for(info.get("preprocess", "coop"), backbone)
    method = None
    if info["kind"] == "prompt":
        cls = method_class(info["method"])
        method = build_method(info["method"], cls.config_for_loading(dict(info["config"])), backbone,
                              info["classnames"], template=info.get("template"))
        method.load_learned_state({k: v.to(backbone.device) for k, v in tensors.items()})
        method.eval()
    cls = method_class(info["method"])
    classnames = info["classnames"]
    out = []
    for i in range(0, len(images), batch_size):
        paths = list(images[i:i + batch_size])
        x = torch.stack([tf(load_image(p)) for p in paths])
        with torch.no_grad():
            logits = head_logits(info, tensors, backbone, x, method)
        probs = logits.softmax(-1)
        k = min(topk, probs.shape[1])
        p, idx = probs.topk(k, dim=-1)
        values = cls.head_values(logits, tensors, info)
        for n, (path, pi, ii) in enumerate(zip(paths, p.tolist(), idx.tolist())):
            out.append({"image": path, "top": [{"class": classnames[j], "probability": q} for j, q in zip(ii, pi)]})
            if values is not None:
                out[-1]["value"] = float(values[n])
    return out


def interpret_run(run_dir: str | Path, topk: int = 5, device: Optional[str] = "cpu") -> list[dict]:
    """Nearest vocabulary words (Euclidean distance in the token-embedding space) to each learned vector the
    method declares (:meth:`Method.interpretable_vectors`), as in CoOp's paper."""
    method, meta, backbone = load_method(Path(run_dir), device=device)
    vectors = method.interpretable_vectors()
    if not vectors:
        raise VLPromptError(f"{meta['method']} has no learned vectors in the token-embedding space to interpret")
    table = backbone.text._parts["token_embedding"].weight.detach().float()
    decode = backbone.tokenizer.decode
    rows = []
    for label, vecs in vectors:
        vals, ids = torch.cdist(vecs.detach().float().reshape(-1, vecs.shape[-1]), table).topk(topk, largest=False)
        for pos, (dv, iv) in enumerate(zip(vals.tolist(), ids.tolist())):
            rows.append({**label, "position": pos, "words": [decode([t]).strip() for t in iv], "distances": dv})
    return rows


# -- the Python API ------------------------------------------------------------------------------------
def train(request: Optional[dict] = None, *, output: str | Path, resume: bool = False, force: bool = False,
          progress: bool = True, **fields) -> dict:
    """Run a method from a request: ``train({"method": "coop", "data": {"dataset": "dtd", "root": "~/data"}},
    output="runs/coop")``; keyword ``fields`` are top-level keys of the request (``method="coop"``,
    ``data={...}``, ``train={"epochs": 5}``...). The very same resolution as ``vlprompt train`` and
    ``--config``: the same request gives the same config.yaml."""
    from .config import merge_requests

    req = merge_requests(request or {}, fields)
    return run(resolve(req), output, resume=resume, force=force, progress=progress)


def show_config(request: dict) -> str:
    """The resolved configuration of a request, as config.yaml will hold it (before the method is built)."""
    return dump_config(resolve(request))


__all__ = ["run", "train", "resolve", "prepare_data", "evaluate", "evaluate_run", "base_to_new", "harmonic_mean",
           "export_run", "predict_images", "interpret_run", "load_method", "transforms_for", "request_of",
           "show_config"]
