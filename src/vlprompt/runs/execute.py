"""Running a resolved configuration: data + backbone + method + engine, wired together, in a run directory.

One path for every method and baseline (:func:`run`). Everything that can be refused -- the configuration,
the data (missing files, too few images for the shots), the weights, the method on these classes (a context
too long for a class name, a word init of another length) -- is checked BEFORE the run directory is touched;
then ``run.json`` + ``config.yaml`` + ``split.json`` are written, the method goes through its lifecycle
(:class:`vlprompt.methods.base.Method`: setup from the training data, training, after-training searches, the test
evaluation), and ``results.json`` closes the run. A run directory holds ``config.yaml``
(the resolved configuration), ``split.json`` (the exact samples used), ``log.txt``, ``prompt.safetensors`` +
``method.json`` (the learned tensors and what rebuilds the method on any class list), ``results.json`` (the
configuration, its identity and hash, the metrics), and for trained methods ``metrics.jsonl``,
``training_curve.png`` and ``checkpoints/``. Assembling the pieces is :mod:`.assembly`, evaluation
:mod:`.evaluate`, heads (export / predict / interpret) :mod:`.heads`.

Under torchrun every rank calls :func:`run` with the same arguments (``torchrun --nproc-per-node N -m vlprompt
train ...``): all ranks resolve and check the same things, rank 0 alone writes the run directory, the training
and the evaluations are split over the ranks (:mod:`vlprompt.engine.distributed`), and every rank returns rank
0's results.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch

from .._io import atomic_write_json, atomic_write_text
from ..backbone import Backbone, load_backbone
from ..backbone.cache import FeatureCache
from ..data import DatasetSplits, load_split, save_split, source_classnames
from ..engine import distributed
from ..engine.callbacks import BestEpoch, MetricsJsonl, TensorBoard, TrainingCurve
from ..engine.sources import sample_targets, split_data, train_source
from ..engine.trainer import Trainer, seed_everything
from ..errors import DataError, VLPromptError
from ..methods import Method, build_config, build_method, method_class
from . import directory
from .assembly import (data_warnings, log_pixel_statistics, needed_splits, prepare_data, save_method,
                       transforms_for)
from .config import RunConfig, config_hash, dump_config, request_of, resolve, with_built_options
from .evaluate import evaluate

log = logging.getLogger("vlprompt")


# -- logging ----------------------------------------------------------------------------------------
def attach_log_file(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "log.txt", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    return handler


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
    directory.refuse_foreign(run_dir)  # not a vlprompt run: refused, --force included
    directory.check_not_busy(run_dir)  # another process runs it: refused at once, naming it
    directory.check_writable(run_dir)

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
    train_tf, test_tf = transforms_for(cfg.preprocess, backbone, cfg.data.crop_scale)
    seed_everything(cfg.seed or 0)  # the method's initial values (random contexts) follow the seed
    method = build_method(cfg.method, cfg.method_options, backbone, splits.classnames, template=splits.template,
                          source_names=source_classnames(splits))
    # record what is actually used (e.g. the number of context vectors a word init gives)
    cfg = with_built_options(cfg, method)
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

    def inspect():
        return directory.inspect(run_dir, config_hash(identity), resume=resume, force=force,
                                 adopted=adopted is not None)

    state = inspect()  # the last refusals; nothing is written before them
    if state.action == "done":
        log.info("%s is already finished (pass --force to run it again)", run_dir)
        return json.loads((run_dir / "results.json").read_text())
    with lock_run_dir(run_dir, main):
        state = inspect()  # again under the lock: another process may have changed the directory meanwhile
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
def lock_run_dir(run_dir: Path, main: bool = True, flag: str = "--output"):
    """Hold the lock of ``run_dir`` (created if absent) while a run writes it: rank 0 takes it under torchrun, and
    every rank raises its refusal (another process runs the directory; it cannot be written: ``flag`` names the
    option in that message). Yields the lock (None on other ranks)."""
    from .lock import BusyError

    held, error = None, None
    if main:
        try:
            held = directory.lock(run_dir).acquire()
        except OSError as e:
            error = directory.cannot_write(run_dir, e, flag)
        except VLPromptError as e:
            error = e
    message = distributed.broadcast_object(None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:
        raise BusyError(message)
    try:
        yield held
    finally:
        if held is not None:
            held.release()


@contextlib.contextmanager
def run_directory(run_dir: Path, cfg: RunConfig, identity: dict, *, request_hash: str, splits: DatasetSplits,
                  action: str, main: bool = True, **marker):
    """The run directory while a run writes it (every writer of runs goes through here: ``run``, ``import``):
    the directory's lock is held throughout (:func:`lock_run_dir`; reentered when the caller holds it already),
    ``action`` from :func:`directory.inspect` (``replace`` clears it, ``restart`` drops the unfinished run's
    records, ``resume`` keeps its split.json), then run.json (running), config.yaml and split.json are written
    (by rank 0 under torchrun) and log.txt attached; a failure marks run.json failed, with the error."""
    with lock_run_dir(run_dir, main) as lock:
        if main:
            if action == "replace":
                log.info("%s: replacing the run it held", run_dir)
                directory.clear(run_dir)
            elif action == "restart":  # this run's own records of an attempt that left no checkpoint
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
        if lock is not None and lock.taken_over:
            from .lock import describe

            log.warning("%s: took over the lock of %s, which is no longer running", run_dir, describe(lock.taken_over))
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
           "pixel_statistics": backbone.pixel_statistics, "precision_used": backbone.precision_used,
           "timings": timings, "world_size": distributed.world_size()}
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


# -- the Python API ------------------------------------------------------------------------------------
def train(request: Optional[dict] = None, *, output: str | Path, resume: bool = False, force: bool = False,
          progress: bool = True, **fields) -> dict:
    """Run a method from a request: ``train({"method": "coop", "data": {"dataset": "dtd", "root": "~/data"}},
    output="runs/coop")``; keyword ``fields`` are top-level keys of the request (``method="coop"``,
    ``data={...}``, ``train={"epochs": 5}``...). The very same resolution as ``vlprompt train`` and
    ``--config``: the same request gives the same config.yaml. ``request`` may be a run's config.yaml (loaded):
    ``fields`` over it derive the recipe again, as flags over ``--config`` do."""
    from .config import merge_requests

    request = request or {}
    req = merge_requests(request_of(request) if "user_set" in request else request, fields)
    return run(resolve(req), output, resume=resume, force=force, progress=progress)


def show_config(request: dict) -> str:
    """The resolved configuration of a request, as config.yaml will hold it (before the method is built), each
    value followed by where it came from (the user, the method's recipe, the defaults)."""
    return dump_config(resolve(request), annotate=True)


__all__ = ["run", "train", "show_config", "run_directory", "finish_run", "lock_run_dir", "attach_log_file"]
